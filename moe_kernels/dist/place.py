"""Topology-aware expert placement: which GPU holds which expert (and which hot experts get a second copy).

The model (what ``place_experts`` minimises and what ``evaluate`` measures)
---------------------------------------------------------------------------
G GPUs in nodes of ``gpus_per_node`` (g). Tokens are homed uniformly over the GPUs. A token whose k experts sit on
the GPUs D (a set: two experts on one GPU make one destination) is sent once to every GPU of D (the dispatch of
``ExpertParallel``: once per destination GPU, never once per expert) and, across nodes, once per destination node
(the way DeepEP-style inter-node dispatch deduplicates: one InfiniBand transfer per node, NVLink fan-out inside).

Links, each with a bandwidth:
  * the NVLink ingress port of every GPU j: tokens for j homed on another GPU of j's node, (g-1)/G of the tokens
    destined to j;
  * the InfiniBand ingress of every node n (its g NICs together): tokens for n homed on another node, (G-g)/G of
    the (token, node) destinations of n.
  With a full G x G ``link_bandwidth`` matrix instead, link (i, j) carries 1/G of the tokens destined to j.
  The *load* of a link is its token count; its *time* is load x bytes per token / bandwidth. The objective is
  the largest time over all links (with the two-level defaults, NVLink 450 GB/s per GPU port and 50 GB/s of
  InfiniBand per GPU, i.e. an IB token costs 9 NVLink tokens). ``link_latency`` adds a fixed cost per link that
  carries anything (it matters only for nearly idle links).

Expected destinations come from per-expert loads L (pairs per step) and the co-activation matrix C (tokens that
chose both e and f): a set S of expert copies receives A = sum_{e in S} L_e pairs with P = sum_{e<f in S} C_ef
co-activated pairs among them, which the model turns into D = A^2 / (A + 2P) distinct tokens (exact when every
token reaching S brings the same number of its experts; with no C the tokens are taken as disjoint, D = A). A copy
carrying share w of expert e counts w L_e and w w' C_ef.

GPU load = (token, expert) pairs computed there = sum of its copies' w L_e. max GPU load / mean is the balance.

The algorithm
-------------
1. Copies. E <= G: every expert once, then the G - E spare GPUs take replicas of the hottest experts, one at a
   time to the expert whose copies carry the most load each (L_e / copies); copies split an expert evenly.
   E > G: ``redundant_experts`` replicas (default 0) chosen the same way. Every GPU holds the same number of copies
   (E + R must divide by G), so memory is balanced: ``gpu_memory`` / ``expert_bytes`` are checked against it.
2. Start. Copies by descending load, each to the least-loaded GPU with a free slot that holds no copy of the same
   expert (longest-processing-time packing with equal slot counts): balanced load, balanced memory.
   With co-activation statistics a second start groups co-activated experts on nodes (copies by descending
   load, each to the node sharing the most co-activation with it, node loads within 2% of their mean, then
   packing inside each node); both starts are searched and the better result kept. A start whose largest GPU
   load exceeds that cap (below) is not used.
3. Local search. Repeatedly take the most loaded link (by time); screen the swaps of a copy of its GPU / node
   with a copy elsewhere (a swap keeps every GPU's memory) by a linear estimate of what they save, score the best
   candidates by the recomputed model (the L_8 norm of all link times: a smooth stand-in for the largest, which
   also rewards lowering one of two tied links) and apply the best one that lowers it while no GPU's load
   exceeds max(the balanced start's largest, (1 + ``balance_slack``) x the mean; 2% by default). Stop when no swap helps or after
   ``max_iters``; return the visited plan with the smallest largest link time. Deterministic: no randomness,
   ties to the lower index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_int
from .placement import Placement

__all__ = ["place_experts", "Topology", "evaluate", "copies_for"]

NVLINK_GBPS = 450.0  # per GPU port, one direction (H100/H200 NVLink 4: 900 GB/s both ways)
IB_GBPS_PER_GPU = 50.0  # 400 Gb/s NIC per GPU


@dataclass(frozen=True)
class Topology:
    """G GPUs in nodes of ``gpus_per_node``; link bandwidths in GB/s; or a full [G, G] matrix."""

    num_gpus: int
    gpus_per_node: int
    nvlink_gbps: float = NVLINK_GBPS
    ib_gbps_per_gpu: float = IB_GBPS_PER_GPU
    matrix: np.ndarray | None = None  # [G, G] GB/s from row to column (diagonal ignored)
    latency_us: np.ndarray | float = 0.0

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    def node_of(self) -> np.ndarray:
        return np.arange(self.num_gpus) // self.gpus_per_node


def _as_load(load, E):
    if load is None:
        return np.ones(E)
    a = np.asarray(load.detach().cpu() if hasattr(load, "detach") else load, dtype=np.float64)
    if a.shape != (E,):
        raise ValueError(f"load must have one entry per expert, shape ({E},), got {a.shape}")
    if not np.all(np.isfinite(a)) or (a < 0).any():
        raise ValueError("load must hold finite, non-negative per-expert counts")
    if a.sum() <= 0:
        return np.ones(E)
    return a


def _as_coact(coactivation, E):
    if coactivation is None:
        return np.zeros((E, E))
    c = np.asarray(coactivation.detach().cpu() if hasattr(coactivation, "detach") else coactivation,
                   dtype=np.float64)
    if c.shape != (E, E):
        raise ValueError(f"coactivation must be [{E}, {E}] (tokens choosing both experts), got {c.shape}")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("coactivation must hold finite, non-negative counts")
    c = (c + c.T) / 2 if not np.allclose(c, c.T) else c.copy()
    np.fill_diagonal(c, 0.0)
    return c


def copies_for(load: np.ndarray, slots: int, max_copies: int | None = None) -> np.ndarray:
    """How many copies each expert gets when ``slots`` >= E copies are handed out: one each, then each further copy
    to the expert whose copies carry the most load apiece (ties: lower expert), at most ``max_copies`` each (one
    per GPU)."""
    E = len(load)
    n = np.ones(E, dtype=np.int64)
    load = np.asarray(load, dtype=np.float64)
    for _ in range(slots - E):
        per = np.where(n < (max_copies or slots), load / n, -np.inf)
        n[int(np.argmax(per))] += 1
    return n


class _Plan:
    """Copies (expert, share) on GPUs, with the link model; ``objective()`` recomputes everything exactly."""

    def __init__(self, topo: Topology, load, coact, copy_expert, copy_share, bytes_per_token):
        self.topo, self.load, self.coact = topo, load, coact
        self.ce = np.asarray(copy_expert)
        self.cw = np.asarray(copy_share, dtype=np.float64)
        self.cl = load[self.ce] * self.cw                                   # load of each copy
        cc = coact[np.ix_(self.ce, self.ce)] * np.outer(self.cw, self.cw)  # co-activation between copies
        cc[self.ce[:, None] == self.ce[None, :]] = 0.0                      # copies of one expert never overlap
        self.cc = cc
        self.bytes = bytes_per_token
        G, g = topo.num_gpus, topo.gpus_per_node
        self.node = topo.node_of()
        if topo.matrix is not None:
            bw = np.asarray(topo.matrix, dtype=np.float64)
            with np.errstate(divide="ignore"):
                inv = np.where(bw > 0, 1.0 / np.maximum(bw, 1e-30), np.inf)
            np.fill_diagonal(inv, 0.0)
            self.inv_in = inv.max(0)  # slowest link into each GPU: it carries 1/G of the GPU's tokens
            self.mode = "matrix"
        else:
            self.mode = "two-level"
        self.nv_frac = (g - 1) / G
        self.ib_frac = (G - g) / G

    def destinations(self, unit: np.ndarray, n_units: int) -> np.ndarray:
        """Distinct (token, unit) destinations per unit (``unit``: the GPU or node of each copy).

        A unit receives A pairs with P co-activated pairs among them; a token that brings m of its experts adds m
        to A and m(m-1)/2 to P, so with m the same for all its tokens D = A^2 / (A + 2P) tokens arrive. Exact for
        k = 1 and whenever every arriving token brings the same number of experts, in (A / k, A] always.
        """
        same = unit[:, None] == unit[None, :]
        A = np.bincount(unit, weights=self.cl, minlength=n_units)
        P = np.bincount(unit, weights=0.5 * (self.cc * same).sum(1), minlength=n_units)
        return np.where(A > 0, A * A / np.maximum(A + 2 * P, 1e-30), 0.0)

    def links(self, gpu_of_copy):
        """(GPU link times, node link times, GPU link tokens, node link tokens) in microseconds / tokens."""
        G = self.topo.num_gpus
        d_gpu = self.destinations(gpu_of_copy, G)
        to_us = self.bytes / 1e3  # tokens x bytes / (GB/s) -> us
        if self.mode == "matrix":
            tok_gpu = d_gpu / G
            t_gpu = tok_gpu * self.inv_in * to_us
            return t_gpu, np.zeros(0), tok_gpu, np.zeros(0)
        tok_gpu = d_gpu * self.nv_frac
        t_gpu = tok_gpu / self.topo.nvlink_gbps * to_us
        if self.topo.num_nodes > 1:
            d_node = self.destinations(self.node[gpu_of_copy], self.topo.num_nodes)
            tok_node = d_node * self.ib_frac
            t_node = tok_node / (self.topo.ib_gbps_per_gpu * self.topo.gpus_per_node) * to_us
        else:
            tok_node = t_node = np.zeros(0)
        lat = self.topo.latency_us
        if np.any(np.asarray(lat) > 0):
            t_gpu = t_gpu + np.where(tok_gpu > 0, float(np.max(lat)), 0.0)
        return t_gpu, t_node, tok_gpu, tok_node

    def gpu_load(self, gpu_of_copy):
        return np.bincount(gpu_of_copy, weights=self.cl, minlength=self.topo.num_gpus)

    def objective(self, gpu_of_copy, p: int = 8):
        """(largest link time, the L_p norm of all link times): the search descends the smooth L_p norm, which
        moves toward the largest time but also rewards lowering a link that ties with another."""
        t_gpu, t_node, _, _ = self.links(gpu_of_copy)
        t = np.concatenate([t_gpu, t_node])
        m = float(t.max())
        return m, (m * float(((t / m) ** p).sum()) ** (1.0 / p)) if m > 0 else 0.0


def _lpt_start(plan: _Plan, slots_per_gpu: int) -> np.ndarray:
    G = plan.topo.num_gpus
    gpu = np.empty(len(plan.ce), dtype=np.int64)
    load = np.zeros(G)
    free = np.full(G, slots_per_gpu)
    held = [set() for _ in range(G)]
    for c in np.argsort(-plan.cl, kind="stable"):
        e = int(plan.ce[c])
        ok = np.array([free[j] > 0 and e not in held[j] for j in range(G)])
        if not ok.any():
            raise RuntimeError(f"place_experts: no GPU with a free slot lacks a copy of expert {e}; "
                               f"lower redundant_experts")
        j = int(np.argmin(np.where(ok, load, np.inf)))
        gpu[c], load[j], free[j] = j, load[j] + plan.cl[c], free[j] - 1
        held[j].add(e)
    return gpu


def _cluster_start(plan: _Plan, slots_per_gpu: int, slack: float) -> np.ndarray | None:
    """A start that keeps co-activated experts on one node: copies by descending load, each to the node (with free
    slots, load within ``slack`` of the node mean, and no copy of the same expert when it has copies to spare) that
    shares the most co-activation with it; then longest-processing-time packing inside every node."""
    topo = plan.topo
    nodes, g = topo.num_nodes, topo.gpus_per_node
    if nodes < 2:
        return None
    n_copies = len(plan.ce)
    node_cap = slots_per_gpu * g
    node_load_cap = plan.cl.sum() / nodes * (1.0 + slack)
    node_of = np.full(n_copies, -1)
    load, room = np.zeros(nodes), np.full(nodes, node_cap)
    co = np.zeros((n_copies, nodes))  # co-activation of every copy with each node's copies so far
    per_node_expert = [dict() for _ in range(nodes)]
    for c in np.argsort(-plan.cl, kind="stable"):
        e = int(plan.ce[c])
        ok = (room > 0) & (load + plan.cl[c] <= node_load_cap)
        ok &= np.array([per_node_expert[n].get(e, 0) < g for n in range(nodes)])
        if not ok.any():
            ok = room > 0
        score = np.where(ok, co[c] - 1e-9 * load, -np.inf)
        n = int(np.argmax(score))
        node_of[c], load[n], room[n] = n, load[n] + plan.cl[c], room[n] - 1
        per_node_expert[n][e] = per_node_expert[n].get(e, 0) + 1
        co[:, n] += plan.cc[:, c]
    gpu = np.empty(n_copies, dtype=np.int64)
    for n in range(nodes):
        members = np.flatnonzero(node_of == n)
        gl, free = np.zeros(g), np.full(g, slots_per_gpu)
        held = [set() for _ in range(g)]
        for c in members[np.argsort(-plan.cl[members], kind="stable")]:
            e = int(plan.ce[c])
            ok = (free > 0) & np.array([e not in h for h in held])
            if not ok.any():
                return None
            j = int(np.argmin(np.where(ok, gl, np.inf)))
            gpu[c], gl[j], free[j] = n * g + j, gl[j] + plan.cl[c], free[j] - 1
            held[j].add(e)
    return gpu


def _local_search(plan: _Plan, gpu: np.ndarray, cap: float, max_iters: int, candidates: int = 32) -> np.ndarray:
    gpu = gpu.copy()
    cur = plan.objective(gpu)[1]
    best_max, best_gpu = plan.objective(gpu)[0], gpu.copy()
    node = plan.node
    for _ in range(max_iters):
        t_gpu, t_node, _, _ = plan.links(gpu)
        if t_node.size and t_node.max() >= t_gpu.max():
            hot = np.flatnonzero(node[gpu] == int(np.argmax(t_node)))  # copies on the busiest node
            cold = np.flatnonzero(node[gpu] != int(np.argmax(t_node)))
        else:
            hot = np.flatnonzero(gpu == int(np.argmax(t_gpu)))
            cold = np.flatnonzero(gpu != int(np.argmax(t_gpu)))
        if not hot.size or not cold.size:
            break
        # screen: a swap helps the hot unit most when it sends out a copy with much load that is little
        # co-activated with the copies staying, and takes one with little load that is much co-activated with them
        in_hot = np.zeros(len(gpu), dtype=bool)
        in_hot[hot] = True
        co_hot = plan.cc[:, in_hot].sum(1)  # each copy's co-activation with the hot unit's copies
        gain = (plan.cl[hot] - co_hot[hot])[:, None] - (plan.cl[cold] - co_hot[cold])[None, :] \
            - plan.cc[np.ix_(hot, cold)]
        load = plan.gpu_load(gpu)
        # only swaps that keep both GPUs under the cap are candidates (the rest would unbalance the load)
        dl = plan.cl[cold][None, :] - plan.cl[hot][:, None]
        fits = (np.maximum(load[gpu[hot]][:, None] + dl, load[gpu[cold]][None, :] - dl) <= cap + 1e-9)
        fits &= gpu[hot][:, None] != gpu[cold][None, :]
        gain = np.where(fits, gain, -np.inf)
        order = np.argsort(-gain, axis=None, kind="stable")[: candidates * 4]
        order = order[np.isfinite(gain.ravel()[order])]
        held = {(int(gpu[c]), int(plan.ce[c])) for c in range(len(gpu))}
        choice = None
        tried = 0
        for flat in order:
            a, b = hot[flat // cold.size], cold[flat % cold.size]
            ja, jb = int(gpu[a]), int(gpu[b])
            ea, eb = int(plan.ce[a]), int(plan.ce[b])
            if ja == jb or ea == eb or (jb, ea) in held or (ja, eb) in held:
                continue
            la = load[ja] - plan.cl[a] + plan.cl[b]
            lb = load[jb] - plan.cl[b] + plan.cl[a]
            if max(la, lb) > cap + 1e-9:
                continue
            gpu[a], gpu[b] = jb, ja
            obj = plan.objective(gpu)[1]
            gpu[a], gpu[b] = ja, jb
            if obj < cur * (1 - 1e-9) and (choice is None or obj < choice[0]):
                choice = (obj, a, b)
            tried += 1
            if tried >= candidates:
                break
        if choice is None:
            break
        cur, a, b = choice
        gpu[a], gpu[b] = gpu[b], gpu[a]
        m = plan.objective(gpu)[0]
        if m < best_max:
            best_max, best_gpu = m, gpu.copy()
    return best_gpu


def evaluate(placement: Placement, load, coactivation=None, topology: Topology | None = None,
             bytes_per_token: int = 7168) -> dict:
    """The model's figures for any placement: max GPU load / mean, max link load (tokens and microseconds), per
    link kind. ``load`` / ``coactivation`` as for ``place_experts``."""
    topo = topology or Topology(placement.num_ranks, min(8, placement.num_ranks))
    E = placement.num_experts
    L, C = _as_load(load, E), _as_coact(coactivation, E)
    ce, cw, cg = [], [], []
    for e in range(E):
        for r, w in placement.copies(e):
            ce.append(e), cw.append(w), cg.append(r)
    plan = _Plan(topo, L, C, ce, cw, bytes_per_token)
    return _metrics(plan, np.asarray(cg, dtype=np.int64))


def _metrics(plan: _Plan, gpu: np.ndarray) -> dict:
    load = plan.gpu_load(gpu)
    t_gpu, t_node, tok_gpu, tok_node = plan.links(gpu)
    t_all = np.concatenate([t_gpu, t_node])
    worst = int(np.argmax(t_all))
    tokens = np.concatenate([tok_gpu, tok_node])
    return {
        "max_over_mean_gpu_load": float(load.max() / load.mean()) if load.mean() > 0 else float("nan"),
        "max_gpu_load": float(load.max()),
        "max_link_us": float(t_all.max()),
        "max_link_load": float(tokens[worst]),  # tokens on the link that takes longest
        "max_link": ("nvlink gpu %d" % worst) if worst < len(t_gpu) else ("ib node %d" % (worst - len(t_gpu))),
        "max_nvlink_tokens": float(tok_gpu.max()) if tok_gpu.size else 0.0,
        "max_ib_tokens": float(tok_node.max()) if tok_node.size else 0.0,
        "copies_per_gpu": int(np.bincount(gpu, minlength=plan.topo.num_gpus).max()),
    }


def place_experts(
    num_experts: int,
    num_gpus: int,
    gpus_per_node: int = 8,
    load=None,
    link_bandwidth=None,
    link_latency=None,
    coactivation=None,
    top_k: int = 2,
    gpu_memory: float | None = None,
    expert_bytes: float | None = None,
    redundant_experts: int | None = None,
    bytes_per_token: int = 7168,
    balance_slack: float = 0.02,
    max_iters: int = 200,
    initial: str = "lpt",
) -> Placement:
    """Place E experts on G GPUs, minimising the most loaded link while keeping GPU loads balanced.

    Args:
        num_experts, num_gpus, gpus_per_node: E, G, g (g divides G, or G < g: one node).
        load: expected (token, expert) pairs per expert [E] (historical counts); None = uniform.
        link_bandwidth: None (two-level defaults: NVLink 450 GB/s per GPU, InfiniBand 50 GB/s per GPU), a pair
            (nvlink_gbps, ib_gbps_per_gpu), or a [G, G] matrix of GB/s.
        link_latency: microseconds added to every link that carries traffic (scalar or [G, G]).
        coactivation: [E, E] tokens that chose both experts (co-activated experts together save link traffic).
        top_k: experts per token (used to fill in a uniform load when ``load`` is None).
        gpu_memory, expert_bytes: bytes per GPU and per expert copy; a plan needing more raises ValueError.
        redundant_experts: extra copies of hot experts (E <= G: default G - E, filling every spare GPU; E > G:
            default 0). E + redundant_experts must be a multiple of G (equal memory per GPU).
        balance_slack: no GPU's load may exceed the mean by more than this fraction (or the balanced start's
            largest, when that is higher) anywhere in the search.
        initial: "lpt" (balanced packing, the default) or "round_robin" (copy c on GPU c % G) as the start.
    Returns a ``Placement`` with ``replicas`` and ``stats`` (``report()``: max GPU load / mean, max link load in
    tokens and microseconds, which link, memory per GPU, the objective before and after the local search).
    """
    check_int("num_experts", num_experts, lo=1)
    check_int("num_gpus", num_gpus, lo=1)
    check_int("gpus_per_node", gpus_per_node, lo=1)
    check_int("top_k", top_k, lo=1, hi=num_experts)
    check_int("max_iters", max_iters, lo=0)
    if initial not in ("lpt", "round_robin"):
        raise ValueError(f"initial must be 'lpt' or 'round_robin', got {initial!r}")
    E, G = num_experts, num_gpus
    g = min(gpus_per_node, G)
    if G % g:
        raise ValueError(f"gpus_per_node ({gpus_per_node}) must divide num_gpus ({num_gpus})")
    L = _as_load(load, E) if load is not None else np.full(E, float(top_k))
    C = _as_coact(coactivation, E)
    if redundant_experts is None:
        redundant_experts = G - E if E <= G else 0
    check_int("redundant_experts", redundant_experts, lo=0)
    slots = E + redundant_experts
    if slots % G:
        raise ValueError(f"num_experts + redundant_experts ({slots}) must be a multiple of num_gpus ({G}): every "
                         f"GPU holds the same number of expert copies")
    per_gpu = slots // G
    if E <= G and per_gpu != 1:
        raise ValueError(f"with num_experts <= num_gpus every GPU holds one expert: redundant_experts must be "
                         f"{G - E}, got {redundant_experts}")
    if gpu_memory is not None or expert_bytes is not None:
        if gpu_memory is None or expert_bytes is None:
            raise ValueError("gpu_memory and expert_bytes go together")
        if per_gpu * float(expert_bytes) > float(gpu_memory):
            raise ValueError(f"gpu_memory ({gpu_memory:.3g} bytes) holds {int(gpu_memory // expert_bytes)} experts "
                             f"of expert_bytes={expert_bytes:.3g}, but this plan puts {per_gpu} on every GPU")
    if per_gpu > E:
        raise ValueError(f"{per_gpu} copies per GPU but only {E} experts: a GPU cannot hold two copies of one")

    topo = _topology(G, g, link_bandwidth, link_latency)
    n = copies_for(L, slots, max_copies=G)
    ce = np.repeat(np.arange(E), n)
    cw = 1.0 / n[ce]
    plan = _Plan(topo, L, C, ce, cw, bytes_per_token)
    if initial == "round_robin":
        gpu = _round_robin(ce, G, per_gpu)
    else:
        gpu = _lpt_start(plan, per_gpu)
    start = _metrics(plan, gpu)
    cap = max(plan.gpu_load(gpu).max(), plan.cl.sum() / G * (1.0 + balance_slack))
    results = [_local_search(plan, gpu, cap, max_iters)]
    if np.any(C > 0) and initial == "lpt":  # co-activation known: also start from co-activated node groups
        alt = _cluster_start(plan, per_gpu, slack=0.02)
        if alt is not None and plan.gpu_load(alt).max() <= cap + 1e-9:
            results.append(_local_search(plan, alt, cap, max_iters))
    gpu = min(results, key=lambda x: plan.objective(x))
    stats = _metrics(plan, gpu)
    stats.update(start_max_link_us=start["max_link_us"], start_max_over_mean_gpu_load=start["max_over_mean_gpu_load"],
                 memory_per_gpu=(per_gpu * float(expert_bytes)) if expert_bytes is not None else None,
                 copies=int(slots), replicated_experts=int((n > 1).sum()), model=plan.mode)
    return _to_placement(ce, cw, gpu, E, G, stats)


def _round_robin(ce, G, per_gpu):
    """Copy c on GPU c % G, copies ordered so that no GPU gets two copies of one expert."""
    gpu = np.arange(len(ce)) % G
    return gpu.astype(np.int64)


def _topology(G, g, link_bandwidth, link_latency) -> Topology:
    lat = 0.0 if link_latency is None else np.asarray(link_latency, dtype=np.float64)
    if link_bandwidth is None:
        return Topology(G, g, latency_us=lat)
    bw = np.asarray(link_bandwidth, dtype=np.float64)
    if bw.shape == (2,):
        if (bw <= 0).any():
            raise ValueError(f"link_bandwidth (nvlink, ib per GPU) must be positive GB/s, got {bw.tolist()}")
        return Topology(G, g, float(bw[0]), float(bw[1]), latency_us=lat)
    if bw.shape == (G, G):
        if (bw < 0).any():
            raise ValueError("link_bandwidth matrix must be non-negative GB/s")
        return Topology(G, g, matrix=bw, latency_us=lat)
    raise ValueError(f"link_bandwidth must be None, (nvlink_gbps, ib_gbps_per_gpu) or a [{G}, {G}] matrix, "
                     f"got shape {bw.shape}")


def _to_placement(ce, cw, gpu, E, G, stats) -> Placement:
    reps: list[list[tuple[int, float]]] = [[] for _ in range(E)]
    for c in range(len(ce)):
        reps[int(ce[c])].append((int(gpu[c]), float(cw[c])))
    for e in range(E):
        reps[e].sort()
    primary = tuple(r[0][0] for r in reps)
    replicas = tuple(tuple(r) for r in reps) if any(len(r) > 1 for r in reps) else None
    return Placement(primary, G, replicas=replicas, stats=stats)
