#!/usr/bin/env bash
# One device call (< 10 min) when device time is short: phase A side by side (the whole `pytest -m gpu` in four
# processes; DeepGEMM 8dfa329 laid out and precompiled by tools/gpu/gemm.sh, whose bench then waits), phase B alone
# on the GPU, each step with its own limit: the decode bench, the decode profile, the wgrad bench, one training
# step (bf16 with the Gluon wgrad when its GPU tests passed; FP8 with FP8 and with bf16 weight gradients), the
# grouped GEMM bench with DeepGEMM (quick). Everything comes back as $OUT/results.tgz + $OUT/summary.log.
#   R_TOTAL=570 R_TESTS=200 R_DECODE=125 R_DECODE64=40 R_PROBE=55 R_WGRAD=60 R_TRAIN=100 bash tools/gpu/round.sh
# (R_DECODE64: Mixtral-like T 32-256 again with MOE_KERNELS_DECODE_MAX_ROWS=64, into moe_decode-<gpu>-decode64.json)
set -u
R=/tmp/gpu_results TOTAL=${R_TOTAL:-570}
source "$(dirname "$0")/_lib.sh"
mkdir -p "$R/gemm"
HOLD=/tmp/gemm_hold; touch "$HOLD"
(OUT=$R/gemm GEMM_END_BY=$END GEMM_SKIP_261=1 GEMM_HOLD=$HOLD timeout -k 5 ${R_TOTAL:-570} bash tools/gpu/gemm.sh \
  > "$R/gemm/stdout.log" 2>&1) &
GEMM_PID=$!
mapfile -t FILES < <(ls tests/test_*.py)
P=()
for i in 0 1 2 3; do
  grp=(); for j in "${!FILES[@]}"; do [ $((j % 4)) = $i ] && grp+=("${FILES[$j]}"); done
  (timeout "${R_TESTS:-200}" python -m pytest -q -m gpu -rfE -p no:cacheprovider "${grp[@]}" > "$R/gpu_tests_$i.log" 2>&1) &
  P+=($!)
done
for p in "${P[@]}"; do wait "$p"; done
echo "tests done $(el)" >> "$S"
for i in 0 1 2 3; do grep -E "passed|failed|^FAILED|^ERROR|Timeout|Terminated" "$R/gpu_tests_$i.log" | tail -15 >> "$S"; done

echo "== decode bench $(el)" >> "$S"
timeout "$(lim ${R_DECODE:-125} 200)" python bench/bench_moe_decode.py --rep 30 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -32 "$R/decode_bench.log" >> "$S"
if [ "${R_DECODE64:-40}" -gt 1 ]; then  # Mixtral-like T 32-256 with the decode kernel forced to 64 rows an expert
  echo "== decode bench, MOE_KERNELS_DECODE_MAX_ROWS=64 $(el)" >> "$S"
  J=bench/results/moe_decode-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' _).json
  cp "$J" "$R/moe_decode_main.json" 2>/dev/null
  MOE_KERNELS_DECODE_MAX_ROWS=64 timeout "$(lim ${R_DECODE64:-40} 190)" python bench/bench_moe_decode.py \
    --cases mixtral-like --tokens 32,64,128,256 --rep 30 > "$R/decode_bench_decode64.log" 2>&1
  echo "rc=$?" >> "$S"; grep -E "^  mixtral" "$R/decode_bench_decode64.log" >> "$S"
  mv "$J" "${J%.json}-decode64.json" 2>/dev/null; cp "$R/moe_decode_main.json" "$J" 2>/dev/null
fi
echo "== decode profile $(el)" >> "$S"
timeout "$(lim 40 180)" python bench/profile_moe_decode.py --tokens 1,8,128 > "$R/profile.log" 2>&1
if [ "${R_PROBE:-55}" -gt 1 ]; then
  echo "== decode GEMM probe $(el)" >> "$S"
  timeout "$(lim ${R_PROBE:-55} 170)" python bench/probe_decode.py --stages 3,4 --splits 0,1,2,4,8 > "$R/probe.log" 2>&1
  echo "rc=$?" >> "$S"; tail -30 "$R/probe.log" >> "$S"
fi
echo "== wgrad bench $(el)" >> "$S"
timeout "$(lim ${R_WGRAD:-60} 140)" python bench/bench_wgrad.py --rep 40 > "$R/wgrad_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -A12 "^| case" "$R/wgrad_bench.log" >> "$S"; grep -E "issue-20 pair|did not run|failed" "$R/wgrad_bench.log" >> "$S"
echo "== training $(el)" >> "$S"
WG=""
if ! grep -hE "^(FAILED|ERROR).*grouped_wgrad_wgmma" "$R"/gpu_tests_*.log > /dev/null 2>&1; then WG=gluon; fi
WG8=""; if ! grep -hE "^(FAILED|ERROR).*grouped_wgrad_fp8" "$R"/gpu_tests_*.log > /dev/null 2>&1; then WG8=gluon; fi
echo "MOE_KERNELS_WGRAD=${WG:-triton} MOE_KERNELS_WGRAD_FP8=${WG8:-triton}" >> "$S"
MOE_KERNELS_WGRAD=$WG MOE_KERNELS_WGRAD_FP8=$WG8 timeout "$(lim ${R_TRAIN:-100} 90)" python bench/bench_training.py --tokens 8192 --cases mixtral-like \
  --precisions bf16,fp8,fp8_bf16wgrad --no-fp32 --err-tokens 0 --profile-tokens 8192 > "$R/training_bench.log" 2>&1
echo "rc=$?" >> "$S"; tail -22 "$R/training_bench.log" >> "$S"
gemm_join "DeepGEMM"
pack
