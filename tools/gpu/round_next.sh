#!/usr/bin/env bash
# For the session after the eleventh (carry .anchors):  N_TOTAL=560 bash tools/gpu/round_next.sh
# Budget (s): fp8mma tests 75, the suite 180 (4 processes), probe_linear 40, decode bench 80, decode probe 40,
# bench_mla 140 (each capped by what is left; see _lib.sh's lim)
# What the tenth session changed and could not run (its device time went on failed starts):
#  1. the whole `pytest -m gpu` in four processes (N_TESTS s): the Gluon bf16 grouped GEMM is now the default from
#     256 rows an expert (only its own tests and the training bench ran with it), linear_fp8's graph-capture fix
#     and fp32 bound, the default-dispatch test of the bf16 kernel; FlashMLA builds in the background meanwhile
#  2. bench/probe_linear_fp8.py: why FP8 attention projections made the whole model slower (issue 19)
#  3. bench_moe_decode.py, Mixtral-like fp8 T = 1 / 8 / 64 / 128 / 256: the router's fill split (ninth session)
#  4. bench_mla.py --no-sweep with graphs: the seesaw's paged hoist (issue 17)
# The eleventh session (no device lent) added, and this runs first (before the suite, 75 s):
#  0. the FP8 cache's seesaw with e4m3 products (ops/mla_decode_sm90_fp8.py, opt-in): its GPU tests
#     (test_gluon_sm90_kernel_gpu[*fp8mma*]); bench_mla.py then times it (MLA_BENCH_GLUON=...,fp8mma) if they passed
#  5. probe_decode.py: the down projection's BLOCK_N 64 against 128 at Mixtral-like T = 1 / 8 / 128 / 256
set -u
R=/tmp/gpu_round_next TOTAL=${N_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
if [ -d .anchors ]; then
    (OUT=/tmp/anchors_out PROJ=. timeout 240 bash .anchors/run.sh build > "$R/flashmla_build.log" 2>&1) &
    BUILD_PID=$!
fi
echo "== fp8mma GPU tests $(el)" >> "$S"
timeout 75 python -m pytest -q -m gpu -rfE -p no:cacheprovider tests/test_mla_decode.py -k "fp8mma" \
  > "$R/t_fp8mma.log" 2>&1
FP8MMA_RC=$?
echo "rc=$FP8MMA_RC" >> "$S"; grep -E "passed|failed|Error|error" "$R/t_fp8mma.log" | tail -12 >> "$S"
MLA_GLUON=1,2,3,fp8
[ "$FP8MMA_RC" = 0 ] && MLA_GLUON=1,2,3,fp8,fp8mma
TT=${N_TESTS:-180}
suite_in_four
echo "== probe linear_fp8 $(el)" >> "$S"
timeout "$(lim 40 260)" python bench/probe_linear_fp8.py > "$R/probe_linear.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||Error" "$R/probe_linear.log" | tail -8 >> "$S"
echo "== decode bench mixtral-like fp8 $(el)" >> "$S"
timeout "$(lim 80 180)" python bench/bench_moe_decode.py --cases mixtral-like --precisions fp8 \
  --tokens 1,8,64,128,256 --rep 30 > "$R/decode_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\||frac|min_|vs_" "$R/decode_bench.log" | tail -14 >> "$S"
# the down projection at Mixtral-like T = 128 / 256 runs at 0.65-0.70 of the weight-read bound where gate_up runs at
# 0.85 (decode_probe, seventh session): 448 programs of BLOCK_N 128 are 3.4 waves on 132 SMs; BLOCK_N 64 (6.8
# waves) was never timed
echo "== decode probe: w2 BLOCK_N 64 vs 128 $(el)" >> "$S"
timeout "$(lim 40 140)" python bench/probe_decode.py --shapes "mixtral T=1,mixtral T=8,mixtral T=128,mixtral T=256" \
  --stages 4 --splits 0 --w2-block-n 64,128 > "$R/decode_probe_bn.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^\|" "$R/decode_probe_bn.log" | tail -10 >> "$S"
[ -n "${BUILD_PID:-}" ] && wait "$BUILD_PID"
echo "== bench_mla (graphs, no sweep) $(el)" >> "$S"
MLA_BENCH_GLUON=$MLA_GLUON timeout "$(lim 140 3)" python bench/bench_mla.py --no-sweep > "$R/mla_bench.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "decode_vs_flashmla|fp8_vs_flashmla|fp8mma|paged_vs|^\|" "$R/mla_bench.log" | tail -26 >> "$S"
pack
