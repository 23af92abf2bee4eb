"""Where the host's time goes in one eager decode step of MoELayer: Python's cProfile over many steps (no CUDA
sync inside), so a step whose wall time is far above its kernels' time shows which Python calls cost it.

    PYTHONPATH=. python bench/profile_host.py [--cases qwen3,deepseek] [--precision fp8,bf16] [--tokens 1]
        [--steps 200] [--top 35]

Prints, per (case, precision, T): the wall time a step (after warm-up, synchronised once at the end) eager and with
the layer's own CUDA graphs (``modules._graphs``), then the eager step's functions by own time and by cumulative
time; writes results/host_profile-<device>.txt.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, wall_us, write_text  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)
from profile_moe_decode import CASES  # noqa: E402

import moe_kernels as mk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="qwen3,deepseek")
    ap.add_argument("--precision", default="fp8,bf16")
    ap.add_argument("--tokens", default="1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--top", type=int, default=35)
    args = ap.parse_args()
    out = []
    for case in args.cases.split(","):
        for precision in args.precision.split(","):
            kw = dict(dict(hidden_size=7168, intermediate_size=2048), **CASES[case])
            layer = mk.MoELayer(precision=precision, device="cuda", dtype=torch.bfloat16, **kw)
            for T in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(T, kw["hidden_size"], device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    for _ in range(5):
                        layer(x)
                    graphed = wall_us(lambda: layer(x), args.steps)
                    os.environ["MOE_KERNELS_CUDA_GRAPHS"] = "0"
                    wall = wall_us(lambda: layer(x), args.steps)
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.steps):
                        layer(x)
                    torch.cuda.synchronize()
                    prof.disable()
                    os.environ.pop("MOE_KERNELS_CUDA_GRAPHS")
                s = io.StringIO()
                st = pstats.Stats(prof, stream=s)
                st.sort_stats("tottime").print_stats(args.top)
                st.sort_stats("cumulative").print_stats(args.top)
                head = (f"## {case} {precision} T={T} ({device_name()}): eager wall {wall:.1f} us a step, with the "
                        f"layer's graphs {graphed:.1f} us ({args.steps} steps, {layer._graphs.replays} replays)")
                print(head, s.getvalue(), sep="\n", flush=True)
                out += [head, s.getvalue()]
            del layer
            torch.cuda.empty_cache()
    write_text("host_profile", "\n".join(out))


if __name__ == "__main__":
    main()
