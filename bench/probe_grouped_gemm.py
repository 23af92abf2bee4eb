"""What limits the FP8 grouped GEMM: kernel variants side by side with torch._scaled_grouped_mm, in one run.

    PYTHONPATH=. python bench/probe_grouped_gemm.py [--quick]
    PYTHONPATH=. python bench/probe_grouped_gemm.py --ncu gate_up:8:4096:base128   # one variant, for ncu

For each shape and base config (tile, warps, stages; TMA on) it times:
  * ``rowmajor``: the shipped kernel, activation scales [M, K/128] row-major (the API's layout);
  * ``colmajor``: the same scales stored column-major (stride (1, M)), so a K step's BLOCK_M scales are contiguous;
  * ``noscale``: a timing probe that drops the per-K promotion and the scales (wrong results): the rate of the
    same kernel with one chained accumulator, an upper bound on what removing the promotion could give.
Also the compiled kernel's registers, spills and shared memory. TFLOP/s = 2 M N K / median time (do_bench).

The run of 2026-12-02 (results/grouped_gemm_probe-NVIDIA_H200.json) also timed a persistent variant (a grid of
SMs x programs-per-SM walking the exact tile count, K loops flattened with tl.range(flatten=True)): 0.22-0.84x of
the shipped kernel at every shape, so it was removed.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, markdown, save  # noqa: E402
from bench_grouped_gemm import PROJ, R, gg, group_sizes, offsets_of, rowwise_fp8  # noqa: E402

BASES = {
    "base128": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1),
    "base64": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3, USE_TMA=1),
    "pair128": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=16, num_stages=4, USE_TMA=1,
                    PAIR_N=1),
}
VARIANTS = {  # name -> (cfg overrides, column-major activation scales)
    "rowmajor": ({}, False),
    "colmajor": ({}, True),
    "noscale": ({"NO_SCALE": 1}, False),
}
SHAPES = [("gate_up", 8, 4096), ("gate_up", 32, 1024), ("down", 8, 4096), ("down", 32, 256)]


def inputs(proj, case, m):
    N, K = PROJ[proj]
    sizes = group_sizes(case, m)
    E, M = len(sizes), sum(sizes)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device="cuda") * K**-0.5).bfloat16()
    a, a_s = R.quantize_fp8(x)
    wq, ws = R.quantize_weight_fp8(w)
    return dict(x=x, w=w, a=a, a_s=a_s, wq=wq, ws=ws, off=offsets_of(sizes), M=M, N=N, K=K, E=E)


def torch_fn(d):
    """torch._scaled_grouped_mm on the same rows, with its rowwise scales (quantised once, outside the timing)."""
    ar, ar_s = rowwise_fp8(d["x"])
    wr, wr_s = rowwise_fp8(d["w"].view(-1, d["K"]))
    wr, wr_s = wr.view(d["E"], d["N"], d["K"]), wr_s.view(d["E"], d["N"])
    ends = d["off"][1:].contiguous()
    return lambda: torch._scaled_grouped_mm(ar, wr.transpose(-2, -1), ar_s, wr_s, offs=ends, out_dtype=torch.bfloat16)


def variant_fn(d, base, variant):
    over, colmajor = VARIANTS[variant]
    cfg = dict(BASES[base], **over)
    a_s = d["a_s"].t().contiguous().t() if colmajor else d["a_s"]
    out = torch.empty(d["M"], d["N"], dtype=torch.bfloat16, device="cuda")

    def fn():
        return gg._launch(d["a"], a_s, d["wq"], d["ws"], out, offsets=d["off"], cfg=cfg)
    return fn, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, base128 and base64 only")
    p.add_argument("--ncu", metavar="PROJ:G:M:BASE[:VARIANT]", help="launch one variant 3 times (under ncu) and exit")
    args = p.parse_args()

    if args.ncu:
        proj, g, m, base, *rest = args.ncu.split(":")
        d = inputs(proj, int(g), int(m))
        fn = torch_fn(d) if base == "torch" else variant_fn(d, base, rest[0] if rest else "rowmajor")[0]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return

    shapes = SHAPES[::2] if args.quick else SHAPES
    bases = ["base128", "base64"] if args.quick else list(BASES)
    rows = []
    for proj, case, m in shapes:
        d = inputs(proj, case, m)
        flop = 2.0 * d["M"] * d["N"] * d["K"]
        ref = R.grouped_gemm_fp8(d["a"], d["a_s"], d["wq"], d["ws"], d["off"], out_dtype=torch.float32)
        torch_ms = bench_ms(torch_fn(d))
        torch_tf = flop / torch_ms / 1e9
        print(f"{proj} G={case} m={m}: torch._scaled_grouped_mm {torch_tf:.0f} TFLOP/s", flush=True)
        for base in bases:
            for variant in VARIANTS:
                row = dict(case=f"{proj} G={case} m={m}", base=base, variant=variant,
                           scaled_grouped_mm_tflops=torch_tf)
                try:
                    fn, out = variant_fn(d, base, variant)
                    kernel = fn()
                    torch.cuda.synchronize()
                    if variant != "noscale":
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        row["rel_err"] = err
                        if not err < 2e-2:
                            raise RuntimeError(f"wrong result: relative error {err:.3g}")
                    ms = bench_ms(fn)
                    row.update(ours_tflops=flop / ms / 1e9, vs_scaled_grouped_mm=torch_ms / ms,
                               regs=getattr(kernel, "n_regs", None), spills=getattr(kernel, "n_spills", None),
                               shared=kernel.metadata.shared if kernel is not None else None)
                except Exception as e:  # a variant that does not compile or fit is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {base:8s} {variant:11s} {row.get('ours_tflops', float('nan')):7.0f} TFLOP/s "
                      f"x{row.get('vs_scaled_grouped_mm', float('nan')):.2f} regs={row.get('regs')} "
                      f"spills={row.get('spills')} smem={row.get('shared')} {row.get('error', '')}", flush=True)
                rows.append(row)
        del d
        torch.cuda.empty_cache()
    cols = ["case", "base", "variant", "ours_tflops", "scaled_grouped_mm_tflops", "vs_scaled_grouped_mm", "regs",
            "spills", "shared"]
    table = markdown(rows, cols, {"ours_tflops": ".0f", "scaled_grouped_mm_tflops": ".0f",
                                  "vs_scaled_grouped_mm": ".2f"})
    print(table)
    path = save("grouped_gemm_probe", rows, {})
    with open(path[:-5] + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
