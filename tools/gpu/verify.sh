#!/usr/bin/env bash
# A short device call: the GPU tests that failed on 2026-12-06 and were fixed after, the decode-config probe and the
# decode profile. Results under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/verify.log"
timeout ${VERIFY_TESTS:-100} python -m pytest -q -m gpu -rfE tests/test_moe_decode_graph.py \
  "tests/test_autograd.py::test_fp8_wgrad_quantises_the_transposed_operands_along_rows" \
  "tests/test_autograd.py::test_fp8_trainable_layer_gradients_at_real_size" \
  "tests/test_ops_quant.py::test_quantize_fp8_nan_spreads_through_its_group_only" 2>&1 | tail -25 | tee -a "$OUT/verify.log"
timeout ${VERIFY_PROBE:-70} python bench/probe_decode.py --splits 0,1,2,4 2>&1 | tee "$OUT/probe.log" | tail -30
timeout ${VERIFY_PROFILE:-45} python bench/profile_moe_decode.py 2>&1 > "$OUT/profile.log"
cp bench/results/decode_probe-*.json bench/results/moe_decode_profile-*.txt "$OUT/" 2>/dev/null
