"""The C++/CUDA extension moe_kernels._C: it is built, and its dispatch-layout kernel matches the reference.

CI sets MOE_KERNELS_REQUIRE_EXTENSION=1: there a missing extension is a failure, not a skip.
"""
import os
import warnings

import pytest
import torch

import moe_kernels.dist.layout as layout_mod
from moe_kernels._ext import extension_error, has_extension
from moe_kernels.dist import dispatch_layout
from moe_kernels.reference.dispatch import dispatch_layout as reference_layout

REQUIRED = os.environ.get("MOE_KERNELS_REQUIRE_EXTENSION") == "1"
needs_ext = pytest.mark.skipif(not has_extension() and not REQUIRED, reason=f"extension not built: {extension_error()}")


def extension_op(*args):
    assert has_extension(), f"moe_kernels._C is missing: {extension_error()}"
    return torch.ops.moe_kernels_C.dispatch_layout(*args)


def random_case(T, k, E, R, id_dtype=torch.int32, device="cpu", none_frac=0.1, repeat_frac=0.0):
    """topk_ids [T, k] of distinct experts per token (as top-k gives), some -1, optionally some repeated ids;
    expert_to_rank [E] random, so tokens often have several experts on one rank."""
    if k <= E:
        ids = torch.rand(T, E).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, E, (T, k))
    if repeat_frac and k > 1:
        dup = torch.rand(T) < repeat_frac
        ids[dup, -1] = ids[dup, 0]
    ids[torch.rand(T, k) < none_frac] = -1
    expert_to_rank = torch.randint(0, R, (E,), dtype=torch.int32)
    return ids.to(id_dtype).to(device), expert_to_rank.to(device)


def assert_layout_equal(out, ref, what):
    names = ("tokens_per_rank", "is_token_in_rank", "tokens_per_expert")
    for name, o, r in zip(names, out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape and o.device == r.device, (
            f"{what} {name}: {o.dtype} {tuple(o.shape)} {o.device} vs reference {r.dtype} {tuple(r.shape)} {r.device}"
        )
        if not torch.equal(o, r):
            bad = (o != r).nonzero()[0].tolist()
            raise AssertionError(f"{what} {name}: differs from the reference first at {bad}: "
                                 f"{o[tuple(bad)].item()} vs {r[tuple(bad)].item()}")


def test_extension_is_built():
    if REQUIRED:
        assert has_extension(), f"MOE_KERNELS_REQUIRE_EXTENSION=1 but moe_kernels._C is missing: {extension_error()}"
    elif not has_extension():
        pytest.skip(f"extension not built: {extension_error()}")
    assert extension_error() is None
    assert hasattr(torch.ops.moe_kernels_C, "dispatch_layout")


def test_reference_by_hand():
    # token 0: experts 0, 1 both on rank 0 -> counted once there; token 1: one expert and a "none";
    # token 2: the same expert twice (counted twice per expert, once per rank)
    ids = torch.tensor([[0, 1], [2, -1], [3, 3]])
    per_rank, in_rank, per_expert = reference_layout(ids, torch.tensor([0, 0, 1, 1], dtype=torch.int32), 3)
    assert per_rank.tolist() == [1, 2, 0]
    assert in_rank.tolist() == [[True, False, False], [False, True, False], [False, True, False]]
    assert per_expert.tolist() == [1, 1, 1, 2]


@needs_ext
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("R", [1, 2, 16])
@pytest.mark.parametrize("E", [7, 16, 256])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("T", [0, 1, 37, 1000])
def test_cpu_kernel_matches_reference(T, k, E, R, id_dtype):
    ids, e2r = random_case(T, k, E, R, id_dtype, repeat_frac=0.1)
    ref = reference_layout(ids, e2r, R)
    assert_layout_equal(extension_op(ids, e2r, R), ref, f"T={T} k={k} E={E} R={R} {id_dtype}")
    assert_layout_equal(dispatch_layout(ids, e2r, R), ref, "dist.dispatch_layout")


@needs_ext
def test_cpu_kernel_edge_cases():
    # all "none"; every expert on one rank; non-contiguous ids; many experts (the GPU's global-counter path)
    ids = torch.full((5, 3), -1, dtype=torch.int32)
    e2r = torch.zeros(4, dtype=torch.int32)
    assert_layout_equal(extension_op(ids, e2r, 2), reference_layout(ids, e2r, 2), "all -1")
    ids, e2r = random_case(64, 4, 16, 4, torch.int64)
    ids = ids.t().contiguous().t()
    assert_layout_equal(extension_op(ids, e2r, 4), reference_layout(ids, e2r, 4), "non-contiguous")
    ids, e2r = random_case(300, 8, 20000, 64)
    assert_layout_equal(extension_op(ids, e2r, 64), reference_layout(ids, e2r, 64), "E=20000")


@needs_ext
def test_meta_shapes():
    ids = torch.empty(37, 8, dtype=torch.int32, device="meta")
    per_rank, in_rank, per_expert = extension_op(ids, torch.empty(256, dtype=torch.int32, device="meta"), 16)
    assert (per_rank.shape, in_rank.shape, per_expert.shape) == ((16,), (37, 16), (256,))
    assert (per_rank.dtype, in_rank.dtype, per_expert.dtype) == (torch.int32, torch.bool, torch.int32)


BAD_INPUTS = [  # (topk_ids, expert_to_rank, num_ranks, exception, text the message must contain)
    (torch.zeros(4, 2), torch.zeros(8, dtype=torch.int32), 2, TypeError, "topk_ids"),
    (torch.zeros(4, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 2, ValueError, "topk_ids"),
    (torch.full((4, 2), 8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 2, ValueError, "topk_ids"),
    (torch.full((4, 2), -2, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 2, ValueError, "topk_ids"),
    (torch.zeros(4, 2, dtype=torch.int32), torch.zeros(8, 1, dtype=torch.int32), 2, ValueError, "expert_to_rank"),
    (torch.zeros(4, 2, dtype=torch.int32), torch.zeros(8), 2, TypeError, "expert_to_rank"),
    (torch.zeros(4, 2, dtype=torch.int32), torch.full((8,), 2, dtype=torch.int32), 2, ValueError, "expert_to_rank"),
    (torch.zeros(4, 2, dtype=torch.int32), torch.full((8,), -1, dtype=torch.int32), 2, ValueError, "expert_to_rank"),
    (torch.zeros(4, 2, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 0, ValueError, "num_ranks"),
    (torch.zeros(4, 2, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 2.0, TypeError, "num_ranks"),
    ("ids", torch.zeros(8, dtype=torch.int32), 2, TypeError, "topk_ids"),
]


@pytest.mark.parametrize("ids,e2r,R,exc,text", BAD_INPUTS)
def test_bad_inputs_raise(ids, e2r, R, exc, text):
    with pytest.raises(exc, match=text):
        dispatch_layout(ids, e2r, R)


OP_BAD_INPUTS = [b for b in BAD_INPUTS if isinstance(b[0], torch.Tensor) and isinstance(b[2], int)]


@needs_ext
@pytest.mark.parametrize("ids,e2r,R,exc,text", OP_BAD_INPUTS)
def test_extension_op_checks_its_arguments(ids, e2r, R, exc, text):
    # the op checks on its own too (the range of expert_to_rank only matters through the ids that reach it)
    if text == "expert_to_rank" and e2r.dtype == torch.int32 and e2r.dim() == 1:
        ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(exc, match=text):
        extension_op(ids, e2r, R)


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(layout_mod, "has_extension", lambda: False)
    monkeypatch.setattr(layout_mod, "_warned_fallback", False)
    ids, e2r = random_case(37, 2, 7, 2)
    with pytest.warns(RuntimeWarning, match="dispatch_layout runs the PyTorch reference"):
        out = dispatch_layout(ids, e2r, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch_layout(ids, e2r, 2)
    assert_layout_equal(out, reference_layout(ids, e2r, 2), "fallback")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,k,E,R", [(0, 2, 7, 2), (1, 8, 256, 16), (37, 2, 7, 2), (37, 8, 16, 1), (1000, 8, 256, 16),
                                     (300_000, 8, 256, 16), (4096, 8, 20000, 64)])
def test_cuda_kernel_matches_reference(T, k, E, R, id_dtype):
    ids, e2r = random_case(T, k, E, R, id_dtype, device="cuda", repeat_frac=0.1)
    ref = reference_layout(ids, e2r, R)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the op must run on the current stream, here a side stream
        out = extension_op(ids, e2r, R)
    torch.cuda.current_stream().wait_stream(side)
    assert_layout_equal(out, ref, f"cuda T={T} k={k} E={E} R={R} {id_dtype}")
    assert_layout_equal(dispatch_layout(ids, e2r, R), ref, "cuda dist.dispatch_layout")


@pytest.mark.gpu
def test_cuda_bad_inputs_raise():
    ids = torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(TypeError, match="expert_to_rank"):
        dispatch_layout(ids, torch.zeros(8, dtype=torch.int32), 2)  # on the CPU
    with pytest.raises(ValueError, match="topk_ids"):
        dispatch_layout(ids + 8, torch.zeros(8, dtype=torch.int32, device="cuda"), 2)
