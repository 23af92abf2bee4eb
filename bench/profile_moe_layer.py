"""Where one MoE layer's forward spends its GPU time at prefill sizes: torch.profiler's CUDA time per kernel, summed
by what the kernel is (routing, permute, quantise, expert GEMMs, unpermute, ...), for ``bench_moe_layer.py``'s
layers (same cases and weights). Says what stands between the layer and its expert GEMMs alone.

    PYTHONPATH=. python bench/profile_moe_layer.py [--cases mixtral-like,deepseek] [--tokens 8192] [--top 12]

Prints per (case, precision) the milliseconds of one forward by category and the top kernels, with the GEMMs'
TFLOP/s over their own time; writes results/moe_layer_profile-<device>.txt.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)
from bench_moe_layer import CASES, H, I, build  # noqa: E402
from profile_hf_prefill import profile, profile_all, report  # noqa: E402


def run(case, tokens, precisions, top, device="cuda"):
    layers, _, _ = build(case, device)
    k = CASES[case]["top_k"]
    x = torch.randn(tokens, H, device=device, dtype=torch.bfloat16)
    expert_flops = 6.0 * tokens * k * H * I
    lines = []
    for prec in precisions:
        per_kernel, by_cat = profile(layers[prec], x, steps=5)
        total = sum(by_cat.values())
        gemm = by_cat.get("ours: expert GEMMs", 0.0)
        where = device_name() if device != "cpu" else "cpu"
        title = (f"## {case} {prec} T={tokens} ({where}): kernels {total:.3f} ms; expert GEMMs {gemm:.3f} ms"
                 + (f" ({expert_flops / gemm / 1e9:.0f} TFLOP/s), the rest {total - gemm:.3f} ms" if gemm else ""))
        lines += report(title, per_kernel, by_cat, top)
    del layers
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--precisions", default="fp8,bf16")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    profile_all(args.cases.split(","), lambda case: run(case, args.tokens, args.precisions.split(","), args.top),
                "moe_layer_profile")


if __name__ == "__main__":
    main()
