#!/usr/bin/env bash
# The FP8 weight gradient as a K-grouped GEMM (issue 20; moe_kernels/ops/grouped_wgrad_fp8.py): GPU tests, then the
# existing FP8 wgrad (Triton) against the new one (quantisation pass + Gluon GEMM, both timed) against the bf16
# Gluon wgrad. One Hopper GPU, under 3 min. Run from the repo root; results under $OUT (default /tmp/out).
#
#   bash tools/gpu/wgrad_fp8.sh
#   WGRAD_FP8_TRAIN=1 bash tools/gpu/wgrad_fp8.sh   # + a trainable-FP8 training step (mixtral-like, 8192 tokens)
#                                                   #   with the Triton FP8 wgrad and with the new one (~+60 s)
#
# Steps (each its own process, with a timeout):
#   1. offline sm_90a compile of the GEMM kernel on this machine's Triton (registers, spills, ptxas wgmma notes)
#   2. pytest -m gpu tests/test_grouped_wgrad_fp8.py: the pass + GEMM against grouped_gemm._wgrad_fp8_reference
#      (2e-3) and float64 (8e-2) with odd / empty / single-expert cases, K tails, few programs, stage and unroll
#      variants, bf16 / fp32 outputs NaN-filled first; the pass value for value on the GPU; non-finite rows kept in
#      their expert; grouped_wgrad(fp8=True) dispatching with MOE_KERNELS_WGRAD_FP8=gluon; 16384-row skewed call
#      against the Triton FP8 kernel
#   3. timing (do_bench medians, L2 flushed), 16384 rows over 32 experts (uniform; skewed too), bf16 dY / X / dW,
#      dW13 (N 4096, K 7168) and dW2 (N 7168, K 2048): fp8_triton = grouped_wgrad(fp8=True) as shipped,
#      fp8_gluon = grouped_wgrad(fp8=True) with MOE_KERNELS_WGRAD_FP8=gluon (pass + GEMM), its parts (pass alone,
#      GEMM alone), GEMM variants (5 stages / unroll 2), bf16_gluon = grouped_wgrad(fp8=False) with
#      MOE_KERNELS_WGRAD=gluon; TFLOP/s count 2 M N K; errors of fp8_gluon against fp8_triton and against the bf16
#      result (relative Frobenius)
# What to look for: step 1 spill 0, no warnings; step 2 all passed; step 3 "fp8_gluon_vs_triton" (speed-up over the
# shipped FP8 wgrad) and "fp8_gluon_vs_bf16" (> 1: the FP8 wgrad beats the bf16 Gluon one), err_vs_triton ~1e-3,
# err_vs_bf16 ~3e-2 (the FP8 quantisation); the gemm/quant split says which part to work on next.
# $OUT gets: wgrad_fp8_summary.txt (read this first), wgrad_fp8_compile.log, wgrad_fp8_tests.log,
# wgrad_fp8_bench.log, wgrad_fp8_bench.json (and with WGRAD_FP8_TRAIN=1 wgrad_fp8_train.log).
set -u
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
SUM="$OUT/wgrad_fp8_summary.txt"; : > "$SUM"
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$SUM"; }
python -c "import moe_kernels" 2>/dev/null || pip install --no-build-isolation -e . > "$OUT/install.log" 2>&1

say "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | $(python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)') | $(git log --oneline -1 | cut -c1-60)"

timeout 60 python -m moe_kernels.ops.grouped_wgrad_fp8 bf16 > "$OUT/wgrad_fp8_compile.log" 2>&1
say "compile: $(tail -1 "$OUT/wgrad_fp8_compile.log" | cut -c1-330)"

timeout 90 python -m pytest -q -m gpu -rfEs tests/test_grouped_wgrad_fp8.py > "$OUT/wgrad_fp8_tests.log" 2>&1
say "gpu tests (rc $?): $(tail -1 "$OUT/wgrad_fp8_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/wgrad_fp8_tests.log" | head -20 | tee -a "$SUM"

timeout 85 python - > "$OUT/wgrad_fp8_bench.log" 2>&1 <<'EOF'
import json, os, time
import torch, triton.testing
from moe_kernels import ops
from moe_kernels.ops import grouped_wgrad_fp8 as gf, grouped_wgrad_wgmma as gw

REP = int(os.environ.get("WGRAD_FP8_REP", "100"))
T_END = time.time() + 60  # no new case past this (the step's timeout is 85 s)
launches = []
real = gf.launch
gf.launch = lambda *a, **k: (launches.append(1), real(*a, **k))[1]


def ms(fn, rep=REP):
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def rel(a, b, chunk=4):  # relative Frobenius error, by expert chunks (dW is GBs)
    num = den = 0.0
    for i in range(0, a.shape[0], chunk):
        d = a[i:i + chunk].double() - b[i:i + chunk].double()
        num += float((d * d).sum())
        den += float((b[i:i + chunk].double() ** 2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def counts_for(M, E, dist):
    if dist == "uniform":
        c = [M // E] * E
        c[0] += M - sum(c)
        return c
    g = torch.Generator().manual_seed(0)
    w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    w[E // 3] = w[2 * E // 3] = 0.0
    return torch.multinomial(w, M, replacement=True, generator=g).bincount(minlength=E).tolist()


def env(**kv):
    for k, v in kv.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


rows = []
for name, M, E, N, K, dist in [("dW13 uniform", 16384, 32, 4096, 7168, "uniform"),
                               ("dW2 uniform", 16384, 32, 7168, 2048, "uniform"),
                               ("dW13 skewed", 16384, 32, 4096, 7168, "skewed"),
                               ("dW2 skewed", 16384, 32, 7168, 2048, "skewed")]:
    if time.time() > T_END:
        print(f"{name}: skipped (time)")
        continue
    counts = counts_for(M, E, dist)
    o = [0]
    for c in counts:
        o.append(o[-1] + c)
    offsets = torch.tensor(o, dtype=torch.int32, device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    flop = 2.0 * M * N * K
    r = dict(case=name, M=M, E=E, N=N, K=K, max_rows=max(counts), empty=sum(c == 0 for c in counts))
    env(MOE_KERNELS_WGRAD_FP8=None, MOE_KERNELS_WGRAD=None)
    ref8 = ops.grouped_wgrad(dy, x, offsets, E, fp8=True)
    r["fp8_triton_ms"] = ms(lambda: ops.grouped_wgrad(dy, x, offsets, E, fp8=True), rep=max(REP, 150))
    env(MOE_KERNELS_WGRAD_FP8="gluon")
    n0 = len(launches)
    out = ops.grouped_wgrad(dy, x, offsets, E, fp8=True)
    r["gluon_ran"] = len(launches) > n0 and not gf.FAILED
    if not r["gluon_ran"]:
        print(f"{name}: the FP8 Gluon path did not run ({gf.FAILED or 'not taken'})")
    r["err_vs_triton"] = rel(out, ref8)
    del ref8
    r["fp8_gluon_ms"] = ms(lambda: ops.grouped_wgrad(dy, x, offsets, E, fp8=True))
    bufs = gf.quantize_transposed(dy, x, offsets, E)
    r["quant_ms"] = ms(lambda: gf.quantize_transposed(dy, x, offsets, E, out=bufs))
    r["gemm_ms"] = ms(lambda: gf.gemm(*bufs, out))
    for tag, kw in (("gemm_s5", dict(stages=5)), ("gemm_u2", dict(unroll=2)), ("gemm_s3", dict(stages=3))):
        r[f"{tag}_ms"] = ms(lambda: gf.gemm(*bufs, out, **kw))
    del bufs
    env(MOE_KERNELS_WGRAD_FP8=None, MOE_KERNELS_WGRAD="gluon")
    ref16 = ops.grouped_wgrad(dy, x, offsets, E)
    r["bf16_gluon_ran"] = not gw.FAILED
    r["err_vs_bf16"] = rel(out, ref16)
    del ref16, out
    r["bf16_gluon_ms"] = ms(lambda: ops.grouped_wgrad(dy, x, offsets, E))
    env(MOE_KERNELS_WGRAD=None)
    for k in [k for k in r if k.endswith("_ms")]:
        r[k.replace("_ms", "_tflops")] = flop / r[k] / 1e9
    r["quant_gbps"] = (M * (N + K) * 2 + M * (N + K)) / r["quant_ms"] / 1e6  # bf16 read + e4m3 written
    r["fp8_gluon_vs_triton"] = r["fp8_triton_ms"] / r["fp8_gluon_ms"]
    r["fp8_gluon_vs_bf16"] = r["bf16_gluon_ms"] / r["fp8_gluon_ms"]
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    rows.append(r)
    del dy, x
    torch.cuda.empty_cache()

cols = ["fp8_triton", "fp8_gluon", "quant", "gemm", "gemm_s5", "gemm_u2", "gemm_s3", "bf16_gluon"]
print("| case | " + " | ".join(f"{c} ms (TFLOP/s)" for c in cols) + " | gluon/triton | gluon/bf16 | err vs triton | err vs bf16 |")
print("|" + "---|" * (len(cols) + 5))
for r in rows:
    cells = [f"{r[c + '_ms']:.3f} ({r[c + '_tflops']:.0f})" for c in cols]
    print(f"| {r['case']} | " + " | ".join(cells) + f" | {r['fp8_gluon_vs_triton']:.1f}x | {r['fp8_gluon_vs_bf16']:.2f}x"
          f" | {r['err_vs_triton']:.1e} | {r['err_vs_bf16']:.1e} |")
pair = [r for r in rows if r["case"] in ("dW13 uniform", "dW2 uniform")]
if len(pair) == 2:
    s = {k: sum(r[k + "_ms"] for r in pair) for k in ("fp8_triton", "fp8_gluon", "bf16_gluon")}
    print("issue-20 pair (dW13 + dW2, 16384 rows, 32 experts, uniform) ms:", {k: round(v, 3) for k, v in s.items()},
          f"fp8_gluon vs fp8_triton {s['fp8_triton'] / s['fp8_gluon']:.1f}x, vs bf16_gluon {s['bf16_gluon'] / s['fp8_gluon']:.2f}x")
dev = torch.cuda.get_device_name().replace(" ", "_")
json.dump(dict(device=dev, rows=rows), open(os.path.join(os.environ.get("OUT", "/tmp/out"), "wgrad_fp8_bench.json"), "w"), indent=1)
EOF
say "bench (rc $?):"
grep -E "^\| |issue-20 pair|did not run|skipped|Error|error:" "$OUT/wgrad_fp8_bench.log" | tee -a "$SUM"

if [ "${WGRAD_FP8_TRAIN:-0}" = 1 ]; then
    for impl in triton gluon; do
        echo "=== fp8 wgrad: $impl" >> "$OUT/wgrad_fp8_train.log"
        if [ $impl = gluon ]; then export MOE_KERNELS_WGRAD_FP8=gluon; else unset MOE_KERNELS_WGRAD_FP8; fi
        timeout 90 python bench/bench_training.py --tokens 8192 --cases mixtral-like --precisions fp8 --no-fp32 \
            --err-tokens 512 --profile-tokens 0 >> "$OUT/wgrad_fp8_train.log" 2>&1
        say "training step (fp8), wgrad=$impl (rc $?): $(grep -iE 'mixtral-like' "$OUT/wgrad_fp8_train.log" | tail -2 | tr '\n' ' ' | cut -c1-300)"
    done
    unset MOE_KERNELS_WGRAD_FP8
fi
say "done"
