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
# suite_in_four: the whole `pytest -m gpu` in four processes side by side (run_t, $TT s each), then tests_report
suite_in_four() {
    local files i j grp
    mapfile -t files < <(ls tests/test_*.py)
    for i in 0 1 2 3; do
        grp=(); for j in "${!files[@]}"; do [ $((j % 4)) = "$i" ] && grp+=("${files[$j]}"); done
        run_t "g$i" "${grp[@]}"
    done
    tests_report
}
# tune_untried WANT RESERVE: this GPU's FP8 tables by `moe_kernels.tune --challenge untried` (limit: lim WANT
# RESERVE), seeded from the H200's where this GPU has none (same chip: they are the incumbents); the tables come
# back in $R/configs, every timing in $R/tune.json. Then the quick GEMM bench on them: gemm_quick WANT RESERVE.
tune_untried() {
    local cfg=moe_kernels/ops/configs gpu f t
    gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
    for f in "$cfg"/grouped_gemm_fp8*_NVIDIA_H200.json; do
        t=${f/NVIDIA_H200/$gpu}; [ -e "$t" ] || { cp "$f" "$t"; echo "seeded $(basename "$t") from the H200's" >> "$S"; }
    done
    echo "== tune --challenge untried $(el)" >> "$S"
    timeout "$(lim "$1" "$2")" python -m moe_kernels.tune --kinds fp8,fp8_swiglu --challenge untried \
      --log "$R/tune.json" > "$R/tune.log" 2>&1
    echo "rc=$?" >> "$S"; grep -vE "^  skip" "$R/tune.log" | tail -30 >> "$S"; grep -c "^  skip" "$R/tune.log" >> "$S"
    mkdir -p "$R/configs"; cp "$cfg"/grouped_gemm_fp8*_"$gpu".json "$R/configs/"
}
gemm_quick() {
    echo "== grouped GEMM bench (quick) on the new tables $(el)" >> "$S"
    timeout "$(lim "$1" "$2")" python bench/bench_grouped_gemm.py --quick > "$R/gemm_quick.log" 2>&1
    echo "rc=$?" >> "$S"; grep -E "min_vs|graph_vs|\| (gate_up|down)" "$R/gemm_quick.log" | head -20 >> "$S"
}
