"""place_experts: the rules of the method, the objective and its search, the model, the errors, replica routing."""
import numpy as np
import pytest
import torch

from moe_kernels.dist import Placement, default_placement, evaluate, place_experts, replica_rank
from moe_kernels.dist.place import Topology, copies_for, routing_stats
from moe_kernels.dist.placement import copy_placement, replica_index


def tokens(E, k, n, seed=0, s=1.0, groups=0, boost=2.0):
    """ids [n, k]: Zipf(s) popularity (ranks shuffled), and with ``groups`` a per-token topic group of experts
    boosted x e^boost (co-activation)."""
    rng = np.random.default_rng(seed)
    logits = np.broadcast_to(-s * np.log(rng.permutation(E) + 1.0), (n, E))
    if groups:
        topic = rng.integers(groups, size=n)
        logits = logits + boost * (np.arange(E)[None, :] * groups // E == topic[:, None])
    return np.argpartition(-(logits + rng.gumbel(size=(n, E))), k, axis=1)[:, :k]


def stats(E, k, n, **kw):
    return routing_stats(tokens(E, k, n, **kw), E)


def held(p, r):
    return p.slots_of(r)


# ---- the rules -----------------------------------------------------------------------------------------------------
def test_e_le_g_one_expert_per_gpu_replicas_of_the_hottest_on_spares():
    load, co = stats(12, 2, 4000, s=1.2)
    p = place_experts(12, 16, 8, load=load, coactivation=co, top_k=2)
    assert all(len(held(p, r)) == 1 for r in range(16))  # every GPU: exactly one copy (spares hold replicas)
    assert sorted({e for r in range(16) for e in held(p, r)}) == list(range(12))
    n = np.array([len(p.copies(e)) for e in range(12)])
    assert n.sum() == 16 and n[int(np.argmax(load))] >= 2
    # a replicated expert carries more per copy than any single-copy expert would with a second copy
    for e in np.flatnonzero(n > 1):
        assert load[e] / (n[e] - 1) >= load[n == 1].max() / 2 - 1e-9
    for e in range(12):
        shares = [w for _, w in p.copies(e)]
        assert abs(sum(shares) - 1) < 1e-9 and min(shares) > 0
        assert p.copies(e)[0] == (p.expert_to_rank[e], max(shares))  # the primary: the largest share, first
    assert p.report()["replicated_experts"] == int((n > 1).sum())


def test_e_le_g_fewer_replicas_leaves_gpus_empty():
    load, _ = stats(12, 2, 3000)
    p = place_experts(12, 16, 8, load=load, max_replicas=2)
    counts = [len(held(p, r)) for r in range(16)]
    assert sorted(counts) == [0, 0] + [1] * 14
    with pytest.raises(ValueError, match="max_replicas"):
        place_experts(12, 16, 8, load=load, max_replicas=5)


@pytest.mark.parametrize("E,G,R,want", [(64, 16, None, {4}), (64, 16, 16, {5}), (10, 4, None, {3}), (10, 4, 0, {2, 3}),
                                        (50, 16, 3, {3, 4})])
def test_e_gt_g_memory_balanced(E, G, R, want):
    load, co = stats(E, 2, 3000, s=0.8)
    p = place_experts(E, G, min(8, G), load=load, coactivation=co, max_replicas=R, expert_bytes=1e6, gpu_memory=1e7)
    counts = [len(held(p, r)) for r in range(G)]
    assert set(counts) == want and max(counts) - min(counts) <= 1
    assert p.report()["memory_per_gpu"] == [c * 1e6 for c in counts]
    assert sum(len(p.copies(e)) for e in range(E)) == E + (R if R is not None else (-E) % G)


def test_round_robin_start_and_balanced_start():
    load, _ = stats(64, 2, 3000, s=0.5)
    rr = place_experts(64, 16, 8, load=load, max_replicas=0, initial="round_robin", max_iters=0)
    assert rr.expert_to_rank == tuple(e % 16 for e in range(64)) and rr.replicas is None
    lpt = place_experts(64, 16, 8, load=load, max_replicas=0, max_iters=0)
    assert {len(held(lpt, r)) for r in range(16)} == {4}
    # the balanced start: the hottest 16 experts on 16 different GPUs, far better balanced than round-robin
    assert len({lpt.expert_to_rank[e] for e in np.argsort(-load)[:16]}) == 16
    assert lpt.report()["max_over_mean"] < 0.8 * rr.report()["max_over_mean"]


# ---- the objective and the search -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,initial,groups,s", [(0, "lpt", 2, 0.5), (1, "lpt", 0, 1.0), (2, "round_robin", 4, 0.8),
                                                    (2, "lpt", 4, 0.8)])
def test_search_never_worse_than_its_start(seed, initial, groups, s):
    load, co = stats(48, 4, 3000, seed=seed, s=s, groups=groups, boost=4.0)
    p = place_experts(48, 16, 8, load=load, coactivation=co, top_k=4, max_replicas=16, initial=initial)
    st = p.report()
    assert st["max_link_us"] <= st["start_max_link_us"] * (1 + 1e-9)
    assert st["max_gpu_load"] <= st["cap_gpu_load"] * (1 + 1e-9)  # never above the balanced start's largest
    trace = st["search_trace"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(trace, trace[1:]))  # each accepted move lowers the norm
    again = evaluate(p, load, co, Topology(16, 8), top_k=4)  # the report is the model's figure of the plan
    assert again["max_link_us"] == pytest.approx(st["max_link_us"], rel=1e-9)
    assert again["max_over_mean"] == pytest.approx(st["max_over_mean"], rel=1e-9)


def test_plan_ends_flatter_than_its_start():
    """With replicas the traffic shares let the plan balance better than the balanced start (the final polish)."""
    load, co = stats(64, 2, 4000, s=1.0)
    st = place_experts(64, 16, 8, load=load, coactivation=co, max_replicas=16).report()
    assert st["max_over_mean"] - 1 <= 0.5 * (st["start_max_over_mean"] - 1)


def test_search_uses_coactivation():
    """2 groups of co-activated experts (interleaved ids) on 2 nodes: the plan must cut the busiest InfiniBand link
    well below a co-activation-blind plan's (round-robin; the balanced start), at their balance or better."""
    ids = tokens(32, 4, 4000, s=0.3, groups=2, boost=4.0)
    ids = (ids % 16) * 2 + ids // 16  # group members interleaved: round-robin splits every group over both nodes
    load, co = routing_stats(ids, 32)
    p = place_experts(32, 16, 8, load=load, coactivation=co, top_k=4, max_replicas=0)
    blind = place_experts(32, 16, 8, load=load, top_k=4, max_replicas=0, max_iters=0)
    rr = evaluate(Placement(tuple(e % 16 for e in range(32)), 16), load, co, Topology(16, 8), top_k=4)
    for base in (rr, evaluate(blind, load, co, Topology(16, 8), top_k=4)):
        assert p.report()["max_link_us"] < 0.8 * base["max_link_us"]
        assert p.report()["max_over_mean"] <= base["max_over_mean"] + 1e-9


def test_slow_link_in_matrix_model_gets_the_least_traffic():
    G = 8
    bw = np.full((G, G), 400.0)
    bw[:, 7] = 20.0  # GPU 7 is reached only over slow links
    load, co = stats(16, 2, 3000, s=1.2)
    p = place_experts(16, G, 8, load=load, coactivation=co, link_bandwidth=bw, balance_slack=1.0, max_replicas=0)
    per_gpu = p.report()["gpu_load"]
    assert per_gpu[7] == min(per_gpu) and p.report()["model"] == "matrix"


def test_deterministic():
    load, co = stats(32, 2, 3000)
    a = place_experts(32, 16, 8, load=load, coactivation=co, max_replicas=16)
    b = place_experts(32, 16, 8, load=torch.tensor(load), coactivation=torch.tensor(co), max_replicas=16)
    assert a.replicas == b.replicas and a.expert_to_rank == b.expert_to_rank and a.fingerprint() == b.fingerprint()


def test_plan_256_experts_on_256_gpus_is_fast():
    import time

    load, co = stats(256, 8, 4000)
    t0 = time.perf_counter()
    p = place_experts(256, 256, 8, load=load, coactivation=co, top_k=8)
    assert time.perf_counter() - t0 < 5.0
    assert sorted(p.expert_to_rank) == list(range(256))  # one expert per GPU


# ---- the model -------------------------------------------------------------------------------------------------------
def test_model_counts_distinct_tokens_exactly_for_pairs():
    """Two experts per GPU, one node: the model's NVLink tokens of a GPU are (g-1)/G x the tokens choosing either
    of its experts, which the pairwise formula gives exactly."""
    E, G, k = 16, 8, 3
    ids = tokens(E, k, 5000, seed=3, groups=2)
    load, co = routing_stats(ids, E)
    p = Placement(tuple(e // 2 for e in range(E)), G)
    got = evaluate(p, load, co, Topology(G, G), top_k=k)
    hit = np.zeros((len(ids), G), dtype=bool)
    hit[np.arange(len(ids))[:, None], ids // 2] = True
    assert got["max_nvlink_tokens"] == pytest.approx(hit.sum(0).max() * (G - 1) / G, rel=1e-9)
    assert got["gpu_load"] == pytest.approx(np.bincount(ids.ravel() // 2, minlength=G).tolist())


def test_tokens_rescale_the_loads():
    load, co = stats(32, 2, 3000)
    p = place_experts(32, 16, 8, load=load, coactivation=co, top_k=2, tokens=1000)
    assert p.report()["mean_gpu_load"] == pytest.approx(1000 * 2 / 16)
    assert p.report()["max_link_load"] <= 1000


def test_routing_stats():
    ids = np.array([[0, 1], [1, 2], [0, 1], [3, -1]])
    load, co = routing_stats(ids, 4)
    assert load.tolist() == [2, 3, 1, 1]
    assert co[0, 1] == co[1, 0] == 2 and co[1, 2] == 1 and co[3].sum() == 0 and np.trace(co) == 0
    with pytest.raises(ValueError, match="topk_ids"):
        routing_stats(np.array([[0, 4]]), 4)


# ---- errors ----------------------------------------------------------------------------------------------------------
def test_memory_overflow_names_the_argument():
    with pytest.raises(ValueError, match="gpu_memory"):
        place_experts(64, 8, 8, gpu_memory=7e9, expert_bytes=1e9)  # 8 experts of 1 GB per GPU
    with pytest.raises(ValueError, match="gpu_memory"):
        place_experts(64, 8, 8, gpu_memory=8e9, expert_bytes=1e9, max_replicas=1)  # one GPU would need 9
    place_experts(64, 8, 8, gpu_memory=8e9, expert_bytes=1e9)  # exactly fits
    with pytest.raises(ValueError, match="expert_bytes"):
        place_experts(64, 8, 8, gpu_memory=8e9)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(load=np.ones(7)), ValueError, "load"),
    (dict(load=-np.ones(8)), ValueError, "load"),
    (dict(load=[1.0] * 7 + [float("nan")]), ValueError, "load"),
    (dict(load=["x"] * 8), TypeError, "load"),
    (dict(coactivation=np.ones((8, 7))), ValueError, "coactivation"),
    (dict(coactivation=-np.ones((8, 8))), ValueError, "coactivation"),
    (dict(link_bandwidth=np.ones((3, 3))), ValueError, "link_bandwidth"),
    (dict(link_bandwidth=(450.0, 0.0)), ValueError, "link_bandwidth"),
    (dict(link_latency=-1.0), ValueError, "link_latency"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(max_replicas=-1), ValueError, "max_replicas"),
    (dict(tokens=0), ValueError, "tokens"),
    (dict(initial="random"), ValueError, "initial"),
    (dict(balance_slack=-0.1), ValueError, "balance_slack"),
])
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        place_experts(8, 4, 4, **kwargs)


def test_bad_topology():
    with pytest.raises(ValueError, match="gpus_per_node"):
        place_experts(8, 12, 8)
    with pytest.raises(TypeError, match="num_gpus"):
        place_experts(8, 4.0, 4)
    with pytest.raises(ValueError, match="num_experts"):
        place_experts(0, 4, 4)


# ---- replica routing ---------------------------------------------------------------------------------------------
def test_replica_rank_follows_the_shares():
    load, co = stats(24, 2, 6000, s=1.2)
    p = place_experts(24, 32, 8, load=load, coactivation=co)
    assert p.replicas is not None and any(len({round(w, 6) for _, w in p.copies(e)}) > 1 for e in range(24)), \
        "the search should have made some shares uneven"
    ids = torch.from_numpy(tokens(24, 2, 20000, seed=9, s=1.2))
    dest = replica_rank(p, ids)
    for e in range(24):
        got = dest[ids == e]
        ranks = [r for r, _ in p.copies(e)]
        assert set(got.tolist()) <= set(ranks)  # every pair goes to a GPU holding the expert
        for r, w in p.copies(e):
            assert abs((got == r).sum().item() - w * len(got)) <= 2.5, (e, r, w, len(got))
    assert torch.equal(replica_rank(p, ids), dest)  # deterministic


def test_replica_rank_few_pairs_per_rank():
    """64 ranks each with one pair of an expert with copies 0.25 / 0.75: the rank offset spreads them by share."""
    p = Placement((3, 1), 4, replicas=(((3, 0.75), (0, 0.25)), ((1, 1.0),)))
    to3 = sum(int(replica_rank(p, torch.tensor([[0, 1]]), rank=r)[0, 0] == 3) for r in range(64))
    assert abs(to3 - 48) <= 2
    ids = torch.tensor([[0, 1], [1, -1], [-1, 0]])
    r = replica_rank(p, ids, rank=5)
    assert r[0, 1] == 1 and r[1, 1] == -1 and r[2, 0] == -1 and r[0, 0] in (0, 3) and r[2, 1] in (0, 3)
    assert torch.equal(replica_index(p, ids, rank=5) >= 0, ids >= 0)


def test_copy_placement_of_a_plan():
    load, _ = stats(12, 2, 3000, s=1.2)
    p = place_experts(12, 16, 8, load=load)
    slots, expert_of, first = copy_placement(p)
    assert slots.num_experts == 16 and sorted(slots.expert_to_rank) == list(range(16))
    assert all(expert_of[first[e] + i] == e for e in range(12) for i in range(len(p.copies(e))))


# ---- Placement ----------------------------------------------------------------------------------------------------
def test_placement_report_and_metrics():
    q = default_placement(8, 4)
    assert q.report()["max_over_mean"] == 1.0 and q.report()["copies_per_gpu"] == [2, 2, 2, 2]
    m = q.metrics([8, 0, 1, 1, 1, 1, 1, 1], gpus_per_node=2)
    assert m["max_over_mean"] == pytest.approx(8 / 3.5) and m["max_gpu_load"] == 8
    assert copies_for(np.array([10.0, 1.0, 1.0]), 5).tolist() == [3, 1, 1]
    assert q.loads([1, 2, 3, 4, 5, 6, 7, 8]) == [3, 7, 11, 15]
    r = Placement((0, 1), 3, replicas=(((0, 0.75), (2, 0.25)), ((1, 1.0),)))
    assert r.loads([8, 2]) == [6.0, 2.0, 2.0]
    load, co = stats(24, 2, 3000, s=1.2)
    p = place_experts(24, 32, 8, load=load, coactivation=co)
    assert p.loads(load) == pytest.approx(p.report()["gpu_load"])  # the plan's GPU loads, shares included


def test_placement_replicas_validated():
    with pytest.raises(ValueError, match="primary"):
        Placement((0, 1), 2, replicas=(((1, 1.0),), ((1, 1.0),)))
    with pytest.raises(ValueError, match="sum to 1"):
        Placement((0, 1), 2, replicas=(((0, 0.5),), ((1, 1.0),)))
    with pytest.raises(ValueError, match="distinct"):
        Placement((0, 1), 2, replicas=(((0, 0.5), (0, 0.5)), ((1, 1.0),)))
