"""Launch configs of the decode grouped GEMM, timed alone: which stage count and split-K keep the weights streaming.

    PYTHONPATH=. python bench/probe_decode.py [--stages 3,4] [--splits 0,1,2,3,4,6]

Shapes (fp8, H 7168, I 2048): ``mixtral T=1`` (2 rows, 2 of 8 experts hit), ``mixtral T=8`` (16 rows over 8
experts, all hit) and ``deepseek T=1`` (8 rows, 8
experts of 256 hit) and the shared expert at T=1 (1 row, one expert); named with --shapes, ``mixtral T=128`` and
``T=256`` (32 and 64 rows for each of the 8 experts). Each GEMM (w13 with SwiGLU + e4m3
re-quantisation; w2 with the routing weight) is captured in a CUDA graph and replayed (median); GB/s = the weight
bytes it reads (e4m3 + scales of the experts with rows) / time, against the copy bandwidth of the same run.
``split`` 0 is the launcher's automatic choice. Writes results/decode_probe-<device>.json.
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, copy_bandwidth, markdown, save  # noqa: E402

from moe_kernels import reference as R  # noqa: E402
from moe_kernels.ops import grouped_gemm as gg  # noqa: E402
from moe_kernels.ops import grouped_gemm_configs as cfgs  # noqa: E402
from moe_kernels.ops import grouped_gemm_decode as gd  # noqa: E402

H, I = 7168, 2048
SHAPES = {"mixtral T=1": (8, [1, 1] + [0] * 6), "mixtral T=8": (8, [2] * 8),
          "deepseek T=1": (256, [1] * 8 + [0] * 248), "shared T=1": (1, [1]),
          "mixtral T=128": (8, [32] * 8), "mixtral T=256": (8, [64] * 8)}  # the last two: only when named


def run(name, E, counts, stages, splits, gbps, warps=(4,), w2_block_n=(128,)):
    dev = "cuda"
    M = sum(counts)
    hit = sum(1 for c in counts if c)
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    # only the experts with rows need real weights; the others are never read (one zero tensor keeps memory low)
    w13 = torch.zeros(E, 2 * I, H, dtype=torch.float8_e4m3fn, device=dev)
    w2 = torch.zeros(E, H, I, dtype=torch.float8_e4m3fn, device=dev)
    w13_s = torch.ones(E, 2 * I // 128, H // 128, device=dev)
    w2_s = torch.ones(E, H // 128, I // 128, device=dev)
    for e in (i for i, c in enumerate(counts) if c):
        q, s = R.quantize_weight_fp8(torch.randn(1, 2 * I, H, device=dev) / H**0.5)
        w13[e], w13_s[e] = q[0], s[0]
        q, s = R.quantize_weight_fp8(torch.randn(1, H, I, device=dev) / I**0.5)
        w2[e], w2_s[e] = q[0], s[0]
    x, xs = R.quantize_fp8(torch.randn(M, H, device=dev))
    h = torch.empty(M, I, dtype=torch.float8_e4m3fn, device=dev)
    hs = torch.empty(M, I // 128, device=dev)
    out = torch.empty(M, H, dtype=torch.bfloat16, device=dev)
    rw = torch.rand(M, device=dev)
    bytes13 = hit * (2 * I * H + w13_s[0].numel() * 4)
    bytes2 = hit * (H * I + w2_s[0].numel() * 4)
    rows = []
    for st in stages:
        for sp in splits:
            for nw in warps:
                for bn in w2_block_n:
                    cfg = dict(cfgs.DECODE_DEFAULT, num_stages=st, num_warps=nw)
                    if sp:
                        cfg["SPLIT_K"] = sp
                    t13 = bench_ms(lambda: gg._launch(x, xs, w13, w13_s, h, offsets=offsets, out_scale=hs, swiglu=True,
                                                      cfg=cfg), cudagraph=True)
                    cfg2 = dict(cfg, BLOCK_N=bn)
                    t2 = bench_ms(lambda: gg._launch(h, hs, w2, w2_s, out, offsets=offsets, row_weight=rw, cfg=cfg2),
                                  cudagraph=True)
                    if not sp:  # the launcher's automatic split, resolved (w13 / w2)
                        bt = gd.block_t_for(M, E)
                        auto = [gd.split_k_for(triton.cdiv(n, b) * min(E, M), k // 128, torch.device(dev),
                                               gd.stage_bytes(b, bt, 128, 1, sw), st, (2 if sw else 1) * b * 128)
                                for n, b, k, sw in ((I, 128, H, True), (H, bn, I, False))]
                    rows.append(dict(shape=name, stages=st, split=sp or f"auto {auto[0]}/{auto[1]}", warps=nw,
                                     w2_block_n=bn, w13_us=t13 * 1e3,
                                     w2_us=t2 * 1e3, w13_frac=bytes13 / t13 / 1e6 / gbps, w2_frac=bytes2 / t2 / 1e6 / gbps,
                                     both_us=(t13 + t2) * 1e3, both_frac=(bytes13 + bytes2) / (t13 + t2) / 1e6 / gbps))
                    print(f"  {name} stages={st} split={rows[-1]['split']} warps={nw} w2 BLOCK_N={bn}: w13 {t13 * 1e3:.1f} us "
                          f"({rows[-1]['w13_frac']:.0%}), w2 {t2 * 1e3:.1f} us ({rows[-1]['w2_frac']:.0%})", flush=True)
    del w13, w2
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="3,4")
    ap.add_argument("--splits", default="0,1,2,3,4,6")
    ap.add_argument("--shapes", default=",".join(list(SHAPES)[:4]))
    ap.add_argument("--warps", default="4", help="num_warps (the launcher raises it to 8 for BLOCK_T > 16)")
    ap.add_argument("--w2-block-n", default="128", help="BLOCK_N of the down projection (64 doubles its programs)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_decode.py needs a CUDA GPU")
    roof = copy_bandwidth()
    stages = [int(s) for s in args.stages.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    rows = []
    for name in args.shapes.split(","):
        E, counts = SHAPES[name]
        rows += run(name, E, counts, stages, splits, roof["gbps"], [int(w) for w in args.warps.split(",")],
                    [int(b) for b in args.w2_block_n.split(",")])
        save("decode_probe", rows, dict(copy_gbps=roof["gbps"]))
    print(markdown(rows, ["shape", "stages", "split", "warps", "w2_block_n", "w13_us", "w13_frac", "w2_us", "w2_frac", "both_frac"],
                   {"w13_us": ".1f", "w2_us": ".1f", "w13_frac": ".2f", "w2_frac": ".2f", "both_frac": ".2f"}))


if __name__ == "__main__":
    main()
