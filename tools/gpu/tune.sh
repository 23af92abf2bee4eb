#!/usr/bin/env bash
# One device call (issue 18, item 1): this GPU's FP8 grouped GEMM tables by `moe_kernels.tune --challenge untried`
# (the Gluon configs with the WS and PERSISTENT variants, whose GPU tests pass since 2026-12-07, against each
# bucket's incumbent timed in the same run). A GPU without tables of its own (the H100 borrows the H200's) starts
# from the same chip's tables as incumbents. Then the grouped GEMM bench (quick) on the new tables. The tables to
# commit come back in results.tgz (configs/), with the sweep's timings (tune.json) and logs.
#   T_TOTAL=560 [T_TUNE=420] bash tools/gpu/tune.sh
set -u
R=/tmp/gpu_tune TOTAL=${T_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
CFG=moe_kernels/ops/configs
GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
for f in "$CFG"/grouped_gemm_fp8*_NVIDIA_H200.json; do
  t=${f/NVIDIA_H200/$GPU}; [ -e "$t" ] || { cp "$f" "$t"; echo "seeded $(basename "$t") from the H200's" >> "$S"; }
done
echo "== tune --challenge untried $(el)" >> "$S"
timeout "$(lim ${T_TUNE:-420} 100)" python -m moe_kernels.tune --kinds fp8,fp8_swiglu --challenge untried \
  --log "$R/tune.json" > "$R/tune.log" 2>&1
echo "rc=$?" >> "$S"; grep -vE "^  skip" "$R/tune.log" | tail -30 >> "$S"
mkdir -p "$R/configs"; cp "$CFG"/grouped_gemm_fp8*_"$GPU".json "$R/configs/"
echo "== grouped GEMM bench (quick) on the new tables $(el)" >> "$S"
timeout "$(lim 90 5)" python bench/bench_grouped_gemm.py --quick > "$R/gemm_quick.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "min_vs|graph_vs|\| (gate_up|down)" "$R/gemm_quick.log" | head -20 >> "$S"
pack
