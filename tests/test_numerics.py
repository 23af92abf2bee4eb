"""Numerics of the FP8 paths: overflow, all-zero blocks, denormals, and the error of every op against float64.

Edge cases, for quantize_fp8, quantize_weight_fp8, permute(fp8=True), grouped_gemm_fp8 and expert_mlp (kernels
through the interpreter on CPU, marked gpu on CUDA):
  * overflow: values far beyond e4m3's 448 are absorbed by the block scale; no inf or NaN comes out;
  * all-zero blocks: the scale is floored (amax >= 1e-10, never 0), so nothing divides by zero and the block
    dequantises to exactly 0;
  * denormals: tiny (1e-30) and subnormal inputs (fp32, bf16, fp16) give finite scales and values within the
    element-wise bound below.
Element-wise bound of one 1x128 group (or 128x128 block) with scale s = max(amax, 1e-10) / 448: rounding to the
nearest e4m3 value (3 mantissa bits; subnormal spacing 2^-9) leaves |x - q*s| <= max(|x| / 16, s / 1024).

The error bounds (BOUNDS) are relative Frobenius errors against a float64 computation from the same unrounded
data; ``python tests/test_numerics.py`` measures them (docs/numerics.md records the numbers and explains the
margins).
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from moe_kernels.ops import mla as ops_mla  # noqa: E402
from moe_kernels.reference import mla as RM  # noqa: E402
from moe_kernels.reference.quant import MIN_AMAX  # noqa: E402
from test_ops_permute import assert_fp8_close  # noqa: E402

# The floored scale of an all-zero block. Kernels and the reference divide with IEEE rounding on every device
# (reference.quant.scale_of); scales are still compared to 1 fp32 ulp (rtol 2e-7), and e4m3 values to 1 e4m3 ulp
# in a few elements (tests/test_ops_permute.assert_fp8_close), where a test's own torch code divides by a scalar.
FLOOR_SCALE = MIN_AMAX / 448

F8 = torch.float8_e4m3fn
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# what each float dtype can hold: the largest finite value, the smallest normal, a subnormal
RANGE = {
    torch.float32: (3.0e38, 1.2e-38, 1e-40),
    torch.bfloat16: (3.0e38, 1.2e-38, 1e-39),
    torch.float16: (6.0e4, 6.2e-5, 6e-8),
}

# relative Frobenius error vs float64 that the tests allow: (fp8 path, bf16 path). Measured values and the
# margins are in docs/numerics.md; the measurement is main() below.
BOUNDS = {
    "quantize": (0.04, 2e-3),  # bf16: rounding to nearest is <= 2^-9 relative per element, so the norm is too
    "quantize_weight": (0.04, 2e-3),
    "permute": (0.04, 2e-3),
    "grouped_gemm": (0.06, 8e-3),
    "expert_mlp": (0.1, 1.2e-2),
    "unpermute": (None, 6e-3),
    "route": (None, 1e-6),
    "mla_latent_proj": (0.06, 8e-3),
    "mla_decode": (None, 5e-3),
}


def rel(out, ref) -> float:
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp(min=1e-300))


def assert_fp8_bound(x: torch.Tensor, deq: torch.Tensor, scale_per_elem: torch.Tensor, what: str):
    """No inf/NaN, and |x - deq| <= max(|x| / 16, scale / 1024) element-wise (see the module docstring)."""
    assert torch.isfinite(deq).all(), f"{what}: {int((~torch.isfinite(deq)).sum())} non-finite values"
    x64, d64, s64 = x.double(), deq.double(), scale_per_elem.double()
    bound = torch.maximum(x64.abs() / 16, s64 / 1024) * (1 + 1e-6)
    err = (x64 - d64).abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{what}: |x - dequant| = {err.view(-1)[i]:.3e} > {bound.view(-1)[i]:.3e} at x = "
                             f"{x64.view(-1)[i]:.3e} (scale {s64.view(-1)[i]:.3e})")


def edge_rows(dtype, M=6, K=384):
    """Rows whose 1x128 groups are: beyond e4m3 (x1e4 .. the dtype's max), all zero, tiny, subnormal, mixed."""
    big, normal_min, sub = RANGE[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    x[0] *= 1e4                                       # beyond 448: the scale absorbs it
    x[1, :128] = x[1, :128].sign() * big              # the dtype's largest values
    x[1, 128:256] = 0.0                               # an all-zero group
    x[1, 256:] *= normal_min                          # smallest normals
    x[2] = 0.0                                        # an all-zero row
    x[3, :128] = 1e-30 if dtype != torch.float16 else 1e-7
    x[3, 128:256] = sub                               # subnormals of the dtype
    x[3, 256:] = -sub
    x[4, :128] = torch.linspace(-big, big, 128, dtype=torch.float64)  # one group spanning the whole range: its small values
    x[4, 128:] *= 1e-3                                # land on e4m3 subnormals or 0
    x[5, :64] = sub
    x[5, 64:128] = 100.0                              # subnormals next to a normal maximum
    return x.to(dtype)


# ---- quantize_fp8 / permute(fp8=True) ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_fp8_edge_values(dtype, device):
    x = edge_rows(dtype).to(device)
    assert torch.isfinite(x).all()
    q, s = mk.ops.quantize_fp8(x)
    assert torch.isfinite(s).all() and bool((s > 0).all()), "a scale is 0, inf or NaN"
    zero = x.view(x.shape[0], -1, 128).abs().amax(-1) == 0
    torch.testing.assert_close(s[zero].cpu(), torch.full((int(zero.sum()),), FLOOR_SCALE), rtol=2e-7, atol=0,
                               msg="all-zero groups: the floored scale")
    assert not torch.isnan(q.float()).any(), "e4m3 NaN in the output"
    deq = R.dequantize_fp8(q.cpu(), s.cpu())
    assert_fp8_bound(x.cpu(), deq, s.cpu().repeat_interleave(128, 1), "quantize_fp8")
    assert bool((deq[2] == 0).all()) and bool((deq[1, 128:256] == 0).all()), "zero groups dequantise to 0"
    qr, sr = R.quantize_fp8(x.cpu())  # the reference's values on these too (a value rounding to 0 may lose its sign)
    torch.testing.assert_close(s.cpu(), sr, rtol=2e-7, atol=0)
    assert_fp8_close(q.cpu(), qr)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).replace("torch.", ""))
def test_permute_fp8_edge_values(dtype, device):
    x = edge_rows(dtype).to(device)
    E = 3
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2]], dtype=torch.int32, device=device)
    p = mk.ops.permute(x, ids, E, fp8=True)
    assert torch.isfinite(p.scale).all() and bool((p.scale > 0).all())
    rows = x.cpu()[p.token_index.long().cpu()]
    deq = R.dequantize_fp8(p.x.cpu(), p.scale.cpu())
    assert_fp8_bound(rows, deq, p.scale.cpu().repeat_interleave(128, 1), "permute(fp8=True)")
    q, s = R.quantize_fp8(rows)  # the same values as quantising the gathered rows
    torch.testing.assert_close(p.scale.cpu(), s, rtol=2e-7, atol=0)
    assert_fp8_close(p.x.cpu(), q)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_weight_fp8_edge_values(dtype, device):
    big, normal_min, sub = RANGE[dtype]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 300, 256, generator=g, dtype=torch.float64)  # ragged: the last 128-row block has 44 rows
    w[0] *= 1e4
    w[0, :128, :128] = w[0, :128, :128].sign() * big
    w[1] = 0.0                                     # an all-zero expert
    w[2, :128] = 1e-30 if dtype != torch.float16 else 1e-7
    w[2, 128:] = sub
    w[3, 256:, 128:] = 0.0                         # a zero ragged block
    w = w.to(dtype).to(device)
    q, s = mk.ops.quantize_weight_fp8(w)
    assert s.shape == (4, 3, 2) and torch.isfinite(s).all() and bool((s > 0).all())
    torch.testing.assert_close(s[1].cpu(), torch.full((3, 2), FLOOR_SCALE), rtol=2e-7, atol=0,
                               msg="zero blocks: the floored scale")
    deq = R.dequantize_weight_fp8(q.cpu(), s.cpu())
    s_elem = s.cpu().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :300, :256]
    assert_fp8_bound(w.cpu(), deq, s_elem, "quantize_weight_fp8")
    assert bool((deq[1] == 0).all()) and bool((deq[3, 256:, 128:] == 0).all())


# ---- grouped_gemm_fp8 / expert_mlp ------------------------------------------------------------------------------

def _exact_gemm(a, w, offsets):
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64)
    o = offsets.tolist()
    for e in range(w.shape[0]):
        out[o[e]:o[e + 1]] = a[o[e]:o[e + 1]].double() @ w[e].double().t()
    return out


@pytest.mark.parametrize("case", ["overflow", "zero_blocks", "tiny", "subnormal"])
def test_grouped_gemm_fp8_edge_values(case, device):
    g = torch.Generator().manual_seed(2)
    M, K, N, E = 12, 256, 256, 3
    a = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g) * K**-0.5
    offsets = torch.tensor([0, 5, 9, M], dtype=torch.int32)  # expert 2: rows 9..11
    if case == "overflow":      # far beyond 448 on both sides; the true products are ~1e9, well inside bf16/fp32
        a *= 3e4
        w *= 2e3
    elif case == "zero_blocks":  # a zero K block of every row, zero rows, an all-zero expert
        a[:, 128:] = 0.0
        a[7] = 0.0
        w[2] = 0.0
    elif case == "tiny":         # below the scale floor: flushed to 0, an absolute error of ~1e-28
        a = torch.full((M, K), 1e-30)
    else:                        # fp32 subnormals in both operands
        a = torch.full((M, K), 1e-40)
        w = torch.full((E, N, K), -2e-39)
    aq, a_s = mk.ops.quantize_fp8(a.to(device))
    wq, w_s = mk.ops.quantize_weight_fp8(w.to(device))
    exact = _exact_gemm(a, w, offsets)
    for out_dtype in (torch.bfloat16, torch.float32):
        out = mk.ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets.to(device), out_dtype=out_dtype).cpu()
        assert torch.isfinite(out).all(), f"{case}/{out_dtype}: inf or NaN in the output"
        # against the dequantised operands multiplied in fp32: what remains is accumulation (the tensor cores'
        # FP8 products inside one 128-wide K block, on the GPU) and the output rounding
        ref = R.grouped_gemm_fp8(aq.cpu(), a_s.cpu(), wq.cpu(), w_s.cpu(), offsets, out_dtype=torch.float32)
        if float(ref.abs().max()) > 0:
            assert rel(out, ref) < 1e-2, f"{case}/{out_dtype}: {rel(out, ref):.3e} from the reference"
        if case in ("overflow", "zero_blocks"):
            assert rel(out, exact) < BOUNDS["grouped_gemm"][0], f"{case}: {rel(out, exact):.3e}"
        else:  # everything is below the floor: exact zeros, off by the (negligible) true value
            assert bool((out == 0).all())
            assert float((out.double() - exact).abs().max()) < 1e-25
    if case == "zero_blocks":  # exact zeros where the true output is 0: a zero row, a zero expert
        out = mk.ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets.to(device)).cpu()
        assert bool((out[7] == 0).all()) and bool((out[9:] == 0).all())


def test_expert_mlp_fp8_edge_values(device):
    """A zero expert, zero rows and inputs beyond 448 through the fused MLP (the SwiGLU output is requantised
    inside the kernel with the same floored scale): finite, and zeros exactly where the true output is 0."""
    g = torch.Generator().manual_seed(3)
    M, H, I, E = 12, 256, 128, 3
    x = torch.randn(M, H, generator=g) * 1e3
    x[4] = 0.0
    w13 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5 * 50
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    w13[1] = 0.0  # expert 1's SwiGLU output is all zero: its requantisation uses the floored scale
    offsets = torch.tensor([0, 5, 9, M], dtype=torch.int32)
    xq, xs = mk.ops.quantize_fp8(x.to(device))
    q13, s13 = mk.ops.quantize_weight_fp8(w13.to(device))
    q2, s2 = mk.ops.quantize_weight_fp8(w2.to(device))
    y = mk.ops.expert_mlp(xq, xs, offsets.to(device), q13, s13, q2, s2).cpu()
    assert torch.isfinite(y).all()
    assert bool((y[4] == 0).all()) and bool((y[5:9] == 0).all()), "zero inputs / a zero expert give exact zeros"
    h = torch.nn.functional.silu(x.double() @ w13[0, :I].double().t()) * (x.double() @ w13[0, I:].double().t())
    exact = h @ w2[0].double().t()
    rows = [0, 1, 2, 3]
    assert rel(y[rows], exact[rows]) < BOUNDS["expert_mlp"][0]


# ---- error bounds vs float64 ------------------------------------------------------------------------------------

def measure(seed: int = 0, device="cpu") -> dict:
    """Relative Frobenius error vs float64 of every op on random data: {op: (fp8 path, bf16 path)}."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    out = {}
    T, H, I, E, k = 48, 256, 256, 4, 2

    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    q, s = mk.ops.quantize_fp8(x.float().to(dev))
    out["quantize"] = (rel(R.dequantize_fp8(q.cpu(), s.cpu()), x), rel(x.bfloat16(), x))

    w = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) * H**-0.5
    wq, ws = mk.ops.quantize_weight_fp8(w.float().to(dev))
    out["quantize_weight"] = (rel(R.dequantize_weight_fp8(wq.cpu(), ws.cpu()), w), rel(w.bfloat16(), w))

    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k].int()
    p8 = mk.ops.permute(x.float().to(dev), ids.to(dev), E, fp8=True)
    pb = mk.ops.permute(x.bfloat16().to(dev), ids.to(dev), E)
    rows = x[p8.token_index.long().cpu()]
    out["permute"] = (rel(R.dequantize_fp8(p8.x.cpu(), p8.scale.cpu()), rows), rel(pb.x.cpu(), rows))

    offsets = pb.offsets
    a = x[pb.token_index.long().cpu()]
    exact = _exact_gemm(a, w, offsets.cpu())
    aq, a_s = mk.ops.quantize_fp8(a.float().to(dev))
    g8 = mk.ops.grouped_gemm_fp8(aq, a_s, wq, ws, offsets)
    gb = mk.ops.grouped_gemm_bf16(a.bfloat16().to(dev), w.bfloat16().to(dev), offsets)
    out["grouped_gemm"] = (rel(g8.cpu(), exact), rel(gb.cpu(), exact))

    w2 = torch.randn(E, H, I, generator=g, dtype=torch.float64) * I**-0.5
    w2q, w2s = mk.ops.quantize_weight_fp8(w2.float().to(dev))
    h = torch.nn.functional.silu(exact[:, :I]) * exact[:, I:]
    mlp_exact = _exact_gemm(h, w2, offsets.cpu())
    y8 = mk.ops.expert_mlp(aq, a_s, offsets, wq, ws, w2q, w2s)
    yb = mk.ops.expert_mlp(a.bfloat16().to(dev), None, offsets, w.bfloat16().to(dev), None, w2.bfloat16().to(dev),
                           None)
    out["expert_mlp"] = (rel(y8.cpu(), mlp_exact), rel(yb.cpu(), mlp_exact))

    weights = torch.rand(T, k, generator=g, dtype=torch.float64)
    y = torch.randn(T * k, H, generator=g, dtype=torch.float64)
    un_exact = (y[pb.slot.long().cpu().view(-1)].view(T, k, H) * weights[..., None]).sum(1)
    un = mk.ops.unpermute(y.bfloat16().to(dev), pb, weights.float().to(dev))
    out["unpermute"] = (None, rel(un.cpu(), un_exact))

    router = torch.randn(E * 4, H, generator=g, dtype=torch.float64) * H**-0.5
    rw, rids, _ = mk.ops.route(x.float().to(dev), router.float().to(dev), k)
    probs = torch.softmax(x.float().double() @ router.float().double().t(), -1)
    picked = probs.gather(1, rids.long().cpu())
    out["route"] = (None, rel(rw.cpu(), picked / picked.sum(1, keepdim=True)))

    Q, C, rope = 128, 64, 32
    xl = torch.randn(T, H, generator=g, dtype=torch.float64)
    wl = torch.randn(Q + C + rope, H, generator=g, dtype=torch.float64) * H**-0.5
    qn, kn = torch.rand(Q, generator=g, dtype=torch.float64) + 0.5, torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    cos, sin = RM.rope_cos_sin(torch.arange(T), RM.default_inv_freq(rope))
    ref_cq, ref_kv = _latent_exact(xl, wl, qn, kn, cos.double(), sin.double(), Q, C)
    wlq, wls = R.quantize_weight_fp8(wl.float())
    c8, kv8 = ops_mla.mla_latent_proj(xl.bfloat16().to(dev), wlq.to(dev), qn.float().to(dev), kn.float().to(dev),
                                      cos.to(dev), sin.to(dev), Q, C, w_scale=wls.to(dev))
    cb, kvb = ops_mla.mla_latent_proj(xl.bfloat16().to(dev), wl.bfloat16().to(dev), qn.bfloat16().to(dev),
                                      kn.bfloat16().to(dev), cos.to(dev), sin.to(dev), Q, C)
    ref_all = torch.cat([ref_cq, ref_kv], 1)
    out["mla_latent_proj"] = (rel(torch.cat([c8, kv8], 1).cpu(), ref_all), rel(torch.cat([cb, kvb], 1).cpu(), ref_all))

    B, h_, S = 4, 8, 96
    ql = torch.randn(B, h_, C, generator=g, dtype=torch.float64)
    qr = torch.randn(B, h_, 16, generator=g, dtype=torch.float64)
    cache = torch.randn(B, S, C + 16, generator=g, dtype=torch.float64)
    lens = torch.tensor([96, 1, 50, 77], dtype=torch.int32)
    scale = (C + 16) ** -0.5
    dec_exact = _decode_exact(ql, qr, cache, lens, scale)
    ob = ops_mla.mla_decode(ql.bfloat16().to(dev), qr.bfloat16().to(dev), cache.bfloat16().to(dev), lens.to(dev),
                            scale)
    out["mla_decode"] = (None, rel(ob.cpu(), dec_exact))
    return out


def _latent_exact(x, w, qn, kn, cos, sin, Q, C):
    y = x @ w.t()
    rms = lambda v, g: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * g  # noqa: E731
    c_q, c_kv, kr = rms(y[:, :Q], qn), rms(y[:, Q:Q + C], kn), y[:, Q + C:]
    x1, x2 = kr[:, 0::2], kr[:, 1::2]  # interleaved pairs, rotated halves written as [first | second]
    return c_q, torch.cat([c_kv, x1 * cos - x2 * sin, x2 * cos + x1 * sin], 1)


def _decode_exact(q, qr, cache, lens, scale):
    B, h, C = q.shape
    out = torch.zeros(B, h, C, dtype=torch.float64)
    for b, L in enumerate(lens.tolist()):
        if L:
            rows = cache[b, :L]
            s = (q[b] @ rows[:, :C].t() + qr[b] @ rows[:, C:].t()) * scale
            out[b] = torch.softmax(s, -1) @ rows[:, :C]
    return out


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def measured(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return measure(seed=0, device=request.param)


@pytest.mark.parametrize("op", list(BOUNDS))
def test_error_bound(op, measured):
    fp8, bf16 = measured[op]
    b8, bb = BOUNDS[op]
    if b8 is not None:
        assert fp8 < b8, f"{op} fp8 path: relative error {fp8:.3e} >= bound {b8:.1e}"
        assert fp8 > 1e-3, f"{op} fp8 path: {fp8:.3e}, suspiciously small for e4m3: not quantised?"
    assert bf16 < bb, f"{op} bf16 path: relative error {bf16:.3e} >= bound {bb:.1e}"


def main(argv) -> None:
    """Print the measured relative errors (max over seeds) as the markdown table of docs/numerics.md."""
    seeds = int(argv[1]) if len(argv) > 1 else 5
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    worst: dict = {}
    for seed in range(seeds):
        for op, errs in measure(seed, dev).items():
            worst[op] = tuple(max(w or 0.0, e or 0.0) if e is not None else None
                              for w, e in zip(worst.get(op, (0.0, 0.0)), errs))
    print(f"device: {dev} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}), max over {seeds} seeds")
    print("| op | fp8 measured | fp8 bound | bf16 measured | bf16 bound |")
    print("|---|---|---|---|---|")
    fmt = lambda v: "—" if v is None else f"{v:.2e}"  # noqa: E731
    for op, (e8, eb) in worst.items():
        b8, bb = BOUNDS[op]
        print(f"| {op} | {fmt(e8)} | {fmt(b8)} | {fmt(eb)} | {fmt(bb)} |")


if __name__ == "__main__":
    main(sys.argv)
