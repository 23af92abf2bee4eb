"""Where one decode step of the MoE layer spends its GPU time: torch.profiler's per-kernel CUDA time, eager
(each kernel's own duration; a CUDA graph removes the launch gaps between them, not these times).

    PYTHONPATH=. python bench/profile_moe_decode.py [--cases deepseek,mixtral-like] [--tokens 1,8]

Layers with random weights (fp8), hidden 7168, intermediate 2048. Prints one table per (case, T) and writes
results/moe_decode_profile-<device>.txt.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, device_name  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)

import moe_kernels as mk  # noqa: E402

CASES = {
    "deepseek": dict(num_experts=256, top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
                     routed_scaling_factor=2.5, n_shared_experts=1),
    "mixtral-like": dict(num_experts=8, top_k=2, scoring="softmax"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--precision", default="fp8")
    args = ap.parse_args()
    out = []
    for case in args.cases.split(","):
        layer = mk.MoELayer(hidden_size=7168, intermediate_size=2048, precision=args.precision, device="cuda",
                            dtype=torch.bfloat16, **CASES[case])
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, 7168, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                for _ in range(3):
                    layer(x)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        layer(x)
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
            head = f"## {case} {args.precision} T={T} ({device_name()}): 10 steps"
            print(head, table, sep="\n", flush=True)
            out += [head, table]
        del layer
        torch.cuda.empty_cache()
    path = os.path.join(RESULTS, f"moe_decode_profile-{device_name().replace(' ', '_')}.txt")
    with open(path, "w") as f:
        f.write("\n".join(out))
    print("wrote", path)


if __name__ == "__main__":
    main()
