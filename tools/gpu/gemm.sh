#!/usr/bin/env bash
# DeepGEMM side by side with our grouped FP8 GEMM (issue 18, items 3-4), one Hopper GPU, offline, ~3 min.
# Run from the repo root with the anchors copied to .anchors (cp -r ../shared/anchors .anchors, plus what
# tools/deepgemm/README.md lists: src/DeepGEMM_8dfa329 and wheels/) and OUT set (results come back from there).
#
#   bash tools/gpu/gemm.sh                 # bench --quick (8 x 4096, both projections, + its MLP row)
#   GEMM_FULL=1 bash tools/gpu/gemm.sh     # all 10 shapes, no MLP rows (~2-3 min more)
#   GEMM_DEADLINE=200                      # seconds after which a working 2.6.1 is not timed any more
#   GEMM_SKIP_261=1                        # no 2.6.1 build / diagnosis (8dfa329 + the bench only, ~2 min)
#
# What it does, each step in its own process so that a segfault ends that step only:
#  t=0    2.6.1 C++ module rebuilt in the background (nice 19) in three variants: B0 = the anchors' build
#         (torch's C++ standard, as DeepGEMM's setup.py: c++17 on torch 2.11), B1 = -std=c++20 and
#         DG_JIT_USE_RUNTIME_API (kernels loaded through cudart's cudaLibrary* instead of a dlopen'ed libcuda),
#         B2 = B0 with libstdc++ linked first (its std::filesystem etc. instead of the copies libtorch_cpu exports:
#         tools/deepgemm/build261.py says why)
#  then   DeepGEMM 8dfa329 (mid-2025, pure-Python JIT, no C++ build) laid out in /tmp, tried on a small grouped
#         GEMM with the installed cuda-python (13.x on torch 2.11), else with the cuda-bindings 12.9 wheel shipped
#         in .anchors/wheels; the one that works precompiles the bench's kernels (4 processes), then
#         bench/bench_grouped_gemm.py runs with it in the same process as ours and torch's (--deepgemm auto)
#  last   2.6.1 step by step (import, scale-layout transform, small grouped GEMM) per variant: B0 plain (with
#         DG_JIT_DEBUG=1 and a native backtrace on a crash: tools/deepgemm/segv_bt.c), B0 with torch's cuBLASLt
#         handle and no static CUDA workspace tensor (DG_USE_PYTORCH_CUBLASLT_HANDLE=1
#         DG_USE_TEMP_CUBLASLT_WORKSPACE=1), B2, B0 with NVRTC instead of nvcc (DG_JIT_USE_NVRTC=1), B1; stops at the
#         first that passes and then times it at (8, 4096), contiguous and masked. A step that printed its result
#         and crashed only while the process exited counts as passed ("crashed at exit" in the log). The five
#         variants run side by side after the bench (small shapes); the timing only before GEMM_DEADLINE.
# $OUT gets 6 files: gemm_summary.txt (read this first), gemm_bench.log, grouped_gemm-<GPU>.json / .md (the
# bench's results), gemm_diag.log (every DeepGEMM step: 8dfa329 and 2.6.1), gemm_build.log (2.6.1 builds, env).
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
A=${ANCHORS:-$ROOT/.anchors}
W=/tmp/gemm_work
DEADLINE=${GEMM_DEADLINE:-200}
rm -rf "$W"; mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
SUM="$OUT/gemm_summary.txt"; DIAG="$OUT/gemm_diag.log"; BLOG="$OUT/gemm_build.log"
: > "$SUM"; : > "$DIAG"; : > "$BLOG"
say() { echo "[$(el) s] $*" | tee -a "$SUM"; }

# --- environment: CUDA_HOME (nvcc), the nvidia wheels' headers for the C++ build (torch's CUDA headers need them)
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")"; do
        [ -x "$c/bin/nvcc" ] && { export CUDA_HOME="$c"; break; }
    done
fi
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
if [ -n "${CUDA_HOME:-}" ] && [ ! -e "$CUDA_HOME/include/cusparse.h" ]; then
    EXTRA_INC=$("$PY" -c "
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
print(':'.join(d for d in glob.glob(site + '/nvidia/*/include') + glob.glob(site + '/nvidia/*/*/include') if os.path.exists(d + '/cusparse.h')))" 2>/dev/null)
    [ -n "$EXTRA_INC" ] && export CPATH="$EXTRA_INC${CPATH:+:$CPATH}"
fi
{
    echo "=== environment"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    echo "CUDA_HOME=${CUDA_HOME:-none} CPATH=${CPATH:-}"
    nvcc --version 2>&1 | tail -2
    g++ --version 2>&1 | head -1
    "$PY" - <<'EOF' 2>&1
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
try:
    import cuda.bindings
    print("cuda-bindings", cuda.bindings.__version__)
except Exception as e:
    print("cuda-bindings: none", type(e).__name__)
try:
    import pybind11
    print("pybind11 (pip)", pybind11.__version__)
except Exception:
    print("pybind11 (pip): none")
EOF
    echo "addr2line: $(command -v addr2line || echo none)   gdb: $(command -v gdb || echo none)   cores: $(nproc)"
    for f in cuobjdump nvcc; do echo "$f: $(ls "${CUDA_HOME:-/none}/bin/$f" 2>/dev/null || echo missing)"; done
} > "$W/env.txt" 2>&1
cat "$W/env.txt" >> "$SUM"; cat "$W/env.txt" >> "$BLOG"
[ -d "$A/src/DeepGEMM" ] || say "NOTE: $A/src/DeepGEMM is missing: no 2.6.1 diagnosis"
[ -d "$A/src/DeepGEMM_8dfa329" ] || say "NOTE: $A/src/DeepGEMM_8dfa329 is missing: no DeepGEMM in the bench"

# --- t=0: the 2.6.1 builds in the background (CPU only; nice so the bench's host side is not starved)
gcc -shared -fPIC -O1 -o "$W/segv_bt.so" tools/deepgemm/segv_bt.c >> "$BLOG" 2>&1 || say "segv_bt.so did not build"
SEGV=""; [ -f "$W/segv_bt.so" ] && SEGV="$W/segv_bt.so"
build261() {  # build261 NAME [--libstdcxx-first] ENV... : a copy of 2.6.1 in $W/NAME, built with ENV
    local name=$1 opt=""; shift
    [ "${1:-}" = --libstdcxx-first ] && { opt=$1; shift; }
    cp -a "$A/src/DeepGEMM" "$W/$name" && chmod -R u+w "$W/$name" && rm -rf "$W/$name/build" "$W/$name"/deep_gemm/_C*.so
    env "$@" MAX_JOBS=4 nice -n 19 timeout 300 "$PY" tools/deepgemm/build261.py "$A" "$W/$name" $opt \
        > "$W/build_$name.log" 2>&1
    echo "build rc=$?" >> "$W/build_$name.log"
}
PIDS=""
DO261=0; [ -d "$A/src/DeepGEMM" ] && [ "${GEMM_SKIP_261:-0}" != 1 ] && DO261=1
if [ "$DO261" = 1 ]; then
    build261 B0 ANCHORS_DG_NOOP=1 & PIDS="$PIDS $!"
    build261 B1 ANCHORS_DG_CXX_STD=c++20 DG_JIT_USE_RUNTIME_API=1 & PIDS="$PIDS $!"
    build261 B2 --libstdcxx-first ANCHORS_DG_NOOP=1 & PIDS="$PIDS $!"
    say "2.6.1 builds started in the background (B0: anchors flags; B1: c++20 + DG_JIT_USE_RUNTIME_API; B2: B0 with libstdc++ linked first)"
fi

# --- DeepGEMM 8dfa329: lay out, try with the installed cuda-python, then with the shipped 12.9 wheels
DG_PP=""
export DG_JIT_CACHE_DIR=/tmp/dg_jit_8dfa329
if [ -d "$A/src/DeepGEMM_8dfa329" ]; then
    for how in sys wheels; do
        flag=""; [ "$how" = wheels ] && flag="--wheels"
        "$PY" tools/deepgemm/setup_8dfa329.py "$A" "$W/dg_old_$how" $flag > "$W/setup_$how.log" 2>&1
        pp=$(grep '^PYTHONPATH=' "$W/setup_$how.log" | cut -d= -f2)
        if [ -z "$pp" ]; then say "8dfa329 setup ($how) failed: $(tail -1 "$W/setup_$how.log")"; continue; fi
        PYTHONPATH="$pp:$ROOT" LD_PRELOAD="$SEGV" timeout 120 "$PY" tools/deepgemm/dg_diag.py \
            --steps contiguous --shapes small --label "8dfa329 cuda-python:$how" --timeout 100 \
            > "$W/diag_old_$how.log" 2>&1
        rc=$?
        cat "$W/diag_old_$how.log" >> "$DIAG"
        say "8dfa329 with cuda-python '$how': $(tail -1 "$W/diag_old_$how.log") (rc $rc)"
        if [ "$rc" = 0 ]; then DG_PP="$pp"; break; fi
    done
fi

# --- precompile the bench's DeepGEMM kernels (its on-disk JIT cache), 4 at a time, each checked against float64
SHAPES=quick; [ "${GEMM_FULL:-0}" = 1 ] && SHAPES=full
if [ -n "$DG_PP" ]; then
    PYTHONPATH="$DG_PP:$ROOT" timeout 150 "$PY" tools/deepgemm/dg_diag.py --steps contiguous,masked --shapes "$SHAPES" \
        --jobs 4 --label "8dfa329 precompile+standalone" --timeout 140 > "$W/diag_old_pre.log" 2>&1
    cat "$W/diag_old_pre.log" >> "$DIAG"
    say "8dfa329 precompile ($SHAPES shapes): $(tail -1 "$W/diag_old_pre.log")"
    grep -h "   | ok " "$W/diag_old_pre.log" | sed 's/^ *| /    /' >> "$SUM"
fi

# --- the bench: ours, torch's, DeepGEMM 8dfa329 in one process
# GEMM_END_BY=EPOCH: the bench ends by then. GEMM_HOLD=FILE: wait while FILE exists (another job is still using the GPU), so the bench times alone
if [ -n "${GEMM_HOLD:-}" ]; then while [ -e "$GEMM_HOLD" ]; do sleep 1; done; say "hold released"; fi
BARGS="--quick"; [ "${GEMM_FULL:-0}" = 1 ] && BARGS="--no-mlp"
if [ -n "$DG_PP" ]; then PPB="$DG_PP:$ROOT"; DGARG="--deepgemm auto"; else PPB="$ROOT"; DGARG="--deepgemm off"; fi
export DG_ANCHOR_COMMIT="8dfa329 ($(basename "${DG_PP%%/src*}"))"  # 8dfa329 has no __version__: the bench reports this
say "bench: bench/bench_grouped_gemm.py $BARGS $DGARG"
BT=400; [ -n "${GEMM_END_BY:-}" ] && BT=$(( GEMM_END_BY - $(date +%s) )) && [ "$BT" -gt 400 ] && BT=400
say "bench time limit ${BT} s"
PYTHONPATH="$PPB${PYTHONPATH:+:$PYTHONPATH}" timeout "$BT" "$PY" -X faulthandler bench/bench_grouped_gemm.py $BARGS $DGARG \
    --out "$W/bench" > "$OUT/gemm_bench.log" 2>&1
rc=$?
say "bench rc=$rc"
if [ "$rc" != 0 ] && [ -n "$DG_PP" ]; then
    say "bench failed with DeepGEMM: rerunning without it"
    mv "$OUT/gemm_bench.log" "$W/gemm_bench_with_dg.log"
    { tail -40 "$W/gemm_bench_with_dg.log"; echo "=== rerun with --deepgemm off"; } > "$OUT/gemm_bench.log"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$PY" -X faulthandler bench/bench_grouped_gemm.py $BARGS \
        --deepgemm off --out "$W/bench" >> "$OUT/gemm_bench.log" 2>&1
    say "bench (no DeepGEMM) rc=$?"
fi
cp "$W"/bench/grouped_gemm-*.json "$W"/bench/grouped_gemm-*.md "$OUT/" 2>/dev/null
"$PY" - "$W/bench" <<'EOF' 2>&1 | tee -a "$SUM"
import glob, json, sys
for p in sorted(glob.glob(sys.argv[1] + "/grouped_gemm-*.json")):
    s = json.load(open(p))["summary"]
    keys = ["deepgemm", "shapes", "quick", "min_vs_scaled_grouped_mm_best", "min_vs_deepgemm",
            "min_vs_deepgemm_contiguous", "min_vs_deepgemm_masked", "min_vs_deepgemm_all_shapes",
            "eager_min_vs_scaled_grouped_mm_best", "eager_min_vs_deepgemm", "tflops_8x4096", "deepgemm_max_rel_err",
            "graph_vs_deepgemm", "min_mlp_speedup", "graph_min_mlp_speedup"]
    print("--- bench summary", p.split("/")[-1])
    print(json.dumps({k: s.get(k) for k in keys}, indent=1))
EOF
sed -n '/^### Grouped GEMM, CUDA-graph/,/^### Expert/p' "$OUT/gemm_bench.log" | head -20 >> "$SUM"

# --- DeepGEMM 2.6.1: wait for the builds, then step by step per variant until one passes or the deadline
for p in $PIDS; do wait "$p"; done
for b in B0 B1 B2; do
    [ -f "$W/build_$b.log" ] || continue
    { echo "=== build $b"; grep -E "compiling|^\[1/1\]|c\+\+ .*python_api|error|Error|build rc|built in" "$W/build_$b.log" | cut -c1-2000 | tail -12; } >> "$BLOG"
    so=$(ls "$W/$b"/deep_gemm/_C*.so 2>/dev/null | head -1)
    if [ -n "$so" ]; then
        { echo "--- $b: NEEDED order, ldd, undefined symbols of interest"; readelf -d "$so" | grep NEEDED | head -12
          ldd "$so" 2>&1 | grep -E "cuda|nvrtc|cublas|torch|c10|stdc"
          nm -DC --undefined-only "$so" 2>/dev/null | grep -E "fmt::|pybind11::|cublasLt" | head -6
          # where the module's libstdc++ references bind at import (libtorch's exported copies or libstdc++ itself)
          rm -f "$W"/ldb.*
          PYTHONPATH="$W/$b" LD_DEBUG=bindings LD_DEBUG_OUTPUT="$W/ldb" timeout 60 "$PY" -c "import torch, deep_gemm" > /dev/null 2>&1
          echo "std:: symbols of $b's module bound to (count, library):"
          cat "$W"/ldb.* 2>/dev/null | grep "binding file [^ ]*deep_gemm/_C" | grep "symbol \`_ZN[KS]*t\|symbol \`_ZNSt\|symbol \`_ZNKSt" \
              | sed -E 's/.* to ([^ ]+) .*/\1/' | sort | uniq -c | sort -rn | head -8
          echo "its std::filesystem references bound to torch's libraries (count, then the first few):"
          cat "$W"/ldb.* 2>/dev/null | grep "binding file [^ ]*deep_gemm/_C" | grep "filesystem" \
              | grep " to [^ ]*lib\(torch\|c10\)[a-z_]*\.so " > "$W/fs_bind.txt"
          wc -l < "$W/fs_bind.txt"
          sed -E 's/.* to ([^ ]+) .* symbol .([^`]+).$/    \1 \2/' "$W/fs_bind.txt" | head -4
          rm -f "$W"/ldb.*; } >> "$BLOG" 2>&1
    fi
    say "2.6.1 build $b: $(tail -1 "$W/build_$b.log") $(ls "$W/$b"/deep_gemm/_C*.so 2>/dev/null | wc -l) module(s)"
done
PASSED=""
run261() {  # run261 LABEL BUILD ENV... : the steps in the background; exit code to $W/rc_LABEL
    local label=$1 b=$2; shift 2
    ls "$W/$b"/deep_gemm/_C*.so > /dev/null 2>&1 || { echo "no module built" > "$W/diag_$label.log"; echo none > "$W/rc_$label"; return 0; }
    ( env "$@" PYTHONPATH="$W/$b:$ROOT" DG_JIT_CACHE_DIR="/tmp/dg_jit_261_$label" LD_PRELOAD="$SEGV" timeout 150 \
        "$PY" tools/deepgemm/dg_diag.py --steps import,sf_layout,contiguous --shapes small --stop-on-fail \
        --label "2.6.1 $label" --timeout 70 > "$W/diag_$label.log" 2>&1
      echo $? > "$W/rc_$label" ) &
    PIDS261="$PIDS261 $!"
}
report261() {  # report261 LABEL BUILD: summary lines; a crash: the native backtrace, its module frames named
    local label=$1 b=$2 rc
    rc=$(cat "$W/rc_$label" 2>/dev/null || echo "?")
    cat "$W/diag_$label.log" >> "$DIAG"
    say "2.6.1 $label: $(tail -1 "$W/diag_$label.log") (rc $rc)"
    local so; so=$(ls "$W/$b"/deep_gemm/_C*.so 2>/dev/null | head -1)
    if [ -n "$so" ] && grep -q "segv_bt\] signal" "$W/diag_$label.log"; then
        grep -A3 "segv_bt\] signal" "$W/diag_$label.log" | head -4 | sed 's/^ *| /    /' >> "$SUM"
        if command -v addr2line > /dev/null; then
            grep -o "_C[^ ]*\.so(+0x[0-9a-f]*)" "$W/diag_$label.log" | sort -u | head -12 | while read -r fr; do
                off=$(echo "$fr" | grep -o "0x[0-9a-f]*")
                echo "    $fr -> $(addr2line -Cfie "$so" "$off" 2>&1 | paste -sd' ' | cut -c1-300)"
            done | tee -a "$DIAG" >> "$SUM"
        fi
        grep -h "_C[^ ]*\.so(\|lib[a-z0-9_+]*\.so[.0-9]*(" "$W/diag_$label.log" | grep -v segv_bt | head -14 \
            | sed 's/^ *| /    /' >> "$SUM"
        grep -h "Running NVCC\|Loading CUBIN\|Launch kernel\|Compiling JIT\|Generated kernel" "$W/diag_$label.log" \
            | tail -4 | cut -c1-300 | sed 's/^ *| /    last JIT debug line: /' >> "$SUM"
    fi
    [ -z "$PASSED" ] && [ "$rc" = 0 ] && PASSED="$label:$b"
    return 0
}
if [ "$DO261" = 1 ]; then
    # the five variants side by side (small shapes, separate JIT caches), reported in this order of preference
    PIDS261=""
    VARIANTS="B0-plain:B0:DG_JIT_DEBUG=1
B0-torch-cublaslt:B0:DG_USE_PYTORCH_CUBLASLT_HANDLE=1 DG_USE_TEMP_CUBLASLT_WORKSPACE=1 DG_JIT_DEBUG=1
B2-libstdc++-first:B2:DG_JIT_DEBUG=1
B0-nvrtc:B0:DG_JIT_USE_NVRTC=1 DG_JIT_DEBUG=1
B1-c++20-runtime-api:B1:DG_JIT_DEBUG=1"
    say "2.6.1: $(echo "$VARIANTS" | wc -l) variants side by side"
    while IFS=: read -r label b envs; do
        # shellcheck disable=SC2086
        run261 "$label" "$b" $envs
    done <<< "$VARIANTS"
    for p in $PIDS261; do wait "$p"; done
    while IFS=: read -r label b envs; do report261 "$label" "$b"; done <<< "$VARIANTS"
    if [ -n "$PASSED" ] && [ "$(el)" -ge "$DEADLINE" ]; then
        say "2.6.1 works as ${PASSED%%:*}, but no time is left to time it (GEMM_DEADLINE ${DEADLINE} s)"
    elif [ -n "$PASSED" ]; then
        label=${PASSED%%:*}; b=${PASSED#*:}
        case "$label" in
            *torch-cublaslt*) VENV="DG_USE_PYTORCH_CUBLASLT_HANDLE=1 DG_USE_TEMP_CUBLASLT_WORKSPACE=1" ;;
            *nvrtc*) VENV="DG_JIT_USE_NVRTC=1" ;;
            *) VENV="DG_NOOP=1" ;;
        esac
        say "2.6.1 works as $label: timing it at (8, 4096) ($(el) s)"
        env $VENV PYTHONPATH="$W/$b:$ROOT" DG_JIT_CACHE_DIR="/tmp/dg_jit_261_$label" timeout 150 "$PY" tools/deepgemm/dg_diag.py \
            --steps contiguous,masked --shapes quick --jobs 4 --time --label "2.6.1 $label timing" --timeout 140 \
            > "$W/diag_261_timing.log" 2>&1
        cat "$W/diag_261_timing.log" >> "$DIAG"
        grep -h "   | ok .*TFLOP" "$W/diag_261_timing.log" | sed 's/^ *| /    2.6.1 /' >> "$SUM"
        say "2.6.1 timing: $(tail -1 "$W/diag_261_timing.log")"
        echo "    (to bench 2.6.1 inside bench_grouped_gemm.py: $VENV PYTHONPATH=<that build>:. python bench/bench_grouped_gemm.py)" >> "$SUM"
    fi
fi
say "done in $(el) s; files: $(ls "$OUT" | tr '\n' ' ')"
