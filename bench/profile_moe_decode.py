"""Where one decode step of the MoE layer spends its GPU time: torch.profiler's per-kernel CUDA time, eager
(each kernel's own duration; a CUDA graph removes the launch gaps between them, not these times).

    PYTHONPATH=. python bench/profile_moe_decode.py [--cases deepseek,mixtral-like,qwen3] [--tokens 1,8]
        [--precision fp8,bf16]

Layers with random weights, hidden 7168, intermediate 2048; ``qwen3``: Qwen3-MoE-30B-A3B's MoE block (hidden 2048,
intermediate 768, 128 experts top-8; its patched model decoded slower in fp8 than in bf16 on an H100, 2026-12-07).
Prints one table per (case, precision, T) with the host's wall time a step beside the kernels' (a host-bound step
shows a wall time well above its kernel time) and writes results/moe_decode_profile[-<cases>]-<device>.txt.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, wall_us, write_text  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)

import moe_kernels as mk  # noqa: E402

CASES = {
    "deepseek": dict(num_experts=256, top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
                     routed_scaling_factor=2.5, n_shared_experts=1),
    "mixtral-like": dict(num_experts=8, top_k=2, scoring="softmax"),
    "qwen3": dict(num_experts=128, top_k=8, scoring="softmax", hidden_size=2048, intermediate_size=768),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="deepseek,mixtral-like")
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--precision", default="fp8")
    args = ap.parse_args()
    out = []
    for case, precision in ((c, p) for c in args.cases.split(",") for p in args.precision.split(",")):
        kw = dict(dict(hidden_size=7168, intermediate_size=2048), **CASES[case])
        # eager steps (the layer's own CUDA graphs off): each kernel's duration as launched one by one
        layer = mk.MoELayer(precision=precision, device="cuda", dtype=torch.bfloat16, cuda_graphs=False, **kw)
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, kw["hidden_size"], device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                for _ in range(3):
                    layer(x)
                wall = wall_us(lambda: layer(x), 20)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        layer(x)
                    torch.cuda.synchronize()
            kernel_us = sum(e.self_device_time_total for e in prof.key_averages()) / 10
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
            head = (f"## {case} {precision} T={T} ({device_name()}): 10 steps; eager wall {wall:.1f} us a step, "
                    f"kernels {kernel_us:.1f} us")
            print(head, table, sep="\n", flush=True)
            out += [head, table]
        del layer
        torch.cuda.empty_cache()
    tag = "" if args.cases == "deepseek,mixtral-like" else "-" + args.cases.replace(",", "_")  # e.g. -qwen3
    write_text(f"moe_decode_profile{tag}", "\n".join(out))


if __name__ == "__main__":
    main()
