#!/usr/bin/env bash
# One device call (~9 min): the whole `pytest -m gpu` (four processes side by side) while DeepGEMM 8dfa329 is laid
# out and its kernels precompiled; then, alone on the GPU, the decode-config probe and the decode profile; then
# bench_grouped_gemm.py (all shapes) with DeepGEMM in the same process (tools/gpu/gemm.sh). Everything comes back
# as $OUT/results.tgz + $OUT/summary.log.
#   VG_TESTS=230 VG_PROBE=110 bash tools/gpu/verify_gemm.sh
set -u
REAL_OUT=${OUT:-/tmp/out}; mkdir -p "$REAL_OUT"
R=/tmp/gpu_results; rm -rf "$R"; mkdir -p "$R/gemm"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=$REAL_OUT/summary.log
T0=$SECONDS
el() { echo "+$((SECONDS - T0)) s"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$S"
HOLD=/tmp/gemm_hold; touch "$HOLD"
(OUT=$R/gemm GEMM_END_BY=$(( $(date +%s) + ${VG_TOTAL:-560} )) GEMM_FULL=1 GEMM_SKIP_261=${GEMM_SKIP_261:-1} GEMM_HOLD=$HOLD timeout -k 5 ${VG_TOTAL:-560} bash tools/gpu/gemm.sh > "$R/gemm/stdout.log" 2>&1) &
GEMM_PID=$!
TL=${VG_TESTS:-230}
mapfile -t FILES < <(ls tests/test_*.py)
P=()
for i in 0 1 2 3; do
  grp=(); for j in "${!FILES[@]}"; do [ $((j % 4)) = $i ] && grp+=("${FILES[$j]}"); done
  (timeout "$TL" python -m pytest -q -m gpu -rfE -p no:cacheprovider "${grp[@]}" > "$R/gpu_tests_$i.log" 2>&1) &
  P+=($!)
done
for p in "${P[@]}"; do wait "$p"; done
echo "tests done $(el)" >> "$S"
for i in 0 1 2 3; do grep -E "passed|failed|^FAILED|^ERROR|Timeout|Terminated" "$R/gpu_tests_$i.log" | tail -15 >> "$S"; done
timeout "${VG_PROBE:-110}" python bench/probe_decode.py --stages 3,4 --splits 0,1,2,4 --warps 4,8 --w2-block-n 128,64 \
  > "$R/probe.log" 2>&1
echo "probe done $(el)" >> "$S"; tail -60 "$R/probe.log" >> "$S"
timeout 45 python bench/profile_moe_decode.py > "$R/profile.log" 2>&1
echo "profile done $(el)" >> "$S"
rm -f "$HOLD"
wait "$GEMM_PID"
echo "gemm done $(el)" >> "$S"; cat "$R/gemm/gemm_summary.txt" >> "$S" 2>/dev/null
cp bench/results/*.json bench/results/*.txt "$R/" 2>/dev/null
tar -czf "$REAL_OUT/results.tgz" -C "$R" .
