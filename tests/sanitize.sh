#!/usr/bin/env bash
# compute-sanitizer over one small call of every Triton op and of the extension's dispatch-layout kernel.
#
#   bash tests/sanitize.sh                 # memcheck, racecheck, synccheck over every op of tests/_sanitize_ops.py
#   SANITIZE_TOOLS="memcheck" bash tests/sanitize.sh
#   SANITIZE_RACE_OPS="route,permute" bash tests/sanitize.sh   # racecheck/synccheck on a subset
#   SANITIZE_P2P=only SANITIZE_P2P_WORLDS="2 4" bash tests/sanitize.sh  # only the P2P dispatch/combine kernels
#
# Prints one summary line per tool ("memcheck: 0 errors ...") and exits non-zero when any tool reports an error,
# when an op fails its comparison with the reference, or when a tool run dies or times out. Without a GPU or
# without compute-sanitizer it says so and exits 0 (set SANITIZE_REQUIRE=1 to make that an error).
#
# How: a plain run first compiles every Triton kernel into Triton's cache (the sanitized runs then only launch),
# and PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an access past a tensor's end is
# an access outside an allocation that memcheck sees (inside the caching allocator's big blocks it would not be).
# racecheck checks shared-memory hazards, synccheck barrier misuse; both run over SANITIZE_RACE_OPS (default: all).
# Then the extension's P2P dispatch/combine (when its ops load): SANITIZE_P2P_WORLDS processes sharing GPU 0 through
# ExpertParallel(allow_shared_device=True), each rank under the tool (tests/_sanitize_ops.py --p2p), one plain run
# first; every rank's log is summarised.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
OPS_SCRIPT="$HERE/_sanitize_ops.py"
TOOLS="${SANITIZE_TOOLS:-memcheck racecheck synccheck}"
ALL_OPS="${SANITIZE_OPS:-all}"
RACE_OPS="${SANITIZE_RACE_OPS:-$ALL_OPS}"
TOOL_TIMEOUT="${SANITIZE_TIMEOUT:-150}"   # seconds per tool run
LOG_DIR="${SANITIZE_LOG_DIR:-$(mktemp -d)}"
P2P="${SANITIZE_P2P:-1}"                  # 1: the ops, then the P2P kernels; only: just P2P; 0: no P2P
P2P_WORLDS="${SANITIZE_P2P_WORLDS:-2}"    # ranks sharing the GPU, e.g. "2 4"
P2P_TIMEOUT="${SANITIZE_P2P_TIMEOUT:-100}" # seconds a P2P kernel waits for a peer (instrumented: slow)
mkdir -p "$LOG_DIR"

skip() {
  echo "sanitize: SKIPPED: $1"
  if [ "${SANITIZE_REQUIRE:-0}" = "1" ]; then exit 1; fi
  exit 0
}

SAN="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  for f in "$d/bin/compute-sanitizer" "$d/compute-sanitizer/compute-sanitizer"; do
    if [ -z "$SAN" ] && [ -n "$d" ] && [ -x "$f" ]; then SAN="$f"; fi
  done
done
[ -n "$SAN" ] || skip "compute-sanitizer not found (PATH, \$CUDA_HOME, /usr/local/cuda*: bin/ or compute-sanitizer/)"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null ||
  skip "no CUDA device visible to $PY"

status=0
t0=$SECONDS
summary=()

# summarize TOOL LOG RC SECS WHAT: one summary line; status=1 on errors, hazards, a failed comparison, a timeout
summarize() {
  local tool=$1 log=$2 rc=$3 secs=$4 what=$5 errors hazards ops_line line
  # memcheck/synccheck end with "========= ERROR SUMMARY: 0 errors"; racecheck with
  # "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
  errors="$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+$')"
  hazards="$(grep -Eo 'RACECHECK SUMMARY: [0-9]+ hazard' "$log" | tail -1 | grep -Eo '[0-9]+' | head -1)"
  if [ -z "$errors" ]; then
    errors="$(grep -Eo 'RACECHECK SUMMARY: .*\([0-9]+ error' "$log" | tail -1 | grep -Eo '[0-9]+ error' | grep -Eo '[0-9]+')"
  fi
  ops_line="$(grep -E '^_sanitize_ops: ' "$log" | tail -1)"
  if [ "$rc" = 124 ]; then
    line="$tool: TIMED OUT after ${TOOL_TIMEOUT} s ($what)"; status=1
  elif [ -z "$errors" ]; then
    line="$tool: no summary (exit $rc; $what; see $log)"; status=1
    tail -5 "$log"
  else
    line="$tool: $errors errors"
    [ -n "$hazards" ] && line="$line, $hazards hazards"
    line="$line ($what; ${secs} s; ${ops_line#_sanitize_ops: })"
    if [ "$errors" != 0 ] || { [ -n "$hazards" ] && [ "$hazards" != 0 ]; } || [ "$rc" != 0 ]; then
      status=1
      line="$line; exit $rc"
      grep -E '^========= |FAIL' "$log" | head -40
    fi
  fi
  summary+=("$line")
}

tool_args() {  # the options of one tool
  case "$1" in
    memcheck) echo "--leak-check no" ;;
    racecheck) echo "--racecheck-report all" ;;
    synccheck) echo "" ;;
    *) return 1 ;;
  esac
}

if [ "$P2P" != "only" ]; then
  echo "sanitize: warm-up run (compiles the Triton kernels; no sanitizer)"
  if ! "$PY" "$OPS_SCRIPT" --ops "$ALL_OPS" >"$LOG_DIR/warmup.log" 2>&1; then
    cat "$LOG_DIR/warmup.log"
    echo "sanitize: the ops fail without the sanitizer; fix that first"
    exit 1
  fi
  echo "sanitize: warm-up done in $((SECONDS - t0)) s; logs in $LOG_DIR"
  for tool in $TOOLS; do
    if ! extra="$(tool_args "$tool")"; then echo "sanitize: unknown tool $tool"; status=1; continue; fi
    ops="$ALL_OPS"; [ "$tool" != memcheck ] && ops="$RACE_OPS"
    log="$LOG_DIR/$tool.log"
    t=$SECONDS
    # shellcheck disable=SC2086
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$TOOL_TIMEOUT" "$SAN" --tool "$tool" $extra --print-limit 20 \
      "$PY" "$OPS_SCRIPT" --ops "$ops" >"$log" 2>&1
    summarize "$tool" "$log" $? $((SECONDS - t)) "ops: $ops"
  done
fi

# The extension's P2P dispatch/combine: WORLD processes sharing GPU 0 (allow_shared_device), each rank under the
# tool; the tools run side by side (each with its own group and port) unless SANITIZE_P2P_SERIAL=1.
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# p2p_run TAG WORLD [SANITIZER ARGS...]: start the ranks (under the sanitizer when args are given), wait for all;
# each rank's log is $LOG_DIR/TAG.rank<r>.log; echoes the worst exit status
p2p_run() {
  local tag=$1 world=$2; shift 2
  local port pids=() r rc worst=0
  port="$(free_port)"
  for ((r = 0; r < world; r++)); do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$TOOL_TIMEOUT" "$@" "$PY" "$OPS_SCRIPT" --p2p "$r,$world,$port" \
      --p2p-timeout "$P2P_TIMEOUT" >"$LOG_DIR/$tag.rank$r.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid"; rc=$?
    if [ "$rc" = 124 ] || { [ "$worst" != 124 ] && [ "$rc" -gt "$worst" ]; }; then worst=$rc; fi
  done
  echo "$worst"
}

if [ "$P2P" != "0" ]; then
  if ! "$PY" -c 'import sys; from moe_kernels.dist.ep import _p2p_ops_available as a; sys.exit(0 if a() else 1)' \
      2>/dev/null; then
    if [ "$P2P" = "only" ]; then skip "the extension's P2P ops are not available (build it first)"; fi
    summary+=("p2p: SKIPPED (the extension's P2P ops are not available)")
  else
    for world in $P2P_WORLDS; do
      t=$SECONDS
      if [ "${SANITIZE_P2P_PLAIN:-1}" = 1 ]; then  # 0: skip it (e.g. when the GPU tests just ran the same checks)
        rc="$(p2p_run "p2p_w${world}_plain" "$world")"
        if [ "$rc" != 0 ]; then
          cat "$LOG_DIR/p2p_w${world}_plain".rank*.log | tail -30
          summary+=("p2p world $world: FAILS without the sanitizer (exit $rc): fix that first"); status=1; continue
        fi
        echo "sanitize: p2p world $world plain run ok in $((SECONDS - t)) s"
      fi
      declare -A rcs=() starts=()
      for tool in $TOOLS; do
        if ! extra="$(tool_args "$tool")"; then echo "sanitize: unknown tool $tool"; status=1; continue; fi
        starts[$tool]=$SECONDS
        # shellcheck disable=SC2086
        if [ "${SANITIZE_P2P_SERIAL:-0}" = 1 ]; then
          p2p_run "p2p_w${world}_$tool" "$world" "$SAN" --tool "$tool" $extra --print-limit 20 >"$LOG_DIR/rc_$tool"
        else
          p2p_run "p2p_w${world}_$tool" "$world" "$SAN" --tool "$tool" $extra --print-limit 20 >"$LOG_DIR/rc_$tool" &
        fi
      done
      wait
      for tool in $TOOLS; do
        [ -f "$LOG_DIR/rc_$tool" ] || continue
        rc="$(cat "$LOG_DIR/rc_$tool")"
        for ((r = 0; r < world; r++)); do
          summarize "$tool" "$LOG_DIR/p2p_w${world}_$tool.rank$r.log" "$rc" $((SECONDS - ${starts[$tool]})) \
            "p2p world $world rank $r"
        done
        rm -f "$LOG_DIR/rc_$tool"
      done
    done
  fi
fi

echo "sanitize: summary ($((SECONDS - t0)) s in all)"
for line in "${summary[@]}"; do echo "$line"; done
exit $status
