"""Checks of expert parallelism that run inside spawned CPU processes on gloo (see tests/test_dist.py).

``run(rank, world, init_file, out_dir, names)`` joins the group, runs the named checks in order and writes
{check: "ok" | traceback} to out_dir/rank<r>.json. Every check is collective: ranks run the same calls in the
same order. Checks record problems with ``expect`` and ``run`` raises them after the check returns, so a rank
whose result is wrong still makes every collective call of the check and its peers do not hang.
Tokens and routing are generated from (seed, rank) so every rank can rebuild what every other rank holds.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import torch
import torch.distributed as dist

H = 128          # hidden size (one FP8 group)
I = 128          # expert intermediate size
TIMEOUT = 60.0   # EP timeout of the ordinary checks (16 processes share 2 cores)


_problems: list[str] = []


def expect(ok, message: str) -> None:
    """A soft assertion: remembered, raised by ``run`` once the check (and its collectives) is done."""
    if not ok:
        _problems.append(message)


# ---- data every rank can rebuild -------------------------------------------------------------------------------

def tokens(rank: int, T: int, E: int, k: int, dtype=torch.bfloat16, seed: int = 0, skew: bool = False):
    """(x [T, H], ids int32 [T, k] distinct per token, weights fp32 [T, k]) of ``rank``."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = (torch.randn(T, H, generator=g) * 3).to(dtype)
    if skew:  # every token to experts 0..k-1
        ids = torch.arange(k).expand(T, k)
    else:
        ids = torch.rand(T, E, generator=g).argsort(1)[:, :k]
    w = torch.rand(T, k, generator=g) + 0.1
    return x, ids.to(torch.int32).contiguous(), w


def num_tokens(rank: int, base: int = 12) -> int:
    return base + (rank * 7) % 5  # ranks hold different numbers of tokens


def expected_rows(me: int, world: int, placement, make):
    """What rank ``me`` must receive: (rows, weights, counts per local expert), grouped by local expert and
    stable by (source rank, token). ``make(rank) -> (x, ids, w)``."""
    data = [make(s) for s in range(world)]
    rows, weights, counts = [], [], []
    for e in placement.experts_of(me):
        n = 0
        for x, ids, w in data:
            hit = (ids == e).nonzero()
            rows.append(x[hit[:, 0]])
            weights.append(w[hit[:, 0], hit[:, 1]])
            n += hit.shape[0]
        counts.append(n)
    if not rows:
        return data[0][0][:0], torch.zeros(0), counts
    return torch.cat(rows), torch.cat(weights), counts


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def expert_counts(world: int) -> list[int]:
    """E < G (idle ranks), E == G, E > G."""
    return sorted({max(1, world // 2), world, 2 * world})


# ---- checks ------------------------------------------------------------------------------------------------------

def check_roundtrip_exact(rank, world):
    """Every received row equals its source row bitwise, grouped as the definition says; top-1 with weight 1
    and identity experts returns x exactly; with k > 1, experts that scale by (e + 1) give sum_j w_j (e_j+1) x."""
    from moe_kernels.dist.ep import ExpertParallel

    for E in expert_counts(world):
        cases = ((torch.bfloat16, 1), (torch.float16, 1), (torch.float32, min(3, E)), (torch.bfloat16, min(2, E)))
        for dtype, k in cases:
            ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)

            def make(s, E=E, k=k, dtype=dtype):
                x, ids, w = tokens(s, num_tokens(s), E, k, dtype, seed=E + k)
                return x, ids, (torch.ones_like(w) if k == 1 else w)

            x, ids, w = make(rank)
            d = ep.dispatch(x, ids, w)
            want_x, want_w, want_counts = expected_rows(rank, world, ep.placement, make)
            y = d.x.float()
            scale_of_row = torch.repeat_interleave(
                torch.tensor([e + 1.0 for e in ep.local_experts]), torch.tensor(d.tokens_per_expert, dtype=torch.long)
            ) if ep.local_experts else torch.zeros(0)
            out = ep.combine(y if k == 1 else y * scale_of_row[:, None], d)
            ctx = f"E={E} dtype={dtype} k={k}"
            expect(d.x.dtype == dtype and d.x.shape == want_x.shape, f"{ctx}: got {d.x.dtype} {tuple(d.x.shape)}")
            expect(torch.equal(bits(d.x), bits(want_x)), f"{ctx}: received rows differ from the source rows")
            expect(torch.equal(d.weights, want_w), f"{ctx}: received weights differ")
            expect(d.tokens_per_expert == want_counts, f"{ctx}: {d.tokens_per_expert} != {want_counts}")
            want_offsets = [0] + torch.tensor(want_counts, dtype=torch.long).cumsum(0).tolist()
            expect(d.offsets.dtype == torch.int32 and d.offsets.tolist() == want_offsets,
                   f"{ctx}: offsets {d.offsets.tolist()}")
            expect(out.dtype == dtype and out.shape == x.shape, f"{ctx}: combine gave {out.dtype} {tuple(out.shape)}")
            if k == 1:
                expect(torch.equal(bits(out), bits(x)), f"{ctx}: top-1 identity round trip is not exact")
            else:
                ref = ((w * (ids.float() + 1)).sum(1, keepdim=True) * x.float())
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                expect(err <= (1e-6 if dtype == torch.float32 else 1e-2), f"{ctx}: combine error {err:.2e}")


def check_once_per_rank(rank, world):
    """A token whose k experts share a rank crosses once: records received == distinct (token, rank) pairs."""
    from moe_kernels.dist.ep import ExpertParallel

    E = 2 * world
    ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)  # rank r holds experts 2r, 2r+1
    T = 10
    dst = torch.arange(T) % world
    ids = torch.stack([2 * dst, 2 * dst + 1], 1).to(torch.int32)  # both experts of a token on one rank
    x = torch.randn(T, H).bfloat16()
    d = ep.dispatch(x, ids, torch.full((T, 2), 0.5))
    out = ep.combine(d.x.float(), d)
    want = sum(int(((torch.arange(T) % world) == rank).sum()) for _ in range(world))
    expect(d.num_recv_tokens == want, f"received {d.num_recv_tokens} records, expected {want} (once per token)")
    expect(d.x.shape[0] == 2 * want, f"{d.x.shape[0]} rows, expected two per record")
    expect(torch.equal(bits(out), bits(x)), "0.5 * x + 0.5 * x must return x exactly")


def check_fp8_dispatch(rank, world):
    """fp8=True sends e4m3 rows + 1x128 scales: bitwise the quantisation of the source rows."""
    from moe_kernels import reference
    from moe_kernels.dist.ep import ExpertParallel

    E = 2 * world
    ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)
    make = lambda s: tokens(s, num_tokens(s), E, 2, torch.bfloat16, seed=5)  # noqa: E731
    x, ids, w = make(rank)
    d = ep.dispatch(x, ids, w, fp8=True)
    want_x, _, _ = expected_rows(rank, world, ep.placement, make)
    q, s = reference.quantize_fp8(want_x)
    expect(d.x.dtype == torch.float8_e4m3fn and d.scale.dtype == torch.float32, f"got {d.x.dtype}, {d.scale.dtype}")
    expect(torch.equal(bits(d.x), bits(q)) and torch.equal(d.scale, s), "fp8 rows/scales differ from the source")
    out = ep.combine(reference.dequantize_fp8(d.x, d.scale), d)
    expect(out.dtype == torch.bfloat16 and out.shape == x.shape, f"combine gave {out.dtype} {tuple(out.shape)}")


def _moe_pair(E, k, precision, n_shared=0):
    """A single-process MoELayer and an EP MoELayer with the same weights (the EP one sharded)."""
    from moe_kernels import MoELayer

    torch.manual_seed(1234)
    ref = MoELayer(H, I, E, top_k=k, precision=precision, n_shared_experts=n_shared)
    ep_layer = MoELayer(H, I, E, top_k=k, precision=precision, n_shared_experts=n_shared, ep_group=dist.group.WORLD)
    ep_layer.gate.load_state_dict(ref.gate.state_dict())
    if n_shared:
        ep_layer.shared_experts.load_state_dict(ref.shared_experts.state_dict())
    ep_layer.experts = ep_layer._ep.shard_experts(ref.experts)
    return ref, ep_layer


def _reference_out(ref, make_x, rank, world):
    """The single-process layer on ALL ranks' tokens (rank order), this rank's rows of the result: every expert
    then sees the same rows in the same order as under EP, so the GEMMs match exactly."""
    xs = [make_x(s) for s in range(world)]
    lo = sum(x.shape[0] for x in xs[:rank])
    return ref(torch.cat(xs))[lo:lo + xs[rank].shape[0]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def check_moe_layer(rank, world):
    """EP MoELayer == single-process MoELayer on the same weights and tokens (fp32: rel. error <= 1e-5)."""
    for E in expert_counts(world):
        for k in sorted({1, min(2, E), min(4, E)}):
            ref, layer = _moe_pair(E, k, "fp32", n_shared=1 if k == 2 else 0)
            make_x = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(s))  # noqa: E731
            out, want = layer(make_x(rank)), _reference_out(ref, make_x, rank, world)
            err = _rel(out, want)
            expect(err <= 1e-5, f"E={E} k={k}: relative error {err:.2e}")


def check_moe_layer_gradients(rank, world):
    """The EP layer's backward == the single-process layer's (fp32: rel. error <= 1e-5; bf16: 3e-2): the tokens'
    gradient on every rank, the local experts' weight gradients (the reference's for those experts: it saw every
    rank's tokens), and the gate's and the shared expert's summed over the ranks (each rank saw its own tokens)."""
    cases = [(E, "fp32", 1e-5) for E in expert_counts(world)] + [(expert_counts(world)[0], "bf16", 3e-2)]
    for E, precision, tol in cases:
        k = min(2, E)
        ref, layer = _moe_pair(E, k, precision, n_shared=1)
        make_x = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(s))  # noqa: E731
        make_g = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(1000 + s))  # noqa: E731
        x = make_x(rank).requires_grad_()
        (layer(x) * make_g(rank)).sum().backward()
        xs = [make_x(s).requires_grad_() for s in range(world)]
        (ref(torch.cat(xs)) * torch.cat([make_g(s) for s in range(world)])).sum().backward()
        err = _rel(x.grad, xs[rank].grad)
        expect(err <= tol, f"E={E} {precision}: x.grad relative error {err:.2e}")
        if layer.experts is not None:
            idx = torch.tensor(layer._ep.local_experts)
            for name in ("w13", "w2"):
                err = _rel(getattr(layer.experts, name).grad, getattr(ref.experts, name).grad[idx])
                expect(err <= tol, f"E={E} {precision}: local experts' {name}.grad relative error {err:.2e}")
        for ours, want in ((layer.gate.weight, ref.gate.weight), (layer.shared_experts.w13, ref.shared_experts.w13)):
            g = ours.grad.clone()
            dist.all_reduce(g)
            err = _rel(g, want.grad)
            expect(err <= tol, f"E={E} {precision}: summed {tuple(ours.shape)} gradient relative error {err:.2e}")
    # E < G with a frozen gate and tokens that need no gradient: the idle ranks have nothing of their own to
    # differentiate, yet must join the backward's exchanges (the experts' gradients still match)
    E = expert_counts(world)[0]
    ref, layer = _moe_pair(E, 1, "fp32")
    for m in (ref, layer):
        m.gate.weight.requires_grad_(False)
    make_x = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(s))  # noqa: E731
    (layer(make_x(rank)) * make_x(rank)).sum().backward()
    (ref(torch.cat([make_x(s) for s in range(world)])) * torch.cat([make_x(s) for s in range(world)])).sum().backward()
    if layer.experts is not None:
        idx = torch.tensor(layer._ep.local_experts)
        err = _rel(layer.experts.w2.grad, ref.experts.w2.grad[idx])
        expect(err <= 1e-5, f"E={E}, frozen gate: local experts' w2.grad relative error {err:.2e}")
    # a rank without tokens (T = 0) still joins both exchanges of the backward
    ref, layer = _moe_pair(world, 2, "fp32")
    make_x = lambda s: torch.randn(0 if s == 0 else 5, H, generator=_gen(s))  # noqa: E731
    x = make_x(rank).requires_grad_()
    (layer(x) * 2.0).sum().backward()
    (ref(torch.cat([make_x(s) for s in range(world)])) * 2.0).sum().backward()
    expect(x.grad is not None and x.grad.shape == x.shape, "T = 0: no gradient for x")
    if layer.experts is not None:
        idx = torch.tensor(layer._ep.local_experts)
        err = _rel(layer.experts.w13.grad, ref.experts.w13.grad[idx])
        expect(err <= 1e-5, f"T = 0 on rank 0: local experts' w13.grad relative error {err:.2e}")
    # FP8 experts: tokens that need a gradient travel unquantised and the experts' straight-through backward runs
    # where they live; the same gradients as the single-process FP8 layer (same rows, same quantisation)
    ref, layer = _moe_pair(expert_counts(world)[0], 1, "fp8")
    make_x = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(s))  # noqa: E731
    x = make_x(rank).requires_grad_()
    (layer(x) * make_x(rank)).sum().backward()
    xs = [make_x(s).requires_grad_() for s in range(world)]
    (ref(torch.cat(xs)) * torch.cat([make_x(s) for s in range(world)])).sum().backward()
    err = _rel(x.grad, xs[rank].grad)
    expect(err <= 1e-2, f"fp8 experts: x.grad relative error {err:.2e} against the single-process FP8 layer")


def check_moe_layer_low_precision(rank, world):
    """FP8 experts (rows travel as e4m3, quantised as the single-process permute does) and bf16 experts: with
    fp32 partial sums (the default) the EP layer equals the single-process layer to fp32 rounding; with bf16
    partials one more rounding per partial. E < G too: the idle ranks send FP8 like the others. Inference (no_grad):
    with autograd on, the single-process bf16 experts take their training kernels (h13 kept for the backward),
    whose rounding differs from the fused inference kernel the EP forward runs."""
    for precision, E in (("fp8", 2 * world), ("fp8", max(1, world // 2)), ("bf16", 2 * world)):
        ref, layer = _moe_pair(E, min(2, E), precision)
        make_x = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(s)).bfloat16()  # noqa: E731
        x = make_x(rank)
        with torch.no_grad():
            want = _reference_out(ref, make_x, rank, world)
            out = layer(x)
        # fp8: the fused MLP re-quantises its intermediate to e4m3, so an fp32 ulp of difference in the w13 product
        # (the interpreter's numpy GEMMs; which BLAS kernel runs depends on the CPU) can move one value across an
        # e4m3 rounding boundary: one e4m3 ulp there, ~1e-4 of the output's norm at these sizes. bf16: fp32 rounding.
        tol = 1e-3 if precision == "fp8" else 1e-5
        expect(out.dtype == torch.bfloat16 and _rel(out, want) <= tol, f"{precision} E={E}: {_rel(out, want):.2e}")
        layer._ep.combine_dtype = torch.bfloat16
        with torch.no_grad():
            out = layer(x)
        expect(_rel(out, want) <= 1e-2, f"{precision} E={E}, bf16 partials: {_rel(out, want):.2e}")


def check_replicas(rank, world):
    """A placement with replicas (place_experts: one expert per rank, spare ranks holding copies of the hottest;
    and a hand-made one with two copies of every expert): every rank holds a copy and the EP layer still equals the
    single-process layer (each pair computed once, by the copy its share picks)."""
    from moe_kernels import MoELayer
    from moe_kernels.dist import Placement, place_experts

    E = max(1, world // 2)
    load = [8.0 * (e + 1) for e in range(E)]
    planned = place_experts(E, world, min(8, world), load=load, top_k=1)
    two = Placement(tuple(range(E)), world, replicas=tuple(((e, 0.5), (e + E, 0.5)) for e in range(E))) \
        if 2 * E <= world else planned
    for placement in (planned, two):
        torch.manual_seed(1234)
        ref = MoELayer(H, I, E, top_k=1, precision="fp32")
        layer = MoELayer(H, I, E, top_k=1, precision="fp32", ep_group=dist.group.WORLD, placement=placement)
        layer.gate.load_state_dict(ref.gate.state_dict())
        layer.experts = layer._ep.shard_experts(ref.experts)
        make_x = lambda s: torch.randn(num_tokens(s, 40), H, generator=_gen(s))  # noqa: E731
        x = make_x(rank)
        holds = torch.tensor([int(layer._ep.num_local_experts > 0)])
        dist.all_reduce(holds)
        expect(holds.item() == world, f"{world - holds.item()} ranks hold no copy")
        if placement is two:  # ranks E.. hold only second copies: half the traffic must reach them
            w, ids, _ = layer.gate(x)
            d = layer._ep.dispatch(x, ids, w)
            rows = torch.tensor([d.x.shape[0] if rank >= E else 0, d.x.shape[0]], dtype=torch.int64)
            dist.all_reduce(rows)
            share = rows[0].item() / max(rows[1].item(), 1)
            expect(0.3 < share < 0.7, f"the second copies took {share:.2f} of the rows, not about half")
        out, want = layer(x), _reference_out(ref, make_x, rank, world)
        expect(_rel(out, want) <= 1e-5, f"replicas ({placement.replicas is not None}): {_rel(out, want):.2e}")


def check_skewed(rank, world):
    """Every token of every rank to the same experts: one rank receives everything, the others nothing."""
    from moe_kernels.dist.ep import ExpertParallel

    for E, k in ((world, 1), (2 * world, 2), (max(1, world // 2), 1)):
        ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)
        make = lambda s, E=E, k=k: tokens(s, num_tokens(s), E, k, torch.float32, seed=3, skew=True)  # noqa: E731
        x, ids, w = make(rank)
        d = ep.dispatch(x, ids, w)
        want_x, _, counts = expected_rows(rank, world, ep.placement, make)
        out = ep.combine(d.x, d)
        expect(torch.equal(d.x, want_x) and d.tokens_per_expert == counts, f"E={E} k={k}: received rows differ")
        ref = w.sum(1, keepdim=True) * x
        expect(_rel(out, ref) <= 1e-6, f"E={E} k={k}: {_rel(out, ref):.2e}")
    ref, layer = _moe_pair(world, 1, "fp32")
    with torch.no_grad():  # the router prefers expert 0 for every token
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0
        ref.gate.weight.copy_(layer.gate.weight)
    x = torch.rand(num_tokens(rank), H) + 0.1
    out, want = layer(x), ref(x)
    expect(_rel(out, want) <= 1e-5, f"skewed MoELayer: {_rel(out, want):.2e}")


def check_zero_tokens(rank, world):
    """A rank with no tokens still takes part (and receives); everyone else is unaffected."""
    from moe_kernels.dist.ep import ExpertParallel

    E = 2 * world
    ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)
    T_of = lambda s: 0 if s == 1 else num_tokens(s)  # noqa: E731
    make = lambda s: tokens(s, T_of(s), E, 2, torch.bfloat16, seed=9)  # noqa: E731
    x, ids, w = make(rank)
    d = ep.dispatch(x, ids, w)
    want_x, _, _ = expected_rows(rank, world, ep.placement, make)
    out = ep.combine(d.x, d)
    expect(torch.equal(bits(d.x), bits(want_x)), "received rows differ from the source rows")
    expect(out.shape == (T_of(rank), H), f"combine gave shape {tuple(out.shape)}")
    ref, layer = _moe_pair(E, 2, "fp32")
    xs = torch.randn(T_of(rank), H)
    out2, want2 = layer(xs), ref(xs)
    expect(out2.shape == want2.shape and (xs.shape[0] == 0 or _rel(out2, want2) <= 1e-5), "MoELayer with T=0 here")
    ones = torch.ones(1, H)  # T = 1: one micro-batch is empty on every rank
    expect(_rel(layer(ones), ref(ones)) <= 1e-5, "MoELayer with one token per rank (an empty micro-batch)")


def check_async(rank, world):
    """Several dispatches in flight, then their combines: the same as the synchronous calls."""
    from moe_kernels.dist.ep import ExpertParallel, Pending

    E = 2 * world
    ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)
    batches = [tokens(rank, num_tokens(rank) + i, E, 2, torch.bfloat16, seed=20 + i) for i in range(3)]
    pend = [ep.dispatch(x, ids, w, async_op=True) for x, ids, w in batches]
    expect(all(isinstance(p, Pending) for p in pend), "async_op=True must return Pending handles")
    ds = [p.wait() for p in pend]
    combs = [ep.combine(d.x, d, async_op=True) for d in ds]
    outs = [c.wait() for c in combs]
    for (x, ids, w), out in zip(batches, outs):
        sync = ep.combine(*(lambda d: (d.x, d))(ep.dispatch(x, ids, w)))
        expect(torch.equal(bits(out), bits(sync)), "async result differs from the synchronous one")


def check_p2p_slots(rank, world):
    """The P2P backend's index math, without a GPU: every record's computed slot in its destination's region,
    shipped along through the collective path, must equal its receive position; every partial sum's home row
    must equal its position in the home's send order; and the combine region must be covered exactly once."""
    from moe_kernels.dist.buffer import combine_slots, dispatch_slots
    from moe_kernels.dist.ep import ExpertParallel

    for E, k in ((2 * world, 2), (world, 1), (max(1, world // 2), 1), (4 * world, 4)):
        ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)
        x, ids, w = tokens(rank, 0 if rank == 1 else num_tokens(rank), E, k, seed=E + k)
        plan = ep._plan(x, ids, w, fp8=False)
        C = plan["counts"]
        slots = dispatch_slots(C, rank, plan["send_dest"], plan["send_splits"])
        got = torch.empty(sum(plan["recv_splits"]), dtype=torch.int64)
        dist.all_to_all_single(got, slots, plan["recv_splits"], plan["send_splits"])
        expect(torch.equal(got, torch.arange(got.shape[0])), f"E={E} k={k}: dispatch slots {got.tolist()[:8]}...")
        src, rows = combine_slots(C, rank, plan["recv_splits"], "cpu")
        back = torch.empty(sum(plan["send_splits"]), dtype=torch.int64)
        dist.all_to_all_single(back, rows, plan["send_splits"], plan["recv_splits"])
        expect(torch.equal(back, torch.arange(back.shape[0])), f"E={E} k={k}: combine rows {back.tolist()[:8]}...")
        home = torch.empty(sum(plan["send_splits"]), dtype=torch.int64)
        dist.all_to_all_single(home, src, plan["send_splits"], plan["recv_splits"])
        expect(bool((home == rank).all()), f"E={E} k={k}: partial sums sent to the wrong home")
        slot = plan["home_slot"]
        used = slot[slot >= 0]
        expect(torch.equal(used.sort().values, torch.arange(back.shape[0])),
               f"E={E} k={k}: home slots do not cover the send order exactly once")


def check_bad_input(rank, world):
    """Wrong arguments raise on the calling rank before anything is sent (no peer waits on it)."""
    from moe_kernels.dist.ep import ExpertParallel
    from moe_kernels.dist.placement import Placement, default_placement

    E = 2 * world
    ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)
    x, ids, w = tokens(rank, 4, E, 2)
    cases = [
        ((x.int(), ids, w), TypeError, "x"),
        ((x, ids.float(), w), TypeError, "topk_ids"),
        ((x, ids, w.double()), TypeError, "topk_weights"),
        ((x, ids[:3], w), ValueError, "topk_ids"),
        ((x, ids, w[:, :1]), ValueError, "topk_weights"),
        ((x, ids + E, w), ValueError, "topk_ids"),
    ]
    for args, exc, name in cases:
        try:
            ep.dispatch(*args)
        except exc as e:
            expect(name in str(e), f"{exc.__name__} does not name {name}: {e}")
        else:
            raise AssertionError(f"dispatch did not raise {exc.__name__} for a bad {name}")
    try:
        ep.dispatch(x[:, :100].contiguous(), ids, w, fp8=True)
        raise AssertionError("fp8 dispatch with H=100 did not raise")
    except ValueError as e:
        expect("128" in str(e), str(e))
    for bad in (lambda: ExpertParallel(None, E, placement=Placement(tuple(range(E)), E + 1)),
                lambda: default_placement(3 * world + 1, world)):
        try:
            bad()
            raise AssertionError("a placement for the wrong world size was accepted")
        except ValueError as e:
            expect("world size" in str(e), str(e))
    try:
        ExpertParallel(None, E, backend="mpi")
        raise AssertionError("backend='mpi' accepted")
    except ValueError as e:
        expect("backend" in str(e), str(e))


def check_config_mismatch(rank, world):
    """Peers that disagree raise ValueError naming the odd rank, on every rank, before rows are sent."""
    from moe_kernels.dist.ep import ExpertParallel

    E = 2 * world
    odd = world - 1
    try:
        ExpertParallel(None, E, hidden_size=256 if rank == odd else H, backend="nccl", timeout=TIMEOUT)
        raise AssertionError("construction with different hidden sizes did not raise")
    except ValueError as e:
        expect(f"rank {odd} has 256" in str(e), str(e))
    try:
        ExpertParallel(None, E * (2 if rank == odd else 1), backend="nccl", timeout=TIMEOUT)
        raise AssertionError("construction with different num_experts did not raise")
    except ValueError as e:
        expect(f"rank {odd}" in str(e) and "num_experts" in str(e), str(e))
    try:  # the backend choice depends on it: ranks that disagree could pick different transports
        ExpertParallel(None, E, allow_shared_device=rank == odd, backend="nccl", timeout=TIMEOUT)
        raise AssertionError("construction with different allow_shared_device did not raise")
    except ValueError as e:
        expect(f"rank {odd} has 1" in str(e) and "allow_shared_device" in str(e), str(e))
    ep = ExpertParallel(None, E, backend="nccl", timeout=TIMEOUT)
    x, ids, w = tokens(rank, 4, E, 2, torch.float32 if rank == odd else torch.bfloat16)
    try:
        ep.dispatch(x, ids, w)
        raise AssertionError("dispatch with different dtypes did not raise")
    except ValueError as e:
        expect(f"rank {odd} sends dtype float32" in str(e), str(e))
    x, ids, w = tokens(rank, 4, E, 2)
    d = ep.dispatch(x, ids, w)  # still usable: the failed call sent no rows
    out = ep.combine(d.x.float(), d)
    expect(_rel(out, w.sum(1, keepdim=True) * x.float()) < 1e-2, "a dispatch after a failed one is wrong")


def check_timeout(rank, world):
    """A rank that never arrives: the others raise TimeoutError naming it (construction and dispatch)."""
    from moe_kernels.dist.ep import ExpertParallel

    E, late, limit = 2 * world, world - 1, 2.0
    g1 = dist.new_group(backend="gloo")
    g2 = dist.new_group(backend="gloo")
    if rank != late:
        try:
            ExpertParallel(g1, E, backend="nccl", timeout=limit)
            raise AssertionError("construction without the last rank did not time out")
        except TimeoutError as e:
            expect(f"rank {late} never arrived" in str(e), str(e))
    dist.barrier()  # the late rank waits here until the others have timed out
    ep = ExpertParallel(g2, E, backend="nccl", timeout=limit)
    if rank != late:
        x, ids, w = tokens(rank, 4, E, 2)
        try:
            ep.dispatch(x, ids, w)
            raise AssertionError("dispatch without the last rank did not time out")
        except TimeoutError as e:
            expect(f"rank {late} never arrived" in str(e) and "dispatch" in str(e), str(e))
    dist.barrier()  # on the default group: the stuck collectives live in g1/g2


def _tp_grid(rank, world, ep):
    """An EP x TP grid over the world, rank = e * TP + t: (tp group, ep group or None, e, t). Every rank creates
    every group (new_group is collective)."""
    tp = world // ep
    tp_groups = [dist.new_group(list(range(e * tp, (e + 1) * tp))) for e in range(ep)]
    ep_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)] if ep > 1 else None
    e, t = divmod(rank, tp)
    return tp_groups[e], (ep_groups[t] if ep_groups else None), e, t


def check_tensor_parallel(rank, world):
    """Expert TP alone (TP = world) and in an EP x TP grid (EP = 2, TP = world / 2), with a shared expert: the
    layer's output, the tokens' gradient, every rank's slice of its experts' gradients, and the gate's and the
    shared expert's gradients (summed over the EP group) equal the single-process layer's. FP8 experts (forward):
    slices of whole 128-blocks quantise the intermediate exactly as the full layer does; the difference left is
    the bf16 rounding of each slice's partial output (FP8 experts return bf16) before the fp32 sum, ~3e-3."""
    from moe_kernels import MoELayer
    from moe_kernels.dist import load_full_experts

    grids = [(1, "fp32", 128, 1e-5), (1, "bf16", 128, 3e-2)] + ([(2, "fp32", 128, 1e-5)] if world >= 4 else []) + \
        ([(1, "fp8", 128 * world, 1e-2)] if world == 2 else [])
    for ep, precision, inter, tol in grids:
        tp_g, ep_g, e, t = _tp_grid(rank, world, ep)
        tp = world // ep
        E, ctx = 2 * ep, f"EP={ep} x TP={tp} {precision}"
        torch.manual_seed(1234)
        ref = MoELayer(H, inter, E, top_k=2, precision=precision, n_shared_experts=1)
        layer = MoELayer(H, inter, E, top_k=2, precision=precision, n_shared_experts=1, ep_group=ep_g,
                         tp_group=tp_g)
        layer.gate.load_state_dict(ref.gate.state_dict())
        layer.shared_experts.load_state_dict(ref.shared_experts.state_dict())
        load_full_experts(layer, ref.experts)
        make_x = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(s))  # noqa: E731
        make_g = lambda s: torch.randn(num_tokens(s, 9), H, generator=_gen(1000 + s))  # noqa: E731
        lo = sum(make_x(s).shape[0] for s in range(e))
        if precision == "fp8":
            with torch.no_grad():
                out = layer(make_x(e).bfloat16())
                want = ref(torch.cat([make_x(s) for s in range(ep)]).bfloat16())[lo:lo + out.shape[0]]
            expect(_rel(out, want) <= tol, f"{ctx}: forward relative error {_rel(out, want):.2e}")
            continue
        x = make_x(e).requires_grad_()
        out = layer(x)
        (out * make_g(e)).sum().backward()
        xs = [make_x(s).requires_grad_() for s in range(ep)]
        want = ref(torch.cat(xs))
        (want * torch.cat([make_g(s) for s in range(ep)])).sum().backward()
        want = want[lo:lo + x.shape[0]]
        expect(_rel(out, want) <= tol, f"{ctx}: forward relative error {_rel(out, want):.2e}")
        expect(_rel(x.grad, xs[e].grad) <= tol, f"{ctx}: x.grad relative error {_rel(x.grad, xs[e].grad):.2e}")
        n = inter // tp
        rows = torch.cat([torch.arange(t * n, (t + 1) * n), inter + torch.arange(t * n, (t + 1) * n)])
        if layer.experts is not None:
            idx = torch.tensor(layer._ep.local_experts if layer._ep is not None else range(E))
            for name, got, full in (("w13", layer.experts.w13.grad, ref.experts.w13.grad[idx][:, rows]),
                                    ("w2", layer.experts.w2.grad, ref.experts.w2.grad[idx][:, :, t * n:(t + 1) * n])):
                expect(_rel(got, full) <= tol, f"{ctx}: this rank's slice of {name}.grad: {_rel(got, full):.2e}")
        for ours, theirs in ((layer.gate.weight, ref.gate.weight), (layer.shared_experts.w13, ref.shared_experts.w13)):
            g = ours.grad.clone()
            if ep_g is not None:
                dist.all_reduce(g, group=ep_g)
            expect(_rel(g, theirs.grad) <= tol, f"{ctx}: {tuple(ours.shape)} gradient: {_rel(g, theirs.grad):.2e}")
    try:  # a slice that is not whole 128-blocks of FP8 weights
        MoELayer(H, 128, 2, precision="fp8", tp_group=dist.group.WORLD)
        raise AssertionError("an FP8 TP slice of 128 / world was accepted")
    except ValueError as err:
        expect("multiple of 128" in str(err), str(err))


def check_replica_training(rank, world):
    """A placement with two copies of every expert, trained 3 SGD steps (the gate's gradient summed over the ranks
    as data parallelism would): after each step every copy of an expert is bitwise identical to the others (their
    gradients are summed over the copies in the backward) and equal to the single-process layer trained on all
    ranks' tokens."""
    from moe_kernels import MoELayer
    from moe_kernels.dist import Placement

    E = max(1, world // 2)
    placement = Placement(tuple(range(E)), world, replicas=tuple(((e, 0.5), (e + E, 0.5)) for e in range(E)))
    torch.manual_seed(1234)
    ref = MoELayer(H, I, E, top_k=1, precision="fp32")
    layer = MoELayer(H, I, E, top_k=1, precision="fp32", ep_group=dist.group.WORLD, placement=placement)
    layer.gate.load_state_dict(ref.gate.state_dict())
    layer.experts = layer._ep.shard_experts(ref.experts)
    opt, ref_opt = torch.optim.SGD(layer.parameters(), lr=0.01), torch.optim.SGD(ref.parameters(), lr=0.01)
    for step in range(3):
        make_x = lambda s: torch.randn(num_tokens(s, 30), H, generator=_gen(100 * step + s))  # noqa: E731
        make_g = lambda s: torch.randn(num_tokens(s, 30), H, generator=_gen(999 + 100 * step + s))  # noqa: E731
        (layer(make_x(rank)) * make_g(rank)).sum().backward()
        for p in layer.gate.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
        (ref(torch.cat([make_x(s) for s in range(world)])) * torch.cat([make_g(s) for s in range(world)])).sum() \
            .backward()
        ref_opt.step()
        ref_opt.zero_grad()
        mine = {e: (layer.experts.w13[j].detach().clone(), layer.experts.w2[j].detach().clone())
                for j, e in enumerate(layer._ep.local_experts)}
        every = [None] * world
        dist.all_gather_object(every, mine)
        for e in range(E):
            copies = [d[e] for d in every if e in d]
            expect(len(copies) == 2, f"step {step}: expert {e} has {len(copies)} copies")
            same = all(torch.equal(c[0], copies[0][0]) and torch.equal(c[1], copies[0][1]) for c in copies)
            expect(same, f"step {step}: the copies of expert {e} differ after the optimiser step")
            err = max(_rel(copies[0][0], ref.experts.w13[e]), _rel(copies[0][1], ref.experts.w2[e]))
            expect(err <= 1e-5, f"step {step}: expert {e} differs from the single-process layer's: {err:.2e}")


CHECKS = {
    "roundtrip_exact": check_roundtrip_exact,
    "once_per_rank": check_once_per_rank,
    "fp8_dispatch": check_fp8_dispatch,
    "moe_layer": check_moe_layer,
    "moe_layer_gradients": check_moe_layer_gradients,
    "moe_layer_low_precision": check_moe_layer_low_precision,
    "skewed": check_skewed,
    "replicas": check_replicas,
    "zero_tokens": check_zero_tokens,
    "async": check_async,
    "p2p_slots": check_p2p_slots,
    "tensor_parallel": check_tensor_parallel,
    "replica_training": check_replica_training,
    "bad_input": check_bad_input,
    "config_mismatch": check_config_mismatch,
    "timeout": check_timeout,  # last: it leaves collectives stuck in its own groups
}


# ---- one GPU shared by every rank: the P2P backend with allow_shared_device (tests/test_ep_shared_device.py) --------
# Every rank is its own process with its own CUDA context on GPU 0; the P2P buffers are mapped through CUDA IPC as
# between GPUs, so these checks run the multigpu tests' P2P checks on any one-GPU machine (correctness only).

GPU_TIMEOUT = 60.0  # the ranks' kernels time-share the GPU, and a peer's first call compiles Triton kernels
SOAK_ITERS = {2: 1000, 4: 1000}


def _gpu():
    return torch.device("cuda", torch.cuda.current_device())


def _p2p(E: int, timeout: float | None = None, **kw):
    from moe_kernels.dist.ep import ExpertParallel

    ep = ExpertParallel(None, E, backend="p2p", allow_shared_device=True, timeout=timeout or GPU_TIMEOUT, **kw)
    if ep.backend != "p2p":
        raise AssertionError(f"allow_shared_device=True did not give the p2p backend: {ep.backend}")
    return ep


def _check_round_trip(ep, rank, world, make, fp8: bool, ctx: str) -> None:
    """One dispatch + identity-expert combine on GPU tensors from ``make(rank)``: rows bitwise the source rows (or
    their row-wise FP8 quantisation), weights and counts exact, the combine sum_j w_j x (bitwise x for top-1)."""
    import moe_kernels as mk
    from moe_kernels import reference

    dev = _gpu()
    x, ids, w = (t.to(dev) for t in make(rank))
    d = ep.dispatch(x, ids, w, fp8=fp8)
    want_x, want_w, counts = expected_rows(rank, world, ep.placement, make)
    want_x = want_x.to(dev)
    expect(d.tokens_per_expert == counts, f"{ctx}: counts {d.tokens_per_expert} != {counts}")
    expect(torch.equal(d.weights.cpu(), want_w.float()), f"{ctx}: received weights differ")
    if fp8:
        expect(d.x.dtype == torch.float8_e4m3fn and d.x.shape == want_x.shape, f"{ctx}: got {d.x.dtype} {d.x.shape}")
        if want_x.shape[0]:
            q, sc = mk.ops.quantize_fp8(want_x)
            expect(torch.equal(bits(d.x), bits(q)) and torch.equal(d.scale, sc), f"{ctx}: fp8 rows/scales differ")
        y = reference.dequantize_fp8(d.x, d.scale).bfloat16() if d.x.shape[0] else d.x.new_zeros(
            0, x.shape[1], dtype=torch.bfloat16)
    else:
        expect(d.x.shape == want_x.shape and torch.equal(bits(d.x), bits(want_x)),
               f"{ctx}: received rows differ from the source rows")
        y = d.x
    out = ep.combine(y, d)
    expect(out.shape == x.shape and out.dtype == x.dtype, f"{ctx}: combine gave {out.dtype} {tuple(out.shape)}")
    if x.shape[0] == 0:
        return
    if ids.shape[1] == 1 and not fp8:
        expect(torch.equal(bits(out), bits(x)), f"{ctx}: the top-1 identity round trip is not exact")
    xq = reference.dequantize_fp8(*reference.quantize_fp8(x)) if fp8 else x.float()
    ref = w.sum(1, keepdim=True) * xq
    expect(bool(torch.isfinite(out).all()) and _rel(out, ref) < 1e-2, f"{ctx}: combine error {_rel(out, ref):.2e}")


def gpu_check_round_trip(rank, world):
    """bf16 and fp8 rows, k = 1/2/4, E < G, E = G, E > G; three calls on the same buffers with new data and a
    different number of tokens each time (the last rank sends none in the middle call): nothing stale is read."""
    for E in expert_counts(world):
        for k in sorted({1, min(2, E), min(4, E)}):
            ep = _p2p(E, buffer_tokens=200 * world)  # later calls carry more tokens than the first
            for fp8 in (False, True):
                for it in range(3):
                    def make(s, it=it, E=E, k=k, fp8=fp8):
                        T = 0 if (it == 1 and s == world - 1) else 40 + 13 * s + 29 * it
                        x, ids, w = tokens(s, T, E, k, torch.bfloat16, seed=100 * it + 10 * E + k + 7 * fp8)
                        return x, ids, (torch.ones_like(w) if k == 1 else w)

                    _check_round_trip(ep, rank, world, make, fp8, f"E={E} k={k} fp8={fp8} call {it}")
            ep.check()
            ep.close()


def gpu_check_stale(rank, world):
    """A large call, then small ones on the same buffers: each small call's rows are its own (a reader that
    raced ahead of the flags, or an epoch mix-up, would hand back the large call's rows); then a call where every
    rank sends nothing, and a large one again."""
    E = 2 * world
    ep = _p2p(E, buffer_tokens=64 * world * 2)
    for it, T in enumerate((64, 3, 1, 0, 64, 5)):
        make = lambda s, T=T, it=it: tokens(s, T, E, 2, torch.bfloat16, seed=500 + it)  # noqa: E731
        _check_round_trip(ep, rank, world, make, False, f"call {it} (T={T})")
    ep.check()
    ep.close()


def _gpu_pair(E, k, precision, dtype=torch.bfloat16):
    """A single-GPU MoELayer and a P2P (shared-device) EP layer with the same weights."""
    from moe_kernels import MoELayer

    dev = _gpu()
    torch.manual_seed(4321)
    ref = MoELayer(2 * H, 2 * I, E, top_k=k, precision=precision, device=dev, dtype=dtype)
    layer = MoELayer(2 * H, 2 * I, E, top_k=k, precision=precision, device=dev, dtype=dtype)
    layer.gate.load_state_dict(ref.gate.state_dict())
    layer.ep_group, layer._ep = dist.group.WORLD, _p2p(E, hidden_size=2 * H)
    layer.experts = layer._ep.shard_experts(ref.experts)
    return ref, layer


def gpu_check_layer(rank, world):
    """The EP MoELayer on the P2P backend (two pipelined micro-batches) equals the single-GPU layer on the same
    weights and every rank's tokens (bf16 and fp8 experts; E > G and E < G)."""
    dev = _gpu()
    for precision, E in (("bf16", 2 * world), ("bf16", max(1, world // 2)), ("fp8", 2 * world)):
        ref, layer = _gpu_pair(E, min(2, E), precision)
        make_x = lambda s: torch.randn(97 + 31 * s, 2 * H, generator=_gen(s)).bfloat16().to(dev)  # noqa: E731
        with torch.no_grad():
            out, want = layer(make_x(rank)), _reference_out(ref, make_x, rank, world)
        err = _rel(out, want)
        expect(bool(torch.isfinite(out.float()).all()) and err < 2e-2, f"{precision} E={E}: relative error {err:.2e}")
        layer._ep.close()


def gpu_check_layer_gradients(rank, world):
    """Training through the P2P backend (bf16 experts): the tokens', the local experts' and the summed gate
    gradients equal the single-GPU layer's on every rank's tokens at once."""
    dev = _gpu()
    for E in (2 * world, max(1, world // 2)):
        ref, layer = _gpu_pair(E, min(2, E), "bf16", dtype=None)
        make_x = lambda s: torch.randn(61 + 17 * s, 2 * H, generator=_gen(s)).bfloat16().to(dev)  # noqa: E731
        make_g = lambda s: torch.randn(61 + 17 * s, 2 * H, generator=_gen(1000 + s)).to(dev)  # noqa: E731
        x = make_x(rank).requires_grad_()
        (layer(x).float() * make_g(rank)).sum().backward()
        xs = [make_x(s).requires_grad_() for s in range(world)]
        (ref(torch.cat(xs)).float() * torch.cat([make_g(s) for s in range(world)])).sum().backward()
        err = _rel(x.grad, xs[rank].grad)
        expect(err < 3e-2, f"E={E}: x.grad relative error {err:.2e}")
        if layer.experts is not None:
            idx = torch.tensor(layer._ep.local_experts, device=dev)
            for name in ("w13", "w2"):
                err = _rel(getattr(layer.experts, name).grad, getattr(ref.experts, name).grad[idx])
                expect(err < 3e-2, f"E={E}: local experts' {name}.grad relative error {err:.2e}")
        g = layer.gate.weight.grad.detach().cpu()
        dist.all_reduce(g)
        err = _rel(g, ref.gate.weight.grad.cpu())
        expect(err < 3e-2, f"E={E}: summed gate gradient relative error {err:.2e}")
        layer._ep.close()


def gpu_check_timeout(rank, world):
    """The last rank never runs its combine: every other rank's P2P kernel gives up after the timeout and
    check() raises TimeoutError naming that rank (and keeps raising: the buffers are unusable)."""
    E, late = 2 * world, world - 1
    ep = _p2p(E, timeout=2.0)
    x, ids, w = (t.to(_gpu()) for t in tokens(rank, 32, E, 2))
    d = ep.dispatch(x, ids, w)
    if rank != late:
        ep.combine(d.x, d, async_op=True)
        try:
            ep.check()
            expect(False, "check() did not raise although a rank never sent its partial sums")
        except TimeoutError as e:
            expect(f"rank {late} never delivered" in str(e), f"the timeout does not name rank {late}: {e}")
        try:  # the error sticks: the buffers are unusable (no collective here: the late rank is elsewhere)
            ep._p2p.check()
            expect(False, "a second check() after the timeout did not raise")
        except TimeoutError:
            pass
    dist.barrier()
    ep.close()


def gpu_check_soak(rank, world):
    """Dispatch + combine SOAK_ITERS times with a changing number of tokens and routing: every result right
    (checked on the device, read every 50 calls), torch.cuda.memory_allocated() flat after the warm-up."""
    dev = _gpu()
    E, k, iters = 2 * world, 2, SOAK_ITERS[world]
    ep = _p2p(E, buffer_tokens=48 * world * 2)
    gen = torch.Generator().manual_seed(77 + rank)  # sizes differ between ranks and calls
    worst = torch.zeros((), device=dev)
    base = peak = None
    for it in range(iters):
        T = int(torch.randint(0, 49, (1,), generator=gen))
        x, ids, w = (t.to(dev) for t in tokens(rank, T, E, k, torch.bfloat16, seed=it))
        d = ep.dispatch(x, ids, w)
        out = ep.combine(d.x, d)
        if T:
            ref = w.sum(1, keepdim=True) * x.float()
            worst = torch.maximum(worst, ((out.float() - ref).abs().max() / ref.abs().max()).nan_to_num(1e9))
        del x, ids, w, d, out
        if it % 50 == 49:
            expect(float(worst) < 1e-2, f"call {it}: relative error {float(worst):.2e}")
            worst.zero_()
        mem = torch.cuda.memory_allocated(dev)
        if it == 49:
            base = peak = mem
        elif it > 49:
            peak = max(peak, mem)
    ep.check()
    growth = peak - base
    expect(growth <= 1 << 20, f"memory_allocated grew by {growth} bytes after the warm-up ({base} -> {peak})")
    ep.close()
    if rank == 0:
        print(f"[soak] world {world}: {iters} calls, memory_allocated {base} -> peak {peak} bytes", flush=True)


def _p2p_ll_available() -> bool:
    """The extension has the low-latency kernels (an older build may not)."""
    try:
        torch.ops.moe_kernels_C.p2p_ll_bytes  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _ll(E, k, fp8=True, max_tokens=64, hidden=2 * H, **kw):
    from moe_kernels.dist import LowLatencyEP

    return LowLatencyEP(None, E, max_tokens, hidden, k, fp8=fp8, allow_shared_device=True, timeout=GPU_TIMEOUT, **kw)


def _ll_identity(d):
    """Identity experts on the masked layout: the received rows (dequantised) as bf16 outputs."""
    if d.scale is None:
        return d.x.clone()
    L, RN, Hh = d.x.shape
    return (d.x.float().view(L, RN, Hh // 128, 128) * d.scale[..., None]).view(L, RN, Hh).bfloat16()


def _ll_expected(x, ids, w, fp8):
    """What an identity-expert round trip returns: sum_j w_j bf16(row_t) over valid slots (fp32, then bf16), the
    row quantised as the sender does (ops.quantize_fp8) and dequantised as ``_ll_identity`` does."""
    import moe_kernels as mk

    if fp8:
        q, sc = mk.ops.quantize_fp8(x)
        y = (q.float().view(x.shape[0], -1, 128) * sc[..., None]).view(x.shape).bfloat16()
    else:
        y = x
    return ((w * (ids >= 0)).sum(1, keepdim=True) * y.float()).bfloat16()


def gpu_check_ll_round_trip(rank, world):
    """Low-latency mode, fp8 and bf16 rows, k = 1/2/4, E < G, E = G, E > G, two micro-batches in flight: the masked
    layout holds exactly the rows the normal mode delivers (same order, bitwise; counts on the device), and the
    combine equals the normal mode's (top-1 with identity experts: bitwise x's quantisation round trip)."""
    for E in expert_counts(world):
        for k in sorted({1, min(2, E), min(4, E)}):
            for fp8 in (True, False):
                ll_round_trip_case(rank, world, E, k, fp8)


def ll_round_trip_case(rank, world, E, k, fp8, seed=0):
    """One LowLatencyEP, two micro-batches in flight (rank 0 sends nothing in the second), checked as
    ``gpu_check_ll_round_trip`` says (also run under compute-sanitizer by tests/_sanitize_ops.py)."""
    import moe_kernels as mk

    dev = _gpu()
    ll = _ll(E, k, fp8, hidden=H)
    ctx = f"E={E} k={k} fp8={fp8}"
    makes = [lambda s, mb=mb: tokens(s, 0 if (mb == 1 and s == 0) else 20 + 9 * s + 5 * mb, E, k,
                                     torch.bfloat16, seed=31 * mb + E + k + seed) for mb in range(2)]
    data = [[t.to(dev) for t in make(rank)] for make in makes]
    pend = [ll.dispatch(x, ids) for x, ids, _ in data]  # both micro-batches in flight
    got = [p.recv() for p in pend]
    outs = [ll.combine(_ll_identity(d), d, w, ids) for d, (x, ids, w) in zip(got, data)]
    outs = [o.wait() for o in outs]
    ll.check()
    for mb, (d, out, make, (x, ids, w)) in enumerate(zip(got, outs, makes, data)):
        want_x, _, counts = expected_rows(rank, world, ll.placement, make)
        expect(d.count.tolist() == counts, f"{ctx} mb {mb}: counts {d.count.tolist()} != {counts}")
        rows = torch.cat([d.x[j, :c] for j, c in enumerate(counts)]) if counts else d.x[:0, 0]
        if fp8 and want_x.shape[0]:
            q, sc = mk.ops.quantize_fp8(want_x.to(dev))
            got_sc = torch.cat([d.scale[j, :c] for j, c in enumerate(counts)])
            expect(torch.equal(bits(rows), bits(q)) and torch.equal(got_sc, sc), f"{ctx} mb {mb}: rows differ")
        elif want_x.shape[0]:
            expect(torch.equal(bits(rows), bits(want_x.to(dev))), f"{ctx} mb {mb}: rows differ")
        if x.shape[0]:
            want = _ll_expected(x, ids, w, fp8)
            ok = torch.equal(out, want) if k == 1 else _rel(out, want) < 8e-3
            expect(ok, f"{ctx} mb {mb}: combine error {_rel(out, want):.2e}")
    ll.close()


def gpu_check_ll_graph(rank, world):
    """One decoding step (dispatch, identity experts, combine) captured in a CUDA graph once and replayed 100 times
    with new tokens and routing copied into its inputs: every replay's output right."""
    dev = _gpu()
    E, k, T = 2 * world, 2, 24
    ll = _ll(E, k, max_tokens=32)
    x_s = torch.zeros(T, 2 * H, dtype=torch.bfloat16, device=dev)
    ids_s = torch.zeros(T, k, dtype=torch.int32, device=dev)
    w_s = torch.zeros(T, k, dtype=torch.float32, device=dev)

    def step():
        d = ll.dispatch(x_s, ids_s).recv()
        return ll.combine(_ll_identity(d), d, w_s, ids_s).wait()

    def load(i):
        x, ids, w = tokens(rank, T, E, k, torch.bfloat16, seed=7000 + i)
        x = torch.cat([x, x], 1)  # hidden 2H
        if i % 3 == 1:
            ids[::4, 1] = -1  # some unused slots too
        x_s.copy_(x.to(dev))
        ids_s.copy_(ids.to(dev))
        w_s.copy_(w.to(dev))
        return x, ids, w

    load(-1)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up (compiles the quantisation kernel) outside the graph
        step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_s = step()
    worst = 0.0
    for i in range(100):
        x, ids, w = load(i)
        graph.replay()
        want = _ll_expected(x.to(dev), ids.to(dev), w.to(dev), True)
        worst = max(worst, _rel(out_s, want))
    ll.check()
    expect(worst < 8e-3, f"graph replays: worst relative error {worst:.2e}")
    ll.close()


def gpu_check_ll_overflow(rank, world):
    """More tokens than max_tokens_per_rank raises ValueError on the calling rank before anything is sent; the
    object stays usable (the next call on every rank is right)."""
    dev = _gpu()
    E, k = 2 * world, 2
    ll = _ll(E, k, max_tokens=16)
    x, ids, w = (t.to(dev) for t in tokens(rank, 17, E, k, torch.bfloat16))
    x = torch.cat([x, x], 1)
    try:
        ll.dispatch(x, ids)
        expect(False, "17 tokens with max_tokens_per_rank=16 did not raise")
    except ValueError as e:
        expect("max_tokens_per_rank=16" in str(e) and "nothing was sent" in str(e), str(e))
    x, ids, w = x[:16], ids[:16], w[:16]
    d = ll.dispatch(x, ids).recv()
    out = ll.combine(_ll_identity(d), d, w, ids).wait()
    ll.check()
    expect(_rel(out, _ll_expected(x, ids, w, True)) < 8e-3, "the call after a refused one is wrong")
    ll.close()


def gpu_check_ll_layer(rank, world):
    """The EP MoELayer with the low-latency mode enabled (FP8 experts, inference: dispatch, masked FP8 expert MLP,
    combine) equals the single-GPU layer and the normal mode (E > G and E < G); then one forward captured in a CUDA
    graph and replayed with new tokens (routing changes with them) stays equal."""
    from moe_kernels.dist import enable_low_latency

    dev = _gpu()
    for E in (2 * world, max(1, world // 2)):
        ref, layer = _gpu_pair(E, min(2, E), "fp8")
        def make_x(s, salt=0):
            return torch.randn(40 + 11 * s, 2 * H, generator=_gen(s + salt)).bfloat16().to(dev)
        with torch.no_grad():
            normal = layer(make_x(rank))  # the normal mode, before the switch
            enable_low_latency(layer, max_tokens_per_rank=96)
            out, want = layer(make_x(rank)), _reference_out(ref, make_x, rank, world)
        err = _rel(out, want)
        expect(bool(torch.isfinite(out.float()).all()) and err < 3e-2, f"E={E}: relative error {err:.2e}")
        expect(_rel(out, normal) < 3e-2, f"E={E}: low-latency vs normal mode: {_rel(out, normal):.2e}")
        if E == 2 * world:
            x_s = make_x(rank).clone()
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad():
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    layer(x_s)
                torch.cuda.current_stream(dev).wait_stream(side)
                with torch.cuda.graph(graph):
                    out_s = layer(x_s)
                worst = 0.0
                for i in range(10):
                    x_s.copy_(make_x(rank, 100 * (i + 1)))
                    graph.replay()
                    want = _reference_out(ref, lambda s, i=i: make_x(s, 100 * (i + 1)), rank, world)
                    worst = max(worst, _rel(out_s, want))
            expect(worst < 3e-2, f"E={E}: CUDA-graph replays, worst relative error {worst:.2e}")
        layer._ep.close()


GPU_CHECKS = {  # the most telling first: a run cut short by its deadline keeps the checks it finished
    "round_trip": gpu_check_round_trip,
    "stale": gpu_check_stale,
    "ll_round_trip": gpu_check_ll_round_trip,
    "ll_graph": gpu_check_ll_graph,
    "ll_overflow": gpu_check_ll_overflow,
    "layer": gpu_check_layer,
    "ll_layer": gpu_check_ll_layer,
    "layer_gradients": gpu_check_layer_gradients,
    "soak": gpu_check_soak,
    "timeout": gpu_check_timeout,  # last: it leaves every rank's buffers unusable
}


def run(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    """Entry of a CPU process: gloo through a file, the checks of ``CHECKS``."""
    os.environ["TRITON_INTERPRET"] = "0"  # CPU tensors take the reference ops (fast); kernels are tested elsewhere
    torch.set_num_threads(1)
    _run_checks(CHECKS, f"file://{init_file}", rank, world, out_dir, names)


def run_gpu(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    """Entry of a process sharing GPU 0 with its peers: gloo over 127.0.0.1:port, the checks of ``GPU_CHECKS``."""
    torch.cuda.set_device(0)
    _run_checks(GPU_CHECKS, f"tcp://127.0.0.1:{port}", rank, world, out_dir, names)


def _run_checks(table: dict, init_method: str, rank: int, world: int, out_dir: str, names: list[str]) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name in names:
            _problems.clear()
            t0 = time.perf_counter()
            try:
                table[name](rank, world)
                if _problems:
                    raise AssertionError("\n".join(_problems))
                results[name] = "ok"
            except Exception:  # noqa: BLE001 (reported per check by the parent)
                results[name] = traceback.format_exc()
            results.setdefault("_seconds", {})[name] = round(time.perf_counter() - t0, 2)
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def failure(results: dict, check: str) -> str | None:
    """None when every rank reported ``check`` ok, else a message with the first failing rank's traceback."""
    failed = {r: res.get(check, "did not run (an earlier check killed the process?)")
              for r, res in results.items() if res.get(check) != "ok"}
    if not failed:
        return None
    r, tb = next(iter(failed.items()))
    return f"{check} failed on ranks {sorted(failed)} (world size {len(results)}); rank {r}:\n{tb}"


def spawn_world(entry, args: tuple, world: int, out_dir, names: list[str], start_method: str,
                deadline_s: float) -> dict:
    """Start ``world`` processes running ``entry(rank, *args)`` (which writes out_dir/rank<r>.json), wait at most
    ``deadline_s`` (then kill them: a hang fails the checks instead of blocking the suite), and return
    {rank: {check: "ok" | traceback}}: every check a process did not report carries the reason."""
    t0 = time.perf_counter()
    err = None
    ctx = torch.multiprocessing.start_processes(entry, args=args, nprocs=world, start_method=start_method,
                                                join=False)
    try:
        while not ctx.join(timeout=5):
            if time.perf_counter() - t0 > deadline_s:
                err = f"the worker processes did not finish within {deadline_s:g} s (killed)"
                for p in ctx.processes:  # only the processes started here
                    if p.is_alive():
                        p.kill()
                break
    except Exception as e:  # noqa: BLE001 (a crashed process: every unfinished check reports it)
        err = f"the worker processes failed: {e}"
    results = {}
    for r in range(world):
        path = os.path.join(str(out_dir), f"rank{r}.json")
        results[r] = json.load(open(path)) if os.path.exists(path) else {}
        if err:
            results[r] = {c: results[r].get(c, err) for c in names}
    print(f"\n[{entry.__name__}] world size {world}: {time.perf_counter() - t0:.1f} s for {len(names)} checks")
    return results
