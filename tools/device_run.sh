#!/usr/bin/env bash
# One device call: build the extension, run the GPU tests, the demo and the benchmarks; logs and JSON to $OUT.
# Usage (on the GPU machine, from the repo root): bash tools/device_run.sh [tests|demo|bench_*]...
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests demo bench_routing bench_grouped_gemm)
log() { echo "=== $* ($(date +%T))"; }
for s in "${steps[@]}"; do
  case "$s" in
    build)
      log build
      python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; }
      python3 -c "import moe_kernels as mk; print('extension built:', mk.has_extension())" ;;
    info) moe-kernels info ;;
    tests)
      # xdist workers share the one GPU: they overlap Triton's compilation, which dominates this step
      log "pytest -m gpu (-n ${TEST_WORKERS:-6}, limit ${TEST_TIMEOUT:-300}s)"
      timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -n "${TEST_WORKERS:-6}" -p no:cacheprovider \
        -o addopts="" ${TEST_ARGS:-tests} 2>&1 | tee "$OUT/pytest_gpu.log" | grep -vE "^\[transformers\]" | tail -25 ;;
    soak)
      log "soak (limit ${SOAK_TIMEOUT:-150}s)"
      timeout "${SOAK_TIMEOUT:-150}" python3 tests/soak.py --iters "${SOAK_ITERS:-10000}" --json "$OUT/soak.json" 2>&1 \
        | tee "$OUT/soak.log" | tail -8 ;;
    sanitize)
      log "compute-sanitizer (limit ${SANITIZE_TIMEOUT:-300}s)"
      SANITIZE_LOG_DIR=/tmp/sanitize timeout "${SANITIZE_TIMEOUT:-300}" bash tests/sanitize.sh 2>&1 \
        | tee "$OUT/sanitize.log" | tail -12 ;;
    tune)
      # this GPU's grouped GEMM tables (moe_kernels/ops/configs, in results.tgz); TUNE_KINDS=fp8,fp8_swiglu; TUNE_ARGS="--challenge wgmma"
      log "tune ${TUNE_KINDS:-fp8,fp8_swiglu} (limit ${TUNE_TIMEOUT:-400}s)"
      # shellcheck disable=SC2086
      timeout "${TUNE_TIMEOUT:-400}" python3 -m moe_kernels.tune --kinds "${TUNE_KINDS:-fp8,fp8_swiglu}" ${TUNE_ARGS:-} \
        --log "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | grep -v "^  skip" | tail -20 ;;
    demo)
      log demo
      timeout "${DEMO_TIMEOUT:-180}" python3 -m moe_kernels.cli demo 2>&1 | tee "$OUT/demo.log" | tail -12 ;;
    ncu:*)
      # "ncu:gate_up:8:4096:base128:noscale": Nsight Compute sections of one probe_grouped_gemm variant ("torch" as
      # the base profiles torch._scaled_grouped_mm); the report goes to $OUT/ncu_<spec>.log
      spec=${s#ncu:}; kern='regex:_grouped_gemm_kernel'; [[ "$spec" == *:torch* ]] && kern='regex:(?i)gemm|cutlass'
      log "ncu $spec"
      PYTHONPATH=. timeout "${NCU_TIMEOUT:-120}" ncu --clock-control none --kernel-name "$kern" --launch-skip 1 \
        --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        python3 bench/probe_grouped_gemm.py --ncu "$spec" >"$OUT/ncu_${spec//:/_}.log" 2>&1
      grep -E "Duration|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Stall|Issue Slots|Warp Cycles Per Issued|Shared Memory Configuration Size|Block Limit" \
        "$OUT/ncu_${spec//:/_}.log" | head -20 ;;
    bench_*|probe_*)
      # "bench_moe_layer:--quick" passes "--quick" to the script
      name=${s%%:*}; args=""; [ "$name" != "$s" ] && args=${s#*:}
      log "$name $args (limit ${BENCH_TIMEOUT:-300}s)"
      # shellcheck disable=SC2086
      PYTHONPATH=. timeout "${BENCH_TIMEOUT:-300}" python3 "bench/$name.py" $args 2>&1 | tee "$OUT/$name.log" | tail -30 ;;
    *) echo "unknown step $s" ;;
  esac
done
# everything in one archive: the device tool returns at most 8 files
tar czf "$OUT/results.tgz" bench/results moe_kernels/ops/configs "$OUT"/*.log "$OUT"/*.json /tmp/sanitize 2>/dev/null || true
