"""The decode grouped GEMM (weights on the MMA's M side, tokens on N) against the fp32 reference.

Same bounds as tests/test_ops_grouped_gemm.py: FP8 <= 2e-2 relative (bf16 output rounding and, with the SwiGLU
re-quantisation, e4m3 rounding of h), bf16 <= 1e-2, fp32 <= 1e-4. Outputs are NaN-filled before the launch.
"""
import pytest
import torch

from _helpers import assert_close_rel, offsets_for as _offsets
from moe_kernels import reference as R
from moe_kernels.ops import grouped_gemm as gg
from moe_kernels.ops import grouped_gemm_configs as cfgs
from moe_kernels.ops import grouped_gemm_decode as gd

FP8_TOL = 2e-2

# rows per expert: empty experts, one row, rows past one BLOCK_T (the row-chunk loop), all rows to one expert
COUNTS = {
    "decode": [0, 1, 3, 0, 2, 0, 0, 1],
    "chunked": [19, 0, 1],  # 19 > BLOCK_T = 16: two row chunks
    "one_expert": [0, 0, 5, 0],
    "single_row": [0, 1],
}


def _cfg(block_t=16, block_n=128, split_k=1):
    return dict(cfgs.DECODE_DEFAULT, BLOCK_T=block_t, BLOCK_N=block_n, SPLIT_K=split_k)


def _fp8_weights(E, N, K, device):
    return R.quantize_weight_fp8(torch.randn(E, N, K, device=device) / K**0.5)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), device=device).to(dtype)


@pytest.mark.parametrize("name", list(COUNTS))
@pytest.mark.parametrize("block_n", [128, 64])
def test_decode_fp8_plain_row_weight(device, name, block_n):
    """Plain FP8 GEMM with the routing weight; N = 320 leaves the last tile partial (and a partial scale block)."""
    counts = COUNTS[name]
    E, N, K = len(counts), 320, 256
    M = sum(counts)
    offsets = _offsets(counts, device)
    a, a_scale = R.quantize_fp8(torch.randn(M, K, device=device))
    w, w_scale = _fp8_weights(E, N, K, device)
    rw = torch.rand(M, device=device) + 0.5
    out = _nan((M, N), torch.bfloat16, device)
    gg._launch(a, a_scale, w, w_scale, out, offsets=offsets, row_weight=rw, cfg=_cfg(block_n=block_n))
    ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32) * rw[:, None]
    assert_close_rel(out.float(), ref, FP8_TOL, f"decode fp8 [{name}]")


@pytest.mark.parametrize("name,split_k", [("decode", 1), ("chunked", 1), ("decode", 3), ("chunked", 2)])
def test_decode_expert_mlp_fp8(device, name, split_k):
    """The fused MLP through the decode kernel: SwiGLU + e4m3 re-quantisation, then w2 with the routing weight;
    split_k > 1: K slices summed by the last program to arrive (H = 384: 3 K steps, uneven over 2 slices)."""
    counts = COUNTS[name]
    E, H, I = len(counts), 384, 256
    M = sum(counts)
    offsets = _offsets(counts, device)
    x, x_scale = R.quantize_fp8(torch.randn(M, H, device=device))
    w13, w13_scale = _fp8_weights(E, 2 * I, H, device)
    w2, w2_scale = _fp8_weights(E, H, I, device)
    tw = torch.rand(M, device=device)
    h = _nan((M, I), torch.float32, device).to(torch.float8_e4m3fn)
    h_scale = _nan((M, I // 128), torch.float32, device)
    gg._launch(x, x_scale, w13, w13_scale, h, offsets=offsets, out_scale=h_scale, swiglu=True,
               cfg=_cfg(split_k=split_k))
    out = _nan((M, H), torch.bfloat16, device)
    gg._launch(h, h_scale, w2, w2_scale, out, offsets=offsets, row_weight=tw, cfg=_cfg(split_k=split_k))
    ref = R.expert_mlp(x, offsets, w13, w2, x_scale, w13_scale, w2_scale, out_dtype=torch.float32) * tw[:, None]
    assert torch.isfinite(h_scale).all()
    assert_close_rel(out.float(), ref, FP8_TOL, f"decode expert_mlp fp8 [{name}]")


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
def test_decode_swiglu_16_and_32_bit(device, dtype, tol, split_k):
    """bf16 / fp32 SwiGLU GEMM with K = 200 (no multiple of BLOCK_K: the masked K tail) and I = 96."""
    counts = COUNTS["decode"]
    E, I, K = len(counts), 96, 200
    M = sum(counts)
    offsets = _offsets(counts, device)
    a = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(E, 2 * I, K, device=device) / K**0.5).to(dtype)
    out = _nan((M, I), dtype, device)
    gg._launch(a, None, w, None, out, offsets=offsets, swiglu=True, cfg=_cfg(block_n=64, split_k=split_k))
    g = R.grouped_gemm(a.float(), w.float(), offsets)
    ref = torch.nn.functional.silu(g[:, :I]) * g[:, I:]
    assert_close_rel(out.float(), ref, tol, f"decode swiglu {dtype}")


def test_decode_masked_layout(device):
    """A [E, max_m, K] with masked_m valid rows per expert; rows past masked_m stay untouched (NaN)."""
    E, max_m, N, K = 4, 8, 128, 256
    a, a_scale = R.quantize_fp8(torch.randn(E * max_m, K, device=device))
    w, w_scale = _fp8_weights(E, N, K, device)
    masked_m = torch.tensor([3, 0, 8, 1], dtype=torch.int32, device=device)
    out = _nan((E * max_m, N), torch.bfloat16, device)
    gg._launch(a, a_scale, w, w_scale, out, masked_m=masked_m, max_m=max_m, cfg=_cfg())
    out = out.view(E, max_m, N)
    a3, s3 = a.view(E, max_m, K), a_scale.view(E, max_m, K // 128)
    for e, m in enumerate(masked_m.tolist()):
        assert torch.isnan(out[e, m:].float()).all(), f"expert {e}: rows past masked_m were written"
        if m:
            one = torch.tensor([0, m], dtype=torch.int32, device=device)
            ref = R.grouped_gemm_fp8(a3[e, :m], s3[e, :m], w[e:e + 1], w_scale[e:e + 1], one, out_dtype=torch.float32)
            assert_close_rel(out[e, :m].float(), ref, FP8_TOL, f"masked expert {e}")


def test_decode_no_rows(device):
    E, N, K = 3, 128, 128
    a, a_scale = R.quantize_fp8(torch.randn(0, K, device=device))
    w, w_scale = _fp8_weights(E, N, K, device)
    out = torch.empty(0, N, dtype=torch.bfloat16, device=device)
    assert gg._launch(a, a_scale, w, w_scale, out, offsets=torch.zeros(E + 1, dtype=torch.int32, device=device),
                      cfg=_cfg()) is None


def test_split_k_fills_one_wave(monkeypatch):
    """The automatic split sizes the grid to one wave of the programs an SM holds: H100-like (132 SMs, 228 KiB an
    SM); the SwiGLU ring at 4 stages (4 x 34 KiB) leaves room for one program an SM, at 3 stages for two."""
    monkeypatch.setattr(gd, "_sm_count", lambda index: 132)
    monkeypatch.setattr(gd, "_smem_per_sm", lambda index: 233472)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dev = torch.device("cuda", 0)
    swiglu = gd.stage_bytes(128, 16, 128, 1, True)  # fp8, BLOCK_N 128 (gate + up), BLOCK_T 16, BLOCK_K 128
    assert swiglu == (2 * 128 + 16) * 128
    assert gd.resident_per_sm(0, 4 * swiglu) == 1 and gd.resident_per_sm(0, 3 * swiglu) == 2
    assert gd.resident_per_sm(0, 4 * (128 + 16) * 128) == 2  # the down projection's ring: capped at 2
    # Mixtral-like T = 1: 2 experts x 16 column tiles, 56 K steps -> 4 slices (128 programs), not 2+ waves
    assert gd.split_k_for(32, 56, dev, swiglu, 4) == 4
    assert gd.split_k_for(32, 56, dev, swiglu, 3) == 8
    # DeepSeek T = 1 (8 experts x 16 tiles = 128 programs) already fills the SMs; many programs never split
    assert gd.split_k_for(128, 56, dev, swiglu, 4) == 1 and gd.split_k_for(448, 16, dev) == 1
    # one expert, one column tile: bounded by 4 K steps a slice
    assert gd.split_k_for(1, 16, dev, swiglu, 4) == 4
    # with the weight bytes of a K step: the down projection (16 steps x 16 KiB) never splits, even with few
    # programs; the SwiGLU one (56 steps x 32 KiB) keeps its one-wave split up to 9 slices of >= 192 KiB
    down = (128 + 16) * 128
    assert gd.split_k_for(112, 16, dev, down, 4) == 2 and gd.split_k_for(112, 16, dev, down, 4, 128 * 128) == 1
    assert gd.split_k_for(56, 16, dev, down, 4, 128 * 128) == 1 and gd.split_k_for(56, 32, dev, down, 4, 128 * 128) == 2
    assert gd.split_k_for(32, 56, dev, swiglu, 3, 2 * 128 * 128) == 8
    assert gd.split_k_for(1, 56, dev, swiglu, 4, 2 * 128 * 128) == 9
    for programs in (1, 7, 32, 100, 133, 1000):  # never more than one wave
        split = gd.split_k_for(programs, 1 << 10, dev, swiglu, 4)
        assert split == 1 or programs * split <= 132


def test_decode_selection_and_token_tile():
    """The decode kernel is the default at <= DECODE_MAX_ROWS rows per expert; BLOCK_T follows the mean rows."""
    assert gd.block_t_for(1, 256) == 16 and gd.block_t_for(8, 8) == 16
    assert gd.block_t_for(2048, 256) == 16 and gd.block_t_for(512, 8) == 64 and gd.block_t_for(10**6, 8) == 64
    assert gd.split_k_for(8, 56, torch.device("cpu")) == 1  # the interpreter: split only when a config asks
    with pytest.raises(ValueError, match="BLOCK_N dividing 128"):
        E, N, K = 2, 128, 128
        a, a_scale = R.quantize_fp8(torch.randn(3, K))
        w, w_scale = _fp8_weights(E, N, K, "cpu")
        gd.launch(a, a_scale, w, w_scale, torch.empty(3, N), offsets=_offsets([1, 2], "cpu"),
                  cfg=dict(_cfg(), BLOCK_N=256))


@pytest.mark.gpu
def test_decode_is_chosen_for_few_rows_and_graph_replays():
    """On CUDA, expert_mlp at 1 token x top-8 over 64 experts takes the decode config; one CUDA graph captured
    once replays with new routing (offsets) and matches the reference each time."""
    E, H, I, k = 64, 512, 256, 8
    dev = torch.device("cuda")
    assert cfgs.get_config("fp8_swiglu", I, H, k // E, dev).get("DECODE") == 1
    w13, w13_scale = _fp8_weights(E, 2 * I, H, dev)
    w2, w2_scale = _fp8_weights(E, H, I, dev)
    T = 4
    x, x_scale = R.quantize_fp8(torch.randn(T * k, H, device=dev))
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    tw = torch.rand(T * k, device=dev)

    def route(seed):
        g = torch.Generator().manual_seed(seed)
        counts = torch.zeros(E, dtype=torch.int64)
        picks = torch.randint(0, E, (T * k,), generator=g)
        counts.index_add_(0, picks, torch.ones_like(picks))
        offsets.copy_(torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32))

    route(0)
    gg.expert_mlp(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, tw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gg.expert_mlp(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, tw)
    for seed in range(1, 4):
        route(seed)
        graph.replay()
        ref = R.expert_mlp(x, offsets, w13, w2, x_scale, w13_scale, w2_scale, out_dtype=torch.float32) * tw[:, None]
        assert_close_rel(y.float(), ref, FP8_TOL, f"graph replay {seed}")


@pytest.mark.gpu
def test_decode_split_k_auto_one_expert():
    """One expert, one row (a shared expert at T = 1): the launcher splits K so more SMs stream the weights."""
    dev = torch.device("cuda")
    H, I = 2048, 1024
    w13, w13_scale = _fp8_weights(1, 2 * I, H, dev)
    w2, w2_scale = _fp8_weights(1, H, I, dev)
    assert gd.split_k_for(I // 128, H // 128, dev) > 1
    x, x_scale = R.quantize_fp8(torch.randn(1, H, device=dev))
    offsets = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    got = gg.expert_mlp(x, x_scale, offsets, w13, w13_scale, w2, w2_scale)
    ref = R.expert_mlp(x, offsets, w13, w2, x_scale, w13_scale, w2_scale, out_dtype=torch.float32)
    assert_close_rel(got.float(), ref, FP8_TOL, "split-K one expert")


def test_split_k_counters_left_at_zero_and_reused(device, monkeypatch):
    """Split-K arrival counters are not zero-filled per launch: the launch takes them zeroed and must leave them at
    zero, so the same counters serve the next launch (here a second, different GEMM on the same counters)."""
    import moe_kernels.ops.grouped_gemm_decode as dec

    counters = torch.zeros(4096, dtype=torch.int32, device=device)
    monkeypatch.setattr(dec, "arrival_counters", lambda dev, n: counters[:n])
    counts = COUNTS["decode"]
    E, H, I = len(counts), 384, 256
    M = sum(counts)
    offsets = _offsets(counts, device)
    for trial in range(2):
        x, x_scale = R.quantize_fp8(torch.randn(M, H, device=device))
        w2, w2_scale = _fp8_weights(E, H, I if trial else H, device)
        if trial:  # the down projection: K = I
            x, x_scale = R.quantize_fp8(torch.randn(M, I, device=device))
        out = _nan((M, H), torch.bfloat16, device)
        gg._launch(x, x_scale, w2, w2_scale, out, offsets=offsets, cfg=_cfg(split_k=2))
        ref = R.grouped_gemm_fp8(x, x_scale, w2, w2_scale, offsets, out_dtype=torch.float32)
        assert_close_rel(out.float(), ref, FP8_TOL, f"decode split-K launch {trial}")
        assert int(counters.abs().sum()) == 0, "the last-arriving programs must reset their counters"
