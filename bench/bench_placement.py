"""Expert placement: ``mk.dist.place_experts`` against round-robin, greedy packing and the EPLB policy (CPU only).

    python bench/bench_placement.py [--tokens 32768] [--quick]

E=256 experts, G in {16, 64, 256} GPUs, 8 GPUs per node, top-2 and top-8. Loads:
  * ``zipf``: expert popularity p_e ~ 1 / rank^1.0 (ranks shuffled over the experts), each token draws its k
    distinct experts with probabilities p (Gumbel top-k): skew, but co-activation only through popularity.
  * ``clustered``: 8 groups of 32 experts (DeepSeek-V3's n_group), lognormal popularity; each token has a topic
    group (lognormal popularity too) whose experts get a x e^2 boost: skewed *and* co-activated, like real
    routers whose experts specialise.
Each policy plans from one sample of tokens (per-expert counts and co-activation counts) and is scored EXACTLY on a
fresh sample of the same distribution (not on the model's estimate): tokens homed round-robin on the GPUs, each
sent once per destination GPU (NVLink ingress of that GPU when the home is in the same node) and once per
destination node (InfiniBand ingress of that node when the home is elsewhere); 7168 bytes per token, NVLink
450 GB/s per GPU, InfiniBand 50 GB/s per GPU (400 GB/s a node). A replica is chosen per (token, expert) pair with
``replica_rank``'s rule, the same for every policy.

Policies (equal memory: the same copies per GPU for the replicating ones; E <= G means one expert per GPU):
  * ``round_robin``: expert e on GPU e % G, no replicas.
  * ``greedy``: longest-processing-time packing (hottest expert to the least loaded GPU with a free slot), no
    replicas.
  * ``eplb``: DeepSeek's EPLB idea, re-implemented here: replicate the experts with the most load per copy, then
    hierarchical (pack the 8 expert groups onto nodes by load, replicate and pack inside each node) when the
    groups divide over the nodes, else global (replicate, pack over all GPUs).
  * ``ours``: ``place_experts`` (same replicas, balanced start, link-aware local search with co-activation).
Reports, per case and policy: max GPU load / mean, the busiest link's tokens and time, and whether ours is no worse
on max GPU load (within 1%) and better on max link time than EPLB.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import markdown, write_json  # noqa: E402

import torch  # noqa: E402

from moe_kernels.dist import Placement, place_experts, replica_rank  # noqa: E402
from moe_kernels.dist.place import copies_for  # noqa: E402

E, GPN, GROUPS, BYTES = 256, 8, 8, 7168
NV_GBPS, IB_GBPS = 450.0, 50.0


def sample(kind, k, n, seed, pop_seed=1):
    """ids [n, k] of n tokens drawn from the distribution ``kind`` (its popularity fixed by pop_seed)."""
    prng = np.random.default_rng(pop_seed)
    rng = np.random.default_rng(seed)
    if kind == "zipf":
        logp = -1.0 * np.log(prng.permutation(E) + 1.0)
        logits = np.broadcast_to(logp, (n, E))
    else:
        logp = prng.normal(0.0, 1.0, E)
        topic_p = np.exp(prng.normal(0.0, 1.0, GROUPS))
        topic = rng.choice(GROUPS, size=n, p=topic_p / topic_p.sum())
        logits = logp[None, :] + 2.0 * (np.arange(E)[None, :] // (E // GROUPS) == topic[:, None])
    g = logits + rng.gumbel(size=(n, E))
    return np.argpartition(-g, k, axis=1)[:, :k]


def stats(ids):
    load = np.bincount(ids.ravel(), minlength=E).astype(np.float64)
    onehot = np.zeros((ids.shape[0], E), dtype=np.float32)
    np.put_along_axis(onehot, ids, 1.0, axis=1)
    co = (onehot.T @ onehot).astype(np.float64)
    np.fill_diagonal(co, 0.0)
    return load, co


def score(placement, ids, G):
    """Exact figures of a placement on the token sample ids."""
    dest = replica_rank(placement, torch.from_numpy(ids)).numpy()
    n = ids.shape[0]
    gpu_load = np.bincount(dest.ravel(), minlength=G)
    hit = np.zeros((n, G), dtype=bool)
    hit[np.arange(n)[:, None], dest] = True
    home = np.arange(n) % G
    node_of = np.arange(G) // GPN
    same_node = node_of[home][:, None] == node_of[None, :]
    not_home = home[:, None] != np.arange(G)[None, :]
    nv = (hit & same_node & not_home).sum(0)
    nodes = G // GPN
    t_nv = nv * BYTES / (NV_GBPS * 1e3)
    if nodes > 1:
        hit_node = hit.reshape(n, nodes, GPN).any(2)
        ib = (hit_node & (node_of[home][:, None] != np.arange(nodes)[None, :])).sum(0)
        t_ib = ib * BYTES / (IB_GBPS * GPN * 1e3)
    else:
        ib, t_ib = np.zeros(1), np.zeros(1)
    t = np.concatenate([t_nv, t_ib])
    tokens = np.concatenate([nv, ib])
    w = int(np.argmax(t))
    return dict(max_over_mean=float(gpu_load.max() / gpu_load.mean()), max_link_tokens=int(tokens[w]),
                max_link_us=float(t[w]), link=("nvlink" if w < len(t_nv) else "ib"), max_nvlink_tokens=int(nv.max()),
                max_ib_tokens=int(ib.max()))


def _from_copies(copy_expert, copy_gpu, G):
    n = np.bincount(copy_expert, minlength=E)
    reps = [[] for _ in range(E)]
    for e, j in zip(copy_expert, copy_gpu):
        reps[int(e)].append((int(j), 1.0 / n[e]))
    for r in reps:
        r.sort()
    rep = tuple(tuple(r) for r in reps) if (n > 1).any() else None
    return Placement(tuple(r[0][0] for r in reps), G, replicas=rep)


def pack(weights, items, bins, per_bin, item_key=None):
    """Longest-processing-time: each item (heaviest first) to the lightest bin with room (and, with item_key,
    no other item of the same key)."""
    load = np.zeros(len(bins))
    room = np.full(len(bins), per_bin)
    keys = [set() for _ in bins]
    out = {}
    for i in sorted(range(len(items)), key=lambda i: (-weights[i], i)):
        ok = [room[b] > 0 and (item_key is None or item_key[i] not in keys[b]) for b in range(len(bins))]
        b = min((b for b in range(len(bins)) if ok[b]), key=lambda b: (load[b], b))
        out[items[i]] = bins[b]
        load[b] += weights[i]
        room[b] -= 1
        if item_key is not None:
            keys[b].add(item_key[i])
    return out


def round_robin(load, G):
    return Placement(tuple(e % G for e in range(E)), G)


def greedy(load, G):
    per = max(1, E // G)
    where = pack(load, list(range(E)), list(range(G)), per)
    return Placement(tuple(where[e] for e in range(E)), G)


def _replicate_and_pack(experts, load, slots, gpus):
    n = copies_for(load[experts], slots, max_copies=len(gpus))
    ce = np.repeat(np.asarray(experts), n)
    w = load[ce] / np.repeat(n, n)
    where = pack(w, list(range(len(ce))), gpus, slots // len(gpus), item_key=list(ce))
    return ce, np.array([where[c] for c in range(len(ce))])


def eplb(load, G, slots):
    nodes = G // GPN
    if nodes > 1 and GROUPS % nodes == 0:  # hierarchical
        group_load = load.reshape(GROUPS, -1).sum(1)
        node_of_group = pack(group_load, list(range(GROUPS)), list(range(nodes)), GROUPS // nodes)
        ce_all, cg_all = [], []
        for nd in range(nodes):
            experts = [e for e in range(E) if node_of_group[e // (E // GROUPS)] == nd]
            ce, cg = _replicate_and_pack(experts, load, slots // nodes, list(range(nd * GPN, (nd + 1) * GPN)))
            ce_all.append(ce), cg_all.append(cg)
        return _from_copies(np.concatenate(ce_all), np.concatenate(cg_all), G), "hierarchical"
    ce, cg = _replicate_and_pack(list(range(E)), load, slots, list(range(G)))
    return _from_copies(ce, cg, G), "global"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per sample (plan and score samples)")
    ap.add_argument("--quick", action="store_true", help="G=16 and 64 only, fewer tokens")
    args = ap.parse_args()
    n = 8192 if args.quick else args.tokens
    rows = []
    for kind in ("zipf", "clustered"):
        for k in (2, 8):
            plan_ids, test_ids = sample(kind, k, n, seed=10), sample(kind, k, n, seed=20)
            load, co = stats(plan_ids)
            for G in ((16, 64) if args.quick else (16, 64, 256)):
                slots = E + G if E > G else G  # one spare slot per GPU when E > G; E <= G: one expert per GPU
                t0 = time.perf_counter()
                ours = place_experts(E, G, GPN, load=load, coactivation=co, top_k=k, redundant_experts=slots - E)
                t_ours = time.perf_counter() - t0
                ep, flavour = eplb(load, G, slots)
                res = {"round_robin": score(round_robin(load, G), test_ids, G),
                       "greedy": score(greedy(load, G), test_ids, G),
                       "eplb": score(ep, test_ids, G), "ours": score(ours, test_ids, G)}
                o, b = res["ours"], res["eplb"]
                row = dict(load=kind, k=k, G=G, copies_per_gpu=slots // G, eplb=flavour, plan_s=t_ours,
                           gpu_ok=o["max_over_mean"] <= b["max_over_mean"] * 1.01,
                           link_better=o["max_link_us"] < b["max_link_us"],
                           link_vs_eplb=o["max_link_us"] / b["max_link_us"])
                for name, r in res.items():
                    row[f"{name}_gpu"] = r["max_over_mean"]
                    row[f"{name}_link_us"] = r["max_link_us"]
                    row[f"{name}_link_tokens"] = r["max_link_tokens"]
                    row[f"{name}_link"] = r["link"]
                rows.append(row)
                print(f"{kind} k={k} G={G}: ours gpu {o['max_over_mean']:.3f} link {o['max_link_us']:.1f} us "
                      f"({o['link']}) | eplb-{flavour} gpu {b['max_over_mean']:.3f} link {b['max_link_us']:.1f} us "
                      f"| planned in {t_ours:.1f} s", flush=True)
    cols = ["load", "k", "G", "copies_per_gpu", "round_robin_gpu", "greedy_gpu", "eplb_gpu", "ours_gpu",
            "round_robin_link_us", "greedy_link_us", "eplb_link_us", "ours_link_us", "link_vs_eplb", "gpu_ok",
            "link_better"]
    fmt = {c: ".3f" for c in cols if c.endswith("_gpu")}
    fmt.update({c: ".1f" for c in cols if c.endswith("_us")}, link_vs_eplb=".3f")
    print(markdown(rows, cols, fmt))
    summary = dict(cases=len(rows), gpu_no_worse=sum(r["gpu_ok"] for r in rows),
                   link_better=sum(r["link_better"] for r in rows),
                   median_link_vs_eplb=float(np.median([r["link_vs_eplb"] for r in rows])))
    print(summary)
    write_json("placement", {"summary": summary, "rows": rows, "tokens_per_sample": n})


if __name__ == "__main__":
    main()
