#!/usr/bin/env bash
# For the session after the ninth (carry .anchors): what the ninth changed and timed only in part.
#   F_TOTAL=540 bash tools/gpu/round_f.sh
#  1. the whole `pytest -m gpu` in four processes (F_TESTS s): the seesaw is now the bf16 cache's default, the
#     MLA prefill heads and the fused RMSNorm are new, the router's fill split has run only its own file's tests,
#     and the seesaw's paged block-table reads moved to the top of each pair (compiled, never run)
#  2. bench_mla.py with graphs and the config sweep (FlashMLA built in the background meanwhile): the summary keys
#     of issue 17 on the seesaw default, and a tuned mla_<GPU>.json
#  3. bench_moe_decode.py, Mixtral-like fp8 at T = 1 / 8 / 64 / 128 / 256 with the router's fill split (issue 19)
set -u
R=/tmp/gpu_round_f TOTAL=${F_TOTAL:-540}
source "$(dirname "$0")/_lib.sh"
if [ -d .anchors ]; then
    (OUT=/tmp/anchors_out PROJ=. timeout 240 bash .anchors/run.sh build > "$R/flashmla_build.log" 2>&1) &
    BUILD_PID=$!
fi
TT=${F_TESTS:-220}
suite_in_four
[ -n "${BUILD_PID:-}" ] && wait "$BUILD_PID"
echo "== bench_mla (graphs, sweep) $(el)" >> "$S"
timeout "$(lim ${F_MLA:-170} 130)" python bench/bench_mla.py --budget 120 > "$R/mla_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "decode_vs_flashmla|fp8_vs_flashmla|paged_vs|decode kernel" "$R/mla_bench.log" | head -12 >> "$S"
echo "== decode bench mixtral-like fp8 $(el)" >> "$S"
timeout "$(lim ${F_DEC:-120} 5)" python bench/bench_moe_decode.py --cases mixtral-like --precisions fp8 \
  --tokens 1,8,64,128,256 --rep 30 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||frac|min_|vs_" "$R/decode_bench.log" | tail -16 >> "$S"
pack
