"""MLA kernels (moe_kernels.ops.mla) against moe_kernels.reference.mla_decode, and the module's kernel path.

Error bounds (relative Frobenius norm, tests/_helpers.assert_close_rel):
  fp32 inputs: 1e-5 (IEEE products; only summation order differs).
  bf16 outputs: 2e-2. Rounding an output to bf16 alone gives ~3e-3; the decode kernel also rounds the softmax
  weights to bf16 before the P.V product, as flash attention does (~4e-3).
  FP8 latent projection: compared with the FP8 reference (same 1x128 activation quantisation, bit-exact in the
  kernel), so only accumulation order and the bf16 output rounding remain: 2e-2.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.ops import mla as ops_mla  # noqa: E402
from moe_kernels.reference import mla as R  # noqa: E402
from moe_kernels.reference import mla_decode as RD  # noqa: E402
from moe_kernels.reference.quant import quantize_weight_fp8  # noqa: E402
from _helpers import assert_close_rel  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------------------------------------------------------
# fused latent projection


def latent_inputs(T, H, Q, C, rope, dtype, device, positions=None):
    x = torch.randn(T, H)
    w = torch.randn(Q + C + rope, H) * H**-0.5
    qn = torch.rand(Q) + 0.5 if Q else None
    kn = torch.rand(C) + 0.5
    pos = torch.arange(T) * 3 + 5 if positions is None else positions
    cos, sin = R.rope_cos_sin(pos, R.default_inv_freq(rope))
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(x.to(dtype)), w.to(dtype), mv(qn), mv(kn), mv(cos), mv(sin)


# name: T, H, q_lora_rank, kv_lora_rank, rope, dtype, fp8 weights, interleave
LATENT_CASES = {
    "bf16_interleave": (37, 256, 128, 64, 16, torch.bfloat16, False, True),
    "fp32_half": (19, 256, 96, 128, 32, torch.float32, False, False),
    "fp8": (37, 256, 128, 64, 16, torch.bfloat16, True, True),
    "no_q_lora": (9, 128, 0, 64, 64, torch.bfloat16, False, True),
}


@pytest.mark.parametrize("case", list(LATENT_CASES))
def test_latent_proj_matches_reference(case, device):
    T, H, Q, C, rope, dtype, fp8, interleave = LATENT_CASES[case]
    x, w, qn, kn, cos, sin = latent_inputs(T, H, Q, C, rope, dtype, device)
    w_scale = None
    if fp8:
        w, w_scale = quantize_weight_fp8(w.float())
        w_scale = w_scale.to(device)
    w = w.to(device)
    c_q, kv = ops_mla.mla_latent_proj(x, w, qn, kn, cos, sin, Q, C, w_scale=w_scale, interleave=interleave)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    rq, rkv = RD.mla_latent_proj(x.cpu(), w.cpu(), cpu(qn), kn.cpu(), cos.cpu(), sin.cpu(), Q, C,
                                 w_scale=cpu(w_scale), interleave=interleave)
    assert c_q.dtype == dtype and kv.dtype == dtype and kv.shape == (T, C + rope) and c_q.shape == (T, Q)
    if Q:
        assert_close_rel(c_q.cpu(), rq, TOL[dtype], "c_q")
    assert_close_rel(kv.cpu()[:, :C], rkv[:, :C], TOL[dtype], "normalised c_kv")
    assert_close_rel(kv.cpu()[:, C:], rkv[:, C:], TOL[dtype], "rotated k_rope")


def test_latent_proj_reference_is_the_module_math():
    """The fused definition equals the module's separate projections (q_a_proj / kv_a_proj, norms, RoPE)."""
    m = mk.MultiHeadLatentAttention(hidden_size=128, num_heads=2, q_lora_rank=64, kv_lora_rank=32,
                                    qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.1)
    x = torch.randn(1, 7, 128)
    cos, sin = R.rope_cos_sin(torch.arange(7)[None], m.inv_freq)
    with torch.no_grad():
        _, _, c_kv, k_rope = m.latents(x, cos, sin)
        w = torch.cat([m.q_a_proj.weight, m.kv_a_proj_with_mqa.weight])
        c_q, kv = RD.mla_latent_proj(x[0], w, m.q_a_layernorm.weight, m.kv_a_layernorm.weight, cos[0], sin[0], 64, 32)
        ref_cq = R.rms_norm(m.q_a_proj(x[0]), m.q_a_layernorm.weight)
    assert_close_rel(kv, torch.cat([c_kv[0], k_rope[0]], -1), 1e-6, "latent row")
    assert_close_rel(c_q, ref_cq, 1e-6, "c_q")


# ---------------------------------------------------------------------------------------------------------------
# absorbed decode


def paged(cache, lens, page, extra_blocks=3):
    """The same rows in a paged cache: [num_blocks, page, D] with a shuffled block table (unused entries -1)."""
    B, S, D = cache.shape
    nblk = -(-S // page)
    total = B * nblk + extra_blocks
    order = torch.randperm(total)[: B * nblk].view(B, nblk)
    pc = torch.randn(total, page, D).to(cache.dtype)  # garbage everywhere a row does not reach
    for b in range(B):
        for j in range(nblk):
            rows = cache[b, j * page : (j + 1) * page]
            pc[order[b, j], : rows.shape[0]] = rows
    table = order.int()
    for b, L in enumerate(lens.tolist()):
        table[b, -(-L // page) :] = -1  # the kernel must never read past a row's length
    return pc, table


# name: B, heads, kv_lora_rank, rope, S_max, lengths, dtype, page (None: contiguous), num_splits
DECODE_CASES = {
    "bf16_varlen": (4, 16, 128, 64, 200, [200, 1, 77, 0], torch.bfloat16, None, None),
    "fp32_one_split": (3, 8, 64, 16, 150, [150, 33, 2], torch.float32, None, 1),
    "bf16_paged_splits": (3, 16, 64, 32, 190, [190, 64, 65], torch.bfloat16, 16, 3),
    "fp32_paged_64": (2, 4, 64, 16, 130, [130, 1], torch.float32, 64, None),
}


def decode_inputs(B, h, C, rope, S, lens, dtype, page, device, spike=False):
    """Random decode operands on ``device`` (paged through a block table when ``page``) and the reference output.
    ``spike``: one key late in every row scaled x6, so the running max moves far mid-row."""
    lens = torch.tensor(lens, dtype=torch.int32)
    q_lat = torch.randn(B, h, C).to(dtype)
    q_pe = torch.randn(B, h, rope).to(dtype)
    cache = torch.randn(B, S, C + rope)
    if spike:
        cache[:, 40] *= 6
    cache = cache.to(dtype)
    scale = 1.0 / math.sqrt(C / 2)
    ref = RD.mla_decode(q_lat, q_pe, cache, lens, scale)
    table = None
    if page is not None:
        cache, table = paged(cache, lens, page)
        table = table.to(device)
    return q_lat.to(device), q_pe.to(device), cache.to(device), lens.to(device), table, scale, ref


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_reference(case, device):
    B, h, C, rope, S, lens, dtype, page, splits = DECODE_CASES[case]
    q_lat, q_pe, cache, lens, table, scale, ref = decode_inputs(B, h, C, rope, S, lens, dtype, page, device)
    out = ops_mla.mla_decode(q_lat, q_pe, cache, lens, scale, block_table=table, num_splits=splits)
    assert out.dtype == dtype and out.shape == (B, h, C)
    assert_close_rel(out.cpu(), ref, TOL[dtype], f"decode {case}")
    assert (out[lens == 0] == 0).all(), "a row without keys must give zeros"


# the kernel's config variants, called through the launcher with an explicit cfg (interpreter-sized tiles)
# name: cfg, B, heads, kv_lora_rank, rope, S_max, lengths, dtype, page (None: contiguous), num_splits
def dcfg(bh, bn, lazy=0, v=1):
    return dict(BLOCK_H=bh, BLOCK_N=bn, LAZY=lazy, V_BLOCKS=v, num_warps=4, num_stages=1)


DECODE_VARIANTS = {
    "lazy_exact_splits": (dcfg(16, 16, lazy=1), 4, 16, 64, 16, 200, [200, 0, 77, 1], torch.float32, None, 3),
    "lazy_tau_paged": (dcfg(16, 16, lazy=2), 3, 16, 64, 32, 190, [190, 0, 45], torch.bfloat16, 16, 2),
    "split_v_splits": (dcfg(32, 16, v=2), 3, 48, 96, 32, 150, [150, 0, 37], torch.float32, None, 3),
    "split_v_one_split": (dcfg(16, 32, v=2), 3, 16, 64, 16, 100, [100, 0, 33], torch.bfloat16, None, 1),
    "split_v_lazy_paged": (dcfg(32, 16, lazy=2, v=2), 3, 32, 128, 64, 130, [130, 0, 50], torch.float32, 16, 2),
}


@pytest.mark.parametrize("case", list(DECODE_VARIANTS))
def test_decode_variants_match_reference(case, device):
    cfg, B, h, C, rope, S, lens, dtype, page, splits = DECODE_VARIANTS[case]
    # the spike moves the running max by far more than LAZY=2's threshold
    q_lat, q_pe, cache, lens, table, scale, ref = decode_inputs(B, h, C, rope, S, lens, dtype, page, device,
                                                                spike=True)
    out = torch.full((B, h, C), float("nan"), dtype=dtype, device=device)
    ops_mla._decode_launch(q_lat, q_pe, cache, lens, table, scale, splits, out, cfg=cfg)
    assert_close_rel(out.cpu(), ref, TOL[dtype], f"decode {case}")
    assert (out[lens == 0] == 0).all(), "a row without keys must give zeros"


def test_decode_variant_config_checks():
    q, qr, cache = torch.randn(1, 4, 32), torch.randn(1, 4, 16), torch.randn(1, 8, 48)
    lens, out = torch.tensor([8], dtype=torch.int32), torch.empty(1, 4, 32)
    with pytest.raises(ValueError, match="V_BLOCKS"):
        ops_mla._decode_launch(q, qr, cache, lens, None, 0.1, 1, out, cfg=dcfg(16, 16, v=4))
    with pytest.raises(ValueError, match="LAZY"):
        ops_mla._decode_launch(q, qr, cache, lens, None, 0.1, 1, out, cfg=dcfg(16, 16, lazy=3))


def test_decode_strided_queries(device):
    """q_latent as the module makes it (bmm output transposed: heads are not the inner stride)."""
    B, h, C, rope, S = 3, 8, 64, 16, 40
    q_lat = torch.randn(h, B, C).transpose(0, 1)
    q_pe = torch.randn(B, h, rope)
    cache = torch.randn(B, S, C + rope)
    lens = torch.tensor([40, 17, 3], dtype=torch.int32)
    out = ops_mla.mla_decode(q_lat.to(device), q_pe.to(device), cache.to(device), lens.to(device), 0.2)
    assert_close_rel(out.cpu(), RD.mla_decode(q_lat, q_pe, cache, lens, 0.2), 1e-5, "strided q")


def test_absorbed_decode_equals_per_head_attention():
    """The absorption identity the decode path relies on (fp64): latent attention + W_UV == per-head attention."""
    B, h, C, rope, nope, v, S = 2, 4, 32, 8, 16, 12, 9
    torch.manual_seed(0)
    dt = torch.float64
    q_nope, q_rope = torch.randn(B, h, nope, dtype=dt), torch.randn(B, h, rope, dtype=dt)
    cache = torch.randn(B, S, C + rope, dtype=dt)
    w_kv_b = torch.randn(h * (nope + v), C, dtype=dt)
    lens = torch.tensor([S, 5], dtype=torch.int32)
    scale = 0.3
    out = RD.mla_decode_absorbed(q_nope, q_rope, cache, lens, w_kv_b, nope, v, scale)
    for b, L in enumerate(lens.tolist()):
        kv = (cache[b, :L, :C] @ w_kv_b.t()).view(L, h, nope + v).transpose(0, 1)  # expanded keys and values
        k = torch.cat([kv[..., :nope], cache[b, :L, C:].expand(h, L, rope)], -1)
        q = torch.cat([q_nope[b], q_rope[b]], -1).unsqueeze(1)  # [h, 1, nope + rope]
        p = torch.softmax((q @ k.transpose(1, 2)) * scale, -1)
        want = (p @ kv[..., nope:]).squeeze(1)
        assert_close_rel(out[b].double(), want, 1e-6, f"row {b}")


@pytest.mark.gpu
def test_num_splits_heuristic_fills_the_gpu_in_whole_waves():
    if not torch.cuda.is_available():
        pytest.skip("uses the GPU's SM count")
    dev = torch.device("cuda")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    for B in (1, 4, 32, 128):
        s = ops_mla.mla_decode_num_splits(B, 128, 4096, 64, dev)
        programs = B * 2 * s  # two 64-head blocks per row
        assert 1 <= s <= 16 and programs >= min(0.9 * n_sm, B * 2 * 16), (B, s)
        # V blocks count as programs: one 128-head block in two V blocks is as many programs as two 64-head blocks
        assert ops_mla.mla_decode_num_splits(B, 128, 4096, 128, dev, v_blocks=2) == s, B
    assert ops_mla.mla_decode_num_splits(4, 128, 100, 64, dev) == 1  # too few keys to split


# ---------------------------------------------------------------------------------------------------------------
# module: the kernel path against the reference path


def small_mla(dtype, device, q_lora_rank=64):
    torch.manual_seed(1)
    m = mk.MultiHeadLatentAttention(hidden_size=128, num_heads=16, q_lora_rank=q_lora_rank, kv_lora_rank=64,
                                    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.08)
    return m.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_kernels_prefill_then_decode(dtype, device):
    """Prefill 5 tokens, then 3 decode steps (the absorbed kernel), each against the reference path."""
    m = small_mla(dtype, device)
    B = 2
    xs = torch.randn(B, 8, 128).to(device=device, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    caches = {}
    for use in (False, True):
        m.use_kernels = use
        cache = mk.MLACache()
        with torch.no_grad():
            outs = [m(xs[:, :5], cache=cache)] + [m(xs[:, t : t + 1], cache=cache) for t in range(5, 8)]
        caches[use] = (torch.cat(outs, 1).float(), cache)
    (ref, rc), (out, kc) = caches[False], caches[True]
    assert kc.length == rc.length == 8
    assert kc.kv.dtype == dtype
    assert_close_rel(kc.c_kv.float(), rc.c_kv.float(), tol, "cached c_kv")
    assert_close_rel(out[:, :5], ref[:, :5], tol, "prefill")
    assert_close_rel(out[:, 5:], ref[:, 5:], tol, "decode steps")


def test_module_kernels_without_q_lora(device):
    m = small_mla(torch.float32, device, q_lora_rank=None)
    x = torch.randn(1, 6, 128).to(device)
    with torch.no_grad():
        m.use_kernels = False
        ref = m(x)
        m.use_kernels = True
        out = m(x)
    assert_close_rel(out, ref, 1e-4, "q_proj model")


def test_module_fused_weight_shares_storage_and_follows_updates(device):
    m = small_mla(torch.float32, device)
    m.use_kernels = True
    x = torch.randn(1, 3, 128).to(device)
    with torch.no_grad():
        m(x)
        w, _ = m._fused_down_weight()
        assert m.q_a_proj.weight.data_ptr() == w.data_ptr()  # no second copy of the weights
        m.kv_a_proj_with_mqa.weight.mul_(2.0)  # in place: seen through the shared storage
        out = m(x)
        m.use_kernels = False
        ref = m(x)
    assert_close_rel(out, ref, 1e-4, "after an in-place weight update")


def test_module_with_grad_takes_the_reference_path_and_says_so():
    m = small_mla(torch.float32, "cpu")
    m.use_kernels = True
    x = torch.randn(1, 3, 128)
    if not ops_mla.interpret_mode():
        pytest.skip("needs the interpreter")
    with pytest.warns(UserWarning, match="gradients"):
        y = m(x)
    y.sum().backward()
    assert m.q_a_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# argument checks: TypeError / ValueError naming the argument, before any launch


def test_bad_arguments_are_named():
    T, H, Q, C, rope = 4, 128, 64, 32, 16
    x, w, qn, kn, cos, sin = latent_inputs(T, H, Q, C, rope, torch.float32, "cpu")
    f = ops_mla.mla_latent_proj
    with pytest.raises(TypeError, match="w must have dtype"):
        f(x, w.bfloat16(), qn, kn, cos, sin, Q, C)
    with pytest.raises(ValueError, match="w must have shape"):
        f(x, w[:, :64], qn, kn, cos, sin, Q, C)
    with pytest.raises(ValueError, match="rope"):
        f(x, w[:-1], qn, kn, cos, sin, Q, C)
    with pytest.raises(ValueError, match="cos must have shape"):
        f(x, w, qn, kn, cos[:, :4], sin, Q, C)
    with pytest.raises(ValueError, match="q_norm_weight"):
        f(x, w, qn[:3], kn, cos, sin, Q, C)
    with pytest.raises(TypeError, match="w_scale"):
        f(x, w.to(torch.float8_e4m3fn), qn, kn, cos, sin, Q, C, w_scale=torch.ones(1, 1, dtype=torch.float64))

    d = ops_mla.mla_decode
    q, qr, cache = torch.randn(2, 4, 32), torch.randn(2, 4, 16), torch.randn(2, 10, 48)
    lens = torch.tensor([10, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_cache must have C \\+ R"):
        d(q, qr, cache[..., :40], lens, 0.1)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        d(q, qr, cache, lens.long(), 0.1)
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        d(q, qr, cache, torch.tensor([11, 3], dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match="q_rope must have dtype"):
        d(q, qr.double(), cache, lens, 0.1)
    with pytest.raises(ValueError, match="block_table entries"):
        d(q, qr, cache, torch.tensor([11, 3], dtype=torch.int32), 0.1,
          block_table=torch.tensor([[0, 5], [1, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_splits"):
        d(q, qr, cache, lens, 0.1, num_splits=0)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: DeepSeek-V3's shapes (production launch configs: 64-head decode blocks, 128x128 GEMM tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_latent_proj_deepseek_shapes_gpu(fp8):
    T, H, Q, C, rope = 300, 1024, 1536, 512, 64
    x, w, qn, kn, cos, sin = latent_inputs(T, H, Q, C, rope, torch.bfloat16, "cuda")
    w_scale = None
    if fp8:
        w, w_scale = quantize_weight_fp8(w.float())
        w_scale = w_scale.cuda()
    w = w.cuda()
    c_q, kv = ops_mla.mla_latent_proj(x, w, qn, kn, cos, sin, Q, C, w_scale=w_scale)
    rq, rkv = RD.mla_latent_proj(x.cpu(), w.cpu(), qn.cpu(), kn.cpu(), cos.cpu(), sin.cpu(), Q, C,
                                 w_scale=None if w_scale is None else w_scale.cpu())
    assert_close_rel(c_q.cpu(), rq, 2e-2, "c_q")
    assert_close_rel(kv.cpu(), rkv, 2e-2, "kv")


@pytest.mark.gpu
@pytest.mark.parametrize("paged_cache", [False, True])
def test_decode_deepseek_shapes_gpu(paged_cache):
    B, h, C, rope, S = 5, 128, 512, 64, 1100
    lens = torch.tensor([1100, 1, 700, 0, 513], dtype=torch.int32)
    q_lat, q_pe = torch.randn(B, h, C).bfloat16(), torch.randn(B, h, rope).bfloat16()
    cache = torch.randn(B, S, C + rope).bfloat16()
    scale = 1.0 / math.sqrt(192)
    ref = RD.mla_decode(q_lat, q_pe, cache, lens, scale)
    table = None
    if paged_cache:
        cache, table = paged(cache, lens, 64)
        table = table.cuda()
    for splits in (None, 1, 5):
        out = ops_mla.mla_decode(q_lat.cuda(), q_pe.cuda(), cache.cuda(), lens.cuda(), scale, block_table=table,
                                    num_splits=splits)
        assert_close_rel(out.cpu(), ref, 2e-2, f"decode splits={splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [
    dict(BLOCK_H=64, BLOCK_N=64, LAZY=1, V_BLOCKS=1, num_warps=8, num_stages=2),
    dict(BLOCK_H=64, BLOCK_N=128, LAZY=2, V_BLOCKS=1, num_warps=8, num_stages=1),
    dict(BLOCK_H=128, BLOCK_N=32, LAZY=2, V_BLOCKS=2, num_warps=8, num_stages=2),
    dict(BLOCK_H=128, BLOCK_N=64, LAZY=0, V_BLOCKS=2, num_warps=8, num_stages=1),
], ids=lambda c: f"h{c['BLOCK_H']}n{c['BLOCK_N']}s{c['num_stages']}lazy{c['LAZY']}v{c['V_BLOCKS']}")
def test_decode_variants_deepseek_shapes_gpu(cfg):
    """The sweep's variants compiled for Hopper (shared memory at its limit), with splits and a paged cache."""
    B, h, C, rope, S = 5, 128, 512, 64, 1100
    lens = torch.tensor([1100, 1, 700, 0, 513], dtype=torch.int32)
    q_lat, q_pe = torch.randn(B, h, C).bfloat16(), torch.randn(B, h, rope).bfloat16()
    cache = torch.randn(B, S, C + rope)
    cache[:, 600] *= 6  # moves the running max late in the row (LAZY's rescale path)
    cache = cache.bfloat16()
    scale = 1.0 / math.sqrt(192)
    ref = RD.mla_decode(q_lat, q_pe, cache, lens, scale)
    pc, table = paged(cache, lens, 64)
    for kv, tab in ((cache, None), (pc, table)):
        for splits in (1, 3):
            out = torch.full((B, h, C), float("nan"), dtype=torch.bfloat16, device="cuda")
            ops_mla._decode_launch(q_lat.cuda(), q_pe.cuda(), kv.cuda(), lens.cuda(),
                                   None if tab is None else tab.cuda(), scale, splits, out, cfg=cfg)
            assert_close_rel(out.cpu(), ref, 2e-2, f"paged={tab is not None} splits={splits}")
