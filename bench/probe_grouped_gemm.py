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
    # the Gluon kernel (grouped_gemm_wgmma): each K step's promotion overlaps the next step's product
    "wg128": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1, WGMMA=1),
    "wg128s5": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=5, USE_TMA=1,
                    WGMMA=1),
    "wg128u2": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1,
                    WGMMA=1, UNROLL=2),
    "wg128u8": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1,
                    WGMMA=1, UNROLL=8),
    "wg64s3": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3, USE_TMA=1, WGMMA=1),
    "wg128ws": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1,
                    WGMMA=1, WS=1),
    "wg128ws5": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=5, USE_TMA=1,
                     WGMMA=1, WS=1),
    "wg64": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, USE_TMA=1, WGMMA=1),
    # the persistent kernel: one program per SM walking the tiles (p2: two per SM), with and without a loader warp
    "wg128p": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1,
                   WGMMA=1, PERSISTENT=1),
    "wg128p2": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1,
                    WGMMA=1, PERSISTENT=2),
    "wg128pws": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1,
                     WGMMA=1, PERSISTENT=1, WS=1),
    "wg64p": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, USE_TMA=1, WGMMA=1,
                  PERSISTENT=1),
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


MLP_CFGS = {  # name -> (w13 SwiGLU config, w2 config); None: the tuned table's config
    "shipped": (None, None),
    "wgmma128": (BASES["wg128"], BASES["wg128"]),
    "wgmma128s3": (dict(BASES["wg128"], num_stages=3), BASES["wg128"]),
    "wgmma128ws": (BASES["wg128ws"], BASES["wg128ws"]),
    "wgmma64": (BASES["wg64"], BASES["wg128"]),
    "wgmma128p": (BASES["wg128p"], BASES["wg128p"]),
    "wgmma128pws": (BASES["wg128pws"], BASES["wg128pws"]),
}


def probe_mlp(shapes, H=7168, I=2048):
    """The fused expert MLP (w13 + SwiGLU + e4m3 requant, then w2) per config pair, checked against the reference."""
    rows = []
    for case, m in shapes:
        sizes = group_sizes(case, m)
        E, M = len(sizes), sum(sizes)
        off = offsets_of(sizes)
        x, xs = R.quantize_fp8(torch.randn(M, H, device="cuda", dtype=torch.bfloat16))
        w13, w13s = R.quantize_weight_fp8((torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16())
        w2, w2s = R.quantize_weight_fp8((torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16())
        ref = None
        flop = 2.0 * M * 3 * I * H
        for name, (c1, c2) in MLP_CFGS.items():
            h = torch.empty(M, I, dtype=torch.float8_e4m3fn, device="cuda")
            hs = torch.empty(M, I // 128, device="cuda")
            out = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")

            def fn():
                gg._launch(x, xs, w13, w13s, h, offsets=off, out_scale=hs, swiglu=True, cfg=c1)
                return gg._launch(h, hs, w2, w2s, out, offsets=off, cfg=c2)
            row = dict(case=f"mlp G={case} m={m}", base=name, variant="rowmajor")
            try:
                fn()
                torch.cuda.synchronize()
                if ref is None:
                    ref = out.float().clone()  # the shipped pair: the tests hold it to the fp32 reference
                err = ((out.float() - ref).norm() / ref.norm()).item()
                row["rel_err_vs_shipped"] = err
                if not err < 2e-2:
                    raise RuntimeError(f"differs from the shipped kernels: relative error {err:.3g}")
                ms = bench_ms(fn)
                row.update(ours_tflops=flop / ms / 1e9, ms=ms)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  mlp G={case} m={m} {name:10s} {row.get('ours_tflops', float('nan')):7.0f} TFLOP/s "
                  f"{row.get('ms', float('nan')):.3f} ms {row.get('error', '')}", flush=True)
            rows.append(row)
        del x, w13, w2
        torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, base128 and base64 only")
    p.add_argument("--mlp", action="store_true", help="also time the fused expert MLP per config pair")
    p.add_argument("--bases", default=None, help="comma-separated subset of " + ",".join(BASES))
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
    bases = args.bases.split(",") if args.bases else ["base128", "base64"] if args.quick else list(BASES)
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
                if BASES[base].get("WGMMA") and variant == "noscale":  # a switch of the Triton kernel only
                    continue
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
    if args.mlp:
        rows += probe_mlp([(8, 4096), (32, 1024), (32, 256), ("zipf", 8192)])
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
