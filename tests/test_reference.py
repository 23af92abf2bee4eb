"""The references themselves: properties that pin down their meaning."""
import pytest
import torch

import moe_kernels.reference as R
from _helpers import assert_close_rel


@pytest.mark.parametrize("shape", [(37, 256), (1, 128), (5, 7168)])
def test_fp8_activation_roundtrip(shape):
    x = torch.randn(shape) * 3
    q, s = R.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (shape[0], shape[1] // 128)
    assert_close_rel(R.dequantize_fp8(q, s), x, 4e-2, "1x128 fp8 round trip")


def test_fp8_weight_roundtrip_and_ragged_blocks():
    w = torch.randn(3, 300, 200)  # not multiples of 128: partial blocks
    q, s = R.quantize_weight_fp8(w)
    assert s.shape == (3, 3, 2)
    assert_close_rel(R.dequantize_weight_fp8(q, s), w, 4e-2, "128x128 fp8 round trip")


def test_fp8_zero_blocks_and_huge_values_stay_finite():
    x = torch.zeros(4, 256)
    x[1, 130] = 1e30  # far beyond e4m3's range: the block scale absorbs it
    x[2] = 1e-40  # denormal fp32 inputs
    q, s = R.quantize_fp8(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    d = R.dequantize_fp8(q, s)
    assert torch.isfinite(d).all()
    assert d[0].abs().max() == 0 and d[1, :128].abs().max() == 0
    assert abs(d[1, 130].item() / 1e30 - 1) < 1e-6


def test_route_ties_go_to_lower_expert():
    x = torch.ones(3, 128)
    w = torch.zeros(8, 128)  # every score equal
    weights, ids, counts = R.route(x, w, top_k=3)
    assert ids.tolist() == [[0, 1, 2]] * 3
    assert counts.tolist() == [3, 3, 3, 0, 0, 0, 0, 0]
    assert_close_rel(weights, torch.full((3, 3), 1 / 3), 1e-6)


def test_route_group_limited_keeps_only_top_groups():
    T, E, G = 64, 32, 8
    x, w = torch.randn(T, 128), torch.randn(E, 128)
    _, ids, _ = R.route(x, w, top_k=4, scoring="sigmoid", n_group=G, topk_group=2)
    groups = (ids // (E // G)).long()
    assert all(len(set(g.tolist())) <= 2 for g in groups)


def test_permute_is_stable_and_inverts():
    T, k, E = 37, 2, 7
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)]).int()  # expert E-1 stays empty
    x = torch.randn(T, 128)
    p = R.permute(x, ids, E)
    assert p.offsets[0] == 0 and p.offsets[-1] == T * k
    for e in range(E):
        toks = p.token_index[p.offsets[e] : p.offsets[e + 1]]
        assert torch.all(toks[1:] > toks[:-1]), "rows of one expert must keep ascending token order"
    assert torch.equal(p.x[p.slot.long()], x.unsqueeze(1).expand(T, k, 128))
    w = torch.rand(T, k)
    assert_close_rel(R.unpermute(p.x, p, w), x * w.sum(1, keepdim=True), 1e-6)


def test_grouped_gemm_matches_per_expert_matmul():
    offsets = torch.tensor([0, 5, 5, 12, 13], dtype=torch.int32)  # an empty expert and a one-row expert
    a, w = torch.randn(13, 256), torch.randn(4, 64, 256)
    out = R.grouped_gemm(a, w, offsets)
    assert torch.equal(out[5:12], a[5:12] @ w[2].t())
    assert out.shape == (13, 64)


def test_moe_layer_reference_equals_dense_loop():
    T, H, I, E, k = 11, 128, 64, 6, 2
    x, wr = torch.randn(T, H), torch.randn(E, H)
    w13, w2 = torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    out = R.moe_layer(x, wr, w13, w2, k)
    weights, ids, _ = R.route(x, wr, k)
    loop = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            h = R.swiglu(x[t : t + 1] @ w13[e].t())
            loop[t] += weights[t, j] * (h @ w2[e].t())[0]
    assert_close_rel(out, loop, 1e-5)
