#!/usr/bin/env bash
# A short device call (~5 min) for the changes not yet run on a GPU: their GPU tests side by side, then alone the
# decode bench (--quick), the decode GEMM probe, the wgrad bench and one training step. $OUT/results.tgz + $OUT/summary.log.
#   S_TOTAL=300 bash tools/gpu/short.sh
set -u
R=/tmp/gpu_results TOTAL=${S_TOTAL:-300}
source "$(dirname "$0")/_lib.sh"
TT=${S_TESTS:-110}
run_t decode tests/test_moe_decode_graph.py tests/test_ops_grouped_gemm_decode.py tests/test_ops_load.py \
  tests/test_ops_permute.py tests/test_ops_routing.py
run_t wgrad tests/test_grouped_wgrad_wgmma.py tests/test_grouped_wgrad_fp8.py tests/test_ops_quant.py
run_t gemm tests/test_ops_grouped_gemm.py
run_t mla tests/test_mla_decode.py -k "gluon"
run_t train tests/test_autograd.py tests/test_hf_families.py -k "phimoe or fp8 or bf16 or route"
tests_report
echo "== decode bench $(el)" >> "$S"
timeout "$(lim 70 120)" python bench/bench_moe_decode.py --quick --rep 20 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -16 "$R/decode_bench.log" >> "$S"
echo "== decode GEMM probe $(el)" >> "$S"
timeout "$(lim ${S_PROBE:-40} 150)" python bench/probe_decode.py --stages 3,4 --splits 0,1,4,8 > "$R/probe.log" 2>&1
echo "rc=$?" >> "$S"; tail -24 "$R/probe.log" >> "$S"
echo "== wgrad bench $(el)" >> "$S"
timeout "$(lim ${S_WGRAD:-60} 60)" python bench/bench_wgrad.py --rep 30 > "$R/wgrad_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -A12 "^| case" "$R/wgrad_bench.log" >> "$S"; grep -E "issue-20 pair|did not run|failed" "$R/wgrad_bench.log" >> "$S"
echo "== training $(el)" >> "$S"
WG=""; grep -qhE "^(FAILED|ERROR).*grouped_wgrad_wgmma" "$R/t_wgrad.log" || WG=gluon
WG8=""; grep -qhE "^(FAILED|ERROR).*grouped_wgrad_fp8" "$R/t_wgrad.log" || WG8=gluon
grep -q "passed" "$R/t_wgrad.log" || { WG=""; WG8=""; }
echo "MOE_KERNELS_WGRAD=${WG:-triton} MOE_KERNELS_WGRAD_FP8=${WG8:-triton}" >> "$S"
MOE_KERNELS_WGRAD=$WG MOE_KERNELS_WGRAD_FP8=$WG8 timeout "$(lim 90 5)" python bench/bench_training.py --tokens 8192 \
  --cases mixtral-like --precisions bf16,fp8,fp8_bf16wgrad --no-fp32 --err-tokens 0 --profile-tokens 0 \
  > "$R/training_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -16 "$R/training_bench.log" >> "$S"
pack
