#!/usr/bin/env bash
# MLA decode on one Hopper GPU, issue 17: the Gluon sm_90 kernel's seesaw schedule (PIPE=1, two warp-specialised
# warpgroups alternating tiles; the default since the ninth session) against its serial schedule (PIPE=0) and
# FlashMLA. Run from the repo root; results go to $OUT (default /tmp/out).
#
#   bash tools/gpu/mla_pipe.sh                 # < 4 min
#   MLA_PIPE_FULL=1 bash tools/gpu/mla_pipe.sh # also the serial and FP8 Gluon GPU tests (~1 min more)
#
#  0. background: FlashMLA's build (when .anchors exists and flash_mla does not import; ~100 s) and the compile
#     of the timed launch configs (bench_mla's precompile of GLUON=1 and GLUON=2)
#  1. GPU tests of PIPE=1: tests/test_mla_decode.py -k "gluon and pipe" (contiguous and paged + 2 query tokens;
#     NaN in the cache past every length; 1, 3 and auto splits; lengths 0 .. 2000), then
#     test_ops_mla.py::test_decode_deepseek_shapes_gpu with MOE_KERNELS_MLA_PIPE=1 (shipped config: the bf16
#     one-split output too). A hang (deadlocked barrier) is killed by the timeout (rc 124) and leaves PIPE=1 untimed.
#  2. timing: B in {32, 128} x S in {1024, 4096}, bf16 cache contiguous and paged: serial, seesaw, FlashMLA
#     (bench/_common.bench_ms: do_bench median, L2 flushed; same data as bench/bench_mla.py), each output checked
#     against the fp32 reference of rows 0-1 (and FlashMLA's output).
#  3. summary ($OUT/mla_pipe_summary.txt): test counts, then per shape serial_us, pipe_us, flashmla_us,
#     pipe_vs_serial (serial / pipe: > 1 = the seesaw is faster), x_flashmla (flashmla / pipe: 1 = FlashMLA's
#     speed), and the errors.
# Look for: "pipe tests: ... passed" with no FAILED/timeout; pipe_vs_serial > 1 and x_flashmla toward 1 at
# S=4096; err_* < 2e-2.
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}
export OUT
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset MOE_KERNELS_MLA_PIPE
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${MLA_PIPE_BUDGET:-225}  # seconds for the whole script
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(date +%s) + T0 )); }
cap() { local a=$1 b; b=$(left); [ "$b" -lt "$a" ] && a=$b; [ "$a" -lt 5 ] && a=5; echo "$a"; }  # min(arg, left)

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    git log --oneline -1 2>/dev/null
} 2>&1 | tee "$OUT/mla_pipe_env.txt"

# 0. background: FlashMLA build, compile of the timed configs
BUILD_PID=""
if "$PY" -c "import sys; sys.path.insert(0, 'bench'); import bench_mla as b; sys.exit(b.load_flash_mla()[0] is None)" \
        > /dev/null 2>&1; then
    echo "flash_mla imports" | tee "$OUT/mla_pipe_build.log"
elif [ -d .anchors ]; then
    (OUT=/tmp/anchors_out PROJ=. timeout 170 bash .anchors/run.sh build > "$OUT/mla_pipe_build.log" 2>&1
     echo "build rc=$?" >> "$OUT/mla_pipe_build.log"
     tail -8 /tmp/anchors_out/logs/build_flashmla.log >> "$OUT/mla_pipe_build.log" 2>/dev/null) &
    BUILD_PID=$!
else
    echo "no .anchors and no flash_mla: timing without FlashMLA" | tee "$OUT/mla_pipe_build.log"
fi
(timeout 150 "$PY" - > "$OUT/mla_pipe_precompile.log" 2>&1 <<'EOF'
import sys
sys.path.insert(0, "bench")
import bench_mla as bm
for g in (1, 2):  # contiguous and paged, one split and two: the specialisations the timing launches
    print(g, bm._precompile_job(("decode", dict(bm.dec_cfg(64, 64, 8, 2), GLUON=g)))[2], flush=True)
EOF
) &
PRE_PID=$!

# 1. GPU tests of PIPE=1
echo "[$(el) s] GPU tests: Gluon kernel, PIPE=1"
timeout "$(cap 120)" "$PY" -m pytest -q -rA -m gpu tests/test_mla_decode.py -k "gluon and pipe" -p no:cacheprovider \
    > "$OUT/mla_pipe_tests.log" 2>&1
rc=$?
echo "pipe gluon tests rc=$rc" >> "$OUT/mla_pipe_tests.log"
PIPE_TIME=1
if [ $rc = 124 ] || [ $rc = 137 ]; then
    PIPE_TIME=0
    echo "PIPE=1 tests timed out (a hang?): PIPE=1 is not timed" | tee -a "$OUT/mla_pipe_tests.log"
elif [ "${MLA_PIPE_NO_OPS:-0}" != 1 ]; then  # MLA_PIPE_NO_OPS=1: a short call skips these
    echo "[$(el) s] GPU tests: decode at DeepSeek shapes (shipped config) with MOE_KERNELS_MLA_PIPE=1"
    MOE_KERNELS_MLA_PIPE=1 timeout "$(cap 60)" "$PY" -m pytest -q -rA -m gpu tests/test_ops_mla.py \
        -k "test_decode_deepseek_shapes_gpu" -p no:cacheprovider >> "$OUT/mla_pipe_tests.log" 2>&1
    rc2=$?
    echo "ops_mla tests (MOE_KERNELS_MLA_PIPE=1) rc=$rc2" >> "$OUT/mla_pipe_tests.log"
    [ $rc2 = 124 ] || [ $rc2 = 137 ] && PIPE_TIME=0
fi
if [ "${MLA_PIPE_FULL:-0}" = 1 ]; then
    echo "[$(el) s] GPU tests: Gluon kernel, serial and FP8"
    timeout "$(cap 90)" "$PY" -m pytest -q -rA -m gpu tests/test_mla_decode.py -k "gluon and not pipe" \
        -p no:cacheprovider >> "$OUT/mla_pipe_tests.log" 2>&1
    echo "serial/fp8 gluon tests rc=$?" >> "$OUT/mla_pipe_tests.log"
fi
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|rc=" "$OUT/mla_pipe_tests.log" | cut -c1-200 | tail -20

wait "$PRE_PID" 2>/dev/null
if [ -n "$BUILD_PID" ]; then
    W=$(( $(left) - 70 ))
    echo "[$(el) s] waiting for the FlashMLA build (up to ${W} s)"
    for _ in $(seq 1 $(( W > 0 ? W : 0 ))); do kill -0 "$BUILD_PID" 2>/dev/null || break; sleep 1; done
    tail -3 "$OUT/mla_pipe_build.log"
fi

# 2. timing
echo "[$(el) s] timing (PIPE=1 timed: $PIPE_TIME)"
MLA_PIPE_TIME=$PIPE_TIME timeout "$(cap 200)" "$PY" - > "$OUT/mla_pipe_bench.log" 2>&1 <<'EOF'
import json
import os
import sys
import time

sys.path.insert(0, "bench")
import torch  # noqa: E402

import bench_mla as bm  # noqa: E402
from _common import bench_ms  # noqa: E402

t0 = time.time()
fm, fm_err = bm.load_flash_mla()
print("flash_mla:", "imported" if fm else f"not available ({fm_err})", flush=True)
names = [("serial", 1)] + ([("pipe", 2)] if os.environ.get("MLA_PIPE_TIME") == "1" else [])
rows = []


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


for S in (4096, 1024):
    for B in (32, 128):
        d = bm.decode_data(B, S)
        ref = bm.decode_ref(d, "bf16")
        out_fm = None
        base = dict(B=B, S=S)
        if fm is not None:
            meta = fm.get_mla_metadata()[0]

            def flashmla():
                return fm.flash_mla_with_kvcache(d["q_fm"], d["k_fm"], d["table"], d["lens"], bm.C, meta, None,
                                                 softmax_scale=bm.SCALE, causal=False)[0]
            out_fm = flashmla().reshape(B, bm.HEADS, bm.C).clone()
            base["flashmla_us"] = bench_ms(flashmla) * 1e3
        for cache in ("bf16", "bf16_paged"):
            row = dict(base, cache=cache)
            for name, g in names:
                try:
                    fn = bm.ours_fn(d, cache, dict(bm.dec_cfg(64, 64, 8, 2), GLUON=g), 0)
                    out = fn().clone()
                    torch.cuda.synchronize()
                    row[f"err_{name}"] = rel(out[:2].cpu(), ref)
                    if out_fm is not None:
                        row[f"err_{name}_vs_fm"] = rel(out, out_fm)
                    row[f"{name}_us"] = bench_ms(fn) * 1e3
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if "pipe_us" in row and "serial_us" in row:
                row["pipe_vs_serial"] = row["serial_us"] / row["pipe_us"]
            for name, _ in names:
                if f"{name}_us" in row and "flashmla_us" in row:
                    row[f"x_flashmla_{name}"] = row["flashmla_us"] / row[f"{name}_us"]
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del d
        torch.cuda.empty_cache()
cols = ["cache", "B", "S", "serial_us", "pipe_us", "flashmla_us", "pipe_vs_serial", "x_flashmla_serial",
        "x_flashmla_pipe", "err_serial", "err_pipe", "err_pipe_vs_fm"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in sorted(rows, key=lambda r: (r["cache"], r["S"], r["B"])):
    print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, seconds=time.time() - t0),
          open(os.path.join(os.environ.get("OUT", "/tmp/out"), "mla_pipe.json"), "w"), indent=1)
print(f"timing took {time.time() - t0:.0f} s")
EOF
echo "bench rc=$?" >> "$OUT/mla_pipe_bench.log"
[ -n "$BUILD_PID" ] && kill "$BUILD_PID" 2>/dev/null

# 3. summary
{
    echo "=== MLA PIPE=1 (seesaw) run: $(el) s ==="
    cat "$OUT/mla_pipe_env.txt"
    echo "--- tests:"
    grep -E "passed|failed|error|rc=|timed out" "$OUT/mla_pipe_tests.log" | tail -6
    grep -E "^(FAILED|ERROR)" "$OUT/mla_pipe_tests.log" | cut -c1-300 | head -12
    echo "--- precompile:"; tail -3 "$OUT/mla_pipe_precompile.log"
    echo "--- build:"; grep -E "flash_mla|build rc|FAILED" "$OUT/mla_pipe_build.log" | tail -2
    echo "--- timing (us; pipe_vs_serial = serial/pipe, x_flashmla_* = flashmla/ours):"
    grep -E "^flash_mla|^\||Error|error|bench rc|timing took" "$OUT/mla_pipe_bench.log" | head -30
} 2>&1 | tee "$OUT/mla_pipe_summary.txt"
