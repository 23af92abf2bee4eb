#!/usr/bin/env bash
# compute-sanitizer over one small call of every Triton op and of the extension's dispatch-layout kernel.
#
#   bash tests/sanitize.sh                 # memcheck, racecheck, synccheck over every op of tests/_sanitize_ops.py
#   SANITIZE_TOOLS="memcheck" bash tests/sanitize.sh
#   SANITIZE_RACE_OPS="route,permute" bash tests/sanitize.sh   # racecheck/synccheck on a subset
#
# Prints one summary line per tool ("memcheck: 0 errors ...") and exits non-zero when any tool reports an error,
# when an op fails its comparison with the reference, or when a tool run dies or times out. Without a GPU or
# without compute-sanitizer it says so and exits 0 (set SANITIZE_REQUIRE=1 to make that an error).
#
# How: a plain run first compiles every Triton kernel into Triton's cache (the sanitized runs then only launch),
# and PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an access past a tensor's end is
# an access outside an allocation that memcheck sees (inside the caching allocator's big blocks it would not be).
# racecheck checks shared-memory hazards, synccheck barrier misuse; both run over SANITIZE_RACE_OPS (default: all).
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
OPS_SCRIPT="$HERE/_sanitize_ops.py"
TOOLS="${SANITIZE_TOOLS:-memcheck racecheck synccheck}"
ALL_OPS="${SANITIZE_OPS:-all}"
RACE_OPS="${SANITIZE_RACE_OPS:-$ALL_OPS}"
TOOL_TIMEOUT="${SANITIZE_TIMEOUT:-150}"   # seconds per tool run
LOG_DIR="${SANITIZE_LOG_DIR:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"

skip() {
  echo "sanitize: SKIPPED: $1"
  if [ "${SANITIZE_REQUIRE:-0}" = "1" ]; then exit 1; fi
  exit 0
}

SAN="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -z "$SAN" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then SAN="$d/bin/compute-sanitizer"; fi
done
[ -n "$SAN" ] || skip "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null ||
  skip "no CUDA device visible to $PY"

status=0
t0=$SECONDS
echo "sanitize: warm-up run (compiles the Triton kernels; no sanitizer)"
if ! "$PY" "$OPS_SCRIPT" --ops "$ALL_OPS" >"$LOG_DIR/warmup.log" 2>&1; then
  cat "$LOG_DIR/warmup.log"
  echo "sanitize: the ops fail without the sanitizer; fix that first"
  exit 1
fi
echo "sanitize: warm-up done in $((SECONDS - t0)) s; logs in $LOG_DIR"

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
summary=()
for tool in $TOOLS; do
  case "$tool" in
    memcheck) ops="$ALL_OPS"; extra=(--leak-check no) ;;
    racecheck) ops="$RACE_OPS"; extra=(--racecheck-report all) ;;
    synccheck) ops="$RACE_OPS"; extra=() ;;
    *) echo "sanitize: unknown tool $tool"; status=1; continue ;;
  esac
  log="$LOG_DIR/$tool.log"
  t=$SECONDS
  timeout "$TOOL_TIMEOUT" "$SAN" --tool "$tool" "${extra[@]}" --print-limit 20 \
    "$PY" "$OPS_SCRIPT" --ops "$ops" >"$log" 2>&1
  rc=$?
  secs=$((SECONDS - t))
  # memcheck/synccheck end with "========= ERROR SUMMARY: 0 errors"; racecheck with
  # "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
  errors="$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+$')"
  hazards="$(grep -Eo 'RACECHECK SUMMARY: [0-9]+ hazard' "$log" | tail -1 | grep -Eo '[0-9]+' | head -1)"
  if [ -z "$errors" ]; then
    errors="$(grep -Eo 'RACECHECK SUMMARY: .*\([0-9]+ error' "$log" | tail -1 | grep -Eo '[0-9]+ error' | grep -Eo '[0-9]+')"
  fi
  ops_line="$(grep -E '^_sanitize_ops: ' "$log" | tail -1)"
  if [ "$rc" = 124 ]; then
    line="$tool: TIMED OUT after ${TOOL_TIMEOUT} s (ops: $ops)"; status=1
  elif [ -z "$errors" ]; then
    line="$tool: no summary (exit $rc; see $log)"; status=1
  else
    line="$tool: $errors errors"
    [ -n "$hazards" ] && line="$line, $hazards hazards"
    line="$line (ops: $ops; ${secs} s; ${ops_line#_sanitize_ops: })"
    if [ "$errors" != 0 ] || { [ -n "$hazards" ] && [ "$hazards" != 0 ]; } || [ "$rc" != 0 ]; then
      status=1
      grep -E '^========= ' "$log" | head -40
    fi
  fi
  summary+=("$line")
done

echo "sanitize: summary ($((SECONDS - t0)) s in all)"
for line in "${summary[@]}"; do echo "$line"; done
exit $status
