"""mk.ops.linear_fp8 (DeepSeek-V3's FP8 linear on the grouped FP8 kernels) at MLA's projection shapes, by config,
against the bf16 linear (torch) in the same run.

    PYTHONPATH=. python bench/probe_linear_fp8.py [--rows 4096,16]   (writes results/linear_fp8_probe-<GPU>.json)

Shapes (DeepSeek-V3: hidden 7168, 128 heads, q_lora 1536): o_proj (K = 128 x 128 = 16384 -> N = 7168) and
q_b_proj (K = 1536 -> N = 128 x 192 = 24576), at M = 4096 rows (a 4096-token prefill) and M = 16 (a decode step
of 16 sequences). Each FP8 time includes the activations' 1x128 quantisation (what the module pays). Configs: the
launcher's choice (tables, else DEFAULTS["fp8"]; the decode kernel at <= 16 rows) and, at 4096 rows, the
persistent Gluon kernel (PERSISTENT=1) with 4 or 5 stages and with the warp-specialised loader. Median of
triton.testing.do_bench in CUDA-graph replays (``_common.bench_ms``); TFLOP/s = 2 M N K / time.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, markdown, save  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.ops import grouped_gemm_configs as gcfg  # noqa: E402
from moe_kernels.ops import linear as linear_mod  # noqa: E402

SHAPES = (("o_proj", 16384, 7168), ("q_b_proj", 1536, 24576))
VARIANTS = {"persistent4": dict(PERSISTENT=1), "persistent5": dict(PERSISTENT=1, num_stages=5),
            "persistent5_ws": dict(PERSISTENT=1, WS=1, num_stages=5)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="4096,16")
    args = ap.parse_args()
    rows = []
    for name, K, N in SHAPES:
        w = torch.randn(N, K, device="cuda") * K ** -0.5
        q, s = mk.ops.quantize_weight_fp8(w)
        wb = w.to(torch.bfloat16)
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ w.double().t()
            flop = 2.0 * M * N * K
            t_bf16 = bench_ms(lambda: F.linear(x, wb), cudagraph=True)
            row = dict(shape=name, M=M, N=N, K=K, bf16_ms=t_bf16, bf16_tflops=flop / t_bf16 / 1e9)
            cfgs = {"auto": None}
            if M > gcfg.DECODE_MAX_ROWS:
                cfgs.update({k: dict(gcfg.DEFAULTS["fp8"], **v) for k, v in VARIANTS.items()})
            for label, cfg in cfgs.items():
                out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                try:
                    linear_mod._linear_fp8_triton(x, q, s, out, cfg=cfg)
                    err = float((out.double() - ref).norm() / ref.norm())
                    t = bench_ms(lambda: linear_mod._linear_fp8_triton(x, q, s, out, cfg=cfg), cudagraph=True)
                except Exception as e:  # noqa: BLE001 - a config this Triton cannot build: say so, go on
                    print(f"{name} M={M} {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                row[f"{label}_ms"], row[f"{label}_tflops"] = t, flop / t / 1e9
                row[f"{label}_vs_bf16"], row[f"{label}_err"] = t_bf16 / t, err
            best = min((v, k[:-3]) for k, v in row.items() if k.endswith("_ms") and k != "bf16_ms")
            row["best"], row["best_vs_bf16"] = best[1], t_bf16 / best[0]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    summary = {f"{r['shape']}_M{r['M']}": dict(best=r["best"], best_vs_bf16=r["best_vs_bf16"],
                                                auto_vs_bf16=r.get("auto_vs_bf16")) for r in rows}
    print("wrote", save("linear_fp8_probe", rows, summary))
    print(markdown(rows, ["shape", "M", "bf16_tflops", "auto_tflops", "auto_vs_bf16", "best", "best_vs_bf16"],
                   {"bf16_tflops": ".0f", "auto_tflops": ".0f", "auto_vs_bf16": ".2f", "best_vs_bf16": ".2f"}))


if __name__ == "__main__":
    main()
