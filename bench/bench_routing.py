"""Routing + permutation benchmark: mk.ops.route / permute / unpermute against the torch composition.

    python bench/bench_routing.py            # H=7168, E=256, T in {512, 4096, 16384}, k in {2, 8}, both scorings
    python bench/bench_routing.py --quick    # T=4096 only
    python bench/bench_routing.py --sweep    # also time route / row-kernel block configs (for the config table)
    python bench/bench_routing.py --cudagraph  # GPU time: CUDA-graph replays, no host launch overhead
    python bench/bench_routing.py --smoke    # tiny sizes; runs on a CPU through TRITON_INTERPRET=1

Baseline (same run, same inputs): F.linear in bf16 (fp32 accumulation), softmax or sigmoid (+ bias, group-limited
top-2 group ranking), torch.topk, gather + renormalise, counts by scatter_add_; permute by a stable argsort,
index_select and an inverse scatter; unpermute by index_add_ of the weighted rows in fp32. Times are medians of
triton.testing.do_bench (warm-up included, L2 flushed between calls). Value checks (host syncs) are off, as under
torch.compile / CUDA graphs. GB/s count the fewest bytes an op must move (x read once, rows written once, weights
read once); "% copy" compares that with a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the smoke run: Triton kernels through the interpreter
os.environ["MOE_KERNELS_VALUE_CHECKS"] = "0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

import moe_kernels as mk  # noqa: E402
from _common import bench_ms, copy_bandwidth, gbps, markdown, write_json  # noqa: E402

SCORINGS = {
    "softmax": dict(scoring="softmax", n_group=1, topk_group=1, routed_scaling_factor=1.0),
    "deepseek": dict(scoring="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5),
}


# ---- the torch composition -------------------------------------------------------------------------------------
def torch_route(x, w, k, scoring, n_group, topk_group, routed_scaling_factor, bias=None):
    T, E = x.shape[0], w.shape[0]
    logits = F.linear(x, w).float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        group_scores = choice.view(T, n_group, -1).topk(2, dim=-1).values.sum(-1)
        group_idx = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        choice = choice.masked_fill(group_mask.repeat_interleave(E // n_group, 1) == 0, float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * routed_scaling_factor
    flat = ids.view(-1)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    return weights, ids, counts


def torch_permute(x, ids, num_experts):
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token_index = order // ids.shape[1]
    rows = x.index_select(0, token_index)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel(), device=x.device)
    return rows, offsets, token_index, slot, order


def torch_unpermute(y, token_index, order, weights, T):
    w = weights.reshape(-1).index_select(0, order)
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, token_index, y.float() * w[:, None]).to(y.dtype)


# ---- bytes each op must move -----------------------------------------------------------------------------------
def route_bytes(T, H, E, k, es):
    return T * H * es + E * H * es + T * k * 8 + E * 4


def permute_bytes(T, H, k, es, fp8=False):
    index = T * k * 4 * 3  # ids read, token_index and slot written
    rows = T * k * (H + H // 128 * 4) if fp8 else T * k * H * es
    return T * H * es + rows + index


def unpermute_bytes(T, H, k, es):
    return T * k * H * es + T * k * 8 + T * H * es


# ---- runs ------------------------------------------------------------------------------------------------------
def bench_shape(T, H, E, k, name, device, copy_gbps, cudagraph=False):
    cfg = SCORINGS[name]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, H, device=device, generator=gen).bfloat16()
    w = (torch.randn(E, H, device=device, generator=gen) * H**-0.5).bfloat16()
    bias = 0.01 * torch.randn(E, device=device, generator=gen) if name == "deepseek" else None
    es = x.element_size()

    route = lambda: mk.ops.route(x, w, k, bias=bias, **cfg)  # noqa: E731
    base_route = lambda: torch_route(x, w, k, bias=bias, **cfg)  # noqa: E731
    weights, ids, _ = route()
    perm = lambda: mk.ops.permute(x, ids, E)  # noqa: E731
    perm8 = lambda: mk.ops.permute(x, ids, E, fp8=True)  # noqa: E731
    base_perm = lambda: torch_permute(x, ids, E)  # noqa: E731
    p = perm()
    rows, _, token_index, _, order = base_perm()
    assert torch.equal(p.x, rows) and torch.equal(p.token_index.long(), token_index), "permute != torch composition"

    def ours_both():
        wts, i, _ = mk.ops.route(x, w, k, bias=bias, **cfg)
        return mk.ops.permute(x, i, E)

    def base_both():
        wts, i, _ = torch_route(x, w, k, bias=bias, **cfg)
        return torch_permute(x, i, E)

    y = p.x
    unperm = lambda: mk.ops.unpermute(y, p, weights)  # noqa: E731
    base_unperm = lambda: torch_unpermute(y, token_index, order, weights, T)  # noqa: E731
    ref = base_unperm().float()
    err = ((unperm().float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"unpermute differs from the torch composition: {err:.2e}"

    fns = [("route", route), ("route_torch", base_route), ("permute", perm), ("permute_fp8", perm8),
           ("permute_torch", base_perm), ("both", ours_both), ("both_torch", base_both), ("unpermute", unperm),
           ("unpermute_torch", base_unperm)]
    t = {n: bench_ms(f, cudagraph=cudagraph) for n, f in fns}
    rb, pb, p8b = route_bytes(T, H, E, k, es), permute_bytes(T, H, k, es), permute_bytes(T, H, k, es, True)
    ub = unpermute_bytes(T, H, k, es)
    bothb = T * H * es + E * H * es + T * k * H * es + T * k * 8  # x once, W once, rows written once, weights
    row = {
        "scoring": name, "k": k, "T": T,
        "route_us": 1e3 * t["route"], "route_torch_us": 1e3 * t["route_torch"],
        "route_speedup": t["route_torch"] / t["route"], "route_gbps": gbps(rb, t["route"]),
        "route_pct_copy": 100 * gbps(rb, t["route"]) / copy_gbps,
        "permute_us": 1e3 * t["permute"], "permute_gbps": gbps(pb, t["permute"]),
        "permute_pct_copy": 100 * gbps(pb, t["permute"]) / copy_gbps,
        "permute_torch_us": 1e3 * t["permute_torch"], "permute_speedup": t["permute_torch"] / t["permute"],
        "permute_fp8_us": 1e3 * t["permute_fp8"], "permute_fp8_gbps": gbps(p8b, t["permute_fp8"]),
        "permute_fp8_pct_copy": 100 * gbps(p8b, t["permute_fp8"]) / copy_gbps,
        "fp8_vs_bf16": t["permute"] / t["permute_fp8"],
        "route_permute_us": 1e3 * t["both"], "composition_us": 1e3 * t["both_torch"],
        "route_permute_speedup": t["both_torch"] / t["both"],
        "route_permute_pct_copy": 100 * gbps(bothb, t["both"]) / copy_gbps,
        "unpermute_us": 1e3 * t["unpermute"], "unpermute_gbps": gbps(ub, t["unpermute"]),
        "unpermute_pct_copy": 100 * gbps(ub, t["unpermute"]) / copy_gbps,
        "unpermute_torch_us": 1e3 * t["unpermute_torch"], "unpermute_speedup": t["unpermute_torch"] / t["unpermute"],
    }
    return row


def sweep(Ts, H, E, device):
    """Route kernel block configs and row-kernel (BLOCK_H, num_warps) for the config tables."""
    import importlib

    routing = importlib.import_module("moe_kernels.ops.routing")
    permute = importlib.import_module("moe_kernels.ops.permute")
    out = []
    gen = torch.Generator(device=device).manual_seed(1)
    w = (torch.randn(E, H, device=device, generator=gen) * H**-0.5).bfloat16()
    bias = 0.01 * torch.randn(E, device=device, generator=gen)
    configs = [(16, 128, 4, 4, 1), (16, 64, 4, 4, 1), (32, 128, 4, 3, 1), (64, 64, 8, 4, 1), (64, 64, 8, 3, 1),
               (64, 128, 8, 3, 1), (64, 64, 16, 4, 1), (64, 64, 4, 4, 1), (128, 64, 16, 3, 1),
               # SPLIT_K: programs sharing a token tile, each over a slice of H (more programs than tiles)
               (64, 64, 8, 4, 2), (64, 64, 16, 4, 2), (64, 64, 8, 4, 4), (32, 128, 4, 3, 2)]
    variants = [("deepseek", 8, True), ("softmax", 2, False)]
    for T in Ts:
        x = torch.randn(T, H, device=device, generator=gen).bfloat16()
        for name, k, use_bias in variants:
            c = SCORINGS[name]
            # up to 1024 tokens: the decode sizes' tiles split to about one wave (routing._fill_split, the untuned
            # tables' rule there), and 16 slices
            fill = [(16, 64, 4, 3, routing._fill_split(T, 16)), (16, 64, 4, 3, 16)] if T <= 1024 else []
            for bm, bk, nw, ns, split in configs + list(dict.fromkeys(fill)):
                if (T <= 1024) != (bm <= 32) and bm != 64:
                    continue  # small tiles for small T, large tiles for large T; 64 everywhere
                cfg = dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=nw, num_stages=ns, SPLIT_K=split)
                args = (x, w, k, c["scoring"], c["n_group"], c["topk_group"], True, c["routed_scaling_factor"],
                        bias if use_bias else None, None)
                try:
                    ms = bench_ms(lambda: routing._route_triton(*args, config=cfg))
                    out.append({"kernel": "route", "scoring": name, "k": k, "T": T, **cfg, "us": 1e3 * ms,
                                "gbps": gbps(route_bytes(T, H, E, k, 2), ms)})
                except Exception as e:  # out of shared memory / registers: record and go on
                    out.append({"kernel": "route", "scoring": name, "k": k, "T": T, **cfg, "error": str(e)[:200]})
        for k in (2, 8):
            if T < 4096 and len(Ts) > 1:
                continue  # the row kernels are tuned where they matter
            ids = torch.rand(T, E, device=device, generator=gen).argsort(1)[:, :k].int()
            p = mk.ops.permute(x, ids, E)
            wts = torch.rand(T, k, device=device)
            for block_h, nw in [(512, 4), (1024, 4), (1024, 8), (2048, 8), (2048, 4)]:
                for fp8 in (False, True):
                    ms = bench_ms(lambda: permute._permute_triton(x, ids, E, fp8, block_h=block_h, num_warps=nw))
                    out.append({"kernel": "permute_fp8" if fp8 else "permute", "k": k, "T": T, "BLOCK_H": block_h,
                                "num_warps": nw, "us": 1e3 * ms, "gbps": gbps(permute_bytes(T, H, k, 2, fp8), ms)})
                ms = bench_ms(lambda: permute._unpermute_triton(p.x, p.slot, wts, block_h=block_h, num_warps=nw))
                out.append({"kernel": "unpermute", "k": k, "T": T, "BLOCK_H": block_h, "num_warps": nw,
                            "us": 1e3 * ms, "gbps": gbps(unpermute_bytes(T, H, k, 2), ms)})
        del x
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=4096 only")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU / interpreter sanity run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel block configs")
    ap.add_argument("--cudagraph", action="store_true",
                    help="time CUDA-graph replays (GPU time without host launch overhead) instead of eager calls")
    ap.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    ap.add_argument("--no-json", action="store_true")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        H, E, Ts, ks = 256, 16, [48], [2, 8]
    else:
        H, E, ks = 7168, 256, [2, 8]
        Ts = [4096] if args.quick else [512, 4096, 16384]
    copy = copy_bandwidth()
    print(f"device-to-device copy: {copy['gbps']:.0f} GB/s (read + written, {copy['bytes'] / 2**20:.0f} MiB)")

    rows = []
    for name in SCORINGS:
        for k in ks:
            for T in Ts:
                rows.append(bench_shape(T, H, E, k, name, device, copy["gbps"], args.cudagraph and device == "cuda"))
                r = rows[-1]
                print(f"{name:8s} k={k} T={T:6d}: route {r['route_us']:8.1f} us ({r['route_speedup']:.2f}x torch) | "
                      f"permute {r['permute_us']:8.1f} us {r['permute_pct_copy']:3.0f}% copy | fp8 "
                      f"{r['fp8_vs_bf16']:.2f}x | route+permute {r['route_permute_speedup']:.2f}x | unpermute "
                      f"{r['unpermute_pct_copy']:3.0f}% copy", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()

    cols = ["scoring", "k", "T", "route_us", "route_speedup", "route_pct_copy", "route_permute_us", "composition_us",
            "route_permute_speedup", "permute_us", "permute_pct_copy", "permute_fp8_us", "fp8_vs_bf16",
            "unpermute_us", "unpermute_pct_copy", "unpermute_speedup"]
    fmt = {c: ".1f" for c in cols if c.endswith("_us") or c.endswith("pct_copy")}
    fmt.update({c: ".2f" for c in cols if c.endswith("speedup") or c == "fp8_vs_bf16"})
    print()
    print(markdown(rows, cols, fmt))

    big = [r for r in rows if r["T"] >= 4096] or rows
    targets = {
        "route+permute >= 3x composition (T >= 4096)": min(r["route_permute_speedup"] for r in big) >= 3,
        "permute >= 80% of copy (T >= 4096)": min(r["permute_pct_copy"] for r in big) >= 80,
        "unpermute >= 80% of copy (T >= 4096)": min(r["unpermute_pct_copy"] for r in big) >= 80,
        "fp8 permute >= 1.6x bf16 (T >= 4096)": min(r["fp8_vs_bf16"] for r in big) >= 1.6,
    }
    print()
    for what, met in targets.items():
        print(f"{'met    ' if met else 'NOT met'}  {what}")
    payload = {"shape": {"H": H, "E": E, "T": Ts, "k": ks}, "timing": "cudagraph" if args.cudagraph else "eager",
               "copy": copy, "targets": targets, "rows": rows}
    result_name = "routing" + ("-smoke" if args.smoke else "") + ("-cudagraph" if args.cudagraph else "")
    if not args.no_json:
        write_json(result_name, payload, args.results_dir)  # again after the sweep: a cut-off run keeps the table
    if args.sweep:
        payload["sweep"] = sweep(Ts, H, E, device)
        print()
        print(markdown(payload["sweep"], ["kernel", "scoring", "k", "T", "BLOCK_M", "BLOCK_K", "SPLIT_K", "BLOCK_H",
                                          "num_warps", "num_stages", "us", "gbps", "error"],
                       {"us": ".1f", "gbps": ".0f"}))
        if not args.no_json:
            write_json(result_name, payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
