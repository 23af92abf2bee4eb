# Sourced by the device-call scripts (round.sh, round2.sh, short.sh, mini.sh) after they set R (their scratch
# folder, made afresh) and TOTAL (seconds the call may take). Sets REAL_OUT ($OUT: what comes back), S (the summary
# log, begun with the GPU's name), PYTHONPATH (this checkout) and the timers: el (elapsed), left (seconds to the
# end), lim WANT [RESERVE] (WANT, or less so that RESERVE seconds are left at the end; at least 1).
REAL_OUT=${OUT:-/tmp/out}; mkdir -p "$REAL_OUT"
rm -rf "$R"; mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S=$REAL_OUT/summary.log
T0=$SECONDS
END=$(( $(date +%s) + TOTAL ))
el() { echo "+$((SECONDS - T0)) s"; }
left() { echo $(( END - $(date +%s) )); }
lim() { local want=$1 l; l=$(( $(left) - ${2:-0} )); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 1 ] && want=1; echo "$want"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$S"
# gemm_join LABEL: let the background tools/gpu/gemm.sh (pid GEMM_PID, waiting while the file HOLD exists) time its
# bench now, wait for it, and add its summary to S. pack: end the summary, copy the results and tar $R to $OUT.
gemm_join() {
    echo "== gemm bench ($1) $(el)" >> "$S"
    rm -f "$HOLD"
    wait "$GEMM_PID"
    cat "$R/gemm/gemm_summary.txt" >> "$S" 2>/dev/null
}
pack() {
    echo "done $(el)" >> "$S"
    cp bench/results/*.json bench/results/*.txt bench/results/*.png "$R/" 2>/dev/null
    tar -czf "$REAL_OUT/results.tgz" -C "$R" .
}
# run_t NAME PYTEST_ARGS...: GPU tests in the background (limit $TT s) into $R/t_NAME.log; tests_report: wait for
# them and add their counts and failures to S
T_PIDS=()
run_t() { local name=$1; shift; (timeout "$TT" python -m pytest -q -m gpu -rfE -p no:cacheprovider "$@" > "$R/t_$name.log" 2>&1) & T_PIDS+=($!); }
tests_report() {
    local p; for p in "${T_PIDS[@]}"; do wait "$p"; done
    echo "tests done $(el)" >> "$S"
    for f in "$R"/t_*.log; do echo "-- $(basename "$f")" >> "$S"; grep -E "passed|failed|^FAILED|^ERROR" "$f" | tail -12 >> "$S"; done
}
# killed from outside (the device call's limit): still pack what is there
trap 'echo "killed $(el)" >> "$S"; pack; exit 143' TERM INT
