#!/usr/bin/env bash
# MLA decode on one Hopper GPU: GPU tests, FlashMLA build, bench against FlashMLA. Run from the repo root, with
# the anchors copied to .anchors (cp -r ../shared/anchors .anchors) and OUT set (results come back from there).
#
#   bash tools/gpu/mla.sh            # ~4-5 min (at most MLA_TOTAL=330 s + the bench's 90 s floor): FlashMLA
#                                    # build (background, ~100 s) || GPU tests (~2.5 min); then the bench
#   MLA_QUICK=1 bash tools/gpu/mla.sh   # bench without the config sweep and the CUDA-graph timings (all shapes)
#
# $OUT gets 7 files: mla_tests.log, mla_bench.log, mla_build.log, mla-<GPU>.json (rows, summary, sweep),
# mla_<GPU>.json (the sweep's launch configs, for moe_kernels/ops/configs/), mla_ncu.log (Nsight Compute, when time
# is left or MLA_NCU=1), mla_summary.txt (printed at the end).
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    "$PY" -m moe_kernels.cli info 2>&1 | grep -E "GPU 0|MLA|triton" || true
} 2>&1 | tee /tmp/mla_env.txt

# 1. FlashMLA build in the background (CPU-bound, ~100 s), while the GPU tests run
BUILD_PID=""
if [ -d .anchors ]; then
    # its own logs go to /tmp/anchors_out (not $OUT: few files come back); the tail of FlashMLA's is appended
    (OUT=/tmp/anchors_out PROJ=. timeout 240 bash .anchors/run.sh build > "$OUT/mla_build.log" 2>&1
     echo "build rc=$?" >> "$OUT/mla_build.log"
     tail -15 /tmp/anchors_out/logs/build_flashmla.log >> "$OUT/mla_build.log" 2>/dev/null) &
    BUILD_PID=$!
else
    echo "no .anchors: FlashMLA is not built; the bench runs without it" | tee "$OUT/mla_build.log"
fi

# 2. GPU tests (gpu-marked: DeepSeek-V3 sizes, FP8 cache, 2 query tokens, paged, CUDA-graph replay). The Gluon
#    kernel's test runs alone first, with a short timeout: if it fails (or hangs) the bench leaves it out.
echo "[$(el) s] GPU tests: Gluon kernel"
timeout 110 "$PY" -m pytest -q -rA -m gpu tests/test_mla_decode.py -k gluon -p no:cacheprovider \
    > "$OUT/mla_tests.log" 2>&1
rc=$?
echo "gluon tests rc=$rc" >> "$OUT/mla_tests.log"
GLUON_OK=""
if [ $rc != 124 ] && [ $rc != 137 ]; then  # a hang leaves them all out
    for v in serial pipe lookahead fp8; do
        if grep -q "^PASSED.*gluon.*-$v\]" "$OUT/mla_tests.log" && ! grep -q "^FAILED.*gluon.*-$v\]" "$OUT/mla_tests.log"; then
            case $v in serial) GLUON_OK="$GLUON_OK,1" ;; pipe) GLUON_OK="$GLUON_OK,2" ;; lookahead) GLUON_OK="$GLUON_OK,3" ;; fp8) GLUON_OK="$GLUON_OK,fp8" ;; esac
        fi
    done
fi
GLUON_OK=${GLUON_OK#,}
[ -z "$GLUON_OK" ] && GLUON_OK=none
echo "Gluon schedules that passed: $GLUON_OK" | tee -a "$OUT/mla_tests.log"
echo "[$(el) s] GPU tests: the rest"
timeout 160 "$PY" -m pytest -q -m gpu tests/test_ops_mla.py tests/test_mla_*.py -k "not gluon" -p no:cacheprovider \
    >> "$OUT/mla_tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/mla_tests.log"
tail -3 "$OUT/mla_tests.log"

if [ -n "$BUILD_PID" ]; then
    echo "[$(el) s] waiting for the FlashMLA build"
    wait "$BUILD_PID"
    tail -4 "$OUT/mla_build.log"
fi

# 3. the bench (FlashMLA in the same process when it imports)
echo "[$(el) s] bench"
# the whole script stays within ~${MLA_TOTAL:-330} s: the bench gets what is left (at least 90 s)
LEFT=$(( ${MLA_TOTAL:-330} - $(el) )); [ $LEFT -lt 90 ] && LEFT=90
ARGS="--budget $(( LEFT - 50 ))"
[ "${MLA_QUICK:-0}" = 1 ] && ARGS="--quick"
touch /tmp/mla_bench_start
MLA_BENCH_GLUON=$GLUON_OK timeout $LEFT "$PY" bench/bench_mla.py $ARGS > "$OUT/mla_bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/mla_bench.log"
NEW_JSON=$(find bench/results -maxdepth 1 -name 'mla*.json' -newer /tmp/mla_bench_start)  # this run's only
for f in $NEW_JSON; do cp "$f" "$OUT/"; done

# 4. Nsight Compute on one B=128, S=4096 call of the Gluon kernel and of FlashMLA (tensor pipe, stalls), when
#    MLA_NCU=1 or time is left (it takes ~1 min)
if command -v ncu > /dev/null && { [ "${MLA_NCU:-0}" = 1 ] || [ $(el) -lt 270 ]; }; then
    echo "[$(el) s] ncu"
    : > "$OUT/mla_ncu.log"
    for k in "gluon:regex:_mla_decode_sm90_kernel" "flashmla:regex:(?i)splitkv_mla"; do
        name=${k%%:*}; kern=${k#*:}
        echo "=== $name" >> "$OUT/mla_ncu.log"
        timeout 60 ncu --clock-control none --kernel-name "$kern" --launch-skip 1 --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
            "$PY" bench/bench_mla.py --profile "$name" >> "$OUT/mla_ncu.log" 2>&1
        echo "ncu $name rc=$?" >> "$OUT/mla_ncu.log"
    done
fi

# 5. compact summary
{
    echo "=== MLA GPU run: $(el) s total ==="
    cat /tmp/mla_env.txt
    echo "--- tests:"; grep -E "passed|failed|error|rc=" "$OUT/mla_tests.log" | tail -6
    grep -E "^(FAILED|ERROR)" "$OUT/mla_tests.log" | cut -c1-300 | head -20
    echo "--- build:"; grep -E "build rc|FAILED|flash_mla" "$OUT/mla_build.log" | tail -3
    echo "--- bench:"; grep -E "flash_mla:|decode kernel:|bench rc|budget|Error|error:" "$OUT/mla_bench.log" | head -12
    sed -n '/^| cache/,/^$/p' "$OUT/mla_bench.log" | head -30
    if [ -f "$OUT/mla_ncu.log" ]; then
        echo "--- ncu (B=128, S=4096):"
        grep -E "^===|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per\
 Issued|Issue Slots Busy|Executed Ipc A|ncu .* rc=" "$OUT/mla_ncu.log" | head -30
    fi
    NEW_JSON="$NEW_JSON" "$PY" - <<'EOF'
import json, os
for p in sorted(p for p in os.environ["NEW_JSON"].split() if os.path.basename(p).startswith("mla-")):
    s = json.load(open(p)).get("summary", {})
    keys = ["flash_mla", "decode_vs_flashmla_min", "decode_vs_flashmla_min_graph", "decode_vs_flashmla_max",
            "gluon_vs_flashmla_min", "gluon_fp8_vs_flashmla_B128_S4096",
            "decode_fp8_vs_flashmla_B128_S4096", "decode_fp8_paged_vs_flashmla_B128_S4096", "paged_vs_contig_max",
            "decode_B128_S4096_GBps", "copy_GBps", "rel_err_vs_fp32_max_bf16", "rel_err_vs_fp32_max_fp8",
            "decode_kernel", "seconds"]
    print(p, json.dumps({k: s.get(k) for k in keys}, indent=1))
EOF
} 2>&1 | tee "$OUT/mla_summary.txt"
