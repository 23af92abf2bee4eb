#!/usr/bin/env bash
# The smallest useful device call (~3 min) when little device time is left: the GPU tests of the paths changed
# since the last run, side by side (M_TESTS s), then the decode bench (--quick, M_DECODE s) and, if time is
# left, one FP8 training step with the Gluon FP8 wgrad when its tests passed (M_TRAIN s).
#   M_TESTS=90 M_DECODE=60 M_TRAIN=40 bash tools/gpu/mini.sh
set -u
R=/tmp/gpu_results TOTAL=600
source "$(dirname "$0")/_lib.sh"
TT=${M_TESTS:-90}
run_t decode tests/test_moe_decode_graph.py tests/test_ops_permute.py tests/test_ops_routing.py
run_t gemm tests/test_ops_grouped_gemm.py tests/test_ops_grouped_gemm_decode.py
run_t wgrad tests/test_grouped_wgrad_fp8.py tests/test_ops_quant.py
run_t mla tests/test_mla_decode.py -k "gluon"
tests_report
echo "== decode bench $(el)" >> "$S"
timeout "${M_DECODE:-60}" python bench/bench_moe_decode.py --quick --rep 20 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -16 "$R/decode_bench.log" >> "$S"
WG8=""; grep -qhE "^(FAILED|ERROR).*grouped_wgrad_fp8" "$R/t_wgrad.log" || WG8=gluon
grep -q "passed" "$R/t_wgrad.log" || WG8=""
echo "== training fp8 (MOE_KERNELS_WGRAD_FP8=${WG8:-off}) $(el)" >> "$S"
MOE_KERNELS_WGRAD_FP8=$WG8 timeout "${M_TRAIN:-40}" python bench/bench_training.py --tokens 8192 --cases mixtral-like \
  --precisions fp8,fp8_bf16wgrad --no-fp32 --err-tokens 0 --profile-tokens 0 > "$R/training_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -12 "$R/training_bench.log" >> "$S"
pack
