#!/usr/bin/env bash
# The Gluon wgmma weight-gradient kernel (issue 20): GPU tests, then Triton vs Gluon vs torch timings. One Hopper
# GPU, ~2-3 min. Run from the repo root; results under $OUT (default /tmp/out).
#
#   bash tools/gpu/wgrad.sh
#   WGRAD_TRAIN=1 bash tools/gpu/wgrad.sh    # + one training step (mixtral-like, 8192 tokens, bf16) with the
#                                            #   Triton wgrad and with the Gluon one, and their backward profiles
#
# Steps (each its own process, with a timeout):
#   1. offline sm_90a compile of the kernel on this machine's Triton (registers, spills, ptxas wgmma notes)
#   2. pytest -m gpu tests/test_grouped_wgrad_wgmma.py (float64 references: odd / empty experts, one expert,
#      M = 0, K tails, few programs, bf16 / fp16 / fp32, dispatch, real-size skew)
#   3. bench/bench_wgrad.py: 16384 rows / 32 experts (uniform, skewed) at dW13 (N 4096, K 7168) and dW2 (N 7168,
#      K 2048), 8192 rows / 256 experts; ms, TFLOP/s, gluon/triton and gluon/torch ratios, errors vs torch; the
#      Gluon kernel at 3 stages (default) and 4 (gluon_s4)
#   4. (if started before 190 s) MOE_KERNELS_WGRAD=gluon pytest -m gpu on tests/test_autograd.py's bf16 backward
#      tests (the layer's backward with the Gluon wgrad wherever its shapes qualify; others fall back, warned)
# $OUT gets: wgrad_summary.txt (read this first), wgrad_compile.log, wgrad_tests.log, wgrad_autograd.log,
# wgrad_bench.log, wgrad-<GPU>.json (and with WGRAD_TRAIN=1 wgrad_train.log).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
SUM="$OUT/wgrad_summary.txt"; : > "$SUM"
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$SUM"; }

say "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | $(python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"

timeout 60 python -m moe_kernels.ops.grouped_wgrad_wgmma bf16 bf16 > "$OUT/wgrad_compile.log" 2>&1
say "compile: $(tail -1 "$OUT/wgrad_compile.log" | cut -c1-330)"

timeout 150 python -m pytest -q -m gpu -rfEs tests/test_grouped_wgrad_wgmma.py > "$OUT/wgrad_tests.log" 2>&1
say "gpu tests (rc $?): $(tail -1 "$OUT/wgrad_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/wgrad_tests.log" | head -20 | tee -a "$SUM"

timeout 170 python bench/bench_wgrad.py --rep ${WGRAD_REP:-60} > "$OUT/wgrad_bench.log" 2>&1
say "bench (rc $?):"
grep -A12 "^| case" "$OUT/wgrad_bench.log" | tee -a "$SUM"
grep -E "issue-20 pair|did not run|failed" "$OUT/wgrad_bench.log" | tee -a "$SUM"
cp bench/results/wgrad-*.json "$OUT/" 2>/dev/null

if [ $(( $(date +%s) - T0 )) -lt ${WGRAD_AUTOGRAD_BY:-190} ]; then
    MOE_KERNELS_WGRAD=gluon timeout 120 python -m pytest -q -m gpu -rfE tests/test_autograd.py \
        -k "(bf16 or layer_gradients or expert_mlp_backward or expert_mlp_train) and not fp8" \
        > "$OUT/wgrad_autograd.log" 2>&1
    say "autograd tests with MOE_KERNELS_WGRAD=gluon (rc $?): $(tail -1 "$OUT/wgrad_autograd.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/wgrad_autograd.log" | head -10 | tee -a "$SUM"
    grep -o "the Gluon wgrad kernel does not run here, grouped_wgrad runs the Triton kernel: [^\"']*" "$OUT/wgrad_autograd.log" \
        | sort | uniq -c | head -5 | tee -a "$SUM"
else
    say "autograd tests skipped (past ${WGRAD_AUTOGRAD_BY:-190} s)"
fi

if [ "${WGRAD_TRAIN:-0}" = 1 ]; then
    for impl in triton gluon; do
        echo "=== wgrad: $impl" >> "$OUT/wgrad_train.log"
        if [ $impl = gluon ]; then export MOE_KERNELS_WGRAD=gluon; else unset MOE_KERNELS_WGRAD; fi
        timeout 150 python bench/bench_training.py --tokens 8192 --cases mixtral-like --precisions bf16 --no-fp32 \
            --err-tokens 1024 --profile-tokens 8192 >> "$OUT/wgrad_train.log" 2>&1
        say "training step, wgrad=$impl (rc $?): $(grep -iE 'ours_ms|mixtral-like' "$OUT/wgrad_train.log" | tail -2 | tr '\n' ' ' | cut -c1-300)"
    done
    unset MOE_KERNELS_WGRAD
    grep -E "wgrad|=== wgrad" "$OUT/wgrad_train.log" | head -20 | tee -a "$SUM"
fi
say "done"
