"""MLA prefill heads (moe_kernels.ops.mla_prefill): q rotated and laid out per head, k = [k_nope | k_rope], v.

Against a float64 evaluation of the definition (reference.mla.apply_rope's pairing), by relative error: the kernel
copies nope / v / k_rope exactly (bit-equal) and rotates q's rope part in fp32, rounded once to q's dtype (bf16:
one rounding, ~3e-3; fp32: only FMA contraction differs, 1e-6). Outputs are pre-filled with NaN where the launcher
is called directly, so an element no program writes fails.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

from moe_kernels.modules.mla import MultiHeadLatentAttention  # noqa: E402
from moe_kernels.ops import mla_prefill as P  # noqa: E402
from moe_kernels.reference import mla as R  # noqa: E402
from _helpers import assert_close_rel, poison_allocator  # noqa: E402

TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3}


def rope64(x, cos, sin, interleave):
    """The rotation in float64, pairs as reference.mla.apply_rope takes them, written [first | second]."""
    x = x.double()
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    cos, sin = cos.double(), sin.double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def inputs(B, S, L, h, dn, dr, dv, dtype, device, q_heads_stride=None):
    q = torch.randn(B, S, h, dn + dr) * 2.0
    if q_heads_stride is not None:  # q as a view with padding between heads
        q = torch.randn(B, S, h, q_heads_stride)[..., : dn + dr]
    pos = torch.arange(S) + (L - S) + 3
    cos, sin = R.rope_cos_sin(pos, R.default_inv_freq(dr), attention_scaling=1.3)
    cos, sin = (t.expand(B, S, dr // 2).contiguous() for t in (cos, sin))
    kv = torch.randn(B, L, h * (dn + dv))
    latent = torch.randn(B, L, 40 + dr)  # k_rope: a strided view into a latent row, as in the module
    mv = lambda t: t.to(device)  # noqa: E731
    return mv(q.to(dtype)), mv(cos), mv(sin), mv(kv.to(dtype)), mv(latent.to(dtype))[..., 40:]


def expected(q, cos, sin, kv, k_rope, dn, dv, interleave):
    B, S, h, _ = q.shape
    L = kv.shape[1]
    qr = rope64(q[..., dn:], cos.unsqueeze(2), sin.unsqueeze(2), interleave)
    q_out = torch.cat([q[..., :dn].double(), qr], -1).transpose(1, 2)
    kv4 = kv.view(B, L, h, dn + dv).double()
    k_out = torch.cat([kv4[..., :dn], k_rope.double().unsqueeze(2).expand(B, L, h, k_rope.shape[-1])], -1)
    return q_out, k_out.transpose(1, 2), kv4[..., dn:].transpose(1, 2)


# name: B, S, L, heads, nope, rope, v, dtype, interleave
CASES = {
    "bf16_interleave": (2, 37, 37, 3, 32, 16, 32, torch.bfloat16, True),
    "bf16_half_chunked": (2, 5, 70, 2, 32, 16, 24, torch.bfloat16, False),  # queries = the last 5 of 70 keys
    "fp32_odd_dims": (1, 33, 33, 4, 24, 8, 40, torch.float32, True),
    "one_token": (3, 1, 1, 2, 16, 16, 16, torch.bfloat16, True),
    "no_queries": (2, 0, 9, 2, 16, 16, 16, torch.bfloat16, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_heads_match_float64(case, device):
    B, S, L, h, dn, dr, dv, dtype, interleave = CASES[case]
    q, cos, sin, kv, k_rope = inputs(B, S, L, h, dn, dr, dv, dtype, device)
    want = expected(q.cpu(), cos.cpu(), sin.cpu(), kv.cpu(), k_rope.cpu(), dn, dv, interleave)
    got = P.mla_prefill_heads(q, cos, sin, kv, k_rope, dn, dv, interleave=interleave)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype and g.is_contiguous(), name
        if g.numel():
            assert_close_rel(g.cpu(), w.to(dtype), TOL[dtype], what=name)
    # the copies are exact: nope columns of q, all of k_nope / k_rope / v
    if S:
        assert torch.equal(got[0][..., :dn].cpu(), q.cpu()[..., :dn].transpose(1, 2))
    assert torch.equal(got[1].cpu(), want[1].to(dtype))
    assert torch.equal(got[2].cpu(), want[2].to(dtype))


def test_every_output_element_is_written():
    B, S, L, h, dn, dr, dv = 2, 37, 41, 3, 32, 16, 24
    q, cos, sin, kv, k_rope = inputs(B, S, L, h, dn, dr, dv, torch.bfloat16, "cpu", q_heads_stride=64)
    outs = [torch.full(s, float("nan"), dtype=torch.bfloat16)
            for s in ((B, h, S, dn + dr), (B, h, L, dn + dr), (B, h, L, dv))]
    P._launch(q, cos, sin, kv, k_rope, dn, dv, True, *outs)
    want = expected(q, cos, sin, kv, k_rope, dn, dv, True)
    for name, g, w in zip("qkv", outs, want):
        assert_close_rel(g, w.to(torch.bfloat16), TOL[torch.bfloat16], what=name)


def test_matches_the_torch_composition():
    """The op gives what reference.mla.mla_prefill_heads (the torch ops it replaces) gives: same rounding."""
    B, S, L, h, dn, dr, dv = 2, 19, 19, 2, 32, 16, 32
    q, cos, sin, kv, k_rope = inputs(B, S, L, h, dn, dr, dv, torch.bfloat16, "cpu")
    got = P.mla_prefill_heads(q, cos, sin, kv, k_rope, dn, dv)
    ref = R.mla_prefill_heads(q, cos, sin, kv, k_rope, dn, dv)
    for name, g, r in zip("qkv", got, ref):
        diff = (g.float() - r.float()).abs().max().item()
        assert diff <= 2 ** -7 * r.float().abs().max().item(), f"{name}: {diff}"  # at most one bf16 ulp apart


@pytest.mark.parametrize("bad, err", [
    (dict(q=torch.zeros(2, 5, 3, 48, dtype=torch.int32)), TypeError),
    (dict(nope_dim=47), ValueError),  # rope part of odd size
    (dict(cos=torch.zeros(2, 5, 7)), ValueError),
    (dict(kv=torch.zeros(2, 9, 3 * 60, dtype=torch.bfloat16)), ValueError),
    (dict(k_rope=torch.zeros(2, 8, 16, dtype=torch.bfloat16)), ValueError),
    (dict(sin=torch.zeros(2, 5, 8, dtype=torch.float64)), TypeError),
])
def test_bad_input_raises_before_launch(bad, err):
    args = dict(q=torch.zeros(2, 5, 3, 48, dtype=torch.bfloat16), cos=torch.zeros(2, 5, 8), sin=torch.zeros(2, 5, 8),
                kv=torch.zeros(2, 9, 3 * 64, dtype=torch.bfloat16), k_rope=torch.zeros(2, 9, 16, dtype=torch.bfloat16),
                nope_dim=32, v_dim=32)
    args.update(bad)
    with pytest.raises(err):
        P.mla_prefill_heads(**args)


def test_module_prefill_kernel_path_matches_reference_path():
    """The module's prefill with the kernels (prefill heads op + SDPA) against its fp32 reference path."""
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(hidden_size=128, num_heads=3, q_lora_rank=64, kv_lora_rank=48, qk_nope_head_dim=32,
                                 qk_rope_head_dim=16, v_head_dim=24).to(torch.bfloat16)
    m.use_kernels = True
    x = torch.randn(2, 23, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        got = m(x)
        m.use_kernels = False
        want = m(x)
    assert_close_rel(got.float(), want.float(), 2e-2)


@pytest.mark.gpu
def test_prefill_heads_deepseek_sizes_gpu():
    B, S, h, dn, dr, dv = 1, 4096, 128, 128, 64, 128
    q, cos, sin, kv, k_rope = inputs(B, S, S, h, dn, dr, dv, torch.bfloat16, "cuda")
    for shape in ((B, h, S, dv), (B, h, S, dn + dr), (B, h, S, dn + dr)):  # outputs never written show up as NaN
        poison_allocator(shape, torch.bfloat16, "cuda")
    got = P.mla_prefill_heads(q, cos, sin, kv, k_rope, dn, dv)
    ref = R.mla_prefill_heads(q, cos, sin, kv, k_rope, dn, dv)
    for name, g, r in zip("qkv", got, ref):
        assert (g.float() - r.float()).abs().max().item() <= 2 ** -7 * r.float().abs().max().item(), name
