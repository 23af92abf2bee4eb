#!/usr/bin/env bash
# Device run for the decode path (issue 19): GPU tests of the decode kernel and the captured layer, then
# bench_moe_decode.py. Usage on the device: bash tools/gpu/decode.sh [bench args...]; results under $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/decode_gpu.txt"
timeout 80 python -m pytest -q -m gpu -x tests/test_ops_grouped_gemm_decode.py tests/test_moe_decode_graph.py \
  2>&1 | tail -25 | tee "$OUT/decode_tests.log"
timeout 160 python bench/bench_moe_decode.py "$@" 2>&1 | tee "$OUT/decode_bench.log"
cp bench/results/moe_decode-*.json "$OUT/" 2>/dev/null
