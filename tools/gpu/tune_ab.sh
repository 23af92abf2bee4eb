#!/usr/bin/env bash
# One device call (sixth session): first the GPU tests of what changed without a GPU run (the layer's graph
# capture, the router's merged fill, the wgrad stage rule), then `tools/gpu/tune.sh`'s sweep (issue 18: the
# untried Gluon variants; the decode kernel now competes in the 64-row bucket), then the Mixtral-like decode layer
# at T 32-256 on the new tables and with MOE_KERNELS_DECODE_MAX_ROWS=64 (issue 19), then the quick GEMM bench.
#   A_TOTAL=560 [A_TESTS=110 A_TUNE=280 A_DEC=45] bash tools/gpu/tune_ab.sh
set -u
R=/tmp/gpu_tune_ab TOTAL=${A_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
CFG=moe_kernels/ops/configs
GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
TT=${A_TESTS:-110}
run_t graph tests/test_moe_decode_graph.py
run_t route tests/test_ops_routing.py
run_t wgrad tests/test_grouped_wgrad_wgmma.py
tests_report
for f in "$CFG"/grouped_gemm_fp8*_NVIDIA_H200.json; do
  t=${f/NVIDIA_H200/$GPU}; [ -e "$t" ] || { cp "$f" "$t"; echo "seeded $(basename "$t") from the H200's" >> "$S"; }
done
echo "== tune --challenge untried $(el)" >> "$S"
timeout "$(lim ${A_TUNE:-280} 170)" python -m moe_kernels.tune --kinds fp8,fp8_swiglu --challenge untried \
  --log "$R/tune.json" > "$R/tune.log" 2>&1
echo "rc=$?" >> "$S"; grep -vE "^  skip" "$R/tune.log" | tail -30 >> "$S"; grep -c "^  skip" "$R/tune.log" >> "$S"
mkdir -p "$R/configs"; cp "$CFG"/grouped_gemm_fp8*_"$GPU".json "$R/configs/"
J=bench/results/moe_decode-$GPU.json
for mode in tables decode64; do
  echo "== decode bench mixtral-like T 1-256 ($mode) $(el)" >> "$S"
  if [ $mode = decode64 ]; then export MOE_KERNELS_DECODE_MAX_ROWS=64; fi
  timeout "$(lim ${A_DEC:-45} 75)" python bench/bench_moe_decode.py --cases mixtral-like --tokens 1,8,32,64,128,256 \
    --rep 30 > "$R/decode_$mode.log" 2>&1
  echo "rc=$?" >> "$S"; grep -E "^  mixtral|frac|min_vs" "$R/decode_$mode.log" | head -20 >> "$S"
  cp "$J" "$R/moe_decode-$mode.json" 2>/dev/null
done
unset MOE_KERNELS_DECODE_MAX_ROWS
echo "== grouped GEMM bench (quick) on the new tables $(el)" >> "$S"
timeout "$(lim 70 3)" python bench/bench_grouped_gemm.py --quick > "$R/gemm_quick.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "min_vs|graph_vs|\| (gate_up|down)" "$R/gemm_quick.log" | head -20 >> "$S"
pack
