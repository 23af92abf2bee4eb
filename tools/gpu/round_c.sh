#!/usr/bin/env bash
# Seventh session, first call after round_b.sh: the router's expert-split GEMV (issue 19) and where one MoE layer's
# time goes at T = 8192 (issue 18):
#   GPU tests of routing, PDL and the decode graphs; bench/probe_route.py at T = 1, 2, 4 (the new default beside the
#   old GEMV config 4,32,32 and neighbours); bench_moe_decode.py fp8 at T = 1, 2, 4, 8 with PDL as a variant;
#   bench/profile_moe_layer.py at T = 8192 (fp8, both cases).
#   C_TOTAL=420 bash tools/gpu/round_c.sh
set -u
R=/tmp/gpu_round_c TOTAL=${C_TOTAL:-420}
source "$(dirname "$0")/_lib.sh"
TT=${C_TESTS:-110}
run_t routing tests/test_ops_routing.py
run_t pdl tests/test_pdl.py tests/test_moe_decode_graph.py
tests_report
echo "== route probe $(el)" >> "$S"
timeout "$(lim 70 220)" python bench/probe_route.py --tokens 1,2,4 --rep 30 \
  --gemv '4,32,32;4,256,28,8;4,128,28,8;8,256,28,8;4,256,28,16;4,128,56,8;2,256,28,8' > "$R/route_probe.log" 2>&1
echo "rc=$?" >> "$S"; grep -vE "^\s*\{|^\s*\"|^\s*\}" "$R/route_probe.log" | tail -30 >> "$S"
echo "== decode bench fp8 T 1,2,4,8, PDL as a variant $(el)" >> "$S"
timeout "$(lim 150 60)" python bench/bench_moe_decode.py --precisions fp8 --tokens 1,2,4,8 \
  --ab "pdl:MOE_KERNELS_PDL=1" --rep 30 > "$R/decode.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^  (mixtral|deepseek)|min_|frac_" "$R/decode.log" >> "$S"
echo "== moe layer profile T=8192 fp8 $(el)" >> "$S"
timeout "$(lim 60 5)" python bench/profile_moe_layer.py --precisions fp8 > "$R/layer_profile.log" 2>&1
echo "rc=$?" >> "$S"; cat "$R/layer_profile.log" | grep -v Warn | tail -40 >> "$S"
pack
