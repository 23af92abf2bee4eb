#!/usr/bin/env bash
# The call after tools/gpu/tune_ab.sh (< 10 min; the sixth session had no device time left for it), on its tables:
#   phase A side by side: the whole `pytest -m gpu` in four processes; DeepGEMM 8dfa329 laid out and precompiled
#     (tools/gpu/gemm.sh GEMM_FULL=1, whose bench then waits)
#   phase B alone on the GPU: the decode bench with MOE_KERNELS_PDL=1 as a variant (issue 19);
#     bench/bench_moe_layer.py at T = 8192 (issue 18: >= 4x the torch composition, fp8); a whole model's prefill
#     by kernel category (bench/profile_hf_prefill.py; issue 19's prefill target); all ten grouped GEMM shapes
#     beside DeepGEMM (issue 18)
#   B_TOTAL=560 [B_TESTS=190 B_DEC=60 B_LAYER=90 B_PREFILL=50] bash tools/gpu/round_b.sh
set -u
R=/tmp/gpu_round_b TOTAL=${B_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
mkdir -p "$R/gemm"
HOLD=/tmp/gemm_hold_b; touch "$HOLD"
(OUT=$R/gemm GEMM_FULL=1 GEMM_END_BY=$END GEMM_SKIP_261=1 GEMM_HOLD=$HOLD timeout -k 5 "$TOTAL" \
  bash tools/gpu/gemm.sh > "$R/gemm/stdout.log" 2>&1) &
GEMM_PID=$!
TT=${B_TESTS:-190}
suite_in_four
echo "== decode bench fp8, PDL as a variant $(el)" >> "$S"
timeout "$(lim ${B_DEC:-60} 280)" python bench/bench_moe_decode.py --precisions fp8 --tokens 1,8,64,256 \
  --ab "pdl:MOE_KERNELS_PDL=1" --rep 30 > "$R/decode_pdl.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^  (mixtral|deepseek)" "$R/decode_pdl.log" >> "$S"
echo "== moe layer bench T=8192 $(el)" >> "$S"
timeout "$(lim ${B_LAYER:-90} 220)" python bench/bench_moe_layer.py --tokens 8192 > "$R/moe_layer.log" 2>&1
echo "rc=$?" >> "$S"; tail -24 "$R/moe_layer.log" >> "$S"
echo "== prefill profile $(el)" >> "$S"
timeout "$(lim ${B_PREFILL:-50} 170)" python bench/profile_hf_prefill.py > "$R/prefill_profile.log" 2>&1
echo "rc=$?" >> "$S"; grep -vE "^    " "$R/prefill_profile.log" | tail -30 >> "$S"
gemm_join "DeepGEMM, full"
pack
