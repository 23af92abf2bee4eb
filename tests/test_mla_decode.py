"""MLA decode over the latent cache: the FP8 cache, several query tokens per row (MTP), the issue's length mix,
paged caches with shuffled block tables, bad input, and the module's static (CUDA-graph capturable) cache.

Each kernel output is compared with moe_kernels.reference.mla_decode (float32 over the cache as stored, FP8 rows
dequantised) by relative Frobenius error; outputs start NaN-filled where the launcher is called directly.
Bounds: fp32 1e-5; bf16 2e-2 (output rounding ~3e-3, bf16 softmax weights in P.V ~4e-3). The FP8 cache's own
error (against a bf16 cache) is measured in test_fp8_cache_error_against_bf16 and stated in docs/numerics.md.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.ops import mla as ops_mla  # noqa: E402
from moe_kernels.reference import mla_decode as RD  # noqa: E402
from _helpers import assert_close_rel  # noqa: E402
from test_ops_mla import paged  # noqa: E402  (the shuffled block table, -1 past each length)
from test_ops_permute import assert_fp8_close  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ISSUE_LENGTHS = [0, 1, 63, 64, 65]  # plus one long row per case


def make_case(B, s_q, h, C, R, lens, dtype, fp8, page, device, q_std=1.0):
    """Queries [B, s_q, h, *] (s_q None: [B, h, *]), the cache (bf16/fp32 rows or the FP8 cache), the reference."""
    S = max(max(lens), 1)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    shape = (B, h) if s_q is None else (B, s_q, h)
    q = (torch.randn(*shape, C) * q_std).to(dtype)
    qr = (torch.randn(*shape, R) * q_std).to(dtype)
    rows = torch.randn(B, S, C + R)
    cache = RD.pack_latent_fp8(rows.to(dtype), C) if fp8 else rows.to(dtype)
    scale = 1.0 / math.sqrt(C / 2)
    ref = RD.mla_decode(q, qr, cache, lens_t, scale)
    table = None
    if page is not None:
        cache, table = paged(cache, lens_t, page)
        table = table.to(device)
    return q.to(device), qr.to(device), cache.to(device), lens_t.to(device), table, scale, ref


# name: B, s_q (None: 3-D queries), heads, C, R, lengths, dtype, fp8 cache, page, num_splits
CASES = {
    "bf16_issue_lengths": (6, None, 16, 64, 16, ISSUE_LENGTHS + [150], torch.bfloat16, False, None, None),
    "fp8_issue_lengths_paged": (6, None, 16, 64, 16, ISSUE_LENGTHS + [150], torch.bfloat16, True, 16, 3),
    "fp8_fp32_queries": (3, None, 8, 64, 16, [90, 0, 17], torch.float32, True, None, 2),
    "mtp2_bf16_paged": (4, 2, 8, 64, 16, [0, 1, 2, 81], torch.bfloat16, False, 16, 2),
    "mtp2_fp8": (3, 2, 8, 64, 32, [65, 1, 2], torch.float32, True, None, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_cases_match_reference(case, device):
    B, s_q, h, C, R, lens, dtype, fp8, page, splits = CASES[case]
    q, qr, cache, lens_t, table, scale, ref = make_case(B, s_q, h, C, R, lens, dtype, fp8, page, device)
    out = ops_mla.mla_decode(q, qr, cache, lens_t, scale, block_table=table, num_splits=splits)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_close_rel(out.cpu().float(), ref, TOL[dtype], case)
    assert (out[lens_t == 0] == 0).all(), "a row without keys must give zeros"


def test_launcher_fills_every_output(device):
    """Direct launch into a NaN-filled output (fp8, two tokens, splits): every element is written."""
    q, qr, cache, lens_t, table, scale, ref = make_case(3, 2, 8, 64, 16, [40, 1, 0], torch.float32, True, 16, device)
    out = torch.full(q.shape, float("nan"), device=device)
    ops_mla._decode_launch(q, qr, cache, lens_t, table.contiguous(), scale, 3, out)
    assert not out.isnan().any()
    assert_close_rel(out.cpu(), ref, 1e-5, "launcher")


def test_gluon_config_runs_the_triton_kernel_where_gluon_does_not_apply(device):
    """A GLUON config off sm_90 (or on shapes the Gluon kernel does not take: fp32, C=64) runs the Triton kernel."""
    q, qr, cache, lens_t, table, scale, ref = make_case(3, None, 8, 64, 16, [40, 1, 0], torch.float32, True, 16,
                                                        device)
    if ops_mla.mla_decode_sm90 is not None:
        assert not ops_mla.mla_decode_sm90.supports(q, cache, table)
    out = torch.full(q.shape, float("nan"), device=device)
    cfg = dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1, GLUON=2)
    ops_mla._decode_launch(q, qr, cache, lens_t, table.contiguous(), scale, 2, out, cfg=cfg)
    assert_close_rel(out.cpu(), ref, 1e-5, "GLUON config, Triton kernel")


def test_pack_fp8_matches_reference(device):
    kv = (torch.randn(37, 80) * 3).bfloat16()
    kv[5] = 0  # an all-zero row: the floor scale, zeros back
    got = ops_mla.pack_latent_fp8(kv.to(device), 64)
    want = RD.pack_latent_fp8(kv, 64)
    assert got.shape == (37, RD.fp8_row_bytes(64, 16)) == want.shape and got.dtype == torch.uint8
    got = got.cpu()
    # scales, rope and padding bit-identical; the e4m3 codes too, up to the rare 1-ulp difference between the GPU's
    # cvt.rn and torch's CPU cast that quantize_fp8 shows as well (test_ops_permute.assert_fp8_close)
    assert torch.equal(got[:, 64:], want[:, 64:]), "scales / rope / padding differ from the reference"
    assert_fp8_close(got[:, :64].contiguous().view(torch.float8_e4m3fn), want[:, :64].contiguous().view(
        torch.float8_e4m3fn), "packed e4m3 latent")
    back = RD.unpack_latent_fp8(want, 64, 16)
    assert torch.equal(back[:, 64:], kv[:, 64:].float()), "the rope part is stored exactly (bf16)"
    assert (back[5] == 0).all()
    assert_close_rel(back[:, :64], kv[:, :64].float(), 0.04, "e4m3 round trip")  # 3 mantissa bits: ~2.5%


def test_fp8_row_layout():
    assert RD.fp8_row_bytes(512, 64) == 656  # DeepSeek-V3: 57% of the bf16 row's 1152 bytes
    assert RD.fp8_row_bytes(64, 16) % 16 == 0


def test_fp8_cache_error_against_bf16():
    """The FP8 cache's error against the bf16 cache (both through the reference), on RMSNorm-like latents: the
    numbers docs/numerics.md states (bounds with margin)."""
    torch.manual_seed(0)
    B, h, C, R, S = 2, 16, 512, 64, 512
    gamma = torch.exp(torch.randn(C) * 0.5)  # a spread of per-channel norm weights
    c = torch.randn(B, S, C)
    c = c / c.pow(2).mean(-1, keepdim=True).sqrt() * gamma
    rows = torch.cat([c, torch.randn(B, S, R)], -1).bfloat16()
    lens = torch.tensor([S, S - 77], dtype=torch.int32)
    packed = RD.pack_latent_fp8(rows, C)
    errs = []
    for q_std in (0.05, 0.3):
        q, qr = torch.randn(B, h, C) * q_std, torch.randn(B, h, R) * q_std
        ref = RD.mla_decode(q, qr, rows, lens, 1 / math.sqrt(192))
        got = RD.mla_decode(q, qr, packed, lens, 1 / math.sqrt(192))
        errs.append(float((got - ref).norm() / ref.norm()))
    assert errs[0] < 0.03 and errs[1] < 0.08, errs


def test_fp8_products_error_against_bf16():
    """The e4m3-product kernel's roundings (q per row, the weights P x sk; reference.mla_decode_fp8_products) on the
    same latents: what they add to the FP8 cache's own error, the numbers docs/numerics.md states (bounds with
    margin)."""
    torch.manual_seed(0)
    B, h, C, R, S = 2, 16, 512, 64, 512
    gamma = torch.exp(torch.randn(C) * 0.5)
    c = torch.randn(B, S, C)
    c = c / c.pow(2).mean(-1, keepdim=True).sqrt() * gamma
    rows = torch.cat([c, torch.randn(B, S, R)], -1).bfloat16()
    lens = torch.tensor([S, S - 77], dtype=torch.int32)
    packed = RD.pack_latent_fp8(rows, C)
    for q_std in (0.05, 0.3):
        q, qr = torch.randn(B, h, C) * q_std, torch.randn(B, h, R) * q_std
        ref = RD.mla_decode(q, qr, rows, lens, 1 / math.sqrt(192))
        cache_only = RD.mla_decode(q, qr, packed, lens, 1 / math.sqrt(192))
        products = RD.mla_decode_fp8_products(q, qr, packed, lens, 1 / math.sqrt(192))
        added = float((products - cache_only).norm() / cache_only.norm())
        total = float((products - ref).norm() / ref.norm())
        assert 1e-3 < added < 0.05 and total < 0.07, (q_std, added, total)
    with pytest.raises(ValueError, match="FP8 cache"):
        RD.mla_decode_fp8_products(q, qr, rows, lens, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear error before any launch


def test_bad_input_is_named():
    d = ops_mla.mla_decode
    q, qr = torch.randn(2, 4, 64), torch.randn(2, 4, 16)
    cache = torch.randn(2, 10, 80)
    lens = torch.tensor([10, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_rope must have shape"):
        d(q, qr[:, :3], cache, lens, 0.1)  # head count
    with pytest.raises(ValueError, match="q_latent must be"):
        d(q[0], qr[0], cache, lens, 0.1)
    with pytest.raises(ValueError, match="query tokens"):
        d(torch.randn(2, 17, 4, 64), torch.randn(2, 17, 4, 16), cache, lens, 0.1)
    with pytest.raises(ValueError, match="C \\+ R = 80 columns"):
        d(q, qr, cache[..., :72], lens, 0.1)  # dims
    packed = RD.pack_latent_fp8(cache, 64)
    with pytest.raises(ValueError, match="fp8_row_bytes"):
        d(q, qr, packed[..., :-16], lens, 0.1)
    with pytest.raises(ValueError, match="multiple of 16"):
        d(torch.randn(2, 4, 56), torch.randn(2, 4, 24), packed, lens, 0.1)
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        d(q, qr, cache, torch.tensor([11, 3], dtype=torch.int32), 0.1)  # lengths beyond the cache
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        d(q, qr, cache, torch.tensor([-1, 3], dtype=torch.int32), 0.1)
    pages = cache.view(4, 5, 80)
    with pytest.raises(ValueError, match="block_table entries"):  # block table out of range
        d(q, qr, pages, lens, 0.1, block_table=torch.tensor([[0, 4], [1, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        d(q, qr, pages, torch.tensor([11, 3], dtype=torch.int32), 0.1,
          block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    with pytest.raises(TypeError, match="kv_cache must have dtype"):
        d(q, qr, cache.double(), lens, 0.1)
    # entries past a row's length are never read: -1 there is fine
    d(q, qr, pages, torch.tensor([5, 3], dtype=torch.int32), 0.1,
      block_table=torch.tensor([[0, -1], [1, -1]], dtype=torch.int32))


def test_module_and_cache_arguments():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        mk.MultiHeadLatentAttention(hidden_size=64, num_heads=2, q_lora_rank=32, kv_lora_rank=32,
                                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="capacity"):
        mk.MLACache(2, 0)
    with pytest.raises(ValueError, match="page_size needs"):
        mk.MLACache(page_size=16)


# ---------------------------------------------------------------------------------------------------------------
# module: FP8 cache, static cache (per-row lengths on the device)


def random_mla(std, seed, **kw):
    """A module with N(0, std) weights (seeded)."""
    torch.manual_seed(seed)
    m = mk.MultiHeadLatentAttention(**kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=std)
    return m.eval()


def small_mla(dtype, device, kv_cache_dtype="auto"):
    return random_mla(0.08, 1, hidden_size=128, num_heads=16, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, kv_cache_dtype=kv_cache_dtype).to(device=device, dtype=dtype)


def run_steps(m, xs, cache, prefill):
    with torch.no_grad():
        outs = [m(xs[:, :prefill], cache=cache)]
        outs += [m(xs[:, t : t + 1], cache=cache) for t in range(prefill, xs.shape[1])]
    return torch.cat(outs, 1).float()


@pytest.mark.parametrize("static", [False, True])
def test_module_fp8_cache_kernels_match_reference(static, device):
    """Prefill 5 tokens then 3 decode steps with the FP8 cache: the kernel path against the reference path (both
    read the same FP8 rows), and the FP8 cache against the bf16 one (its own error)."""
    m = small_mla(torch.float32, device, "fp8")
    xs = torch.randn(2, 8, 128).to(device)
    res = {}
    for use in (False, True):
        m.use_kernels = use
        # the kernels on a static paged cache (static) against the reference on a growable contiguous one
        cache = mk.MLACache(2, 12, page_size=4) if static and use else mk.MLACache()
        res[use] = (run_steps(m, xs, cache, 5), cache)
    (ref, rc), (out, kc) = res[False], res[True]
    assert kc.fp8 and kc.kv.dtype == torch.uint8 and kc.length == rc.length == 8
    assert_close_rel(kc.c_kv, rc.c_kv, 2e-3, "cached c_kv (same quantisation, fp32 inputs)")
    assert_close_rel(out, ref, 1e-3, "fp8-cache kernels vs reference")
    m.kv_cache_dtype = "auto"
    m.use_kernels = False
    full = run_steps(m, xs, mk.MLACache(), 5)
    err = float((ref - full).norm() / full.norm())
    assert 1e-4 < err < 0.05, err  # the FP8 cache's error is there, and small


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_module_static_cache_per_row_lengths(kv_cache_dtype, device):
    """A static paged cache whose rows have different lengths (set on the device between steps): the kernel decode
    step against the reference decode step (per-row lengths, reference.mla_decode)."""
    m = small_mla(torch.float32, device, kv_cache_dtype)
    B = 3
    xs = torch.randn(B, 6, 128).to(device)
    outs = {}
    for use in (False, True):
        torch.manual_seed(5)
        m.use_kernels = use
        cache = mk.MLACache(B, 24, page_size=8)
        with torch.no_grad():
            m(xs[:, :5], cache=cache)  # prefill: equal lengths
            cache.seqlens.copy_(torch.tensor([5, 1, 3], dtype=torch.int32))  # rows cut back to different lengths
            steps = [m(xs[:, 5:6], cache=cache)]
            cache.seqlens.copy_(torch.tensor([9, 0, 4], dtype=torch.int32))  # stale rows past a length are junk
            steps.append(m(xs[:, 5:6], cache=cache))
        outs[use] = torch.cat(steps, 1).float()
        assert cache.seqlens.tolist() == [10, 1, 5]
    assert_close_rel(outs[True], outs[False], 1e-4, "static cache decode")


# ---------------------------------------------------------------------------------------------------------------
# GPU: DeepSeek-V3's sizes, production configs, CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("fp8,s_q,paged", [(False, 1, False), (False, 2, True), (True, 1, True), (True, 2, False)],
                         ids=["bf16-contig", "bf16-mtp2-paged", "fp8-paged", "fp8-mtp2-contig"])
def test_decode_deepseek_sizes_gpu(fp8, s_q, paged):
    """The Triton kernel at DeepSeek-V3's sizes (shipped configs), each factor in two cases (compiles are costly)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lens = ISSUE_LENGTHS + [2000, 777]
    q, qr, cache, lens_t, table, scale, ref = make_case(len(lens), s_q if s_q > 1 else None, 128, 512, 64, lens,
                                                        torch.bfloat16, fp8, 64 if paged else None, "cuda",
                                                        q_std=0.3)
    for splits in (None, 1):
        out = ops_mla.mla_decode(q, qr, cache, lens_t, scale, block_table=table, num_splits=splits)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert_close_rel(out.cpu().float(), ref, 2e-2, f"splits={splits}")
        assert (out[lens_t == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("gluon", [1, 2, 3, "fp8", "fp8mma"], ids=["serial", "pipe", "lookahead", "fp8", "fp8mma"])
@pytest.mark.parametrize("paged,s_q", [(False, 1), (True, 2)], ids=["contig", "paged-mtp2"])
def test_gluon_sm90_kernel_gpu(s_q, paged, gluon, monkeypatch):
    """The Gluon sm_90 kernel (config GLUON=1: serial schedule; 2, or $MOE_KERNELS_MLA_PIPE=1: the seesaw kernel,
    PIPE=1; 3, or $MOE_KERNELS_MLA_PIPE=2: the serial kernel with lookahead; "fp8mma": the FP8 cache's seesaw
    with e4m3 products, mla_decode_sm90_fp8) against the float32 reference: the issue's lengths (odd and even tile
    counts, the last tile partial as the even or the odd one of a pair, one tile alone), a long row, one split and
    several (some without keys), 2 query tokens, a paged cache with a shuffled table; NaN-filled outputs; garbage
    (NaN) in the cache past every row's length must not leak in. The e4m3 products round q and the weights as
    well: that kernel is held to reference.mla_decode_fp8_products (the same roundings, emulated) at 1.5e-2 and
    to the float32 reference at 4e-2."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    if ops_mla.mla_decode_sm90 is None:
        pytest.skip("this Triton has no Gluon")
    # whatever the caller's environment
    monkeypatch.setenv("MOE_KERNELS_MLA_PIPE", {2: "1", 3: "2", "fp8mma": "1"}.get(gluon, "0"))
    fp8 = gluon in ("fp8", "fp8mma")
    lens = ISSUE_LENGTHS + [2000, 777, 128]
    q, qr, cache, lens_t, table, scale, ref = make_case(len(lens), s_q if s_q > 1 else None, 128, 512, 64, lens,
                                                        torch.bfloat16, fp8, 64 if paged else None, "cuda",
                                                        q_std=0.3)
    if not paged:  # NaN past each row's length (contiguous cache rows nobody wrote; FP8: 0xFF is an e4m3 NaN)
        for b, L in enumerate(lens):
            cache[b, L:] = 255 if fp8 else float("nan")
    assert ops_mla.mla_decode_sm90.supports(q, cache, table)
    assert ops_mla.mla_decode_sm90.uses_pipe(cache, 512) == (gluon == 2)
    assert ops_mla.mla_decode_sm90.uses_lookahead(cache) == (gluon == 3)
    assert (ops_mla.mla_decode_sm90.schedule(0, fp8, 512) == "fp8 seesaw") == (gluon == "fp8mma")
    emulated = None
    if gluon == "fp8mma":
        emulated = RD.mla_decode_fp8_products(q.cpu(), qr.cpu(), cache.cpu(), lens_t.cpu(), scale,
                                              None if table is None else table.cpu())
    cfg = dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2, GLUON=1 if fp8 else gluon)
    for splits in (1, 3, 0):
        out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
        ops_mla._decode_launch(q, qr, cache, lens_t, table, scale, splits, out, cfg=cfg)
        torch.cuda.synchronize()
        got = out.cpu().float()
        # per row (length): which rows go wrong tells a tile / pipeline / split fault from a product fault
        per_row = {L: round(float((got[b] - ref[b]).norm() / ref[b].norm().clamp(min=1e-30)), 4) if L else
                   float(got[b].abs().max()) for b, L in enumerate(lens)}
        assert torch.isfinite(out).all(), f"splits={splits}: non-finite; per-row errors {per_row}"
        if emulated is not None:
            assert_close_rel(got, emulated, 1.5e-2, f"e4m3 products vs their emulation, splits={splits}, per-row "
                                                    f"errors against the float32 reference {per_row}")
        assert_close_rel(got, ref, 4e-2 if emulated is not None else 2e-2,
                         f"gluon splits={splits}, per-row errors {per_row}")
        assert (out[lens_t == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_module_decode_step_cuda_graph_gpu(kv_cache_dtype):
    """Capture one decode step of the module over a static paged cache once, replay it with changing lengths; each
    replay equals an eager step at the same lengths."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = random_mla(0.03, 0, hidden_size=1024, num_heads=128, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, kv_cache_dtype=kv_cache_dtype).cuda().bfloat16()
    B, cap = 4, 1024
    cache = mk.MLACache(B, cap, page_size=64)
    x0 = torch.randn(B, 300, 1024, device="cuda", dtype=torch.bfloat16)
    x_step = torch.randn(B, 1, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m(x0, cache=cache)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
            m(x_step, cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_graph = m(x_step, cache=cache)
        snapshot = cache.kv.clone()
        for lens in ([300, 5, 0, 1000], [64, 65, 63, 1], [1023, 2, 700, 128]):
            cache.kv.copy_(snapshot)
            cache.seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
            x_step.normal_()
            g.replay()
            torch.cuda.synchronize()
            assert cache.seqlens.tolist() == [n + 1 for n in lens]
            got = y_graph.float().clone()
            cache.kv.copy_(snapshot)
            cache.seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
            want = m(x_step, cache=cache).float()
            # not bit-equal: the small-T latent GEMM adds its split-K partials with atomics (any order)
            assert_close_rel(got, want, 1e-2, f"replay at lengths {lens}")
            assert torch.isfinite(got).all()
