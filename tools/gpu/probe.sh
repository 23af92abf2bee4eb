#!/usr/bin/env bash
# One device call (~7 min) after a round: the GPU tests of the files whose failures were mended (P_TESTS s, side
# by side), the router probe (decode sizes, the GEMV path), the decode GEMM probe at Mixtral T = 128 / 256, the
# decode bench (T 1, 2, 4, 8, 64), the T=1 profile, and one FP8 training step with the Gluon FP8 wgrad when its tests passed.
#   P_TESTS=170 P_ROUTE=70 P_PROBE=70 P_DECODE=100 P_TRAIN=50 bash tools/gpu/probe.sh
set -u
R=/tmp/gpu_results TOTAL=${P_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
TT=${P_TESTS:-170}
run_t quant tests/test_ops_quant.py tests/test_numerics.py tests/test_ops_routing.py tests/test_moe_decode_graph.py
run_t permute tests/test_ops_permute.py tests/test_autograd.py
run_t wgrad tests/test_grouped_wgrad_fp8.py
tests_report
echo "== route probe $(el)" >> "$S"
timeout "$(lim ${P_ROUTE:-70} 200)" python bench/probe_route.py > "$R/route_probe.log" 2>&1
echo "rc=$?" >> "$S"; grep -vE "^\s+\{" "$R/route_probe.log" | tail -30 >> "$S"
echo "== decode GEMM probe (mixtral T=128/256) $(el)" >> "$S"
timeout "$(lim ${P_PROBE:-70} 160)" python bench/probe_decode.py --shapes "mixtral T=128,mixtral T=256" --stages 3,4 \
  --splits 0,1,2 --warps 4,8 > "$R/probe.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\s+mixtral" "$R/probe.log" | tail -30 >> "$S"
echo "== decode bench $(el)" >> "$S"
timeout "$(lim ${P_DECODE:-100} 50)" python bench/bench_moe_decode.py --tokens 1,2,4,8,64 --rep 20 \
  > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -24 "$R/decode_bench.log" >> "$S"
for f in bench/results/moe_decode-*.json; do cp "$f" "$R/small_T_$(basename "$f")"; done
timeout "$(lim 30 50)" python bench/profile_moe_decode.py --tokens 1 > "$R/profile.log" 2>&1
WG8=""; grep -qhE "^(FAILED|ERROR).*grouped_wgrad_fp8" "$R/t_wgrad.log" || WG8=gluon
grep -q "passed" "$R/t_wgrad.log" || WG8=""
echo "== training fp8 (MOE_KERNELS_WGRAD_FP8=${WG8:-off}) $(el)" >> "$S"
MOE_KERNELS_WGRAD_FP8=$WG8 timeout "$(lim ${P_TRAIN:-50} 5)" python bench/bench_training.py --tokens 8192 \
  --cases mixtral-like --precisions fp8,fp8_bf16wgrad --no-fp32 --err-tokens 0 --profile-tokens 0 \
  > "$R/training_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -12 "$R/training_bench.log" >> "$S"
pack
