#!/usr/bin/env bash
# A last short device call: the whole `pytest -m gpu` in four processes side by side (F_TESTS s), then the router
# probe on named GEMV configs at T = 1 (F_ROUTE s).
#   F_TESTS=200 F_ROUTE=70 bash tools/gpu/final.sh
set -u
R=/tmp/gpu_results TOTAL=${F_TOTAL:-330}
source "$(dirname "$0")/_lib.sh"
TT=${F_TESTS:-200}
suite_in_four
echo "== route probe $(el)" >> "$S"
timeout "$(lim ${F_ROUTE:-70} 5)" python bench/probe_route.py --tokens 1 --gates bfloat16 \
  --gemv "1,16,32;2,16,32;2,32,16;2,32,32;4,32,32;4,64,16;8,32,16" > "$R/route_probe.log" 2>&1
echo "rc=$?" >> "$S"; tail -30 "$R/route_probe.log" >> "$S"
pack
