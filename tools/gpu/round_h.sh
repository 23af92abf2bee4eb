#!/usr/bin/env bash
# Tenth session, second call (carry .anchors):  H_TOTAL=500 bash tools/gpu/round_h.sh
#  1. the whole `pytest -m gpu` in four processes (H_TESTS s), the Gluon bf16 grouped GEMM now the default on sm_90
#     and linear_fp8's graph-capture fix; FlashMLA builds in the background meanwhile
#  2. bench/probe_linear_fp8.py: the FP8 linear at o_proj / q_b_proj shapes by config, against bf16
#  3. bench_moe_decode.py, Mixtral-like fp8 at T = 1 / 8 / 64 / 128 / 256 (the router's fill split, issue 19)
#  4. bench_mla.py --no-sweep with graphs (FlashMLA in the same process): the seesaw's paged hoist (issue 17)
set -u
R=/tmp/gpu_round_h TOTAL=${H_TOTAL:-500}
source "$(dirname "$0")/_lib.sh"
if [ -d .anchors ]; then
    (OUT=/tmp/anchors_out PROJ=. timeout 240 bash .anchors/run.sh build > "$R/flashmla_build.log" 2>&1) &
    BUILD_PID=$!
fi
TT=${H_TESTS:-190}
suite_in_four
echo "== probe linear_fp8 $(el)" >> "$S"
timeout "$(lim 50 180)" python bench/probe_linear_fp8.py > "$R/probe_linear.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||Error" "$R/probe_linear.log" | tail -8 >> "$S"
echo "== decode bench mixtral-like fp8 $(el)" >> "$S"
timeout "$(lim 100 90)" python bench/bench_moe_decode.py --cases mixtral-like --precisions fp8 \
  --tokens 1,8,64,128,256 --rep 30 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||frac|min_|vs_" "$R/decode_bench.log" | tail -14 >> "$S"
[ -n "${BUILD_PID:-}" ] && wait "$BUILD_PID"
echo "== bench_mla (graphs, no sweep) $(el)" >> "$S"
timeout "$(lim 140 3)" python bench/bench_mla.py --no-sweep > "$R/mla_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "decode_vs_flashmla|fp8_vs_flashmla|paged_vs|^\|" "$R/mla_bench.log" | tail -24 >> "$S"
pack
