#!/bin/bash
# Issue 20 (training an MoE layer) on one GPU: the gradient tests, the training benchmark, the bf16-vs-FP8 training
# run. Everything lands under $OUT (at most 8 files: logs, the benchmark's JSON + profile, the curves' JSON + PNG).
#
#   OUT=/tmp/out bash tools/gpu/training.sh            # about 4-6 minutes on an H100 (first Triton compiles included)
#
# Steps (each under its own timeout, so one failure does not hide the others):
#   1. pytest -q -m gpu tests/test_autograd.py: every gradient test on CUDA, among them the 4 fp32 tests of issue 20
#      (test_expert_mlp_backward_kernels[...float32...-cuda], test_moe_layer_gradients_match_a_dense_float64_
#      formulation[cuda-*-fp32-*]) and the FP8 training tests at real sizes.
#   2. bench/bench_training.py: bf16 + fp8 (+ fp32 once), mixtral-like and deepseek, T = 4096, 8192, 16384;
#      results/training-<gpu>.json (summary: min_vs_composition_bf16, min_vs_composition_fp8, max_peak_mem_ratio)
#      and results/training_profile-<gpu>.txt (the backward per CUDA kernel at T=8192).
#   3. tools/train_compare.py: 300 steps of a small patched Mixtral, bf16 vs fp8: train_compare.json + .png.
set -u
OUT=${OUT:-/tmp/training_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import moe_kernels" 2>/dev/null || pip install --no-build-isolation -e . > "$OUT/install.log" 2>&1
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/log.txt" 2>&1

echo "=== 1. pytest -m gpu tests/test_autograd.py" >> "$OUT/log.txt"
timeout 600 python -m pytest -q -m gpu tests/test_autograd.py -rfE 2>&1 | tail -40 >> "$OUT/log.txt"

echo "=== 2. bench_training" >> "$OUT/log.txt"
timeout 420 python bench/bench_training.py > "$OUT/bench_training.log" 2>&1
echo "bench rc=$?" >> "$OUT/log.txt"
grep -E "^\{'min_vs|^  [a-z-]+ (bf16|fp8|fp32) T=|^## backward|^ +[0-9.]+ ms +[0-9.]+%|Error|error" "$OUT/bench_training.log" >> "$OUT/log.txt"
cp bench/results/training-*.json bench/results/training_profile-*.txt "$OUT/" 2>/dev/null

echo "=== 3. train_compare" >> "$OUT/log.txt"
timeout 240 python tools/train_compare.py --out "$OUT" > "$OUT/train_compare.log" 2>&1
echo "train_compare rc=$?" >> "$OUT/log.txt"
tail -5 "$OUT/train_compare.log" >> "$OUT/log.txt"
ls -la "$OUT" >> "$OUT/log.txt"
