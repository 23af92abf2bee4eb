#!/usr/bin/env bash
# Issue 21, drop-in defects 1/2/5/6/7/8 on one GPU. Needs no build (the tests do not use the extension).
#  1. pytest -m gpu: tests/test_dropin.py (FP8 layer with rows requiring grad, .cuda().half() keeps e4m3 weights,
#     odd sizes H=64/72/96, I=40/48 in bf16/fp32 through the TMA grouped GEMMs and their backward, NaN scales through
#     the FP8 expert MLP), tests/test_ops_quant.py (NaN spreads through its 1x128 group: the amax is now a
#     NaN-propagating max, max.NaN.f32 in PTX), tests/test_ops_permute.py -k fp8 (the fused quantisation shares it).
#  2. Timing of quantize_fp8 and permute(fp8=True) at DeepSeek-V3 shape (T=16384, H=7168, k=8, E=256): compare with
#     permute_fp8_gbps at T=16384 in bench/results/routing-<this GPU>.json (H200 ~2250 GB/s, H100 ~2110 GB/s);
#     the NaN-propagating max should cost nothing.
# Logs under $OUT (dropin.log). Budget: about 2-3 minutes (kernel compiles dominate).
#
#   OUT=/tmp/out bash tools/gpu/dropin.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$SECONDS
{
  echo "=== pytest -m gpu ($(date +%T))"
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfEsx \
    tests/test_dropin.py tests/test_ops_quant.py "tests/test_ops_permute.py" -k "not permute or fp8" 2>&1 | tail -40
  echo "=== timing (+$((SECONDS - T0)) s)"
  timeout 120 python3 - <<'EOF'
import torch, triton.testing
import moe_kernels as mk
dev = torch.cuda.get_device_name(0)
T, H, k, E = 16384, 7168, 8, 256
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
ids = torch.rand(T, E, device="cuda").argsort(1)[:, :k].to(torch.int32).contiguous()
ms = triton.testing.do_bench(lambda: mk.ops.quantize_fp8(x), warmup=25, rep=200, return_mode="median")
gb = T * H * (2 + 1) + T * H // 128 * 4
print(f"{dev}: quantize_fp8 [{T}, {H}] bf16: {ms * 1e3:.1f} us, {gb / ms / 1e6:.0f} GB/s")
ms = triton.testing.do_bench(lambda: mk.ops.permute(x, ids, E, fp8=True), warmup=25, rep=200, return_mode="median")
gb = T * H * 2 + T * k * (H + H // 128 * 4) + T * k * 12  # bench_routing.permute_bytes(fp8=True)
print(f"{dev}: permute fp8 T={T} k={k} E={E} (random ids): {ms * 1e3:.1f} us, {gb / ms / 1e6:.0f} GB/s")
xn = x[:4].float().clone(); xn[1, 5] = float("nan")
q, s = mk.ops.quantize_fp8(xn)
print("NaN group -> scale NaN:", torch.isnan(s).cpu().tolist()[1][:2], "values NaN:", int(torch.isnan(q.float()).sum()))
EOF
  echo "=== done (+$((SECONDS - T0)) s)"
} 2>&1 | tee "$OUT/dropin.log"
