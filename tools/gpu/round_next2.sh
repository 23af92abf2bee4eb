#!/usr/bin/env bash
# A second call for the session after the eleventh (after round_next.sh; no .anchors needed):
#   N_TOTAL=560 bash tools/gpu/round_next2.sh
# Budget (s): GPU tests 100, the 2048-token prompt 160, the 16-token prompt 80 + 60 (A/B), ncu 4 x 35
# The eleventh session (no device lent) changed the patched DeepSeek attention under HF `generate`: its latent rows
# live in HF's cache (bf16, or the FP8 latent cache with patch_model(kv_cache_dtype="fp8")), and a single-token
# step over a DynamicCache without padding runs the absorbed latent decode kernel over them, where before every
# step expanded every cached key through kv_b_proj (as HF's own attention does). This times it:
#  1. its GPU tests (tests/test_hf_mla_cache.py, tests/test_hf_equivalence.py; the suite in round_next.sh runs them too)
#  2. bench_hf_model.py, DeepSeek shape, a 2048-token prompt: HF grouped_mm, ours fp8, ours fp8 + FP8 latent cache
#  3. the same with the default 16-token prompt, then with MOE_KERNELS_HF_LATENT_DECODE=0 (the former, expanding
#     path) for the A/B at short context (the second run overwrites results/hf_model-*.json: the first is kept in
#     the results tarball as latent_on-hf_model-*.json)
#  4. ncu of the MLA decode kernels at B 128, S 4096: tensor pipe and DRAM busy shares
set -u
R=/tmp/gpu_round_next2 TOTAL=${N_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
echo "== HF MLA cache GPU tests $(el)" >> "$S"
timeout "$(lim 100 440)" python -m pytest -q -m gpu -rfE -p no:cacheprovider tests/test_hf_mla_cache.py \
  tests/test_hf_equivalence.py > "$R/t_hf.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "passed|failed|^FAILED|^ERROR" "$R/t_hf.log" | tail -12 >> "$S"
echo "== whole model, 2048-token prompt $(el)" >> "$S"
timeout "$(lim 160 280)" python bench/bench_hf_model.py --models deepseek --quick --decode-prompt 2048 \
  --variants hf_grouped_mm,ours_fp8,ours_fp8_kv8 > "$R/hf_long.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||decode_vs|Error" "$R/hf_long.log" | tail -10 >> "$S"
echo "== whole model, 16-token prompt $(el)" >> "$S"
timeout "$(lim 80 200)" python bench/bench_hf_model.py --models deepseek --quick \
  --variants hf_grouped_mm,ours_fp8,ours_fp8_kv8 > "$R/hf_short.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||decode_vs|prefill_vs|Error" "$R/hf_short.log" | tail -10 >> "$S"
for f in bench/results/hf_model-NVIDIA*.json; do [ -e "$f" ] && cp "$f" "$R/latent_on-$(basename "$f")"; done
echo "== whole model, 16-token prompt, MOE_KERNELS_HF_LATENT_DECODE=0 (the former path) $(el)" >> "$S"
MOE_KERNELS_HF_LATENT_DECODE=0 timeout "$(lim 60 140)" python bench/bench_hf_model.py --models deepseek --quick \
  --variants hf_grouped_mm,ours_fp8 > "$R/hf_short_off.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||decode_vs|Error" "$R/hf_short_off.log" | tail -6 >> "$S"
# Nsight Compute on the decode kernels at B 128, S 4096 (issue 17 asks for the tensor pipe's busy share): the bf16
# seesaw, the FP8 cache's serial kernel and its e4m3-product seesaw, FlashMLA if .anchors built it (round_next.sh)
if command -v ncu > /dev/null; then
    for k in seesaw fp8serial fp8mma flashmla; do
        echo "== ncu $k $(el)" >> "$S"
        timeout "$(lim 35 5)" ncu --clock-control none --kernel-name "regex:mla_decode_sm90|flash_fwd_splitkv_mla" \
          --launch-skip 1 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
          --print-details all python bench/bench_mla.py --profile "$k" > "$R/ncu_$k.log" 2>&1
        echo "rc=$?" >> "$S"
        grep -iE "mla_decode|flash_fwd|Duration|Throughput|Tensor|Pipe|Error" "$R/ncu_$k.log" | tail -14 >> "$S"
    done
fi
pack
