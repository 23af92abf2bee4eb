#!/usr/bin/env bash
# One device call (sixth session), in order of what matters if the call is cut short:
#   1. GPU tests of what changed without a GPU run: the layer's graph capture and the load monitor's stream, the
#      router's merged fill, the wgrad stage rule, programmatic dependent launch (test_pdl.py), permute and the
#      decode GEMM (their kernels gained the PDL switch);
#   2. the decode bench, fp8, both cases, with MOE_KERNELS_DECODE_MAX_ROWS=64 and MOE_KERNELS_PDL=1 as --ab
#      variants timed in the same process (issue 19);
#   3. `moe_kernels.tune --challenge untried` (issue 18: the untried Gluon variants; the decode kernel competes in
#      the 64-row bucket), the H100's tables seeded from the H200's; the tables come back in configs/;
#   4. the quick GEMM bench on the new tables, if time is left.
#   A_TOTAL=560 [A_TESTS=130 A_DEC=110] bash tools/gpu/tune_ab.sh
set -u
R=/tmp/gpu_tune_ab TOTAL=${A_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
TT=${A_TESTS:-130}
run_t graph tests/test_moe_decode_graph.py tests/test_pdl.py
run_t route tests/test_ops_routing.py tests/test_ops_permute.py
run_t gemm tests/test_grouped_wgrad_wgmma.py tests/test_ops_grouped_gemm_decode.py
tests_report
echo "== decode bench fp8, variants decode64 and pdl $(el)" >> "$S"
timeout "$(lim ${A_DEC:-110} 150)" python bench/bench_moe_decode.py --cases mixtral-like,deepseek --precisions fp8 \
  --ab "decode64:MOE_KERNELS_DECODE_MAX_ROWS=64;pdl:MOE_KERNELS_PDL=1" --rep 30 > "$R/decode_ab.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^  (mixtral|deepseek)|frac|min_vs|Error|error" "$R/decode_ab.log" | tail -40 >> "$S"
tune_untried 400 60
gemm_quick 70 3
pack
