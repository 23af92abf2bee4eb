#!/usr/bin/env bash
# One short device call (issue 19's host-bound decode, issue 20's DeepSeek fp8 rows): the GPU tests of the layer's
# own CUDA graphs (tests/test_moe_decode_graph.py); where the host's time goes in an eager decode step and what the
# layer's graphs leave of it (bench/profile_host.py, Qwen3- and DeepSeek-shaped blocks at T=1 and 16, fp8 and bf16);
# bench_hf_model.py (whole models: HF generate runs the patched layers eagerly, so their graphs replay); with
# H_PREFILL=S (seconds) bench/profile_hf_prefill.py; then (H_TRAIN=0: not) bench_training.py's DeepSeek fp8 rows.
# Results: $OUT/results.tgz + $OUT/summary.log.
#   H_TOTAL=400 [H_MORE_TESTS='tests/a.py ...'] [H_WGRAD=60] [H_PROFILE_ARGS=...] [H_PREFILL=60] [H_TRAIN=0] \
#     bash tools/gpu/host.sh
set -u
R=/tmp/gpu_results TOTAL=${H_TOTAL:-400}
source "$(dirname "$0")/_lib.sh"
TT=${H_TESTS:-90}
run_t graphs tests/test_moe_decode_graph.py
[ -n "${H_MORE_TESTS:-}" ] && run_t more ${H_MORE_TESTS}
tests_report
if [ "${H_WGRAD:-0}" -gt 0 ]; then
  echo "== wgrad bench $(el)" >> "$S"
  timeout "$(lim ${H_WGRAD} 200)" python bench/bench_wgrad.py --rep 40 > "$R/wgrad_bench.log" 2>&1
  echo "rc=$?" >> "$S"; grep -A9 "^| case" "$R/wgrad_bench.log" >> "$S"
fi
echo "== host profile $(el)" >> "$S"
timeout "$(lim ${H_PROFILE:-90} 200)" python bench/profile_host.py ${H_PROFILE_ARGS:---tokens 1,16 --steps 100} > "$R/host_profile.log" 2>&1
echo "rc=$?" >> "$S"; grep "^## " "$R/host_profile.log" >> "$S"
echo "== hf model bench $(el)" >> "$S"
timeout "$(lim ${H_HF:-130} 110)" python bench/bench_hf_model.py > "$R/hf_model.log" 2>&1
echo "rc=$?" >> "$S"; tail -14 "$R/hf_model.log" >> "$S"
if [ "${H_PREFILL:-0}" -gt 0 ]; then
  echo "== prefill profile $(el)" >> "$S"
  timeout "$(lim ${H_PREFILL} 8)" python bench/profile_hf_prefill.py > "$R/prefill_profile.log" 2>&1
  echo "rc=$?" >> "$S"; grep -vE "^    " "$R/prefill_profile.log" | tail -40 >> "$S"
fi
if [ "${H_TRAIN:-150}" -gt 0 ]; then
  echo "== training deepseek fp8 $(el)" >> "$S"
  timeout "$(lim ${H_TRAIN:-150} 8)" python bench/bench_training.py --cases deepseek --precisions fp8,fp8_bf16wgrad \
    --no-fp32 --err-tokens 0 --profile-tokens 0 > "$R/training_bench.log" 2>&1
  echo "rc=$?" >> "$S"; grep -E "^  deepseek|^\{|Error" "$R/training_bench.log" >> "$S"
fi
pack
