"""Property-based tests (hypothesis) of route -> permute -> unpermute, through the Triton interpreter on CPU.

For every drawn shape (T in 0..40, k in 1..4, E in 1..16, H in {128, 256}) and id pattern:
  * route: ids in [0, E), distinct per token, a valid top-k of the reference scores (ties to the lower expert),
    weights equal to the reference's for the chosen experts, counts = histogram of ids summing to T*k;
  * permute: offsets start at 0, never decrease, end at T*k and count each expert's pairs; every (token, k) pair
    gets exactly one row and that row lies in its expert's segment; inside an expert rows keep ascending token
    order (stable); the rows are x's rows, bit for bit; all equal to moe_kernels.reference.permute;
  * unpermute inverts permute exactly: one-hot weights give back x bit for bit (bf16 and fp32 moves); general
    weights equal the reference's fp32 weighted sum.
Bounded so that the file takes well under a minute on two cores (max_examples below, no deadline).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from test_ops_permute import assert_fp8_close  # noqa: E402

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: CUDA, else the interpreter on CPU tensors
DTYPES = [torch.bfloat16, torch.float32]


@st.composite
def shapes(draw, distinct=True):
    E = draw(st.integers(1, 16))
    k = draw(st.integers(1, min(4, E) if distinct else 4))
    T = draw(st.integers(0, 40))
    H = draw(st.sampled_from([128, 256]))
    return T, k, E, H


def make_ids(T, k, E, mode, gen):
    """topk_ids [T, k] int32: distinct experts per token (as top-k gives), repeats, or degenerate loads."""
    if T == 0:
        return torch.empty(0, k, dtype=torch.int32)
    if mode == "distinct":
        ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k]
    elif mode == "repeats":  # any ids, an expert may repeat within a token
        ids = torch.randint(0, E, (T, k), generator=gen)
    elif mode == "one_expert":  # every pair to the last expert: one full segment, all others empty
        ids = torch.full((T, k), E - 1)
    else:  # "skewed": most pairs to expert 0, some experts never used
        ids = torch.where(torch.rand(T, k, generator=gen) < 0.7, 0, torch.randint(0, E, (T, k), generator=gen))
    return ids.to(torch.int32)


def to_cpu(p):
    return type(p)(*(None if t is None else t.cpu() for t in p))


def check_permutation(p, x, ids, E):
    """The invariants of a permutation of the (token, k) pairs of ids, with x's rows moved unchanged."""
    T, k = ids.shape
    n = T * k
    offsets = p.offsets.long()
    assert offsets.shape == (E + 1,) and int(offsets[0]) == 0 and int(offsets[-1]) == n, offsets
    assert bool((offsets[1:] >= offsets[:-1]).all()), f"offsets decrease: {offsets.tolist()}"
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    assert torch.equal(offsets[1:] - offsets[:-1], counts), "offsets do not count each expert's pairs"
    slot = p.slot.long().reshape(-1)
    # every (token, k) pair has exactly one row, and every row belongs to exactly one pair
    assert torch.equal(torch.sort(slot).values, torch.arange(n)), "slot is not a permutation of the rows"
    pair_token = torch.arange(n) // max(k, 1)
    assert torch.equal(p.token_index.long()[slot], pair_token), "token_index[slot[t, j]] != t"
    # the row of pair (t, j) lies in the segment of expert ids[t, j]
    e = ids.reshape(-1).long()
    assert bool(((offsets[e] <= slot) & (slot < offsets[e + 1])).all()), "a pair landed outside its expert"
    # stable: inside one expert, rows are in ascending pair order (token, then j)
    row_pair = torch.empty(n, dtype=torch.long)
    row_pair[slot] = torch.arange(n)
    for ex in range(E):
        seg = row_pair[offsets[ex] : offsets[ex + 1]]
        assert bool((seg[1:] > seg[:-1]).all()), f"expert {ex}: rows not in ascending token order"
    if p.scale is None:
        assert torch.equal(p.x, x[p.token_index.long()]), "permuted rows are not x's rows, bit for bit"


@settings(max_examples=80, **SETTINGS)
@given(shape=shapes(), scoring=st.sampled_from(["softmax", "sigmoid"]), dtype=st.sampled_from(DTYPES),
       mode=st.sampled_from(["random", "ties"]), seed=st.integers(0, 2**31 - 1))
def test_route_properties(shape, scoring, dtype, mode, seed):
    T, k, E, H = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w = (torch.randn(E, H, generator=gen) * H**-0.5).to(dtype)
    if mode == "ties":  # every logit equal: the k lowest experts, in index order
        x = torch.zeros_like(x)
    weights, ids, counts = (t.cpu() for t in mk.ops.route(x.to(DEV), w.to(DEV), k, scoring=scoring))
    assert weights.shape == (T, k) and weights.dtype == torch.float32
    assert ids.shape == (T, k) and ids.dtype == torch.int32 and counts.shape == (E,) and counts.dtype == torch.int32
    assert int(counts.sum()) == T * k
    assert torch.equal(counts, torch.bincount(ids.reshape(-1).long(), minlength=E).int())
    if T == 0:
        return
    assert int(ids.min()) >= 0 and int(ids.max()) < E
    assert bool((ids.sort(1).values[:, 1:] != ids.sort(1).values[:, :-1]).all()), "an expert chosen twice"
    assert torch.isfinite(weights).all()
    if mode == "ties":
        assert torch.equal(ids, torch.arange(k, dtype=torch.int32).expand(T, k)), "ties go to the lower expert"
    # a valid top-k of the reference scores: no unchosen expert scores above a chosen one (beyond rounding of
    # the fp32 logits, whose summation order differs between the kernel and torch)
    logits = R.router_logits(x, w)
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids.long(), True)
    worst_in = scores.masked_fill(~chosen, float("inf")).min(1).values
    best_out = scores.masked_fill(chosen, float("-inf")).max(1).values
    assert bool((worst_in >= best_out - 1e-5).all()), "not a top-k of the scores"
    # descending selection score
    picked = scores.gather(1, ids.long())
    assert bool((picked[:, 1:] <= picked[:, :-1] + 1e-5).all()), "top-k not in descending order"
    want = picked / (picked.sum(1, keepdim=True) + 1e-20)
    torch.testing.assert_close(weights, want, rtol=1e-4, atol=1e-6)
    # and the reference itself, wherever its choice is not a near-tie
    rw, rids, _ = R.route(x, w, k, scoring=scoring)
    clear = torch.ones(T, dtype=torch.bool)
    if E > k:  # no two of the k + 1 best scores within 1e-4 of each other
        clear = torch.sort(scores, 1, descending=True).values[:, :k + 1].diff(dim=1).abs().min(1).values > 1e-4
    assert torch.equal(ids[clear], rids[clear]), "ids differ from the reference on a clear choice"
    torch.testing.assert_close(weights[clear], rw[clear], rtol=1e-4, atol=1e-6)


@settings(max_examples=80, **SETTINGS)
@given(shape=shapes(distinct=False), mode=st.sampled_from(["distinct", "repeats", "one_expert", "skewed"]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_permute_unpermute_properties(shape, mode, dtype, seed):
    T, k, E, H = shape
    if mode == "distinct" and k > E:
        mode = "repeats"
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids = make_ids(T, k, E, mode, gen)
    p_dev = mk.ops.permute(x.to(DEV), ids.to(DEV), E)
    p = to_cpu(p_dev)
    check_permutation(p, x, ids, E)
    r = R.permute(x, ids, E)
    assert torch.equal(p.offsets, r.offsets) and torch.equal(p.token_index, r.token_index)
    assert torch.equal(p.slot, r.slot) and torch.equal(p.x, r.x), "differs from moe_kernels.reference.permute"

    # one-hot weights invert the permutation exactly: x comes back bit for bit
    pick = torch.randint(0, k, (T,), generator=gen)
    one_hot = torch.nn.functional.one_hot(pick, k).float() if T else torch.zeros(0, k)
    back = mk.ops.unpermute(p_dev.x, p_dev, one_hot.to(DEV)).cpu()
    assert back.dtype == dtype and torch.equal(back, x), "unpermute(permute(x), one-hot) != x"

    # general weights: the reference's fp32 weighted sum, rounded once to y's dtype (summation order and the
    # interpreter's fp32 -> bf16 cast, which truncates, allow one bf16 ulp)
    y = torch.randn(T * k, H, generator=gen).to(dtype)
    wts = torch.rand(T, k, generator=gen)
    out = mk.ops.unpermute(y.to(DEV), p_dev, wts.to(DEV)).cpu()
    want = R.unpermute(y, r, wts)
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out, want, rtol=rtol, atol=1e-6)


@settings(max_examples=30, **SETTINGS)
@given(shape=shapes(), seed=st.integers(0, 2**31 - 1))
def test_route_permute_unpermute_pipeline(shape, seed):
    """route -> permute(fp8) -> unpermute: the FP8 rows dequantise to x's rows (1x128 groups, <= 1/16 relative per
    element), every pair is computed once, and unpermute of the identity expert (bf16 rows) with the routing
    weights gives back sum_j w_j * x = x (the weights sum to 1)."""
    T, k, E, H = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    w = (torch.randn(E, H, generator=gen) * H**-0.5).to(torch.bfloat16)
    weights, ids, counts = mk.ops.route(x.to(DEV), w.to(DEV), k)
    p8 = to_cpu(mk.ops.permute(x.to(DEV), ids, E, fp8=True))
    ids, counts = ids.cpu(), counts.cpu()
    check_permutation(p8, x, ids, E)
    assert torch.equal(p8.offsets[1:] - p8.offsets[:-1], counts), "permute's offsets disagree with route's counts"
    r8 = R.permute(x, ids, E, fp8=True)
    if DEV == "cpu":  # the interpreter: the reference's e4m3 values (to 1 ulp in <= 0.1%) and scales (1 fp32 ulp)
        torch.testing.assert_close(p8.scale, r8.scale, rtol=2e-7, atol=0)
        assert_fp8_close(p8.x, r8.x)
    else:  # an H200 run put some scales 1 fp32 ulp from the CPU reference's, which flips e4m3 values at the
        # exact ties that bf16 inputs hit often: compare the dequantised rows (the bound below stays exact)
        torch.testing.assert_close(p8.scale, r8.scale, rtol=1e-6, atol=0)
        deq_ref = R.dequantize_fp8(r8.x, r8.scale)
        err = float((R.dequantize_fp8(p8.x, p8.scale) - deq_ref).norm() / deq_ref.norm().clamp(min=1e-30))
        assert err < 1e-2, f"fp8 rows {err:.2e} from the reference"
    rows = x.float()[p8.token_index.long()]
    deq = R.dequantize_fp8(p8.x, p8.scale)
    assert bool(((deq - rows).abs() <= rows.abs() / 16 + p8.scale.repeat_interleave(128, 1) / 512).all())
    p = mk.ops.permute(x.to(DEV), ids.to(DEV), E)
    out = mk.ops.unpermute(p.x, p, weights).cpu()
    # weights sum to 1 (fp32), each product rounded once to bf16 at the end
    torch.testing.assert_close(out.float(), x.float(), rtol=8e-3, atol=1e-5)
