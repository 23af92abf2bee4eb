#!/usr/bin/env bash
# Eighth session (never got a GPU; ready for the next): the MLA seesaw schedule without spills (issue 17), its host
# time, then the router probes (Mixtral-like T = 128 / 256: the fill split; DeepSeek T = 8: GEMV configs; issue 19)
# and the bf16 MoE layer profile (issue 20), as time allows.
#   E_TOTAL=430 bash tools/gpu/round_e.sh
#   E_TOTAL=240 E_NO_OPS=1 E_RESERVE=10 bash tools/gpu/round_e.sh   # a short call: seesaw tests and timing only
set -u
R=/tmp/gpu_round_e TOTAL=${E_TOTAL:-430}
source "$(dirname "$0")/_lib.sh"
echo "== mla_pipe.sh (seesaw tests, E_FULL=1: serial/FP8 Gluon tests too; timing beside FlashMLA) $(el)" >> "$S"
OUT=$R/mla MLA_PIPE_FULL=${E_FULL:-0} MLA_PIPE_NO_OPS=${E_NO_OPS:-0} MLA_PIPE_BUDGET=$(lim 300 ${E_RESERVE:-100}) bash tools/gpu/mla_pipe.sh > "$R/mla_pipe.out" 2>&1
cat "$R/mla/mla_pipe_summary.txt" >> "$S" 2>/dev/null
grep -E "^(FAILED|ERROR)" "$R/mla/mla_pipe_tests.log" | cut -c1-300 | head -12 >> "$S"
echo "== mla host probe $(el)" >> "$S"
timeout "$(lim 40 100)" python tools/gpu/mla_host_probe.py > "$R/mla_host.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^B=" "$R/mla_host.log" >> "$S"; grep -A30 "ncalls" "$R/mla_host.log" | head -30 | cut -c1-160 >> "$S"
echo "== route probe mixtral T=128,256 (the fill split against the former unsplit default) $(el)" >> "$S"
timeout "$(lim 40 60)" python bench/probe_route.py --case mixtral --tokens 128,256 --splits 16 --warps 4 --rep 30 \
  --extra '[{"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}]' > "$R/route_probe_mixtral.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^gate|^  \{" "$R/route_probe_mixtral.log" | tail -8 >> "$S"
mv bench/results/route_probe-mixtral-*.json "$R/" 2>/dev/null
echo "== route probe T=8 $(el)" >> "$S"
timeout "$(lim 45 80)" python bench/probe_route.py --tokens 8 --rep 30 \
  --gemv '4,128,28,16;4,256,28,16;8,256,28,16;4,128,28,8;8,128,28,8' > "$R/route_probe8.log" 2>&1
echo "rc=$?" >> "$S"; grep -E "^gate|^  \{" "$R/route_probe8.log" | tail -12 >> "$S"
mv bench/results/route_probe-*.json "$R/" 2>/dev/null
echo "== moe layer profile T=8192 bf16 $(el)" >> "$S"
timeout "$(lim 60 5)" python bench/profile_moe_layer.py --precisions bf16 --cases mixtral-like \
  > "$R/layer_profile_bf16.log" 2>&1
echo "rc=$?" >> "$S"; grep -v Warn "$R/layer_profile_bf16.log" | tail -20 >> "$S"
pack
