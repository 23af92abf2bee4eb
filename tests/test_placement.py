"""place_experts: the rules of the method, the objective, the errors, and replica routing."""
import numpy as np
import pytest
import torch

from moe_kernels.dist import Placement, evaluate, place_experts, replica_rank
from moe_kernels.dist.place import Topology


def zipf_tokens(E, k, n, seed=0, s=1.0):
    rng = np.random.default_rng(seed)
    logp = -s * np.log(rng.permutation(E) + 1.0)
    g = logp[None, :] + rng.gumbel(size=(n, E))
    ids = np.argpartition(-g, k, axis=1)[:, :k]
    load = np.bincount(ids.ravel(), minlength=E).astype(float)
    onehot = np.zeros((n, E))
    np.put_along_axis(onehot, ids, 1.0, axis=1)
    co = onehot.T @ onehot
    np.fill_diagonal(co, 0)
    return ids, load, co


def test_e_le_g_one_expert_per_gpu_and_replicas_on_spares():
    _, load, co = zipf_tokens(12, 2, 4000)
    p = place_experts(12, 16, 8, load=load, coactivation=co, top_k=2)
    held = [p.slots_of(r) for r in range(16)]
    assert all(len(h) == 1 for h in held), held  # every GPU holds exactly one expert copy
    assert sorted(set(e for h in held for e in h)) == list(range(12))
    hottest = int(np.argmax(load))
    assert len(p.copies(hottest)) >= 2  # the 4 spare GPUs went to hot experts
    for e in range(12):
        assert abs(sum(w for _, w in p.copies(e)) - 1) < 1e-9
    assert p.report()["replicated_experts"] >= 1


def test_e_gt_g_memory_balanced_and_search_never_worse():
    _, load, co = zipf_tokens(64, 4, 6000)
    p = place_experts(64, 16, 8, load=load, coactivation=co, top_k=4)
    assert {len(p.slots_of(r)) for r in range(16)} == {4}  # equal memory per GPU
    st = p.report()
    assert st["max_link_us"] <= st["start_max_link_us"] + 1e-9
    assert st["max_over_mean_gpu_load"] <= max(1.02, st["start_max_over_mean_gpu_load"]) + 1e-9
    rr = Placement(tuple(e % 16 for e in range(64)), 16)
    assert evaluate(p, load, co, Topology(16, 8))["max_link_us"] <= evaluate(rr, load, co, Topology(16, 8))[
        "max_link_us"]


def test_deterministic():
    _, load, co = zipf_tokens(32, 2, 3000)
    a = place_experts(32, 16, 8, load=load, coactivation=co, redundant_experts=16)
    b = place_experts(32, 16, 8, load=load, coactivation=co, redundant_experts=16)
    assert a.replicas == b.replicas and a.expert_to_rank == b.expert_to_rank


def test_memory_and_bad_inputs():
    with pytest.raises(ValueError, match="gpu_memory"):
        place_experts(64, 8, 8, gpu_memory=7e9, expert_bytes=1e9)  # 8 experts of 1 GB per GPU
    with pytest.raises(ValueError, match="load"):
        place_experts(8, 4, 4, load=np.ones(7))
    with pytest.raises(ValueError, match="load"):
        place_experts(8, 4, 4, load=-np.ones(8))
    with pytest.raises(ValueError, match="gpus_per_node"):
        place_experts(8, 12, 8)
    with pytest.raises(ValueError, match="coactivation"):
        place_experts(8, 4, 4, coactivation=np.ones((8, 7)))
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        place_experts(10, 4, 4)
    with pytest.raises(ValueError, match="link_bandwidth"):
        place_experts(8, 4, 4, link_bandwidth=np.ones((3, 3)))
    with pytest.raises(ValueError, match="top_k"):
        place_experts(8, 4, 4, top_k=9)


def test_link_matrix_model_runs_and_prefers_fast_links():
    G = 8
    bw = np.full((G, G), 400.0)
    bw[:, 7] = 10.0  # GPU 7 is reached only over a slow link: the cold experts should go there
    _, load, co = zipf_tokens(16, 2, 3000, s=1.5)
    p = place_experts(16, G, 8, load=load, coactivation=co, link_bandwidth=bw, balance_slack=1.0)
    per_gpu = [sum(load[e] for e in p.slots_of(r)) for r in range(G)]
    assert per_gpu[7] <= np.median(per_gpu), per_gpu  # the slow GPU ends up with less traffic than most
    assert p.report()["model"] == "matrix"


def test_replica_rank_follows_shares():
    p = Placement((0, 1, 2), 4, replicas=(((0, 0.25), (3, 0.75)), ((1, 1.0),), ((2, 0.5), (3, 0.5))))
    ids = torch.tensor([[0, 2]] * 4000 + [[1, -1]] * 10)
    r = replica_rank(p, ids)
    first = r[:4000, 0]
    assert set(first.tolist()) <= {0, 3} and abs((first == 3).float().mean().item() - 0.75) < 0.02
    assert abs((r[:4000, 1] == 3).float().mean().item() - 0.5) < 0.02
    assert (r[4000:, 0] == 1).all() and (r[4000:, 1] == -1).all()
    assert torch.equal(replica_rank(p, ids), r)  # deterministic


def test_placement_replicas_validated():
    with pytest.raises(ValueError, match="primary"):
        Placement((0, 1), 2, replicas=(((1, 1.0),), ((1, 1.0),)))
    with pytest.raises(ValueError, match="sum to 1"):
        Placement((0, 1), 2, replicas=(((0, 0.5),), ((1, 1.0),)))
    with pytest.raises(ValueError, match="distinct"):
        Placement((0, 1), 2, replicas=(((0, 0.5), (0, 0.5)), ((1, 1.0),)))
