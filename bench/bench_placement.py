"""Expert placement: ``mk.dist.place_experts`` against round-robin, greedy packing and the EPLB policy (CPU only).

    python bench/bench_placement.py [--tokens 131072] [--quick]
    python bench/bench_placement.py --G 64 --repeats 3   # 3 independent histories + fresh samples per case:
                                                         # how much of a difference is sampling noise

E=256 experts, G in {16, 64, 256} GPUs, 8 GPUs per node, top-2 and top-8. Loads:
  * ``zipf-0.8`` / ``zipf-1.2``: expert popularity p_e ~ 1 / rank^s (ranks shuffled over the experts); each token
    draws its k distinct experts with probabilities p (Gumbel top-k): skew, co-activation only through popularity.
  * ``clustered``: 8 groups of 32 experts (DeepSeek-V3's n_group), lognormal popularity; each token has a topic
    group (lognormal popularity too) whose experts get a x e^2 boost: skewed *and* co-activated, like routers whose
    experts specialise.
Each policy plans from one sample of tokens (the "history": per-expert counts and co-activation counts) and is
scored by exact counting, both on that sample ("planned") and on a fresh sample of the same distribution
("fresh", which adds the estimation noise of the history): tokens homed round-robin on the GPUs, each sent once
per destination GPU (NVLink ingress of that GPU when the home is in the same node) and once per destination node
(InfiniBand ingress of that node when the home is elsewhere); 7168 bytes per token, NVLink 450 GB/s per GPU,
InfiniBand 50 GB/s per GPU (400 GB/s a node). Each home rank picks the copy of every pair of its tokens with
``replica_rank(placement, ids, rank)`` (as ``ExpertParallel.dispatch`` does), the same rule for every policy.

Policies (equal memory: the same copies per GPU for the replicating ones; E <= G means one expert per GPU):
  * ``round_robin``: expert e on GPU e % G, no replicas.
  * ``greedy``: longest-processing-time packing (hottest expert to the least loaded GPU with a free slot), no
    replicas.
  * ``eplb_h`` / ``eplb_g``: DeepSeek's EPLB idea, re-implemented here from its description. Both first give the
    spare slots to the experts with the most load per copy. Hierarchical: pack the 8 expert groups onto the nodes
    by load (equal groups per node), replicate inside each node, pack each node's copies onto its GPUs. Global:
    pack all copies onto all GPUs. EPLB itself uses hierarchical when the nodes divide the groups (G = 16, 64 here)
    and global otherwise; both are run wherever they apply, and ours is compared with each.
  * ``ours``: ``place_experts`` (same number of replicas, balanced start, link-aware local search).
Claims checked per case: ours' max GPU load / mean no worse than EPLB's (within 1%), and ours' busiest link
faster than EPLB's.
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
from moe_kernels.dist.place import copies_for, routing_stats  # noqa: E402

E, GPN, GROUPS, BYTES = 256, 8, 8, 7168
NV_GBPS, IB_GBPS = 450.0, 50.0
LOADS = ("zipf-0.8", "zipf-1.2", "clustered")
POLICIES = ("round_robin", "greedy", "eplb_h", "eplb_g", "ours")


# ---- token samples ----------------------------------------------------------------------------------------------
def sample(kind, k, n, seed, pop_seed=1, chunk=32768):
    """ids [n, k] of n tokens drawn from the distribution ``kind`` (its popularity fixed by pop_seed)."""
    prng = np.random.default_rng(pop_seed)
    rng = np.random.default_rng(seed)
    if kind.startswith("zipf"):
        s = float(kind.split("-")[1])
        logp = -s * np.log(prng.permutation(E) + 1.0)
        topic_p = None
    else:
        logp = prng.normal(0.0, 1.0, E)
        topic_p = np.exp(prng.normal(0.0, 1.0, GROUPS))
        topic_p /= topic_p.sum()
    out = []
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        logits = np.broadcast_to(logp, (m, E))
        if topic_p is not None:
            topic = rng.choice(GROUPS, size=m, p=topic_p)
            logits = logits + 2.0 * (np.arange(E)[None, :] // (E // GROUPS) == topic[:, None])
        g = logits + rng.gumbel(size=(m, E))
        out.append(np.argpartition(-g, k, axis=1)[:, :k])
    return np.concatenate(out)


def describe(load, co):
    """Skew and co-activation statistics of a history."""
    pairs = co.sum() / 2
    same = sum(co[i * 32:(i + 1) * 32, i * 32:(i + 1) * 32].sum() for i in range(GROUPS)) / 2
    top = np.sort(load)[::-1]
    return dict(hottest_over_mean=float(top[0] / top.mean()), top10pct_share=float(top[: E // 10].sum() / top.sum()),
                same_group_pairs=float(same / pairs) if pairs else 0.0, same_group_if_independent=31 / 255)


# ---- exact scoring ------------------------------------------------------------------------------------------------
def _distinct(units):
    """(token, unit) pairs of a [n, k] array of units, each pair once."""
    u = np.sort(units, axis=1)
    first = np.ones_like(u, dtype=bool)
    first[:, 1:] = u[:, 1:] != u[:, :-1]
    t = np.broadcast_to(np.arange(len(u))[:, None], u.shape)
    return t[first], u[first]


def score(placement, ids, G):
    """Exact figures of a placement on the token sample ids."""
    n = ids.shape[0]
    home = np.arange(n) % G
    dest = np.empty_like(ids)
    for j in range(G):  # every rank picks the copies of its own tokens' pairs, as ExpertParallel.dispatch does
        dest[home == j] = replica_rank(placement, torch.from_numpy(ids[home == j]), rank=j).numpy()
    gpu_load = np.bincount(dest.ravel(), minlength=G)
    t, j = _distinct(dest)  # a token crosses once per destination GPU ...
    nv = np.bincount(j[(j // GPN == home[t] // GPN) & (j != home[t])], minlength=G)
    nodes = G // GPN
    t_nv = nv * BYTES / (NV_GBPS * 1e3)
    if nodes > 1:
        t, nd = _distinct(dest // GPN)  # ... and once per destination node
        ib = np.bincount(nd[nd != home[t] // GPN], minlength=nodes)
        t_ib = ib * BYTES / (IB_GBPS * GPN * 1e3)
    else:
        ib, t_ib = np.zeros(1), np.zeros(1)
    t = np.concatenate([t_nv, t_ib])
    tokens = np.concatenate([nv, ib])
    w = int(np.argmax(t))
    return dict(max_over_mean=float(gpu_load.max() / gpu_load.mean()), max_link_tokens=int(tokens[w]),
                max_link_us=float(t[w]), link=("nvlink" if w < len(t_nv) else "ib"))


# ---- baselines ----------------------------------------------------------------------------------------------------
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


def eplb_hierarchical(load, G, slots):
    nodes = G // GPN
    if nodes < 2 or GROUPS % nodes:
        return None
    group_load = load.reshape(GROUPS, -1).sum(1)
    node_of_group = pack(group_load, list(range(GROUPS)), list(range(nodes)), GROUPS // nodes)
    ce_all, cg_all = [], []
    for nd in range(nodes):
        experts = [e for e in range(E) if node_of_group[e // (E // GROUPS)] == nd]
        ce, cg = _replicate_and_pack(experts, load, slots // nodes, list(range(nd * GPN, (nd + 1) * GPN)))
        ce_all.append(ce), cg_all.append(cg)
    return _from_copies(np.concatenate(ce_all), np.concatenate(cg_all), G)


def eplb_global(load, G, slots):
    ce, cg = _replicate_and_pack(list(range(E)), load, slots, list(range(G)))
    return _from_copies(ce, cg, G)


# ---- the run --------------------------------------------------------------------------------------------------------
def compare(o, b):
    return dict(gpu_ok=o["max_over_mean"] <= b["max_over_mean"] * 1.01, link_better=o["max_link_us"] < b["max_link_us"],
                link_ratio=o["max_link_us"] / b["max_link_us"])


def run_case(kind, k, G, hist, fresh, load, co):
    slots = E + G if E > G else G  # one spare slot per GPU when E > G; E <= G: one expert per GPU
    t0 = time.perf_counter()
    ours = place_experts(E, G, GPN, load=load, coactivation=co, top_k=k, max_replicas=slots - E)
    t_ours = time.perf_counter() - t0
    plans = {"round_robin": round_robin(load, G), "greedy": greedy(load, G),
             "eplb_h": eplb_hierarchical(load, G, slots), "eplb_g": eplb_global(load, G, slots), "ours": ours}
    row = dict(load=kind, k=k, G=G, copies_per_gpu=slots // G, plan_s=t_ours,
               ours_model_max_link_us=ours.report()["max_link_us"])
    for split, ids in (("planned", hist), ("fresh", fresh)):
        res = {name: score(p, ids, G) for name, p in plans.items() if p is not None}
        for name, r in res.items():
            row[f"{split}_{name}_gpu"] = r["max_over_mean"]
            row[f"{split}_{name}_link_us"] = r["max_link_us"]
            row[f"{split}_{name}_link_tokens"] = r["max_link_tokens"]
            row[f"{split}_{name}_link"] = r["link"]
        for base in ("eplb_h", "eplb_g"):
            if base in res:
                for key, v in compare(res["ours"], res[base]).items():
                    row[f"{split}_vs_{base}_{key}"] = v
                row[f"{split}_vs_{base}_gpu_ratio"] = res["ours"]["max_over_mean"] / res[base]["max_over_mean"]
    return row


def summarise(rows):
    summary = dict(cases=len(rows), max_plan_s=max(r["plan_s"] for r in rows))
    for split in ("planned", "fresh"):
        for base in ("eplb_h", "eplb_g"):
            have = [r for r in rows if f"{split}_vs_{base}_gpu_ok" in r]
            lr = [r[f"{split}_vs_{base}_link_ratio"] for r in have]
            gr = [r[f"{split}_vs_{base}_gpu_ratio"] for r in have]
            summary[f"{split}_vs_{base}"] = dict(
                cases=len(have), gpu_no_worse=sum(r[f"{split}_vs_{base}_gpu_ok"] for r in have),
                link_better=sum(r[f"{split}_vs_{base}_link_better"] for r in have),
                both=sum(r[f"{split}_vs_{base}_gpu_ok"] and r[f"{split}_vs_{base}_link_better"] for r in have),
                link_ratio=dict(median=float(np.median(lr)), min=float(np.min(lr)), max=float(np.max(lr))),
                gpu_ratio=dict(median=float(np.median(gr)), min=float(np.min(gr)), max=float(np.max(gr))))
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=131072, help="tokens per sample (history and fresh samples)")
    ap.add_argument("--G", type=int, nargs="+", default=[16, 64, 256], help="GPU counts")
    ap.add_argument("--repeats", type=int, default=1, help="independent history / fresh samples per case")
    ap.add_argument("--quick", action="store_true", help="G=16 and 64 only, 16384 tokens")
    args = ap.parse_args()
    n = 16384 if args.quick else args.tokens
    gpus = [16, 64] if args.quick else args.G
    rows, loads_info = [], {}
    t_start = time.perf_counter()
    for kind in LOADS:
        for k in (2, 8):
            for rep in range(args.repeats):
                hist, fresh = sample(kind, k, n, seed=10 + rep), sample(kind, k, n, seed=20 + rep)
                load, co = routing_stats(hist, E)
                if rep == 0:
                    loads_info[f"{kind} k={k}"] = describe(load, co)
                for G in gpus:
                    row = run_case(kind, k, G, hist, fresh, load, co)
                    row["repeat"] = rep
                    rows.append(row)
                    f = lambda p: (f"{row.get(f'fresh_{p}_gpu', float('nan')):.3f}/"  # noqa: E731
                                   f"{row.get(f'fresh_{p}_link_us', float('nan')):.0f}us")
                    print(f"{kind} k={k} G={G} #{rep}: fresh gpu/link  ours {f('ours')}  eplb_h {f('eplb_h')}  "
                          f"eplb_g {f('eplb_g')}  | planned in {row['plan_s']:.1f} s", flush=True)
    cols = ["load", "k", "G"] + (["repeat"] if args.repeats > 1 else []) \
        + [f"fresh_{p}_gpu" for p in POLICIES] + [f"fresh_{p}_link_us" for p in POLICIES] \
        + ["fresh_vs_eplb_g_link_ratio"]
    fmt = {c: ".3f" for c in cols if c.endswith("_gpu")}
    fmt.update({c: ".0f" for c in cols if c.endswith("_us")}, fresh_vs_eplb_g_link_ratio=".3f")
    print(markdown(rows, cols, fmt))
    pcols = ["load", "k", "G"] + [f"planned_{p}_gpu" for p in ("eplb_h", "eplb_g", "ours")] \
        + [f"planned_{p}_link_us" for p in ("eplb_h", "eplb_g", "ours")] + ["ours_model_max_link_us", "plan_s"]
    pfmt = {c: ".4f" for c in pcols if c.endswith("_gpu")}
    pfmt.update({c: ".0f" for c in pcols if c.endswith("_us")}, plan_s=".1f")
    print(markdown(rows, pcols, pfmt))
    summary = summarise(rows)
    summary["seconds"] = time.perf_counter() - t_start
    for name, v in summary.items():
        print(name, v)
    for name, v in loads_info.items():
        print(name, {a: round(b, 3) for a, b in v.items()})
    write_json("placement" if args.repeats == 1 and not args.quick else
               f"placement-{'quick' if args.quick else f'repeats{args.repeats}'}",
               {"summary": summary, "rows": rows, "loads": loads_info, "tokens_per_sample": n,
                "gpus": gpus, "repeats": args.repeats})


if __name__ == "__main__":
    main()
