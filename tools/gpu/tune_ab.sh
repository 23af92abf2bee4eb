#!/usr/bin/env bash
# One device call (sixth session): first the GPU tests of what changed without a GPU run (the layer's graph
# capture, the router's merged fill, the wgrad stage rule), then `tools/gpu/tune.sh`'s sweep (issue 18: the
# untried Gluon variants; the decode kernel now competes in the 64-row bucket), then the Mixtral-like decode layer
# (both cases, fp8) on the new tables, with MOE_KERNELS_DECODE_MAX_ROWS=64 and with MOE_KERNELS_PDL=1 as --ab
# variants timed in the same process (issue 19), then the quick GEMM bench.
#   A_TOTAL=560 [A_TESTS=110 A_TUNE=260 A_DEC=110] bash tools/gpu/tune_ab.sh
set -u
R=/tmp/gpu_tune_ab TOTAL=${A_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
CFG=moe_kernels/ops/configs
GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
TT=${A_TESTS:-110}
run_t graph tests/test_moe_decode_graph.py
run_t route tests/test_ops_routing.py
run_t wgrad tests/test_grouped_wgrad_wgmma.py
run_t pdl tests/test_pdl.py
tests_report
for f in "$CFG"/grouped_gemm_fp8*_NVIDIA_H200.json; do
  t=${f/NVIDIA_H200/$GPU}; [ -e "$t" ] || { cp "$f" "$t"; echo "seeded $(basename "$t") from the H200's" >> "$S"; }
done
echo "== tune --challenge untried $(el)" >> "$S"
timeout "$(lim ${A_TUNE:-260} 190)" python -m moe_kernels.tune --kinds fp8,fp8_swiglu --challenge untried \
  --log "$R/tune.json" > "$R/tune.log" 2>&1
echo "rc=$?" >> "$S"; grep -vE "^  skip" "$R/tune.log" | tail -30 >> "$S"; grep -c "^  skip" "$R/tune.log" >> "$S"
mkdir -p "$R/configs"; cp "$CFG"/grouped_gemm_fp8*_"$GPU".json "$R/configs/"
echo "== decode bench fp8, variants decode64 and pdl $(el)" >> "$S"
timeout "$(lim ${A_DEC:-110} 75)" python bench/bench_moe_decode.py --cases mixtral-like,deepseek --precisions fp8 \
  --ab "decode64:MOE_KERNELS_DECODE_MAX_ROWS=64;pdl:MOE_KERNELS_PDL=1" --rep 30 > "$R/decode_ab.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^  (mixtral|deepseek)|frac|min_vs|Error|error" "$R/decode_ab.log" | tail -40 >> "$S"
echo "== grouped GEMM bench (quick) on the new tables $(el)" >> "$S"
timeout "$(lim 70 3)" python bench/bench_grouped_gemm.py --quick > "$R/gemm_quick.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "min_vs|graph_vs|\| (gate_up|down)" "$R/gemm_quick.log" | head -20 >> "$S"
pack
