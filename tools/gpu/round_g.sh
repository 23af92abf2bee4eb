#!/usr/bin/env bash
# Tenth session (carry .anchors not needed):  G_TOTAL=560 bash tools/gpu/round_g.sh
#  1. the whole `pytest -m gpu` in four processes (G_TESTS s): new are test_fp8_linear.py (FP8 MLA projections)
#     and test_grouped_gemm_bf16_wgmma.py (the Gluon bf16 grouped GEMM, opt-in), and the seesaw's paged
#     block-table hoist of the ninth session has not run yet
#  2. bench_hf_model.py on the DeepSeek shape: HF grouped_mm, ours fp8, ours fp8 + FP8 attention projections
#  3. bench/probe_linear_fp8.py: the FP8 linear at o_proj / q_b_proj shapes by config, against bf16
#  4. bench/probe_bf16_wgmma.py --check: the Gluon bf16 kernel against the Triton one and torch._grouped_mm
set -u
R=/tmp/gpu_round_g TOTAL=${G_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
TT=${G_TESTS:-180}
suite_in_four
echo "== bench_hf_model deepseek $(el)" >> "$S"
timeout "$(lim ${G_HF:-210} 150)" python bench/bench_hf_model.py --models deepseek \
  --variants hf_grouped_mm,ours_fp8,ours_fp8_attn > "$R/hf_model.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||prefill_vs|decode_vs" "$R/hf_model.log" | tail -8 >> "$S"
echo "== probe linear_fp8 $(el)" >> "$S"
timeout "$(lim 50 100)" python bench/probe_linear_fp8.py > "$R/probe_linear.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||Error" "$R/probe_linear.log" | tail -8 >> "$S"
echo "== probe bf16 wgmma $(el)" >> "$S"
timeout "$(lim 110 5)" python bench/probe_bf16_wgmma.py --check --out "$R/bf16_wgmma_probe.json" \
  > "$R/probe_bf16.log" 2>&1
echo "rc=$?" >> "$S"; tail -22 "$R/probe_bf16.log" >> "$S"
pack
