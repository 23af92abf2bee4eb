"""Probe the router kernel's block configs at decode sizes (GPU): DeepSeek-V3 routing (E 256, top-8, groups 8/4,
sigmoid with bias, H 7168) at T = 1 and 8, the gate in the dtype the patched model's layer keeps (printed) and in
the other one; 16-row tl.dot tiles and (T <= 8) the GEMV path; each config timed by CUDA-graph replays, beside the
shipped default. Prints a table and the fastest config per (gate dtype, T); writes
``bench/results/route_probe-<gpu>.json``.

    python bench/probe_route.py [--tokens 1,8] [--splits 16,32] [--gates bfloat16,float32] [--rep 50]
    python bench/probe_route.py --tokens 1 --gemv '2,16,32;4,256,28,8'  # named GEMV configs only (E_SPLIT last)
    python bench/probe_route.py --case mixtral --tokens 128,256 --splits 1 \
        --extra '[{"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}]'  # + named tl.dot configs

``--case``: deepseek (above), mixtral (E 8, top-2, softmax), qwen3 (E 128, top-8, softmax); H 7168 each.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import save  # noqa: E402

from moe_kernels.ops import routing  # noqa: E402

E, TOP_K, N_GROUP, TOPK_GROUP, H, SCALING = 256, 8, 8, 4, 7168, 2.5
SCORING, BIAS = "sigmoid", True
CASES = {  # E, top-k, groups, groups kept, scoring, bias, scaling
    "deepseek": (256, 8, 8, 4, "sigmoid", True, 2.5),
    "mixtral": (8, 2, 1, 1, "softmax", False, 1.0),
    "qwen3": (128, 8, 1, 1, "softmax", False, 1.0),
}


def layer_gate_dtype() -> str:
    """The dtype of the gate weight in ``MoELayer.from_hf`` of the decode benchmark's DeepSeek block."""
    try:
        import moe_kernels as mk
        from bench_moe_decode import hf_block

        layer = mk.MoELayer.from_hf(hf_block("deepseek", 512, 256, device="cpu"), precision="bf16")
        return str(layer.gate.weight.dtype).replace("torch.", "")
    except Exception as exc:  # the probe still times both dtypes
        return f"unknown ({type(exc).__name__}: {exc})"


def time_route(x, w, bias, cfg, rep):
    def fn():
        return routing._route_triton(x, w, TOP_K, SCORING, N_GROUP, TOPK_GROUP, True, SCALING, bias, None, config=cfg)
    want = fn()
    return triton.testing.do_bench_cudagraph(fn, rep=rep) * 1e3, want


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--splits", default="16,32")
    ap.add_argument("--gates", default="bfloat16", help="gate dtypes: bfloat16 (the decode bench layer's on the "
                    "device's transformers), float32")
    ap.add_argument("--gemv", default="", help="only these GEMV configs: 'warps,BLOCK_K,SPLIT_K[,E_SPLIT];...'")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--rep", type=int, default=50, help="ms of graph replays per config")
    ap.add_argument("--case", default="deepseek", choices=sorted(CASES))
    ap.add_argument("--extra", default="", help="a JSON list of configs timed too (e.g. a former default)")
    args = ap.parse_args()
    global E, TOP_K, N_GROUP, TOPK_GROUP, SCORING, BIAS, SCALING
    E, TOP_K, N_GROUP, TOPK_GROUP, SCORING, BIAS, SCALING = CASES[args.case]
    torch.manual_seed(0)
    gate = layer_gate_dtype()
    print(f"decode bench layer's gate dtype: {gate}")
    rows = []
    gates = [getattr(torch, g) for g in args.gates.split(",")]
    for dt, T in itertools.product(gates, [int(t) for t in args.tokens.split(",")]):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(E, H, device="cuda") * H ** -0.5).to(dt)
        bias = torch.randn(E, device="cuda") * 0.01 if BIAS else None
        fp32 = dt == torch.float32
        default = routing._config(T, E, H, fp32, heavy=TOP_K > 2 or N_GROUP > 1)
        t_def, (w_def, id_def, _) = time_route(x, w, bias, None, args.rep)
        rows.append(dict(gate=str(dt).replace("torch.", ""), T=T, config="default " + json.dumps(default), us=t_def))
        print(f"gate {rows[-1]['gate']} T={T} default {default}: {t_def:.1f} us", flush=True)
        cfgs = [dict(c) for c in json.loads(args.extra)] if args.extra else []
        if args.gemv and T < 16:  # named GEMV configs only: warps,BLOCK_K,SPLIT_K[,E_SPLIT]
            for spec in args.gemv.split(";"):
                warps, bk, split, *e_split = map(int, spec.split(","))
                cfgs.append(dict(BLOCK_M=triton.next_power_of_2(T), BLOCK_K=bk, num_warps=warps, num_stages=3,
                                 SPLIT_K=split, E_SPLIT=e_split[0] if e_split else 1))
        for split, warps in itertools.product(map(int, args.splits.split(",")), map(int, args.warps.split(","))):
            if args.gemv:
                break
            for bk in (32, 64) if fp32 else (64, 128):  # tl.dot on 16-row tiles
                cfgs.append(dict(BLOCK_M=16, BLOCK_K=bk, num_warps=warps, num_stages=2 if fp32 else 3, SPLIT_K=split))
            if T <= 8:  # the GEMV path (BLOCK_M < 16)
                m = triton.next_power_of_2(T)
                for bk in (16, 32, 64):
                    if m * E * bk <= 32768:
                        cfgs.append(dict(BLOCK_M=m, BLOCK_K=bk, num_warps=warps, num_stages=3, SPLIT_K=split))
        for cfg in cfgs:
            routing.cap_split(cfg, H, min_steps=1 if cfg["BLOCK_M"] < 16 else 2)
            try:
                us, (wt, ids, _) = time_route(x, w, bias, cfg, args.rep)
            except Exception as exc:  # out of resources: a config this GPU cannot run
                print(f"  {cfg}: failed ({type(exc).__name__})")
                continue
            same = bool(torch.equal(ids, id_def))
            rows.append(dict(gate=rows[-1]["gate"], T=T, config=json.dumps(cfg), us=us, same_ids=same))
            print(f"  {cfg}: {us:.1f} us{'' if same else '  (ids differ from the default)'}", flush=True)
    best = {}
    for r in rows:
        key = f"{r['gate']}/T={r['T']}"
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    default = {f"{r['gate']}/T={r['T']}": r["us"] for r in rows if r["config"].startswith("default")}
    summary = {"case": args.case, "layer_gate_dtype": gate,
               "best": {k: dict(config=v["config"], us=v["us"], default_us=default[k]) for k, v in best.items()}}
    print(json.dumps(summary, indent=1))
    save("route_probe" if args.case == "deepseek" else f"route_probe-{args.case}", rows, summary)

if __name__ == "__main__":
    main()
