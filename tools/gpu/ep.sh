#!/usr/bin/env bash
# Expert parallelism on one GPU (issue 22): build the extension, run the gpu-marked EP tests (2 and 4 ranks sharing
# GPU 0 through ExpertParallel(allow_shared_device=True): P2P round trips, stale data, the low-latency mode (round
# trips, CUDA graph, overflow, the layer), the layer forward/backward, a soak, the timeout), then compute-sanitizer
# memcheck/racecheck/synccheck on the P2P and low-latency kernels (2, then 4 ranks) with the time left (each if >= 45
# s; for a sanitizer-only run on a fresh machine: EP_STEPS="build sanitize"). First run (H200, 2026-12-06): tests
# 80 s, sanitizer (2 ranks) 27 s.
# Everything stays within EP_BUDGET seconds (default 230: tools/gpu/session.sh gives each area 240); logs under
# $OUT (ep_logs.tgz holds them all; a summary is printed at the end).
#
#   OUT=/tmp/out bash tools/gpu/ep.sh            # EP_STEPS="build tests sanitize" (default) picks steps
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
T0=$SECONDS
BUDGET=${EP_BUDGET:-230}
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "=== $* ($(date +%T), +$((SECONDS - T0)) s)"; }
for step in ${EP_STEPS:-build tests sanitize}; do
  case "$step" in
    build)
      log "build: pip install --no-build-isolation -e ."
      timeout "$(left)" python3 -m pip install --no-build-isolation -e . -q >"$OUT/build.log" 2>&1 \
        || { tail -30 "$OUT/build.log"; echo "BUILD FAILED"; }
      python3 -c "import moe_kernels as mk, torch; from moe_kernels.dist.ep import _p2p_ops_available as a
print('extension:', mk.has_extension(), '| p2p ops:', a(), '| low-latency:', hasattr(torch.ops.moe_kernels_C, 'p2p_ll_bytes'),
      '|', torch.cuda.get_device_name(0), torch.__version__)" 2>&1 | tee -a "$OUT/build.log"
      ls -d /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer 2>/dev/null
      command -v compute-sanitizer || true ;;
    tests)
      # the tests come first; the sanitizer gets what they leave (EP_SANITIZE_RESERVE keeps some for it)
      t=$(( $(left) - ${EP_SANITIZE_RESERVE:-0} )); [ "$t" -lt 30 ] && t=30
      log "pytest -m gpu tests/test_ep_*.py (limit $t s: world 2 about half, world 4 the rest)"
      MOE_KERNELS_EP_TEST_END=$(( $(date +%s) + t - 5 )) timeout "$t" python3 -m pytest -q -m gpu -p no:cacheprovider \
        -o addopts="" -rfEs -s tests/test_ep_*.py 2>&1 | tee "$OUT/pytest_ep.log" \
        | grep -E "^\[|passed|failed|skipped|FAILED|ERROR|Error" | tail -40 ;;
    sanitize)
      # one sanitize.sh run per world size (2, then 4 while time is left), each with its own summary
      plain=1; [[ " ${EP_STEPS:-build tests sanitize} " == *" tests "* ]] && plain=0  # the tests ran them plain
      for world in ${EP_SANITIZE_WORLDS:-2 4}; do
        t=$(left)
        if [ "$t" -lt "${EP_SANITIZE_MIN:-45}" ]; then
          echo "=== compute-sanitizer, $world ranks: SKIPPED ($t s left of the ${BUDGET} s budget; EP_BUDGET raises it)"
          continue
        fi
        log "compute-sanitizer on the P2P kernels, $world ranks (limit $t s)"
        SANITIZE_P2P=only SANITIZE_P2P_WORLDS="$world" SANITIZE_TIMEOUT=$((t - 10)) \
          SANITIZE_P2P_PLAIN=$plain SANITIZE_TOOLS="${EP_SANITIZE_TOOLS:-memcheck racecheck synccheck}" \
          SANITIZE_LOG_DIR="$OUT/sanitize" SANITIZE_REQUIRE=1 timeout "$t" bash tests/sanitize.sh 2>&1 \
          | tee "$OUT/sanitize_p2p_w$world.log" | tail -20
      done ;;
    *) echo "unknown step $step" ;;
  esac
done
log done
tar czf "$OUT/ep_logs.tgz" -C "$OUT" --exclude ep_logs.tgz . 2>/dev/null && rm -rf "$OUT/sanitize"
