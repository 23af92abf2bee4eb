#!/usr/bin/env bash
# The second call of a session (< 10 min), after tools/gpu/round.sh: what round.sh leaves out.
#   1. bench/bench_hf_model.py (issue 19: whole DeepSeek-V3- and Qwen3-MoE-shaped models, HF vs patched)
#   2. bench/bench_training.py, both cases at T 4096 / 8192 / 16384 (issue 20); the host's time of a decode step,
#      eager and with the layer's own graphs (bench/profile_host.py), and a whole model's prefill by kernel
#      category (bench/profile_hf_prefill.py; issue 19's prefill target)
#   3. tools/gpu/gemm.sh GEMM_FULL=1 (issue 18: all 10 shapes beside DeepGEMM 8dfa329), its precompile beside 1-2
# Everything comes back as $OUT/results.tgz + $OUT/summary.log.
#   R_TOTAL=570 R_HF=200 R_TRAIN=260 bash tools/gpu/round2.sh      (WG8=triton: FP8 weight gradients by Triton)
set -u
R=/tmp/gpu_results2 TOTAL=${R_TOTAL:-570}
source "$(dirname "$0")/_lib.sh"
mkdir -p "$R/gemm"
HOLD=/tmp/gemm_hold2; touch "$HOLD"
(OUT=$R/gemm GEMM_FULL=1 GEMM_END_BY=$END GEMM_SKIP_261=1 GEMM_HOLD=$HOLD timeout -k 5 ${R_TOTAL:-570} \
  bash tools/gpu/gemm.sh > "$R/gemm/stdout.log" 2>&1) &
GEMM_PID=$!
echo "== hf model bench $(el)" >> "$S"
timeout "$(lim ${R_HF:-170} 300)" python bench/bench_hf_model.py > "$R/hf_model.log" 2>&1
echo "rc=$?" >> "$S"; tail -40 "$R/hf_model.log" >> "$S"
echo "== training $(el)" >> "$S"
MOE_KERNELS_WGRAD_FP8=${WG8:-auto} timeout "$(lim ${R_TRAIN:-260} 130)" python bench/bench_training.py \
  --tokens 4096,8192,16384 --cases mixtral-like,deepseek --precisions bf16,fp8_bf16wgrad,fp8 --no-fp32 \
  --err-tokens 0 --profile-tokens 0 > "$R/training_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -30 "$R/training_bench.log" >> "$S"
echo "== host profile $(el)" >> "$S"
timeout "$(lim ${R_PROBE:-50} 90)" python bench/profile_host.py --tokens 1,16 --steps 100 --precision fp8 \
  > "$R/host_profile.log" 2>&1
echo "rc=$?" >> "$S"; grep "^## " "$R/host_profile.log" >> "$S"
echo "== prefill profile $(el)" >> "$S"
timeout "$(lim ${R_PREFILL:-50} 45)" python bench/profile_hf_prefill.py > "$R/prefill_profile.log" 2>&1
echo "rc=$?" >> "$S"; grep -vE "^    " "$R/prefill_profile.log" | tail -30 >> "$S"
gemm_join "DeepGEMM, full"
pack
