#!/usr/bin/env bash
# One device call for several areas when device time is short: phase A runs builds and correctness (GPU tests, a
# training run whose timing does not matter) side by side; phase B times the benchmarks one at a time, alone on
# the GPU. Everything comes back as $OUT/results.tgz + $OUT/summary.log.
#   SESSION_A=240 SESSION_B_DECODE=150 SESSION_B_MLA=110 SESSION_B_TRAIN=100 bash tools/gpu/session.sh
set -u
REAL_OUT=${OUT:-/tmp/out}; mkdir -p "$REAL_OUT"
R=/tmp/gpu_results; rm -rf "$R"; mkdir -p "$R"/{ep,dropin,hf,train}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=$REAL_OUT/summary.log
T0=$SECONDS
el() { echo "+$((SECONDS - T0)) s"; }
A=${SESSION_A:-240}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$S"
echo "phase A $(el)" >> "$S"
[ -d .anchors ] && (OUT=/tmp/anchors_out PROJ=. timeout "$A" bash .anchors/run.sh build > "$R/anchors_build.log" 2>&1) &
(OUT=$R/ep timeout "$A" bash tools/gpu/ep.sh > "$R/ep/stdout.log" 2>&1) &
(OUT=$R/dropin timeout "$A" bash tools/gpu/dropin.sh > "$R/dropin/stdout.log" 2>&1) &
(OUT=$R/hf timeout "$A" bash tools/gpu/hf.sh > "$R/hf/stdout.log" 2>&1) &
(timeout "$A" python -m pytest -q -m gpu -rfE tests/test_ops_grouped_gemm_decode.py tests/test_moe_decode_graph.py \
   tests/test_autograd.py tests/test_ops_grouped_gemm.py > "$R/gpu_tests.log" 2>&1) &
(timeout "$A" python -m pytest -q -m gpu -rfE tests/test_ops_mla.py tests/test_mla_*.py > "$R/mla_tests.log" 2>&1) &
(timeout "$A" python tools/train_compare.py --out "$R/train" > "$R/train/train_compare.log" 2>&1) &
wait
echo "phase A done $(el)" >> "$S"
for f in "$R/gpu_tests.log" "$R/mla_tests.log"; do echo "--- $f" >> "$S"; grep -E "passed|failed|^FAILED|^ERROR" "$f" | head -20 >> "$S"; done
for d in ep dropin hf; do echo "--- $d" >> "$S"; tail -8 "$R/$d/stdout.log" >> "$S"; done
tail -3 "$R/train/train_compare.log" >> "$S"; tail -3 "$R/anchors_build.log" >> "$S"

echo "phase B: decode bench $(el)" >> "$S"
timeout "${SESSION_B_DECODE:-150}" python bench/bench_moe_decode.py --rep 30 > "$R/decode_bench.log" 2>&1
tail -45 "$R/decode_bench.log" >> "$S"
echo "phase B: mla bench $(el)" >> "$S"
timeout "${SESSION_B_MLA:-110}" python bench/bench_mla.py --quick --no-sweep > "$R/mla_bench.log" 2>&1
tail -30 "$R/mla_bench.log" >> "$S"
echo "phase B: training bench $(el)" >> "$S"
timeout "${SESSION_B_TRAIN:-100}" python bench/bench_training.py --tokens 8192 --err-tokens 0 --profile-tokens 8192 \
  > "$R/training_bench.log" 2>&1
tail -30 "$R/training_bench.log" >> "$S"
cp bench/results/*.json bench/results/*.txt "$R/" 2>/dev/null
echo "done $(el)" >> "$S"
tar -czf "$REAL_OUT/results.tgz" -C "$R" .
