"""One training step (forward + backward) of an MoE layer on one GPU: ``mk.MoELayer`` against torch.

    PYTHONPATH=. python bench/bench_training.py [--tokens 4096,8192] [--cases mixtral-like,deepseek]

The layer and its baselines are bench_moe_layer.py's (H=7168, I=2048, bf16 activations), in bf16 (the FP8 path has
no backward). What is timed (median of ``triton.testing.do_bench``, warm-up first): ``layer(x)`` then
``out.backward(g)`` with x, the gate and the expert weights requiring gradients (the gradients are set to None
before each step, so every step allocates them as a training step does).
  * **ours**: ``MoELayer``: the forward kernels; the backward of the expert MLP through the grouped GEMM kernel
    (h13 again, dA and dX on transposed weight views) and ``grouped_wgrad``; routing / permute / unpermute through
    torch ops.
  * **torch composition**: bench_moe_layer.py's bf16 composition (router, ``torch.topk``, argsort, two
    ``torch._grouped_mm``, ``index_add_``), differentiated by autograd.
  * **naive loop**: bench_moe_layer.py's per-expert loop, differentiated by autograd.
Gradient errors: relative (Frobenius) to the naive loop's gradients of x and of the expert weights, with the naive
loop routed on fp32 logits as our router is. TFLOP/s counts 3x the forward's expert and router FLOPs.
Writes results/training-<device>.json and (with matplotlib) its .png.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plots  # noqa: E402
from _common import bench_ms, markdown, save  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)
from bench_moe_layer import CASES, H, I, build, rel_err  # noqa: E402


def step(fn, x, params, g):
    """One forward + backward; the gradients of the previous step are dropped first."""
    for p in params:
        p.grad = None
    x.grad = None
    fn(x).backward(g)


def run_case(case, tokens, device="cuda"):
    layers, tm, E = build(case, device)
    layer = layers["bf16"]
    del layers["fp8"]
    k = CASES[case]["top_k"]
    ours_params = [layer.gate.weight, layer.experts.w13, layer.experts.w2]
    # the torch baselines differentiate the same weights (as leaves of their own)
    tm.gate_w, tm.w13, tm.w2 = (t.detach().clone().requires_grad_() for t in (tm.gate_w, tm.w13, tm.w2))
    torch_params = [tm.gate_w, tm.w13, tm.w2]
    rows = []
    for T in tokens:
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        flops = 3 * (6.0 * T * k * H * I + 2.0 * T * H * E)
        step(lambda x: tm.naive_loop(x, fp32_router=True), x, torch_params, g)
        want = [t.grad.clone() for t in (x, tm.w13, tm.w2)]
        step(layer, x, ours_params, g)
        errs = [rel_err(a.grad, b) for a, b in zip((x, layer.experts.w13, layer.experts.w2), want)]
        t_ours = bench_ms(lambda: step(layer, x, ours_params, g), warmup=5, rep=30)
        try:
            t_comp = bench_ms(lambda: step(lambda x: tm.composition(x, False), x, torch_params, g), warmup=5, rep=30)
        except Exception as e:  # a torch build without the grouped GEMM's backward
            print(f"  composition failed: {type(e).__name__}: {str(e)[:200]}")
            t_comp = float("nan")
        t_naive = bench_ms(lambda: step(tm.naive_loop, x, torch_params, g), warmup=3, rep=10)
        row = dict(case=case, experts=E, top_k=k, precision="bf16", T=T, ours_ms=t_ours, composition_ms=t_comp,
                   naive_ms=t_naive, ours_tflops=flops / t_ours / 1e9, composition_tflops=flops / t_comp / 1e9,
                   naive_tflops=flops / t_naive / 1e9, vs_composition=t_comp / t_ours,
                   vs_naive=t_naive / t_ours, err_grad_x=errs[0], err_grad_w13=errs[1], err_grad_w2=errs[2])
        rows.append(row)
        print(f"  {case} T={T}: ours {t_ours:.2f} ms ({row['ours_tflops']:.0f} TFLOP/s), composition {t_comp:.2f} ms,"
              f" naive {t_naive:.2f} ms; grad errors x {errs[0]:.1e} w13 {errs[1]:.1e} w2 {errs[2]:.1e}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--cases", default="mixtral-like")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_training.py needs a CUDA GPU")
    rows = []
    for case in args.cases.split(","):
        rows += run_case(case, [int(t) for t in args.tokens.split(",")])
        cols = ["case", "T", "ours_ms", "composition_ms", "naive_ms", "ours_tflops", "vs_composition", "vs_naive",
                "err_grad_x", "err_grad_w13", "err_grad_w2"]
        print(markdown(rows, cols, {c: ".3g" for c in cols[2:]}))
        summary = {f"{r['case']}/T={r['T']}": dict(vs_composition=r["vs_composition"], vs_naive=r["vs_naive"],
                                                   ours_ms=r["ours_ms"]) for r in rows}
        path = save("training", rows, summary)
        print("wrote", path, plots.training(path))


if __name__ == "__main__":
    main()
