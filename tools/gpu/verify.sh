#!/usr/bin/env bash
# A short device call: the GPU tests that failed on 2026-12-06 and were fixed after, and the decode profile.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/verify.log"
timeout ${VERIFY_TESTS:-120} python -m pytest -q -m gpu -rfE tests/test_moe_decode_graph.py \
  "tests/test_autograd.py::test_fp8_wgrad_quantises_the_transposed_operands_along_rows" \
  "tests/test_autograd.py::test_fp8_trainable_layer_gradients_at_real_size" \
  "tests/test_ops_quant.py::test_quantize_fp8_nan_spreads_through_its_group_only" \
  tests/test_mla_decode.py -k "graph or wgrad or trainable or nan or pack" 2>&1 | tail -25 | tee -a "$OUT/verify.log"
timeout ${VERIFY_PROFILE:-70} python bench/profile_moe_decode.py 2>&1 | tee "$OUT/profile.log" | tail -5
cp bench/results/moe_decode_profile-*.txt "$OUT/" 2>/dev/null
