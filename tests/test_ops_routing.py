"""mk.ops.route (fused Triton routing) against moe_kernels.reference.routing.

ids must equal the reference's, except where two selection scores tie within rounding (the kernel's fp32 GEMM
sums in another order than torch's): at every differing position the two experts' reference selection scores
must agree to TIE_RTOL, and the weights must then equal the reference rule applied to the kernel's ids.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402
import triton  # noqa: E402
import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from _helpers import assert_close_rel  # noqa: E402

TIE_RTOL = 1e-6  # at H <= 256; the large GPU shapes scale it with sqrt(H / 256) (fp32 accumulation error)


def selection_scores(logits, scoring, n_group, topk_group, bias, expert_scale):
    """The reference's score and selection score (choice) with its group mask, spelled out for the tie rule."""
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores * (expert_scale.float() if expert_scale is not None else 1.0)
    choice = choice + (bias.float() if bias is not None else 0.0)
    return scores, choice


def reference_weights_for(ids, scores, norm, scaling):
    w = scores.gather(1, ids.long())
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling


def regroup(ids, choice, n_group, topk_group, top_k, tie_rtol):
    """The reference's selection when the kept groups are those our ids use (filled up with the best others).

    Allowed only when every group we used ranks within tie_rtol of the reference's last kept group."""
    rows, E = choice.shape
    per = E // n_group
    gscore = choice.view(rows, n_group, per).topk(2, dim=-1).values.sum(-1)
    last_kept = gscore.sort(-1, descending=True).values[:, topk_group - 1 : topk_group]
    used = torch.zeros(rows, n_group, dtype=torch.bool).scatter_(1, ids.long() // per, True)
    slack = tie_rtol * gscore.abs().amax(1, keepdim=True)
    assert not (used & (gscore < last_kept - slack)).any(), "ids from a group the reference does not keep (no tie)"
    keep = torch.where(used, float("inf"), gscore).sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
    mask = torch.zeros(rows, n_group, dtype=torch.bool).scatter_(1, keep, True).repeat_interleave(per, 1)
    return choice.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True).indices[:, :top_k]


def check_route(out, x, w, top_k, scoring="softmax", n_group=1, topk_group=1, norm=True, scaling=1.0, bias=None,
                expert_scale=None, tie_rtol=TIE_RTOL):
    weights, ids, counts = out
    T, E = x.shape[0], w.shape[0]
    assert weights.dtype == torch.float32 and weights.shape == (T, top_k)
    assert ids.dtype == torch.int32 and ids.shape == (T, top_k)
    assert counts.dtype == torch.int32 and counts.shape == (E,)
    ref_w, ref_ids, ref_counts = R.route(x, w, top_k, scoring, n_group, topk_group, norm, scaling, bias, expert_scale)
    ids, weights = ids.cpu(), weights.cpu()
    ref_w, ref_ids, ref_counts = ref_w.cpu(), ref_ids.cpu(), ref_counts.cpu()
    assert ((ids >= 0) & (ids < E)).all(), "ids out of range"
    assert all(len(set(r)) == top_k for r in ids.tolist()), "an expert chosen twice for one token"
    assert torch.equal(counts.cpu(), torch.bincount(ids.reshape(-1).long(), minlength=E).int()), "counts != ids"
    diff = ids != ref_ids
    if diff.any():
        logits = R.router_logits(x, w).cpu()
        scores, choice = selection_scores(logits, scoring, n_group, topk_group,
                                          None if bias is None else bias.cpu(),
                                          None if expert_scale is None else expert_scale.cpu())
        rows = diff.any(1).nonzero()[:, 0]
        expected = ref_ids[rows]
        if n_group > 1:  # a near-tie between group scores may keep another group: select again inside ours
            expected = regroup(ids[rows], choice[rows], n_group, topk_group, top_k, tie_rtol)
        ours = choice[rows].gather(1, ids[rows].long())
        theirs = choice[rows].gather(1, expected.long())
        scale = choice[rows].abs().amax(1, keepdim=True)
        gap = ((ours - theirs).abs() / scale)[ids[rows] != expected]
        assert gap.numel() == 0 or gap.max() <= tie_rtol, (
            f"{int(diff.sum())} ids differ from the reference and not by a tie: selection scores differ by "
            f"{gap.max().item():.2e} (relative) > {tie_rtol:.0e}"
        )
        ref_w = reference_weights_for(ids, scores, norm, scaling)  # the reference rule at our ids
    else:
        assert torch.equal(counts.cpu(), ref_counts)
    if T:
        assert_close_rel(weights, ref_w, 1e-5, "topk_weights")
    return int(diff.sum())


def make_inputs(T, E, H, dtype, device, bias=False, expert_scale=False, gen=None):
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    w = (torch.randn(E, H, generator=gen) * H**-0.5).to(dtype).to(device)
    b = (torch.randn(E, generator=gen) * 0.05).to(device) if bias else None
    s = (1.0 + 0.3 * (torch.rand(E, generator=gen) - 0.5)).to(device) if expert_scale else None
    return x, w, b, s


# name: T, E, H, k, scoring, n_group, topk_group, bias, expert_scale, scaling, norm, dtype
CASES = {
    "odd_T_softmax_k2": (37, 16, 128, 2, "softmax", 1, 1, False, False, 1.0, True, torch.bfloat16),
    "T1_k1": (1, 64, 128, 1, "softmax", 1, 1, False, False, 1.0, True, torch.bfloat16),
    "k8_no_norm_escale": (64, 64, 256, 8, "softmax", 1, 1, False, True, 1.0, False, torch.bfloat16),
    "E256_softmax_k8": (37, 256, 128, 8, "softmax", 1, 1, False, False, 1.0, True, torch.bfloat16),
    "E256_deepseek": (37, 256, 128, 8, "sigmoid", 8, 4, True, False, 2.5, True, torch.bfloat16),
    "E64_sigmoid_bias_escale": (37, 64, 256, 2, "sigmoid", 1, 1, True, True, 1.0, True, torch.bfloat16),
    "E48_groups_softmax": (37, 48, 128, 4, "softmax", 4, 2, True, True, 1.0, True, torch.bfloat16),
    "E7_fp32": (37, 7, 128, 3, "sigmoid", 1, 1, False, False, 1.0, True, torch.float32),
    "E16_fp16_k8_groups": (20, 16, 128, 8, "sigmoid", 8, 4, True, False, 1.5, True, torch.float16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_route_matches_reference(case, device):
    T, E, H, k, scoring, ng, tg, b, s, scaling, norm, dtype = CASES[case]
    x, w, bias, escale = make_inputs(T, E, H, dtype, device, b, s)
    out = mk.ops.route(x, w, k, scoring, ng, tg, norm, scaling, bias, escale)
    check_route(out, x, w, k, scoring, ng, tg, norm, scaling, bias, escale)


@pytest.fixture
def recorded_counters(monkeypatch):
    """Every arrival-counter buffer the router makes, in order (each one fresh zeros, as the real one)."""
    from moe_kernels.ops import routing

    made = []

    def counters(dev, n):
        made.append(torch.zeros(n, dtype=torch.int32, device=dev))
        return made[-1]

    monkeypatch.setattr(routing, "arrival_counters", counters)
    return made


SPLIT_CASES = {  # H = 160 in 32-wide K steps: 5 steps, so 3 slices are 2, 2 and 1 steps (uneven, not a divisor)
    "softmax_k2": (37, 16, 160, 2, "softmax", 1, 1, False, False, 1.0, True, torch.bfloat16),
    "deepseek_E256": (37, 256, 160, 8, "sigmoid", 8, 4, True, False, 2.5, True, torch.bfloat16),
    "fp32_uneven_H": (21, 7, 136, 3, "sigmoid", 1, 1, False, False, 1.0, True, torch.float32),
}


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_route_split_k(case, split, device, recorded_counters):
    """SPLIT_K programs per token tile, the last to arrive reducing the partial logits: the same routing as the
    reference, and each launch leaves its arrival counters (after the E counts in the one zero-filled buffer) at
    zero."""
    from moe_kernels.ops import routing

    made = recorded_counters
    T, E, H, k, scoring, ng, tg, b, s, scaling, norm, dtype = SPLIT_CASES[case]
    for _ in range(2):
        x, w, bias, escale = make_inputs(T, E, H, dtype, device, b, s)
        cfg = dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=split)
        out = routing._route_triton(x, w, k, scoring, ng, tg, norm, scaling, bias, escale, config=cfg)
        check_route(out, x, w, k, scoring, ng, tg, norm, scaling, bias, escale)
        assert made[-1].numel() == E + -(-T // 16), "the counts and one counter per token tile"
        assert int(made[-1][E:].abs().sum()) == 0, "the last-arriving programs must reset their counters"
        assert torch.equal(made[-1][:E], out[2]), "the counts live in the same buffer"


ESPLIT_CASES = {  # T, E, H, k, scoring, n_group, topk_group, bias, expert_scale, scaling, norm, dtype
    "deepseek_T1": (1, 256, 160, 8, "sigmoid", 8, 4, True, False, 2.5, True, torch.bfloat16),
    "deepseek_T3_fp32": (3, 256, 160, 8, "sigmoid", 8, 4, True, False, 2.5, True, torch.float32),
    "E48_T37_dot": (37, 48, 136, 4, "softmax", 4, 2, True, True, 1.0, True, torch.bfloat16),  # tl.dot tiles
}


@pytest.mark.parametrize("parts", [(1, 4), (3, 2)])
@pytest.mark.parametrize("case", list(ESPLIT_CASES))
def test_route_expert_split(case, parts, device, recorded_counters):
    """E_SPLIT programs per slice of H, each multiplying one block of experts (BLOCK_E / E_SPLIT rows of the gate):
    the reference's routing, and every counter back at zero after the launch."""
    from moe_kernels.ops import routing

    made = recorded_counters
    T, E, H, k, scoring, ng, tg, b, s, scaling, norm, dtype = ESPLIT_CASES[case]
    split, e_split = parts
    x, w, bias, escale = make_inputs(T, E, H, dtype, device, b, s)
    m = triton.next_power_of_2(T) if T < 16 else 16
    cfg = dict(BLOCK_M=m, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=split, E_SPLIT=e_split)
    out = routing._route_triton(x, w, k, scoring, ng, tg, norm, scaling, bias, escale, config=cfg)
    check_route(out, x, w, k, scoring, ng, tg, norm, scaling, bias, escale)
    assert int(made[-1][E:].abs().sum()) == 0, "the last-arriving programs must reset their counters"


def test_route_rejects_bad_expert_split(device):
    from moe_kernels.ops import routing

    x, w, bias, escale = make_inputs(1, 16, 64, torch.bfloat16, device, False, False)
    with pytest.raises(ValueError, match="E_SPLIT"):
        routing._route_triton(x, w, 2, "softmax", 1, 1, True, 1.0, None, None,
                              config=dict(BLOCK_M=1, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=2, E_SPLIT=2))


def test_gemv_config_spreads_the_gate_over_programs():
    """At T = 1 the default GEMV config for DeepSeek's router (E 256, H 7168) has every program multiply <= 32
    experts over one step of H, with no empty slice; Mixtral's (E 8) one expert block."""
    from moe_kernels.ops import routing

    for E, fp32 in ((256, False), (256, True), (8, False)):
        cfg = routing._config(1, E, 7168, fp32, heavy=True)
        bk, split = cfg["BLOCK_K"], cfg["SPLIT_K"]
        assert routing._next_pow2(E, 16) // cfg["E_SPLIT"] <= routing.GEMV_EXPERTS
        assert (split - 1) * triton.cdiv(triton.cdiv(7168, bk), split) * bk < 7168, "no empty slice of H"
        assert triton.cdiv(triton.cdiv(7168, bk), split) == 1, "one step a slice"
    for T in (2, 3, 4):
        cfg = routing._config(T, 256, 7168, False, heavy=True)
        assert cfg["BLOCK_M"] * (256 // cfg["E_SPLIT"]) * cfg["BLOCK_K"] <= 16384


def test_untuned_configs_fill_a_wave_up_to_1024_tokens():
    """Tables without a sweep (E other than 256) take the decode sizes' 16-row tiles split over H at T = 65..1024,
    so that tiles x slices come near ROUTE_PROGRAMS (Mixtral's E 8 at T = 128 took 8 programs); the swept E = 256
    rows and larger T keep their configs."""
    from moe_kernels.ops import routing

    for E in (8, 60, 128):
        for T in (65, 128, 256, 1000, 1024):
            cfg = routing._config(T, E, 7168, False, heavy=E > 8)
            programs = triton.cdiv(T, cfg["BLOCK_M"]) * cfg["SPLIT_K"]
            assert routing.ROUTE_PROGRAMS // 2 < programs <= 2 * routing.ROUTE_PROGRAMS, (E, T, cfg)
            steps = triton.cdiv(7168, cfg["BLOCK_K"])
            assert (cfg["SPLIT_K"] - 1) * triton.cdiv(steps, cfg["SPLIT_K"]) < steps, "no empty slice of H"
        assert "SPLIT_K" not in routing._config(2048, E, 7168, False, heavy=True)
    for T in (128, 1024):
        assert "SPLIT_K" not in routing._config(T, 256, 7168, False, heavy=True), "the swept E = 256 configs stay"
    short = routing._config(128, 8, 256, False, heavy=False)  # a short H: slices of 2 whole steps at least
    assert triton.cdiv(triton.cdiv(256, short["BLOCK_K"]), short["SPLIT_K"]) >= 2, short


@pytest.mark.parametrize("E,k,fp32", [(8, 2, False), (20, 4, True)])
def test_route_default_config_at_130_tokens(E, k, fp32, device, recorded_counters):
    """The default config at T = 130 (9 token tiles, the last one of 2 rows), H 2048: split over H by the untuned
    rule (the real config, not one made for the test), the routing the reference's, the counters left at zero."""
    from moe_kernels.ops import routing

    T, H = 130, 2048
    x, w, _, _ = make_inputs(T, E, H, torch.float32 if fp32 else torch.bfloat16, device)
    cfg = routing._config(T, E, H, fp32, heavy=k > 2)
    assert cfg["SPLIT_K"] > 1, cfg
    out = routing._route_triton(x, w, k, "softmax", 1, 1, True, 1.0, None, None)
    check_route(out, x, w, k, "softmax", 1, 1, True)
    assert recorded_counters[-1].numel() == E + triton.cdiv(T, cfg["BLOCK_M"])
    assert int(recorded_counters[-1][E:].abs().sum()) == 0


GEMV_CASES = {  # decode sizes take the GEMV path (BLOCK_M = T rounded up to a power of two, below tl.dot's 16)
    "deepseek_T1_fp32_gate": (1, 256, 384, 8, "sigmoid", 8, 4, True, False, 2.5, True, torch.float32),
    "deepseek_T1_bf16_gate": (1, 256, 384, 8, "sigmoid", 8, 4, True, False, 2.5, True, torch.bfloat16),
    "deepseek_T3_mixed": (3, 256, 384, 8, "sigmoid", 8, 4, True, False, 2.5, True, "mixed"),
    "mixtral_T2": (2, 8, 200, 2, "softmax", 1, 1, False, False, 1.0, True, torch.bfloat16),  # H no multiple of BLOCK_K
    "E7_T4_escale": (4, 7, 256, 3, "sigmoid", 1, 1, False, True, 1.0, True, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(GEMV_CASES))
def test_route_gemv_at_decode_sizes(case, device):
    """T <= GEMV_MAX_T: the config is the GEMV one (BLOCK_M < 16, split over H), and the routing the reference's."""
    from moe_kernels.ops import routing

    T, E, H, k, scoring, ng, tg, b, s, scaling, norm, dtype = GEMV_CASES[case]
    x, w, bias, escale = make_inputs(T, E, H, torch.bfloat16 if dtype == "mixed" else dtype, device, b, s)
    if dtype == "mixed":  # the patched DeepSeek layer's case: bf16 tokens, fp32 gate
        w = w.float() + 1e-3 * torch.randn_like(w.float())
    cfg = routing._config(T, E, H, x.dtype != w.dtype or x.dtype == torch.float32, heavy=k > 2 or ng > 1)
    assert cfg["BLOCK_M"] == triton.next_power_of_2(T) < 16 and cfg["SPLIT_K"] >= 1
    check_route(mk.ops.route(x, w, k, scoring, ng, tg, norm, scaling, bias, escale), x, w, k, scoring, ng, tg, norm,
                scaling, bias, escale)


def test_route_mixed_dtypes_use_fp32_products(device):
    x, w, _, _ = make_inputs(37, 16, 128, torch.bfloat16, device)
    w = w.float() + 1e-3 * torch.randn_like(w.float())  # fp32 gate bits that bf16 cannot hold
    check_route(mk.ops.route(x, w, 2), x, w, 2)


def test_route_exact_ties_go_to_lower_expert(device):
    x, w, _, _ = make_inputs(33, 16, 128, torch.bfloat16, device)
    w[9] = w[3]
    w[12] = w[3]  # experts 3, 9, 12 score identically for every token
    out = mk.ops.route(x, w, 4)
    assert check_route(out, x, w, 4) == 0
    ids = out[1].cpu().tolist()
    for row in ids:
        present = [e for e in (3, 9, 12) if e in row]
        assert present == [e for e in (3, 9, 12)][: len(present)], f"tie not broken toward the lower index: {row}"
        assert [row.index(e) for e in present] == sorted(row.index(e) for e in present)


def test_route_every_token_to_one_expert(device):
    T, E, H = 37, 16, 128
    x = torch.rand(T, H).bfloat16().to(device)  # positive tokens
    w = torch.zeros(E, H).bfloat16().to(device)
    w[5] = 1.0  # expert 5 wins everywhere; the rest tie at 0 -> the lowest indices follow
    out = mk.ops.route(x, w, 2)
    check_route(out, x, w, 2)
    counts = out[2].cpu()
    assert counts[5] == T and counts[0] == T and counts.sum() == 2 * T
    assert (counts[[e for e in range(E) if e not in (0, 5)]] == 0).all()  # empty experts


def test_route_zero_tokens(device):
    x = torch.empty(0, 128, device=device, dtype=torch.bfloat16)
    w = torch.randn(16, 128, device=device, dtype=torch.bfloat16)
    weights, ids, counts = mk.ops.route(x, w, 2)
    assert weights.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == torch.int32
    assert counts.shape == (16,) and counts.dtype == torch.int32 and (counts == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_route_non_finite_logits_raise(bad, device):
    x, w, _, _ = make_inputs(37, 16, 128, torch.bfloat16, device)
    x[20, 3] = bad
    with pytest.raises(ValueError, match="router logits"):
        mk.ops.route(x, w, 2)


def test_route_non_finite_rows_get_nan_weights_without_checks(device, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "0")
    x, w, _, _ = make_inputs(37, 16, 128, torch.bfloat16, device)
    x[20, 3] = float("nan")
    weights, ids, counts = mk.ops.route(x, w, 2)
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the reference path has no kernel to poison the row")
    finite = torch.isfinite(weights.cpu()).all(1)
    assert not finite[20] and finite.sum() == 36
    assert ((ids >= 0) & (ids < 16)).all() and counts.sum() == 74


def _bad_route_calls(device):
    x, w, _, _ = make_inputs(5, 16, 128, torch.bfloat16, device)
    return [
        (dict(x=x[0]), ValueError, "x"),
        (dict(x=x.int()), TypeError, "x"),
        (dict(router_weight=w[:, :64]), ValueError, "router_weight"),
        (dict(router_weight=torch.randn(300, 128, device=device)), ValueError, "256"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=9), ValueError, "top_k"),
        (dict(router_weight=w[:4], top_k=5), ValueError, "top_k"),
        (dict(scoring="relu"), ValueError, "scoring"),
        (dict(n_group=3), ValueError, "n_group"),
        (dict(n_group=4, topk_group=5), ValueError, "topk_group"),
        (dict(bias=torch.zeros(15, device=device)), ValueError, "bias"),
        (dict(expert_scale=torch.ones(16, 1, device=device)), ValueError, "expert_scale"),
    ]


@pytest.mark.parametrize("i", range(12))
def test_route_rejects_bad_arguments(i):
    x, w, _, _ = make_inputs(5, 16, 128, torch.bfloat16, "cpu")
    kwargs, exc, words = _bad_route_calls("cpu")[i]
    args = dict(x=x, router_weight=w, top_k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        mk.ops.route(**args)


@pytest.mark.gpu
def test_route_rejects_mixed_devices():
    x, w, _, _ = make_inputs(5, 16, 128, torch.bfloat16, "cuda")
    with pytest.raises(TypeError, match="router_weight"):
        mk.ops.route(x, w.cpu(), 2)
    with pytest.raises(TypeError, match="bias"):
        mk.ops.route(x, w, 2, bias=torch.zeros(16))


def test_route_is_a_custom_op_that_compiles(device):
    x, w, bias, _ = make_inputs(8, 16, 128, torch.bfloat16, device, bias=True)
    torch.library.opcheck(torch.ops.moe_kernels.route.default, (x, w, 2, "sigmoid", 4, 2, True, 2.5, bias, None),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda a, b: mk.ops.route(a, b, 2, "sigmoid", 4, 2, True, 2.5, bias), backend="aot_eager",
                       fullgraph=True)
    got, want = fn(x, w), mk.ops.route(x, w, 2, "sigmoid", 4, 2, True, 2.5, bias)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


# The tuned shape, on the GPU only (the interpreter would take minutes).
GPU_CASES = {
    "deepseek_T4096": (4096, 256, 7168, 8, "sigmoid", 8, 4, True, False, 2.5, True, torch.bfloat16),
    "softmax_T1000_k2": (1000, 256, 7168, 2, "softmax", 1, 1, False, True, 1.0, True, torch.bfloat16),
    "mixtral_T777": (777, 8, 4096, 2, "softmax", 1, 1, False, False, 1.0, True, torch.bfloat16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_route_matches_reference_large(case):
    T, E, H, k, scoring, ng, tg, b, s, scaling, norm, dtype = GPU_CASES[case]
    x, w, bias, escale = make_inputs(T, E, H, dtype, "cuda", b, s)
    out = mk.ops.route(x, w, k, scoring, ng, tg, norm, scaling, bias, escale)
    ties = check_route(out, x, w, k, scoring, ng, tg, norm, scaling, bias, escale,
                       tie_rtol=TIE_RTOL * (H / 256) ** 0.5)
    print(f"{case}: {ties} of {T * k} ids differ from the reference by a rounding tie")


def test_tie_rule_accepts_rounding_ties_only():
    """The comparison rule itself: swapping two near-tied experts passes, swapping distinct ones fails."""
    x, w, _, _ = make_inputs(4, 16, 128, torch.float32, "cpu")
    w[7] = w[2] * (1 + 1e-9)  # experts 2 and 7: the same scores up to rounding
    ref_w, ref_ids, _ = R.route(x, w, 16)

    def swapped(a, b):
        ids = ref_ids.clone()
        ia, ib = ids == a, ids == b
        ids[ia], ids[ib] = b, a
        counts = torch.bincount(ids.reshape(-1).long(), minlength=16).int()
        return reference_weights_for(ids, torch.softmax(R.router_logits(x, w), -1), True, 1.0), ids, counts

    assert check_route(swapped(2, 7), x, w, 16) > 0
    far = [int(e) for e in ref_ids[0, [0, -1]]]  # the best and the worst expert of token 0
    with pytest.raises(AssertionError, match="not by a tie"):
        check_route(swapped(*far), x, w, 16)


def test_tie_rule_accepts_a_group_tie(device):
    """Two groups whose scores tie: keeping either is correct, and the experts must then be the best inside it.
    The kernel itself breaks the exact tie like the reference: toward the lower group."""
    T, E, H = 32, 16, 128
    x = torch.randn(T, H)
    w = torch.randn(E, H) * H**-0.5
    w[8:12] = w[4:8]  # group 2 (experts 8..11) duplicates group 1 (experts 4..7): equal group scores
    args = (2, "sigmoid", 4, 1, True, 1.0)
    ref_w, ref_ids, _ = R.route(x, w, *args)
    in_tied = ((ref_ids // 4) == 1).all(1)  # rows where the reference kept group 1 of the tied pair
    assert in_tied.any()
    ids = ref_ids.clone()
    ids[in_tied] += 4  # the same experts of the twin group 2
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).int()
    weights = reference_weights_for(ids, torch.sigmoid(R.router_logits(x, w)), True, 1.0)
    assert check_route((weights, ids, counts), x, w, *args) == 2 * int(in_tied.sum())
    xd, wd = x.to(device), w.to(device)
    assert check_route(mk.ops.route(xd, wd, *args), xd, wd, *args) == 0
