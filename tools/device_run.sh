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
      log "pytest -m gpu"
      python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    demo)
      log demo
      moe-kernels demo 2>&1 | tee "$OUT/demo.log" | tail -12 ;;
    bench_*)
      log "$s"
      python3 "bench/$s.py" 2>&1 | tee "$OUT/$s.log" | tail -30 ;;
    *) echo "unknown step $s" ;;
  esac
done
# everything in one archive: the device tool returns at most 8 files
tar czf "$OUT/results.tgz" bench/results moe_kernels/ops/configs "$OUT"/*.log 2>/dev/null || true
