"""Bad input raises a clear TypeError/ValueError naming the argument, before any kernel runs."""
import pytest
import torch

import moe_kernels as mk

H, E = 256, 8


@pytest.fixture(scope="module")
def layer():
    return mk.MoELayer(hidden_size=H, intermediate_size=128, num_experts=E, top_k=2, precision="bf16")


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(top_k=9), ValueError, "top_k"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(n_group=3), ValueError, "n_group"),
        (dict(n_group=4, topk_group=5), ValueError, "topk_group"),
        (dict(hidden_size=200, precision="fp8"), ValueError, "hidden_size"),
        (dict(precision="int4"), ValueError, "precision"),
        (dict(scoring="relu"), ValueError, "scoring"),
        (dict(balance="magic"), ValueError, "balance"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(n_shared_experts=-1), ValueError, "n_shared_experts"),
        (dict(intermediate_size=100, precision="fp8"), ValueError, "intermediate_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, words):
    args = dict(hidden_size=H, intermediate_size=128, num_experts=E, top_k=2, precision="bf16")
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        mk.MoELayer(**args)


def test_router_alpha_range():
    with pytest.raises(ValueError, match="alpha"):
        mk.TopKRouter(H, E, 2, balance="adaptive", alpha=0.5)


def test_layer_wrong_hidden_size(layer):
    with pytest.raises(ValueError, match="hidden_size=256"):
        layer(torch.randn(4, 255))


def test_layer_wrong_dtype(layer):
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        layer(torch.randint(0, 3, (4, H)))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * H])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.gpu
def test_layer_wrong_device(layer):
    with pytest.raises(TypeError, match="cuda"):
        layer(torch.randn(4, H, device="cuda"))


def test_route_bad_arguments():
    x, w = torch.randn(5, H), torch.randn(E, H)
    with pytest.raises(ValueError, match="top_k"):
        mk.ops.route(x, w, top_k=E + 1)
    with pytest.raises(ValueError, match="router_weight"):
        mk.ops.route(x, torch.randn(E, H + 128), top_k=2)
    with pytest.raises(ValueError, match="n_group"):
        mk.ops.route(x, w, top_k=2, n_group=3)
    with pytest.raises((TypeError, ValueError), match="x"):
        mk.ops.route(x[0], w, top_k=2)


def test_route_non_finite_logits():
    x, w = torch.randn(5, H), torch.randn(E, H)
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match="router logits"):
        mk.ops.route(x, w, top_k=2)
    x[2, 7] = float("inf")
    with pytest.raises(ValueError, match="router logits"):
        mk.ops.route(x, w, top_k=2)


def test_permute_ids_out_of_range():
    x = torch.randn(5, H)
    ids = torch.randint(0, E, (5, 2), dtype=torch.int32)
    ids[3, 1] = E
    with pytest.raises(ValueError, match="topk_ids"):
        mk.ops.permute(x, ids, E)
    ids[3, 1] = -2
    with pytest.raises(ValueError, match="topk_ids"):
        mk.ops.permute(x, ids, E)


def test_permute_mismatched_shapes():
    with pytest.raises(ValueError):
        mk.ops.permute(torch.randn(5, H), torch.zeros(6, 2, dtype=torch.int32), E)
    with pytest.raises(TypeError, match="topk_ids"):
        mk.ops.permute(torch.randn(5, H), torch.zeros(5, 2), E)


def test_unpermute_mismatched_shapes():
    x = torch.randn(5, H)
    ids = torch.randint(0, E, (5, 2), dtype=torch.int32)
    p = mk.ops.permute(x, ids, E)
    with pytest.raises(ValueError):
        mk.ops.unpermute(torch.randn(9, H), p, torch.rand(5, 2))
    with pytest.raises(ValueError, match="topk_weights"):
        mk.ops.unpermute(p.x, p, torch.rand(5, 3))


def test_quantize_fp8_bad_inputs():
    with pytest.raises(ValueError, match="128"):
        mk.ops.quantize_fp8(torch.randn(4, 200))
    with pytest.raises((TypeError, ValueError)):
        mk.ops.quantize_fp8(torch.randn(4, 2, 128))


def test_grouped_gemm_bad_inputs():
    a, s = mk.ops.quantize_fp8(torch.randn(10, 256))
    w, ws = mk.ops.quantize_weight_fp8(torch.randn(3, 128, 256))
    good = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="offsets"):
        mk.ops.grouped_gemm_fp8(a, s, w, ws, good.long())
    with pytest.raises(ValueError, match="offsets"):
        mk.ops.grouped_gemm_fp8(a, s, w, ws, good[:3])
    with pytest.raises(ValueError):
        mk.ops.grouped_gemm_fp8(a, s[:, :1], w, ws, good)
    with pytest.raises(ValueError):
        mk.ops.grouped_gemm_fp8(a, s, w[:, :, :128], ws, good)
    with pytest.raises(ValueError, match="offsets"):
        mk.ops.grouped_gemm_fp8(a, s, w, ws, torch.tensor([0, 4, 4, 9], dtype=torch.int32))


def test_experts_fp8_weights_need_scales():
    ex = mk.GroupedExperts(2, H, 128, precision="fp8")
    q, _ = mk.ops.quantize_weight_fp8(torch.randn(2, 256, H))
    with pytest.raises(ValueError, match="scale"):
        ex.load_weights(q, torch.randn(2, H, 128))
    with pytest.raises(ValueError, match="w13"):
        ex.load_weights(torch.randn(2, 255, H), torch.randn(2, H, 128))
