#!/usr/bin/env bash
# Expert parallelism on one GPU (issue 22): build the extension, run the gpu-marked EP tests (2 and 4 ranks sharing
# GPU 0 through ExpertParallel(allow_shared_device=True): P2P round trips, stale data, the layer forward/backward,
# the timeout, a 1000-call soak; low-latency tests when present) and compute-sanitizer memcheck/racecheck/synccheck
# on the P2P kernels (2 ranks). Logs under $OUT (ep_logs.tgz holds everything). Budget: about 4-5 minutes
# (build ~1.5, tests ~2, sanitizer ~1.5); worst case (everything timing out) ~9.
#
#   OUT=/tmp/out bash tools/gpu/ep.sh            # EP_STEPS="build tests sanitize" (default) picks steps
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
T0=$SECONDS
log() { echo "=== $* ($(date +%T), +$((SECONDS - T0)) s)"; }
for step in ${EP_STEPS:-build tests sanitize}; do
  case "$step" in
    build)
      log "build: pip install --no-build-isolation -e ."
      python3 -m pip install --no-build-isolation -e . -q >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; echo "BUILD FAILED"; }
      python3 -c "import moe_kernels as mk, torch; from moe_kernels.dist.ep import _p2p_ops_available as a
print('extension:', mk.has_extension(), '| p2p ops:', a(), '|', torch.cuda.get_device_name(0), torch.__version__)" 2>&1 | tee -a "$OUT/build.log"
      ls -d /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null; command -v compute-sanitizer || true ;;
    tests)
      tests=$(ls tests/test_ep_*.py)
      log "pytest -m gpu $tests (limit ${EP_TEST_TIMEOUT:-330} s, ${EP_WORLD_DEADLINE:-150} s per world size)"
      MOE_KERNELS_EP_TEST_DEADLINE=${EP_WORLD_DEADLINE:-150} timeout "${EP_TEST_TIMEOUT:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfEs -s \
        $tests 2>&1 | tee "$OUT/pytest_ep.log" | grep -E "^\[|passed|failed|FAILED|ERROR|error|Error" | tail -40 ;;
    sanitize)
      log "compute-sanitizer on the P2P kernels (limit ${EP_SANITIZE_TIMEOUT:-150} s)"
      SANITIZE_P2P=only SANITIZE_P2P_WORLDS="${EP_SANITIZE_WORLDS:-2}" SANITIZE_TIMEOUT="${EP_SANITIZE_TOOL_TIMEOUT:-130}" \
        SANITIZE_LOG_DIR="$OUT/sanitize" SANITIZE_REQUIRE=1 timeout "${EP_SANITIZE_TIMEOUT:-150}" bash tests/sanitize.sh 2>&1 \
        | tee "$OUT/sanitize_p2p.log" | tail -20 ;;
    *) echo "unknown step $step" ;;
  esac
done
log done
tar czf "$OUT/ep_logs.tgz" -C "$OUT" --exclude ep_logs.tgz . 2>/dev/null || true
rm -rf "$OUT/sanitize"
