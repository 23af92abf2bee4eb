#!/usr/bin/env bash
# Run several tools/gpu/<area>.sh scripts in one device call, each with its own time limit, and bring back their
# results as one archive (the device tool returns at most 8 files): $OUT/results.tgz + $OUT/summary.log.
#   bash tools/gpu/all.sh decode:240 mla:300      # area:seconds ...
set -u
REAL_OUT=${OUT:-/tmp/out}; mkdir -p "$REAL_OUT"
RES=/tmp/gpu_results; rm -rf "$RES"; mkdir -p "$RES"
export PYTHONUNBUFFERED=1
for spec in "$@"; do
  area=${spec%%:*}; secs=${spec#*:}
  mkdir -p "$RES/$area"
  echo "=== $area (limit ${secs}s) $(date -u +%T)" | tee -a "$REAL_OUT/summary.log"
  OUT="$RES/$area" timeout -k 10 "$secs" bash "tools/gpu/$area.sh" > "$RES/$area/stdout.log" 2>&1
  echo "rc=$?" | tee -a "$REAL_OUT/summary.log"
  tail -30 "$RES/$area/stdout.log" >> "$REAL_OUT/summary.log"
done
tar -czf "$REAL_OUT/results.tgz" -C "$RES" .
