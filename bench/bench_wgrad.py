"""The MoE weight gradient dW[e] = dY_e^T X_e (``ops.grouped_wgrad``): the Triton kernel, the Gluon wgmma kernel
(MOE_KERNELS_WGRAD=gluon) and torch (``torch._grouped_mm`` in its K-grouped 2d x 2d form, else a loop of mm).

    python bench/bench_wgrad.py            # every case below
    python bench/bench_wgrad.py --quick    # the issue-20 pair only (16384 rows, 32 experts, uniform)
    python bench/bench_wgrad.py --smoke    # tiny shapes, nothing saved (on a CPU: the interpreter, plumbing only)

Cases: 16384 rows (8192 tokens x top-2) over 32 experts, uniform and skewed (Zipf-like, s = 1.2, two experts
empty), at the two wgrads of an expert MLP with H = 7168, I = 2048: dW13 (N = 2I = 4096, K = H = 7168) and dW2
(N = H = 7168, K = I = 2048); and 8192 rows over 256 experts (uniform, 32 rows each: the output writes dominate).
bf16 operands and output, fp32 accumulation; gluon: the Gluon kernel with its default stage ring (`default_stages`: 4 for
32-expert dW13, else 3); gluon_s4: with 4 stages (MOE_KERNELS_WGRAD_STAGES=4).
Times are do_bench medians (L2 flushed between runs); TFLOP/s counts
2 M N K. Each case checks the Gluon result against torch's (relative Frobenius error, by expert chunks), and that
the Gluon kernel did run (no fallback). Results: bench/results/wgrad-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from _common import bench_ms, markdown, save  # noqa: E402

from moe_kernels import ops  # noqa: E402

CASES = [  # name, rows, experts, N, K, distribution
    ("dW13 32e uniform", 16384, 32, 4096, 7168, "uniform"),
    ("dW2 32e uniform", 16384, 32, 7168, 2048, "uniform"),
    ("dW13 32e skewed", 16384, 32, 4096, 7168, "skewed"),
    ("dW2 32e skewed", 16384, 32, 7168, 2048, "skewed"),
    ("dW13 256e uniform", 8192, 256, 4096, 7168, "uniform"),
    ("dW2 256e uniform", 8192, 256, 7168, 2048, "uniform"),
]


def counts_for(M: int, E: int, dist: str) -> list[int]:
    if dist == "uniform":
        base = [M // E] * E
        base[0] += M - sum(base)
        return base
    g = torch.Generator().manual_seed(0)
    w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    w[E // 3] = w[2 * E // 3] = 0.0  # two empty experts
    return torch.multinomial(w, M, replacement=True, generator=g).bincount(minlength=E).tolist()


def torch_wgrad():
    """(name, fn(dy, x, offsets, host_offsets) -> dW [E, N, K] bf16)."""
    def grouped(dy, x, offsets, host):
        return torch._grouped_mm(dy.t(), x, offs=offsets[1:])

    def loop(dy, x, offsets, host):
        return torch.stack([dy[lo:hi].t() @ x[lo:hi] for lo, hi in zip(host, host[1:])])

    return [("torch._grouped_mm", grouped), ("torch mm loop", loop)] if hasattr(torch, "_grouped_mm") else \
        [("torch mm loop", loop)]


def rel_err_chunked(a: torch.Tensor, b: torch.Tensor, chunk: int = 8) -> float:
    num = den = 0.0
    for i in range(0, a.shape[0], chunk):
        d = a[i:i + chunk].float() - b[i:i + chunk].float()
        num += float((d * d).sum())
        den += float((b[i:i + chunk].float() ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU run checks the plumbing only)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from moe_kernels.ops import grouped_wgrad_wgmma as gw

    launches = []
    real_launch = gw.launch
    gw.launch = lambda *a, **k: (launches.append(1), real_launch(*a, **k))[1]
    torch_impls = torch_wgrad()
    rows = []
    cases = CASES[:2] if args.quick else CASES
    if args.smoke:
        cases = [(n, M // 64, E // 8 if E > 32 else E // 4, N // 32, K // 32, d) for n, M, E, N, K, d in CASES]
    for name, M, E, N, K, dist in cases:
        counts = counts_for(M, E, dist)
        host = [0]
        for c in counts:
            host.append(host[-1] + c)
        offsets = torch.tensor(host, dtype=torch.int32, device=device)
        dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        flop = 2.0 * M * N * K
        row = dict(case=name, M=M, E=E, N=N, K=K, max_rows=max(counts), empty=sum(c == 0 for c in counts))

        ref = None  # torch first: the other two are compared with it and freed at once (dW can be 15 GB)
        for tname, fn in torch_impls:
            try:
                ref = fn(dy, x, offsets, host)
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a torch without the K-grouped form: the loop
                print(f"{name}: {tname} failed ({type(e).__name__}: {str(e)[:160]})")
                continue
            row["torch"] = tname
            row["torch_ms"] = bench_ms(lambda: fn(dy, x, offsets, host), rep=args.rep)
            break

        os.environ["MOE_KERNELS_WGRAD"] = "triton"
        out = ops.grouped_wgrad(dy, x, offsets, E)
        if ref is not None:
            row["triton_err"] = rel_err_chunked(out, ref)
        del out
        row["triton_ms"] = bench_ms(lambda: ops.grouped_wgrad(dy, x, offsets, E), rep=args.rep)

        os.environ["MOE_KERNELS_WGRAD"] = "gluon"
        n0 = len(launches)
        out = ops.grouped_wgrad(dy, x, offsets, E)
        row["gluon_ran"] = ran = len(launches) > n0 and not gw.FAILED
        if ran:
            if ref is not None:
                row["gluon_err"] = rel_err_chunked(out, ref)
            del out
            row["gluon_ms"] = bench_ms(lambda: ops.grouped_wgrad(dy, x, offsets, E), rep=args.rep)
        else:
            del out
            print(f"{name}: the Gluon kernel did not run ({gw.FAILED or 'not taken'})")
        if ran:  # the 4-stage variant (one epilogue buffer), timed only
            os.environ["MOE_KERNELS_WGRAD_STAGES"] = "4"
            row["gluon_s4_ms"] = bench_ms(lambda: ops.grouped_wgrad(dy, x, offsets, E), rep=args.rep)
            os.environ.pop("MOE_KERNELS_WGRAD_STAGES", None)
        os.environ.pop("MOE_KERNELS_WGRAD", None)
        del ref
        for k in ("triton", "gluon", "gluon_s4", "torch"):
            if f"{k}_ms" in row:
                row[f"{k}_tflops"] = flop / row[f"{k}_ms"] / 1e9
        if "gluon_ms" in row:
            row["gluon_vs_triton"] = row["triton_ms"] / row["gluon_ms"]
            if "torch_ms" in row:
                row["gluon_vs_torch"] = row["torch_ms"] / row["gluon_ms"]
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
        del dy, x
        if device == "cuda":
            torch.cuda.empty_cache()

    cols = ["case", "triton_ms", "gluon_ms", "gluon_s4_ms", "torch_ms", "triton_tflops", "gluon_tflops",
            "gluon_s4_tflops", "torch_tflops",
            "gluon_vs_triton", "gluon_vs_torch", "gluon_err", "triton_err", "torch"]
    print(markdown(rows, cols, {"triton_ms": ".3f", "gluon_ms": ".3f", "gluon_s4_ms": ".3f", "torch_ms": ".3f",
                                "triton_tflops": ".0f", "gluon_tflops": ".0f", "gluon_s4_tflops": ".0f",
                                "torch_tflops": ".0f", "gluon_vs_triton": ".2f",
                                "gluon_vs_torch": ".2f", "gluon_err": ".1e",
                                "triton_err": ".1e"}))
    pair = [r for r in rows if r["case"] in ("dW13 32e uniform", "dW2 32e uniform")]
    summary = {}
    if len(pair) == 2:
        for k in ("triton", "gluon", "gluon_s4", "torch"):
            if all(f"{k}_ms" in r for r in pair):
                summary[f"issue20_pair_{k}_ms"] = sum(r[f"{k}_ms"] for r in pair)
        print("issue-20 pair (dW13 + dW2, 16384 rows, 32 experts, uniform):",
              {k: round(v, 3) for k, v in summary.items()})
    if not args.smoke:
        save("wgrad", rows, summary)


if __name__ == "__main__":
    main()
