#!/usr/bin/env bash
# Tenth session, last call (little device time left):  I_TOTAL=270 bash tools/gpu/round_i.sh
#  1. GPU tests of what the bf16 Gluon default and the FP8 linear touch, in three processes (I_TESTS s)
#  2. bench/probe_linear_fp8.py (the FP8 linear at o_proj / q_b_proj shapes by config, against bf16)
#  3. bench_moe_decode.py, Mixtral-like fp8 at T = 1 / 8 / 64 / 128 / 256, with what time is left
set -u
R=/tmp/gpu_round_i TOTAL=${I_TOTAL:-270}
source "$(dirname "$0")/_lib.sh"
TT=${I_TESTS:-120}
run_t lin tests/test_fp8_linear.py tests/test_grouped_gemm_bf16_wgmma.py
run_t gg tests/test_ops_grouped_gemm.py tests/test_autograd.py
run_t mod tests/test_dropin.py tests/test_hf_equivalence.py tests/test_moe_decode_graph.py
tests_report
echo "== probe linear_fp8 $(el)" >> "$S"
timeout "$(lim 45 60)" python bench/probe_linear_fp8.py > "$R/probe_linear.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||Error" "$R/probe_linear.log" | tail -8 >> "$S"
echo "== decode bench mixtral-like fp8 $(el)" >> "$S"
timeout "$(lim 100 3)" python bench/bench_moe_decode.py --cases mixtral-like --precisions fp8 \
  --tokens 1,8,64,128,256 --rep 30 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||frac|min_|vs_" "$R/decode_bench.log" | tail -14 >> "$S"
pack
