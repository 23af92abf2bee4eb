#!/usr/bin/env bash
# One short device call: where the host's time goes in an eager decode step (bench/profile_host.py, Qwen3- and
# DeepSeek-shaped MoE blocks at T=1, fp8 and bf16), then bench_training.py's DeepSeek fp8 rows (FP8 and bf16 weight
# gradients) at T 4096 / 8192 / 16384. Results: $OUT/results.tgz + $OUT/summary.log.
#   H_TOTAL=300 bash tools/gpu/host.sh
set -u
R=/tmp/gpu_results TOTAL=${H_TOTAL:-300}
source "$(dirname "$0")/_lib.sh"
echo "== host profile $(el)" >> "$S"
timeout "$(lim ${H_PROFILE:-120} 100)" python bench/profile_host.py ${H_ARGS:-} > "$R/host_profile.log" 2>&1
echo "rc=$?" >> "$S"; grep "^## " "$R/host_profile.log" >> "$S"
echo "== training deepseek fp8 $(el)" >> "$S"
timeout "$(lim ${H_TRAIN:-150} 10)" python bench/bench_training.py --cases deepseek --precisions fp8,fp8_bf16wgrad \
  --no-fp32 --err-tokens 0 --profile-tokens 0 > "$R/training_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^  deepseek|^\{|Error" "$R/training_bench.log" >> "$S"
pack
