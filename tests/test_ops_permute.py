"""mk.ops.permute / unpermute (Triton) against moe_kernels.reference.permute.

Index outputs (offsets, token_index, slot) and bf16/fp32 rows must be equal; FP8 rows must carry the reference's
e4m3 bits. The kernel divides with IEEE rounding exactly like torch, so it is bit-exact in practice; the helper
still tolerates a 1-ulp e4m3 difference (a rounding tie of x/scale that another division could resolve
differently) in at most 0.1% of the elements, and reports how many it saw. Scales to 1e-6 relative.

The three index paths run at small sizes: "inline" (no index kernel: the scatter kernel ranks its pairs), "single"
(one program ranks every pair) and "blocks" (the multi-block path, forced by lowering SINGLE_PROGRAM_PAIRS, with
blocks of two chunks so ranks carry across chunks and blocks).
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from _helpers import assert_close_rel, poison_allocator  # noqa: E402

E4M3 = torch.float8_e4m3fn
permute_mod = importlib.import_module("moe_kernels.ops.permute")  # mk.ops.permute is the function


class LaunchSpy:
    """Stands in for a @triton.jit kernel and records the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture(params=["inline", "single", "blocks"])
def index_path(request, monkeypatch):
    """Which index path permute takes; yields (path, spies on the index and scan kernels)."""
    monkeypatch.setattr(permute_mod, "INLINE_PAIRS", 1 << 20 if request.param == "inline" else 0)
    if request.param in ("inline", "single"):  # the path at any test size (its default limit is small)
        monkeypatch.setattr(permute_mod, "SINGLE_PROGRAM_PAIRS", 1 << 20)
    else:
        monkeypatch.setattr(permute_mod, "SINGLE_PROGRAM_PAIRS", 0)
        monkeypatch.setattr(permute_mod, "_pairs_per_block", lambda n: 2 * permute_mod.INDEX_CHUNK)
    spies = {name: LaunchSpy(getattr(permute_mod, name)) for name in ("_index_kernel", "_scan_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(permute_mod, name, spy)
    return request.param, spies


def check_launches(index_path, n):
    """The path asked for is the one taken: single = one index program and no scan; blocks = blocks + scan."""
    path, spies = index_path
    index, scan = spies["_index_kernel"].grids, spies["_scan_kernel"].grids
    if n == 0 or path == "inline":
        assert not index and not scan, "no pairs or inline ranks: no index kernel"
    elif path == "single":
        assert index == [(1,)] and not scan, (index, scan)
    else:
        assert index == [(-(-n // (2 * permute_mod.INDEX_CHUNK)),)] and len(scan) == 1, (index, scan)


def assert_fp8_close(q, q_ref, what="e4m3 rows"):
    """Equal e4m3 bits, up to 1 ulp in at most 0.1% of the elements; returns the count of 1-ulp differences."""
    assert q.dtype == E4M3 and q.shape == q_ref.shape, f"{what}: {q.dtype} {tuple(q.shape)}"
    a, b = q.view(torch.uint8).int(), q_ref.to(q.device).view(torch.uint8).int()
    # e4m3 codes of one sign are monotonic in value: 1 ulp is a code distance of 1 (across zero: the two magnitudes)
    same_sign = (a >> 7) == (b >> 7)
    ulps = torch.where(same_sign, (a - b).abs(), (a & 0x7F) + (b & 0x7F))
    if ulps.numel() and int(ulps.max()) > 1:
        idx = tuple(int(i) for i in torch.unravel_index(ulps.argmax().cpu(), ulps.shape))
        raise AssertionError(f"{what}: {int((ulps > 1).sum())} elements off by > 1 ulp; worst at {idx}: "
                             f"{q[idx].float().item()} vs {q_ref[idx].float().item()}")
    n = int((ulps == 1).sum())
    assert n <= 1e-3 * max(ulps.numel(), 1), f"{what}: {n} of {ulps.numel()} elements off by 1 ulp"
    return n


def make_ids(T, k, E, mode, device, dtype=torch.int32, gen=None):
    """Distinct experts per token, as top-k gives."""
    if T == 0:
        return torch.empty(0, k, dtype=dtype, device=device)
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k]
    if mode == "one_expert":  # expert 2 receives every token, as first choice
        others = torch.rand(T, E - 1, generator=gen).argsort(1)[:, : k - 1]
        ids = torch.cat([torch.full((T, 1), 2), others + (others >= 2).long()], 1)
    elif mode == "empty_experts":  # only even experts are used; odd ones get nothing
        ids = 2 * torch.rand(T, (E + 1) // 2, generator=gen).argsort(1)[:, :k]
    return ids.to(dtype).to(device)


def check_permuted(p, x, ids, E, fp8):
    """Every output against the reference (computed on the same device); every row is compared."""
    r = R.permute(x, ids, E, fp8=fp8)
    n = ids.numel()
    assert p.offsets.dtype == torch.int32 and torch.equal(p.offsets, r.offsets), "offsets"
    assert torch.equal(p.token_index, r.token_index), "token_index: ascending tokens per expert (stable)"
    assert p.slot.shape == ids.shape and torch.equal(p.slot, r.slot), "slot"
    if fp8:
        assert p.scale.dtype == torch.float32 and p.scale.shape == (n, x.shape[1] // 128)
        if n:
            assert_close_rel(p.scale, r.scale, 1e-6, "fp8 scales")
        return assert_fp8_close(p.x, r.x)
    assert p.scale is None and p.x.dtype == x.dtype
    assert torch.equal(p.x, r.x), "permuted rows (every row is compared: unwritten rows would show)"
    return 0


# name: T, k, E, H, mode, id dtype (pairs: 128 a chunk, 256 a block on the "blocks" path)
CASES = {
    "odd_T_k2": (37, 2, 16, 256, "random", torch.int32),
    "k8_E64_3chunks": (37, 8, 64, 128, "random", torch.int64),
    "T1_k1": (1, 1, 4, 128, "random", torch.int32),
    "T0": (0, 2, 8, 128, "random", torch.int32),
    "one_expert_k1": (64, 1, 16, 128, "one_expert", torch.int64),
    "one_expert_k8_E256": (33, 8, 256, 128, "one_expert", torch.int32),
    "empty_experts": (37, 2, 16, 384, "empty_experts", torch.int32),
    "E7_H384": (37, 3, 7, 384, "random", torch.int64),
    "E24_k2_3chunks": (151, 2, 24, 128, "random", torch.int32),
    "E256_k8_3blocks": (67, 8, 256, 128, "random", torch.int64),
    "H2176_partial_row_block": (19, 2, 8, 2176, "random", torch.int32),  # fp8: 2048 + 128 columns, bf16: 3 x 1024
}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", list(CASES))
def test_permute_matches_reference(case, fp8, index_path, device):
    T, k, E, H, mode, id_dtype = CASES[case]
    x = torch.randn(T, H).bfloat16().to(device)
    ids = make_ids(T, k, E, mode, device, id_dtype)
    poison_allocator((T * k, H), torch.bfloat16, device)
    check_permuted(mk.ops.permute(x, ids, E, fp8=fp8), x, ids, E, fp8)
    check_launches(index_path, T * k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_dtypes(dtype, id_dtype, device):
    x = torch.randn(37, 200).to(dtype).to(device)  # any width without fp8
    ids = make_ids(37, 2, 9, "random", device, id_dtype)
    check_permuted(mk.ops.permute(x, ids, 9), x, ids, 9, False)


def test_permute_fp8_special_values(device):
    T, H = 8, 256
    x = torch.randn(T, H) * 3
    x[1] = 0.0  # an all-zero group: the guarded scale, zero codes
    x[2, 5] = 3e4  # beyond e4m3's range: absorbed by the scale
    x[3, :128] = 1e-30  # tiny groups: e4m3 subnormals and underflow
    x[4, 130:140] = torch.tensor([448.0, -448.0, 0.5, -0.5, 1.0, 2.0, 3.0, -1e-3, 1e-3, 7.0])
    x = x.float().to(device)
    ids = make_ids(T, 2, 4, "random", device)
    p = mk.ops.permute(x, ids, 4, fp8=True)
    assert check_permuted(p, x, ids, 4, True) == 0, "bit-exact here: no rounding ties in this data"
    assert torch.isfinite(p.scale).all() and (p.scale > 0).all()


def test_permute_index_many_pairs(index_path, device):
    """Many chunks (and on the blocks path many blocks) with skewed load: a hot expert spans all of them."""
    T, k, E, H = 161, 8, 256, 16
    ids = make_ids(T, k, E, "random", device)
    ids[::3, 0] = 17  # a hot expert whose rows span many chunks / blocks
    ids[::3, 1:] = torch.where(ids[::3, 1:] == 17, 18, ids[::3, 1:])
    x = torch.randn(T, H, device=device)
    check_permuted(mk.ops.permute(x, ids, E), x, ids, E, False)
    check_launches(index_path, T * k)


def test_permute_non_contiguous_ids(device):
    """topk_ids as a column slice (not contiguous): read through a copy, same result."""
    T, k, E, H = 37, 2, 24, 128
    ids = make_ids(T, 2 * k, E, "random", device)[:, ::2]
    assert not ids.is_contiguous()
    x = torch.randn(T, H, device=device)
    check_permuted(mk.ops.permute(x, ids, E), x, ids, E, False)


def test_permute_default_threshold():
    """The single-program path only covers small batches (its one SM walks the pairs serially: ~3 us per 128-pair
    chunk measured on an H200); larger ones take the multi-block path."""
    assert 128 <= permute_mod.SINGLE_PROGRAM_PAIRS <= 4096
    assert 64 <= permute_mod.INLINE_PAIRS <= permute_mod.SINGLE_PROGRAM_PAIRS  # decode batches: no index kernel
    assert permute_mod._pairs_per_block(permute_mod.MAX_PAIRS) % permute_mod.INDEX_CHUNK == 0


# name: T, k, E, H
UNPERMUTE_CASES = {"odd_T_k2": (37, 2, 16, 200), "k8": (37, 8, 64, 128), "T1_k1": (1, 1, 4, 128), "T0": (0, 2, 8, 128)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(UNPERMUTE_CASES))
def test_unpermute_matches_reference(case, dtype, device):
    T, k, E, H = UNPERMUTE_CASES[case]
    ids = make_ids(T, k, E, "random", device)
    p = mk.ops.permute(torch.randn(T, H, device=device), ids, E)
    y = torch.randn(T * k, H).to(dtype).to(device)
    w = torch.rand(T, k, device=device)
    poison_allocator((T, H), dtype, device)
    out = mk.ops.unpermute(y, p, w)
    assert out.dtype == dtype and out.shape == (T, H)
    if T:
        ref = R.unpermute(y.cpu(), R.permute(torch.zeros(T, H), ids.cpu(), E), w.cpu(), out_dtype=torch.float32)
        # fp32: summation order only; bf16: the one final rounding (2^-8 relative)
        assert_close_rel(out.cpu().float(), ref, 1e-6 if dtype == torch.float32 else 4e-3, "unpermute")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["odd_T_k2", "T1_k1", "T0"])
def test_unpermute_add_matches_reference(case, out_dtype, device):
    """The inference gather with the shared experts' output added: fp32 sum, one rounding to out_dtype."""
    from moe_kernels.ops.permute import unpermute_add

    T, k, E, H = UNPERMUTE_CASES[case]
    ids = make_ids(T, k, E, "random", device)
    p = mk.ops.permute(torch.randn(T, H, device=device), ids, E)
    y = torch.randn(T * k, H).to(torch.bfloat16).to(device)
    w = torch.rand(T, k, device=device)
    add = torch.randn(T, H).to(torch.bfloat16).to(device)
    poison_allocator((T, H), out_dtype, device)
    out = unpermute_add(y, p, w, add, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (T, H)
    if T:
        ref = R.unpermute(y.cpu(), R.permute(torch.zeros(T, H), ids.cpu(), E), w.cpu(), out_dtype=torch.float32)
        ref = ref + add.cpu().float()
        assert_close_rel(out.cpu().float(), ref, 1e-6 if out_dtype == torch.float32 else 4e-3, "unpermute_add")


def test_round_trip_restores_tokens(device):
    T, k, E, H = 50, 4, 9, 256
    x = torch.randn(T, H, device=device)
    p = mk.ops.permute(x, make_ids(T, k, E, "random", device), E)
    assert sorted(p.slot.flatten().tolist()) == list(range(T * k)), "every pair owns exactly one row"
    w = torch.rand(T, k, device=device)
    assert_close_rel(mk.ops.unpermute(p.x, p, w), x * w.sum(1, keepdim=True), 1e-6, "round trip")


def test_ops_are_custom_ops_that_compile(device):
    T, k, E, H = 9, 2, 8, 128
    x, ids, w = torch.randn(T, H, device=device), make_ids(T, k, E, "random", device), torch.rand(T, k, device=device)
    torch.library.opcheck(torch.ops.moe_kernels.permute.default, (x, ids, E, True),
                          test_utils=("test_schema", "test_faketensor"))
    p = mk.ops.permute(x, ids, E)
    torch.library.opcheck(torch.ops.moe_kernels.unpermute.default, (p.x, p.slot, w),
                          test_utils=("test_schema", "test_faketensor"))

    def moe_identity(x, ids, w):
        q = mk.ops.permute(x, ids, E)
        return mk.ops.unpermute(q.x, q, w)

    got = torch.compile(moe_identity, backend="aot_eager", fullgraph=True)(x, ids, w)
    assert_close_rel(got, moe_identity(x, ids, w), 1e-6, "compiled permute + unpermute")


def test_permute_rejects_bad_arguments():
    x = torch.randn(5, 256)
    ids = make_ids(5, 2, 8, "random", "cpu")
    with pytest.raises(TypeError, match="topk_ids"):
        mk.ops.permute(x, ids.float(), 8)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.ops.permute(x, ids[:4], 8)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.ops.permute(x, ids[:, 0], 8)
    with pytest.raises(ValueError, match="x"):
        mk.ops.permute(x[0], ids, 8)
    with pytest.raises(ValueError, match="128"):
        mk.ops.permute(torch.randn(5, 200), ids, 8, fp8=True)
    for bad in (8, -1):
        wrong = ids.clone()
        wrong[3, 1] = bad
        with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 8\)"):
            mk.ops.permute(x, wrong, 8)


def test_unpermute_rejects_bad_arguments():
    x = torch.randn(5, 128)
    p = mk.ops.permute(x, make_ids(5, 2, 8, "random", "cpu"), 8)
    w = torch.rand(5, 2)
    with pytest.raises(ValueError, match="y"):
        mk.ops.unpermute(torch.randn(9, 128), p, w)
    with pytest.raises(ValueError, match="topk_weights"):
        mk.ops.unpermute(p.x, p, torch.rand(5, 3))
    with pytest.raises(TypeError, match="permuted"):
        mk.ops.unpermute(p.x, tuple(p), w)


# The tuned shape, on the GPU only.
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("T,k", [(4096, 8), (1000, 2)])
def test_permute_large(T, k, fp8):
    E, H = 256, 7168
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = make_ids(T, k, E, "random", "cuda")
    poison_allocator((T * k, H), torch.bfloat16, "cuda")
    p = mk.ops.permute(x, ids, E, fp8=fp8)
    check_permuted(p, x, ids, E, fp8)
    w = torch.rand(T, k, device="cuda")
    y = torch.randn(T * k, H, device="cuda", dtype=torch.bfloat16)
    ref = R.unpermute(y, p, w, out_dtype=torch.float32)
    assert_close_rel(mk.ops.unpermute(y, p, w).float(), ref, 4e-3, "unpermute")
