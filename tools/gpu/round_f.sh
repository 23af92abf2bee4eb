#!/usr/bin/env bash
# Ninth session's second call (after round_e.sh): the whole `pytest -m gpu` (the router's fill split and the MLA
# seesaw have not run there since their change), then the Mixtral-like decode layer at T = 1 / 8 / 64 / 128 / 256
# (fp8, graphs) with the router's fill split, then, with F_MLA=1, the MLA bench (tools/gpu/mla.sh, MLA_QUICK).
#   F_TOTAL=540 bash tools/gpu/round_f.sh            # carry .anchors when F_MLA=1
set -u
R=/tmp/gpu_round_f TOTAL=${F_TOTAL:-540}
source "$(dirname "$0")/_lib.sh"
TT=${F_TESTS:-210}
suite_in_four
echo "== decode bench mixtral-like fp8 $(el)" >> "$S"
timeout "$(lim ${F_DEC:-120} ${F_RESERVE:-10})" python bench/bench_moe_decode.py --cases mixtral-like --precisions fp8 \
  --tokens 1,8,64,128,256 --rep 30 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||frac|min_|vs_" "$R/decode_bench.log" | tail -16 >> "$S"
if [ "${F_MLA:-0}" = 1 ]; then
    echo "== mla.sh (quick) $(el)" >> "$S"
    OUT=$R/mla MLA_QUICK=1 MLA_TOTAL=$(lim 300 20) timeout "$(lim 330 5)" bash tools/gpu/mla.sh > "$R/mla.out" 2>&1
    cat "$R/mla/mla_summary.txt" >> "$S" 2>/dev/null
fi
pack
