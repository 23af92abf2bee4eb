#!/usr/bin/env bash
# Seventh session, third call: PDL on by default (issue 19) verified and timed (also a counter arena, since removed):
#   the whole `pytest -m gpu` in four processes; bench/probe_route.py at T = 8 (GEMV configs beside the 16-row
#   tl.dot default); bench_moe_decode.py fp8 at every T with PDL switched off as a variant (same run);
#   bench/profile_moe_layer.py bf16 at T = 8192 (issue 20: where the bf16 forward's time goes).
#   D_TOTAL=540 bash tools/gpu/round_d.sh
set -u
R=/tmp/gpu_round_d TOTAL=${D_TOTAL:-540}
source "$(dirname "$0")/_lib.sh"
TT=${D_TESTS:-200}
suite_in_four
[ "${D_PROBE:-1}" = 1 ] && echo "== route probe T=8 $(el)" >> "$S" && timeout "$(lim 40 240)" python bench/probe_route.py --tokens 8 --rep 30 \
  --gemv '4,128,28,16;4,256,28,16;8,256,28,16;4,128,28,8;8,128,28,8' > "$R/route_probe8.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^gate|^  \{" "$R/route_probe8.log" | tail -12 >> "$S"
mv bench/results/route_probe-*.json "$R/" 2>/dev/null
echo "== decode bench fp8, every T, PDL off as a variant $(el)" >> "$S"
timeout "$(lim 200 30)" python bench/bench_moe_decode.py --precisions fp8 --tokens ${D_TOKENS:-1,2,4,8,16,32,64,128,256} \
  --ab "nopdl:MOE_KERNELS_PDL=0" --rep 30 > "$R/decode.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^  (mixtral|deepseek)|min_|frac_" "$R/decode.log" >> "$S"
[ "${D_PROFILE:-1}" = 1 ] && echo "== moe layer profile T=8192 bf16 $(el)" >> "$S" && timeout "$(lim 40 3)" python bench/profile_moe_layer.py --precisions bf16 --cases mixtral-like \
  > "$R/layer_profile_bf16.log" 2>&1
echo "rc=$?" >> "$S"; grep -v Warn "$R/layer_profile_bf16.log" | tail -20 >> "$S"
pack
