"""The Gluon bf16 grouped GEMM (ops/grouped_gemm_bf16_wgmma.py) against the Triton kernel and torch._grouped_mm.

    PYTHONPATH=. python bench/probe_bf16_wgmma.py [--check] [--out results.json] [--tokens 4096,8192,16384]
                                                  [--cfgs "STAGES=4" "STAGES=3" "GROUP_M=16"]

Mixtral-like shapes: 32 experts, top-2 routing drawn at random (balanced in expectation: each token's two experts
are the top-2 of uniform random scores), H = 7168, I = 2048; for T tokens the GEMMs see M = 2T expert-sorted rows:
  * gate_up: W13 [32, 2I = 4096, H = 7168] with the fused SwiGLU epilogue (out [M, I]);
  * down:    W2 [32, H = 7168, I = 2048] (out [M, H]).
Timed (triton.testing.do_bench, median, after a warm-up; eager launches, these kernels run for milliseconds):
  * ``gluon``: this kernel (``grouped_gemm_bf16_wgmma.launch``), for each ``--cfgs`` entry;
  * ``triton``: the shipped Triton kernel with its tuned config (``grouped_gemm._launch``, MOE_KERNELS_BF16_GLUON
    =0), SwiGLU fused as well;
  * ``torch``: torch._grouped_mm (CUTLASS) on the same rows: the GEMM alone (gate_up: h [M, 2I], the SwiGLU not
    included, which flatters it), and ``torch+swiglu`` with F.silu(h[:, :I]) * h[:, I:] after it.
TFLOP/s = 2 M N_w K / median time, N_w the W rows (4096 gate_up, 7168 down): useful work only (the rows of an
expert's last partial tile that the kernels compute and drop are not counted). ``--check`` first compares the
gluon and triton outputs with an fp32 reference (per-expert fp32 matmul of the same bf16 inputs) by relative
Frobenius error (<= 1e-2) and stops on a failure. Writes JSON (device, versions, date, command, rows, summary) to
``--out`` (default bench/results/bf16_wgmma_probe-<device>.json). Under 120 s on an H100 with the defaults.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, environment, markdown, write_json  # noqa: E402

E, H, I, TOPK = 32, 7168, 2048, 2
PROJ = {"gate_up": (2 * I, H, True), "down": (H, I, False)}  # name: (W rows, K, SwiGLU)


def routed_counts(T: int, seed: int = 0) -> list:
    """Rows per expert of T tokens routed top-2 by uniform random scores (balanced in expectation)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=g).topk(TOPK, dim=1).indices
    return torch.bincount(idx.flatten(), minlength=E).tolist()


def offsets_of(counts) -> torch.Tensor:
    o = torch.zeros(len(counts) + 1, dtype=torch.int32)
    o[1:] = torch.cumsum(torch.tensor(counts), 0)
    return o.cuda()


def reference(a, w, offsets, swiglu):
    """fp32 per-expert A_e W_e^T (SwiGLU: silu(gate) * up)."""
    o = offsets.tolist()
    n = w.shape[1] // 2 if swiglu else w.shape[1]
    out = torch.empty(a.shape[0], n, dtype=torch.float32, device=a.device)
    for e, (lo, hi) in enumerate(zip(o, o[1:])):
        h = a[lo:hi].float() @ w[e].float().t()
        out[lo:hi] = F.silu(h[:, :n]) * h[:, n:] if swiglu else h
    return out


def rel_err(x, ref) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def parse_cfg(text: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)} if text else {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,8192,16384")
    ap.add_argument("--cfgs", nargs="*", default=[""], help='gluon configs, e.g. "STAGES=3,GROUP_M=16" ("": default)')
    ap.add_argument("--check", action="store_true", help="verify against the fp32 reference first")
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/bf16_wgmma_probe-<device>.json)")
    args = ap.parse_args()
    os.environ["MOE_KERNELS_BF16_GLUON"] = "0"  # grouped_gemm._launch: the Triton kernel

    from moe_kernels.ops import grouped_gemm as gg
    from moe_kernels.ops import grouped_gemm_bf16_wgmma as gb

    t_start = time.time()
    torch.manual_seed(0)
    weights = {name: (torch.randn(E, n, k, device="cuda") * k**-0.5).bfloat16() for name, (n, k, _) in PROJ.items()}
    rows, checks = [], []
    for T in (int(t) for t in args.tokens.split(",")):
        counts = routed_counts(T)
        offsets = offsets_of(counts)
        M = sum(counts)
        ends = offsets[1:].contiguous()
        for name, (n_w, K, swiglu) in PROJ.items():
            w = weights[name]
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            n_out = n_w // 2 if swiglu else n_w
            out_g = torch.empty(M, n_out, device="cuda", dtype=torch.bfloat16)
            out_t = torch.empty_like(out_g)
            wt = w.transpose(-2, -1)
            gluon = {c: (lambda c=c: gb.launch(a, w, out_g, offsets, swiglu=swiglu, cfg=parse_cfg(c)))
                     for c in args.cfgs}
            triton_fn = lambda: gg._launch(a, None, w, None, out_t, offsets=offsets, swiglu=swiglu)  # noqa: E731
            torch_fn = lambda: torch._grouped_mm(a, wt, offs=ends, out_dtype=torch.bfloat16)  # noqa: E731

            def torch_swiglu():
                h = torch_fn()
                return F.silu(h[:, :n_out]) * h[:, n_out:]

            if args.check:
                ref = reference(a, w, offsets, swiglu)
                for c, fn in gluon.items():
                    out_g.fill_(float("nan"))
                    fn()
                    err = rel_err(out_g, ref)
                    checks.append(dict(T=T, proj=name, impl=f"gluon[{c}]", rel_err=err))
                    print(f"check T={T} {name} gluon[{c}]: rel err {err:.2e}", flush=True)
                    if not err <= 1e-2:
                        raise SystemExit(f"gluon[{c}] wrong at T={T} {name}: rel err {err}")
                triton_fn()
                checks.append(dict(T=T, proj=name, impl="triton", rel_err=rel_err(out_t, ref)))
                del ref
            flops = 2.0 * M * n_w * K
            row = dict(T=T, M=M, proj=name, N_w=n_w, K=K, swiglu=swiglu, max_rows=max(counts), min_rows=min(counts))
            for c, fn in gluon.items():
                ms = bench_ms(fn, rep=args.rep)
                row[f"gluon[{c}] ms"] = ms
                row[f"gluon[{c}] TFLOP/s"] = flops / ms / 1e9
            row["triton ms"] = bench_ms(triton_fn, rep=args.rep)
            row["torch ms"] = bench_ms(torch_fn, rep=args.rep)
            if swiglu:
                row["torch+swiglu ms"] = bench_ms(torch_swiglu, rep=args.rep)
            for impl in ("triton", "torch"):
                row[f"{impl} TFLOP/s"] = flops / row[f"{impl} ms"] / 1e9
            best = min(row[f"gluon[{c}] ms"] for c in args.cfgs)
            row["gluon TFLOP/s"] = flops / best / 1e9
            row["gluon vs triton"] = row["triton ms"] / best
            row["gluon vs torch"] = row["torch ms"] / best
            if swiglu:
                row["gluon vs torch+swiglu"] = row["torch+swiglu ms"] / best
            rows.append(row)
            print(markdown([row], COLS, FORMATS).splitlines()[-1], flush=True)
            del a, out_g, out_t
            torch.cuda.empty_cache()

    print()
    print(markdown(rows, COLS, FORMATS))
    summary = dict(
        gluon_tflops_min=min(r["gluon TFLOP/s"] for r in rows),
        gluon_tflops_T8192={r["proj"]: r["gluon TFLOP/s"] for r in rows if r["T"] == 8192},
        gluon_vs_triton_min=min(r["gluon vs triton"] for r in rows),
        gluon_vs_torch_min=min(r["gluon vs torch"] for r in rows),
        seconds=time.time() - t_start)
    print(json.dumps(summary, indent=1))
    payload = dict(summary=summary, rows=rows, checks=checks, cfgs=args.cfgs,
                   shapes=dict(E=E, H=H, I=I, topk=TOPK), stages=gb.plan(2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), **payload}, f, indent=1)
        print(f"wrote {args.out}")
    else:
        write_json("bf16_wgmma_probe", payload)


COLS = ["T", "proj", "M", "gluon TFLOP/s", "triton TFLOP/s", "torch TFLOP/s", "gluon vs triton", "gluon vs torch"]
FORMATS = {"gluon TFLOP/s": ".0f", "triton TFLOP/s": ".0f", "torch TFLOP/s": ".0f", "gluon vs triton": ".2f",
           "gluon vs torch": ".2f"}

if __name__ == "__main__":
    main()
