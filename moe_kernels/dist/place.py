"""Topology-aware expert placement: which GPU holds which expert, which hot experts get more copies, and the share
of the expert's traffic each copy takes.

The model (what ``place_experts`` minimises and what ``evaluate`` measures)
---------------------------------------------------------------------------
G GPUs in nodes of ``gpus_per_node`` (g); N = G / g nodes. T tokens per step (T = sum(load) / top_k, or
``tokens``), homed uniformly over the GPUs (each GPU is the home of T / G). A token whose k experts are served by
the copies on the GPU set D is sent once to every GPU of D, never once per expert (the dispatch of
``ExpertParallel``: a token whose experts share a GPU crosses once), and across nodes once per destination node
(DeepEP-style inter-node dispatch: one InfiniBand transfer per node, NVLink fan-out inside it). Combine is the
mirror image (the same tokens on the same links, the other way), so one direction is modelled.

"Tokens on a link" (the load of a link), for the two-level NVLink / InfiniBand model:
  * the NVLink port of GPU j: the tokens GPU j receives from the other GPUs of its node = (g - 1) / G x D_j, where
    D_j is the number of distinct tokens with at least one expert served on j;
  * the InfiniBand uplink of node n (its g NICs together): the tokens node n receives from other nodes =
    (G - g) / G x D_n, D_n the distinct tokens with at least one expert served on n.
  With a G x G ``link_bandwidth`` matrix every GPU pair (i, j) is its own link instead; it carries the D_j / G
  tokens homed on i (no node-level deduplication), and GPU j's slowest incoming link is what counts.
A link's *time* is its tokens x ``bytes_per_token`` / bandwidth, plus its latency when it carries anything. The
objective is the largest time over all links; ``max_link_load`` is the token count of that link. With the default
bandwidths (NVLink 450 GB/s per GPU port, InfiniBand 50 GB/s per GPU) an InfiniBand token costs 9 NVLink tokens.

Distinct tokens D_U of a unit U (a GPU or a node) come from the per-expert loads L and co-activation C: a token
picks copy c with probability q_c = w_c L_e / T (w_c: the copy's share of expert e) and copies c, d together with
c_cd = w_c w_d C_ef / T (copies of one expert never together). The unit misses a token with probability
    P(miss U) = prod_c (1 - q_c) x prod_{c<d} (1 - q_c - q_d + c_cd) / ((1 - q_c)(1 - q_d)),
exact for one or two copies and for independent experts, a second-order (Kirkwood-style) approximation otherwise
(0-4% below exact counts for ``bench_placement.py``'s loads), and D_U = T (1 - P(miss U)), at most the unit's
pairs. Co-activated experts on one GPU or node (c_cd > q_c q_d) therefore save link traffic. Without a
co-activation matrix the experts are taken as independent (c_cd = q_c q_d).

GPU load = the (token, expert) pairs a GPU computes = sum of its copies' w L_e; max GPU load / mean is the balance.

The algorithm
-------------
1. Copies. E <= G: every expert once (at most one per GPU), then the spare GPUs take copies of the hottest experts,
   one at a time to the expert whose copies carry the most load each (L_e / copies). E > G: ``max_replicas``
   copies (default: the (-E) mod G that make every GPU hold the same number) chosen the same way. Each GPU holds
   ceil or floor((E + replicas) / G) copies (empty slots are spread over the nodes): memory is balanced, and
   checked against ``gpu_memory``. Copies start with equal shares.
2. Start (the balanced start). Copies by descending load, each to the least-loaded GPU with a free slot that holds
   no copy of the same expert: a load-ordered round-robin (longest-processing-time packing with equal slot
   counts; ``initial="round_robin"`` deals copy c to GPU c mod G instead). Its largest GPU load, or
   (1 + ``balance_slack``) x the mean if higher, is the cap no returned plan exceeds. With a co-activation matrix
   a second start puts experts that are picked together on one node (node loads within 2% of their mean), packed
   the same way inside each node.
3. Local search, from each start: steepest descent on the L_8 norm of all link times (a smooth stand-in for the
   largest that also rewards lowering one of two tied links). Moves: swapping a copy on the busiest link's GPU /
   node with a copy on any other GPU (memory stays balanced; a swap with an empty slot is a move), and shifting
   2-98% of an expert's traffic share between two of its copies. Every move is scored exactly under the model
   (O(1) per swap from per-unit sums) and applied only when it lowers the norm with both GPUs under the cap. The
   search also runs with the cap relaxed to 1.05 x the mean; a repair phase (the swaps and shifts that
   cut the load above the cap most) then brings the plan back under the cap, and the descent runs again; plans
   that cannot be repaired are dropped. Of all visited plans the one with the smallest largest link time wins;
   a last polish flattens its GPU loads (descends their L_8 norm) without slowing its busiest link.
   Deterministic: no random numbers, ties go to the lower index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_int, check_number
from .placement import Placement

__all__ = ["place_experts", "Topology", "evaluate", "copies_for", "routing_stats"]

NVLINK_GBPS = 450.0  # per GPU port, one direction (H100/H200 NVLink 4: 900 GB/s both ways)
IB_GBPS_PER_GPU = 50.0  # one 400 Gb/s NIC per GPU
_P = 8  # the norm the search descends (_pow8 computes x^8)
_MIN_SHARE = 0.02  # a shift never leaves a copy with less of its expert's traffic than this
_RELAX = (0.05,)  # relaxed caps searched (then repaired)


@dataclass(frozen=True)
class Topology:
    """G GPUs in nodes of ``gpus_per_node``; link bandwidths in GB/s and latencies in microseconds; or a full
    [G, G] bandwidth matrix (row: sender, column: receiver; the diagonal is ignored)."""

    num_gpus: int
    gpus_per_node: int
    nvlink_gbps: float = NVLINK_GBPS
    ib_gbps_per_gpu: float = IB_GBPS_PER_GPU
    matrix: np.ndarray | None = None
    latency_us: np.ndarray | float = 0.0

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)

    def node_of(self) -> np.ndarray:
        return np.arange(self.num_gpus) // min(self.gpus_per_node, self.num_gpus)


# ---- inputs ----------------------------------------------------------------------------------------------------
def _array(name, x, dtype=np.float64):
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers (a list, numpy array or tensor), got {type(x).__name__}") from None
    return a


def _as_load(load, E):
    a = _array("load", load)
    if a.shape != (E,):
        raise ValueError(f"load must have one entry per expert, shape ({E},), got shape {a.shape}")
    if not np.all(np.isfinite(a)) or (a < 0).any():
        raise ValueError("load must hold finite, non-negative per-expert counts")
    return a if a.sum() > 0 else np.ones(E)


def _as_coact(coactivation, E):
    if coactivation is None:
        return np.zeros((E, E))
    c = _array("coactivation", coactivation)
    if c.shape != (E, E):
        raise ValueError(f"coactivation must be [{E}, {E}] (tokens choosing both experts), got shape {list(c.shape)}")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("coactivation must hold finite, non-negative counts")
    c = (c + c.T) / 2  # an asymmetric count (e.g. only e < f filled) is read as the symmetric one
    np.fill_diagonal(c, 0.0)
    return c


def routing_stats(topk_ids, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(load [E], coactivation [E, E]) of historical routing: pairs per expert, and tokens that chose both e and f.
    ``topk_ids``: int [T, k] (a tensor or array) of expert ids; entries of -1 (no expert) are skipped."""
    check_int("num_experts", num_experts, lo=1)
    ids = _array("topk_ids", topk_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {list(ids.shape)}")
    if ((ids < -1) | (ids >= num_experts)).any():
        raise ValueError(f"topk_ids must hold expert ids in [0, {num_experts}) or -1")
    E, k = num_experts, ids.shape[1]
    load = np.bincount(ids[ids >= 0], minlength=E).astype(np.float64)
    co = np.zeros(E * E)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = ids[:, i], ids[:, j]
            ok = (a >= 0) & (b >= 0) & (a != b)
            co += np.bincount(a[ok] * E + b[ok], minlength=E * E)
    co = co.reshape(E, E)
    return load, co + co.T


def copies_for(load: np.ndarray, slots: int, max_copies: int | None = None) -> np.ndarray:
    """How many copies each expert gets when ``slots`` >= E copies are handed out: one each, then each further copy
    to the expert whose copies carry the most load apiece (ties: lower expert), at most ``max_copies`` each."""
    E = len(load)
    n = np.ones(E, dtype=np.int64)
    load = np.asarray(load, dtype=np.float64)
    for _ in range(slots - E):
        per = np.where(n < (max_copies or slots), load / n, -np.inf)
        n[int(np.argmax(per))] += 1
    return n


def _topology(G, g, link_bandwidth, link_latency) -> Topology:
    if link_latency is None:
        lat = 0.0
    else:
        lat = _array("link_latency", link_latency)
        if lat.shape not in ((), (G, G)):
            raise ValueError(f"link_latency must be a number or a [{G}, {G}] matrix (microseconds), got shape "
                             f"{list(lat.shape)}")
        if not np.all(np.isfinite(lat)) or (lat < 0).any():
            raise ValueError("link_latency must be finite and >= 0 (microseconds)")
    if link_bandwidth is None:
        return Topology(G, g, latency_us=lat)
    bw = _array("link_bandwidth", link_bandwidth)
    if bw.shape == (2,):
        if not np.all(np.isfinite(bw)) or (bw <= 0).any():
            raise ValueError(f"link_bandwidth (nvlink_gbps, ib_gbps_per_gpu) must be positive GB/s, got {bw.tolist()}")
        return Topology(G, g, float(bw[0]), float(bw[1]), latency_us=lat)
    if bw.shape == (G, G):
        off = ~np.eye(G, dtype=bool)
        if not np.all(np.isfinite(bw[off])) or (bw[off] <= 0).any():
            raise ValueError("link_bandwidth matrix must hold positive, finite GB/s off the diagonal")
        return Topology(G, g, matrix=bw, latency_us=lat)
    raise ValueError(f"link_bandwidth must be None, (nvlink_gbps, ib_gbps_per_gpu) or a [{G}, {G}] matrix, "
                     f"got shape {list(bw.shape)}")


# ---- the model ---------------------------------------------------------------------------------------------------
class _Model:
    """Copies and the link model. A token picks copy c with probability q_c = w_c L_e / T (T = sum L / top_k tokens)
    and copies c, d together with probability c_cd = w_c w_d C_ef / T. A unit U misses a token with probability
    prod_c (1 - q_c) x prod_{c<d} (1 - q_c - q_d + c_cd) / ((1 - q_c)(1 - q_d)): exact for one or two copies and
    for independent experts, a second-order approximation otherwise. With a_c = log(1 - q_c) and b_cd = log of that pair factor, the unit
    receives D = T (1 - exp(sum a + sum b)) distinct tokens (at most its pairs and T): sums over the unit's copies,
    so a move is scored from per-unit sums."""

    def __init__(self, topo: Topology, load, coact, copy_expert, tokens: float, bytes_per_token):
        E = len(load)
        self.topo, self.E, self.T = topo, E, float(tokens)
        self.L = np.append(load, 0.0)  # index E: an empty slot (a "phantom" copy with no load)
        self.q = self.L / self.T
        self.ce = np.asarray(copy_expert, dtype=np.int64)
        C = np.zeros((E + 1, E + 1))
        C[:E, :E] = coact / self.T
        cb = C[np.ix_(self.ce, self.ce)]
        cb[self.ce[:, None] == self.ce[None, :]] = 0.0  # two copies of one expert never serve the same pair
        self.cbase = cb
        G = topo.num_gpus
        self.g = min(topo.gpus_per_node, G)
        self.N = G // self.g
        self.node = np.arange(G) // self.g
        us = bytes_per_token / 1e3  # tokens x bytes / (GB/s) -> microseconds
        lat = np.asarray(topo.latency_us, dtype=np.float64)
        self.coef_n = self.lat_n = self.tok_n = 0.0
        if topo.matrix is not None:
            inv = 1.0 / np.asarray(topo.matrix, dtype=np.float64)
            np.fill_diagonal(inv, 0.0)
            t_in = inv / G * us + (lat if lat.ndim == 2 else float(lat))  # per token-share of each link
            np.fill_diagonal(t_in, 0.0)
            worst = t_in.argmax(0)  # the slowest link into each GPU (it carries 1/G of the GPU's tokens)
            self.coef_g = inv[worst, np.arange(G)] / G * us
            self.lat_g = lat[worst, np.arange(G)] if lat.ndim == 2 else np.full(G, float(lat))
            self.tok_g = 1.0 / G
            self.node_links, self.mode = False, "matrix"
        else:
            lat_s = float(lat.max()) if lat.size else 0.0
            self.tok_g = (self.g - 1) / G
            self.coef_g = np.full(G, self.tok_g / topo.nvlink_gbps * us)
            self.lat_g = np.full(G, lat_s if self.g > 1 else 0.0)
            self.node_links, self.mode = self.N > 1, "two-level"
            self.tok_n = (G - self.g) / G
            self.coef_n = self.tok_n / (topo.ib_gbps_per_gpu * self.g) * us
            self.lat_n = lat_s

    @staticmethod
    def a(qc):
        return np.log1p(-np.minimum(qc, 1.0 - 1e-12))

    def b(self, qc, qd, ccd):
        return np.log(np.maximum(1.0 - qc - qd + ccd, 1e-12)) - self.a(qc) - self.a(qd)

    def distinct(self, A, al, be):
        return np.clip(-np.expm1(al + be) * self.T, 0.0, np.minimum(A, self.T))

    def t_gpu(self, A, al, be, j):
        d = self.distinct(A, al, be)
        return d * self.coef_g[j] + np.where(d > 0, self.lat_g[j], 0.0)

    def t_node(self, A, al, be):
        d = self.distinct(A, al, be)
        return d * self.coef_n + np.where(d > 0, self.lat_n, 0.0)


class _State:
    """An assignment of copies to GPUs with shares, and its per-unit sums: A (pairs: the GPU load), al (sum of a),
    be (sum of b over pairs), and the rows R[c, unit] = sum of b between copy c and the unit's copies."""

    def __init__(self, m: _Model, gpu: np.ndarray, cw: np.ndarray):
        self.m, self.gpu, self.cw = m, np.asarray(gpu, dtype=np.int64).copy(), np.asarray(cw, np.float64).copy()
        self.refresh()

    def copy(self) -> "_State":
        new = object.__new__(_State)
        new.m = self.m
        for k, v in self.__dict__.items():
            if k != "m":
                setattr(new, k, v.copy())
        return new

    def refresh(self):
        m = self.m
        qc = m.q[m.ce] * self.cw
        self.cl = m.L[m.ce] * self.cw
        self.qa = m.a(qc)
        self.bm = m.b(qc[:, None], qc[None, :], m.cbase * np.outer(self.cw, self.cw))
        np.fill_diagonal(self.bm, 0.0)
        self.has = np.zeros((m.E + 1, m.topo.num_gpus), dtype=bool)
        self.has[m.ce, self.gpu] = True
        self._rows()

    def _rows(self):
        m, n = self.m, len(self.gpu)
        U = np.zeros((n, m.topo.num_gpus))
        U[np.arange(n), self.gpu] = 1.0
        self.Rg = self.bm @ U
        self.Rn = self.Rg.reshape(n, m.N, m.g).sum(2)
        self._sums()

    def _sums(self):
        m, gpu = self.m, self.gpu
        G, ar = m.topo.num_gpus, np.arange(len(gpu))
        nd = m.node[gpu]
        self.Ag = np.bincount(gpu, weights=self.cl, minlength=G)
        self.alg = np.bincount(gpu, weights=self.qa, minlength=G)
        self.beg = 0.5 * np.bincount(gpu, weights=self.Rg[ar, gpu], minlength=G)
        self.An = np.bincount(nd, weights=self.cl, minlength=m.N)
        self.aln = np.bincount(nd, weights=self.qa, minlength=m.N)
        self.ben = 0.5 * np.bincount(nd, weights=self.Rn[ar, nd], minlength=m.N)
        self.tg = m.t_gpu(self.Ag, self.alg, self.beg, np.arange(G))
        self.tn = m.t_node(self.An, self.aln, self.ben) if m.node_links else np.zeros(0)

    def times(self):
        return np.concatenate([self.tg, self.tn])

    def max_link(self) -> float:
        return float(self.times().max())

    def norm(self, ref) -> float:
        """sum of (t / ref)^8 over all links."""
        return float(_pow8(self.times() / ref).sum())

    def apply_swap(self, a, b):
        m = self.m
        ja, jb = int(self.gpu[a]), int(self.gpu[b])
        delta = self.bm[:, b] - self.bm[:, a]
        self.Rg[:, ja] += delta
        self.Rg[:, jb] -= delta
        na, nb = m.node[ja], m.node[jb]
        if na != nb:
            self.Rn[:, na] += delta
            self.Rn[:, nb] -= delta
        ea, eb = m.ce[a], m.ce[b]
        self.has[ea, ja] = self.has[eb, jb] = False
        self.has[ea, jb] = self.has[eb, ja] = True
        self.gpu[a], self.gpu[b] = jb, ja
        self._sums()

    def apply_shift(self, i, j, d):
        """Move share d of an expert's traffic from its copy i to its copy j."""
        m = self.m
        self.cw[i] -= d
        self.cw[j] += d
        qc = m.q[m.ce] * self.cw
        for c in (i, j):
            self.cl[c] = m.L[m.ce[c]] * self.cw[c]
            self.qa[c] = m.a(qc[c])
            row = m.b(qc[c], qc, m.cbase[c] * self.cw[c] * self.cw)
            row[c] = 0.0
            self.bm[c], self.bm[:, c] = row, row
        self._rows()


def _pow8(x):
    x = x * x
    x = x * x
    return x * x


def _top3(v):
    idx = np.argsort(-v, kind="stable")[:3]
    idx = np.concatenate([idx, np.full(3 - len(idx), -1)])
    val = np.where(idx >= 0, v[np.maximum(idx, 0)], -np.inf)
    return idx, val


def _max_excluding(idx, val, x1, x2):
    """Per candidate: the largest of a vector (given by its top 3) that is not at position x1 or x2."""
    out = np.full(len(x1), -np.inf)
    done = np.zeros(len(x1), dtype=bool)
    for i, v in zip(idx, val):
        take = ~done & (x1 != i) & (x2 != i)
        out = np.where(take, v, out)
        done |= take
    return out


def _score(st: _State, ref, j1, g1, j2, g2, n1, u1, n2, u2, two_nodes):
    """For candidate moves that change GPUs j1, j2 (to the sums g1, g2 = (A, al, be)) and node n1 (to u1), and n2
    (to u2) when ``two_nodes``: the new norm (sum of (t/ref)^8) and the new largest link time."""
    m = st.m
    f = lambda t: _pow8(t / ref)  # noqa: E731
    t1, t2 = m.t_gpu(*g1, j1), m.t_gpu(*g2, j2)
    S = float(f(st.tg).sum() + (f(st.tn).sum() if m.node_links else 0.0))
    S = S - f(st.tg[j1]) - f(st.tg[j2]) + f(t1) + f(t2)
    idx, val = _top3(st.tg)
    mx = np.maximum(np.maximum(t1, t2), _max_excluding(idx, val, j1, j2))
    if m.node_links:
        v1 = m.t_node(*u1)
        v2 = np.where(two_nodes, m.t_node(*u2), st.tn[n2])
        S = S - f(st.tn[n1]) + f(v1) + np.where(two_nodes, f(v2) - f(st.tn[n2]), 0.0)
        nidx, nval = _top3(st.tn)
        mx = np.maximum(mx, np.maximum(np.maximum(v1, v2), _max_excluding(nidx, nval, n1, n2)))
    return S, mx


def _swap_candidates(st: _State, hot: np.ndarray, cold: np.ndarray, ref):
    """Every allowed swap of a copy in ``hot`` with one in ``cold``: (a, b, norm, max link, new loads of both GPUs)."""
    m = st.m
    a, b = np.repeat(hot, len(cold)), np.tile(cold, len(hot))
    ja, jb = st.gpu[a], st.gpu[b]
    ea, eb = m.ce[a], m.ce[b]
    ok = (ja != jb) & (ea != eb) & ~st.has[ea, jb] & ~st.has[eb, ja]
    a, b, ja, jb = a[ok], b[ok], ja[ok], jb[ok]
    if not len(a):
        return None
    bab = st.bm[a, b]
    dA, da = st.cl[b] - st.cl[a], st.qa[b] - st.qa[a]
    g1 = (st.Ag[ja] + dA, st.alg[ja] + da, st.beg[ja] - st.Rg[a, ja] + st.Rg[b, ja] - bab)
    g2 = (st.Ag[jb] - dA, st.alg[jb] - da, st.beg[jb] - st.Rg[b, jb] + st.Rg[a, jb] - bab)
    na, nb = m.node[ja], m.node[jb]
    two = na != nb
    u1 = (np.where(two, st.An[na] + dA, st.An[na]), np.where(two, st.aln[na] + da, st.aln[na]),
          np.where(two, st.ben[na] - st.Rn[a, na] + st.Rn[b, na] - bab, st.ben[na]))
    u2 = (np.where(two, st.An[nb] - dA, st.An[nb]), np.where(two, st.aln[nb] - da, st.aln[nb]),
          np.where(two, st.ben[nb] - st.Rn[b, nb] + st.Rn[a, nb] - bab, st.ben[nb]))
    S, mx = _score(st, ref, ja, g1, jb, g2, na, u1, nb, u2, two)
    return a, b, S, mx, g1[0], g2[0]


def _shift_candidates(st: _State, pairs: np.ndarray, ref):
    """Moving traffic share from copy i to copy j of the same expert, by a few amounts: (i, j, d, norm, max link,
    new loads of both GPUs)."""
    if not len(pairs):
        return None
    m = st.m
    i, j = pairs[:, 0], pairs[:, 1]
    gi, gj = st.gpu[i], st.gpu[j]
    Le = m.L[m.ce[i]]
    eq = (st.Ag[gi] - st.Ag[gj]) / (2 * np.maximum(Le, 1e-300))  # the shift that equalises the two GPUs
    ds = [eq, st.cw[i] / 2, st.cw[i] / 4, st.cw[i] / 16]
    room = st.cw[i] - _MIN_SHARE
    i, j, gi, gj, Le, room = (np.tile(x, len(ds)) for x in (i, j, gi, gj, Le, room))
    d = np.minimum(np.concatenate(ds), room)
    ok = (d > 1e-6) & (Le > 0)
    i, j, gi, gj, Le, d = i[ok], j[ok], gi[ok], gj[ok], Le[ok], d[ok]
    if not len(i):
        return None
    qe = m.q[m.ce[i]]
    wi, wj = st.cw[i] - d, st.cw[j] + d  # the new shares
    qi, qj = wi * qe, wj * qe
    dai, daj = m.a(qi) - st.qa[i], m.a(qj) - st.qa[j]
    qc = m.q[m.ce] * st.cw

    def rowdiff(c, wc, qcn):  # new b between the moved copy and every copy, minus the old
        r = m.b(qcn[:, None], qc[None, :], m.cbase[c] * wc[:, None] * st.cw[None, :]) - st.bm[c]
        r[np.arange(len(c)), i] = 0.0
        r[np.arange(len(c)), j] = 0.0
        return r

    ri, rj = rowdiff(i, wi, qi), rowdiff(j, wj, qj)
    pair = m.b(qi, qj, 0.0) - st.bm[i, j]
    on = lambda r, gpus: (r * (st.gpu[None, :] == gpus[:, None])).sum(1)  # noqa: E731
    in_node = lambda r, nodes: (r * (m.node[st.gpu][None, :] == nodes[:, None])).sum(1)  # noqa: E731
    g1 = (st.Ag[gi] - d * Le, st.alg[gi] + dai, st.beg[gi] + on(ri, gi))
    g2 = (st.Ag[gj] + d * Le, st.alg[gj] + daj, st.beg[gj] + on(rj, gj))
    ni, nj = m.node[gi], m.node[gj]
    two = ni != nj
    bi, bj = in_node(ri, ni), in_node(rj, nj)
    u1 = (np.where(two, st.An[ni] - d * Le, st.An[ni]), np.where(two, st.aln[ni] + dai, st.aln[ni] + dai + daj),
          np.where(two, st.ben[ni] + bi, st.ben[ni] + bi + in_node(rj, ni) + pair))
    u2 = (np.where(two, st.An[nj] + d * Le, st.An[nj]), st.aln[nj] + daj, st.ben[nj] + bj)
    S, mx = _score(st, ref, gi, g1, gj, g2, ni, u1, nj, u2, two)
    return i, j, d, S, mx, g1[0], g2[0]


def _hot_cold(st: _State):
    m = st.m
    unit_nodes = m.node_links and st.tn.max() >= st.tg.max()
    if unit_nodes:
        busiest = int(np.argmax(st.tn))
        in_hot = m.node[st.gpu] == busiest
    else:
        in_hot = st.gpu == int(np.argmax(st.tg))
    return np.flatnonzero(in_hot), np.flatnonzero(~in_hot)


def _shift_pairs(m: _Model):
    pairs = []
    for e in np.flatnonzero(np.bincount(m.ce[m.ce < m.E], minlength=m.E) > 1):
        cs = np.flatnonzero(m.ce == e)
        pairs += [(i, j) for i in cs for j in cs if i != j]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _from(pairs, copies, n):
    """The shift pairs (i, j) whose i is one of ``copies``."""
    if not len(pairs):
        return pairs
    mask = np.zeros(n, dtype=bool)
    mask[copies] = True
    return pairs[mask[pairs[:, 0]]]


def _descend(st: _State, cap: float, max_iters: int, pairs, trace: list | None = None):
    """Steepest descent on the norm with every GPU load <= cap. Returns (best visited state by max link, iterations)."""
    ref = max(st.max_link(), 1e-30)
    cur = st.norm(ref)
    best, best_key = st.copy(), (st.max_link(), cur)
    it = 0
    for it in range(1, max_iters + 1):
        hot, cold = _hot_cold(st)
        choice = None
        sw = _swap_candidates(st, hot, cold, ref) if len(hot) and len(cold) else None
        if sw is not None:
            a, b, S, mx, A1, A2 = sw
            S = np.where(np.maximum(A1, A2) <= cap * (1 + 1e-12), S, np.inf)
            x = int(np.argmin(S))
            if S[x] < cur * (1 - 1e-9):
                choice = (S[x], "swap", int(a[x]), int(b[x]))
        sh = _shift_candidates(st, _from(pairs, hot, len(st.gpu)), ref)
        if sh is not None:
            i, j, d, S, mx, A1, A2 = sh
            S = np.where(np.maximum(A1, A2) <= cap * (1 + 1e-12), S, np.inf)
            x = int(np.argmin(S))
            if S[x] < cur * (1 - 1e-9) and (choice is None or S[x] < choice[0]):
                choice = (S[x], "shift", int(i[x]), int(j[x]), float(d[x]))
        if choice is None:
            it -= 1
            break
        if choice[1] == "swap":
            st.apply_swap(choice[2], choice[3])
        else:
            st.apply_shift(choice[2], choice[3], choice[4])
        cur = st.norm(ref)
        if trace is not None:
            trace.append(ref * cur ** (1 / _P))
        key = (st.max_link(), cur)
        if key < best_key:
            best, best_key = st.copy(), key
    return best, it


def _repair(st: _State, cap: float, pairs, max_iters: int) -> bool:
    """Bring every GPU load to <= cap: repeatedly the swap or shift (involving an overloaded GPU) that lowers the
    total excess over the cap most, ties by the norm. False when no move lowers it."""
    ref = max(st.max_link(), 1e-30)
    tol = cap * 1e-12
    for _ in range(max(max_iters, 1) * 4):
        over = np.maximum(st.Ag - cap, 0.0)
        X = float(over.sum())
        if X <= tol:
            return True
        bad = np.isin(st.gpu, np.flatnonzero(over > tol))
        best = None
        sw = _swap_candidates(st, np.flatnonzero(bad), np.flatnonzero(st.Ag[st.gpu] < cap), ref)
        if sw is not None:
            a, b, S, mx, A1, A2 = sw
            new = X - over[st.gpu[a]] - over[st.gpu[b]] + np.maximum(A1 - cap, 0) + np.maximum(A2 - cap, 0)
            x = int(np.lexsort((S, new))[0])
            best = (new[x], S[x], "swap", int(a[x]), int(b[x]))
        sh = _shift_candidates(st, _from(pairs, np.flatnonzero(bad), len(st.gpu)), ref)
        if sh is not None:
            i, j, d, S, mx, A1, A2 = sh
            new = X - over[st.gpu[i]] - over[st.gpu[j]] + np.maximum(A1 - cap, 0) + np.maximum(A2 - cap, 0)
            x = int(np.lexsort((S, new))[0])
            if best is None or (new[x], S[x]) < best[:2]:
                best = (new[x], S[x], "shift", int(i[x]), int(j[x]), float(d[x]))
        if best is None or best[0] >= X * (1 - 1e-9):
            return False
        if best[2] == "swap":
            st.apply_swap(best[3], best[4])
        else:
            st.apply_shift(best[3], best[4], best[5])
    return float(np.maximum(st.Ag - cap, 0.0).sum()) <= tol


def _polish(st: _State, cap: float, pairs, max_iters: int) -> int:
    """Flatten the GPU loads (descend the L_8 norm of GPU loads by swaps from the most loaded GPU and by shifts)
    without raising the busiest link's time or any GPU above the cap: fewer GPUs sit at the cap, so fewer exceed it
    when the real loads differ a little from the history. Returns the moves made."""
    lim = st.max_link() * (1 + 1e-12)
    ref = max(st.max_link(), 1e-30)
    mean = max(float(st.Ag.mean()), 1e-300)
    f = lambda A: _pow8(A / mean)  # noqa: E731
    for it in range(max_iters):
        cur = float(f(st.Ag).sum())
        j = int(np.argmax(st.Ag))
        best = None
        sw = _swap_candidates(st, np.flatnonzero(st.gpu == j), np.flatnonzero(st.gpu != j), ref)
        if sw is not None:
            a, b, S, mx, A1, A2 = sw
            new = cur - f(st.Ag[st.gpu[a]]) - f(st.Ag[st.gpu[b]]) + f(A1) + f(A2)
            new = np.where((mx <= lim) & (np.maximum(A1, A2) <= cap * (1 + 1e-12)), new, np.inf)
            x = int(np.argmin(new))
            best = (new[x], "swap", int(a[x]), int(b[x]))
        sh = _shift_candidates(st, _from(pairs, np.flatnonzero(st.gpu == j), len(st.gpu)), ref)
        if sh is not None:
            i, jj, d, S, mx, A1, A2 = sh
            new = cur - f(st.Ag[st.gpu[i]]) - f(st.Ag[st.gpu[jj]]) + f(A1) + f(A2)
            new = np.where((mx <= lim) & (np.maximum(A1, A2) <= cap * (1 + 1e-12)), new, np.inf)
            x = int(np.argmin(new))
            if best is None or new[x] < best[0]:
                best = (new[x], "shift", int(i[x]), int(jj[x]), float(d[x]))
        if best is None or not best[0] < cur * (1 - 1e-9):
            return it
        if best[1] == "swap":
            st.apply_swap(best[2], best[3])
        else:
            st.apply_shift(best[2], best[3], best[4])
    return max_iters


# ---- starts ------------------------------------------------------------------------------------------------------
def _phantom_gpus(G, g, count):
    """Empty slots spread over the nodes first: slot i on node i mod N, GPU i // N of it."""
    N = G // g
    return np.array([(i % N) * g + (i // N) for i in range(count)], dtype=np.int64)


def _lpt_start(m: _Model, cl: np.ndarray, per_gpu: int, n_phantom: int) -> np.ndarray:
    G = m.topo.num_gpus
    gpu = np.full(len(m.ce), -1, dtype=np.int64)
    load = np.zeros(G)
    free = np.full(G, per_gpu)
    held = np.zeros((m.E + 1, G), dtype=bool)
    phantoms = np.flatnonzero(m.ce == m.E)
    for c, j in zip(phantoms, _phantom_gpus(G, m.g, n_phantom)):
        gpu[c], free[j] = j, free[j] - 1
        held[m.E, j] = True
    for c in np.argsort(-cl, kind="stable"):
        if gpu[c] >= 0:
            continue
        ok = (free > 0) & ~held[m.ce[c]]
        j = int(np.argmin(np.where(ok, load, np.inf)))
        gpu[c], load[j], free[j] = j, load[j] + cl[c], free[j] - 1
        held[m.ce[c], j] = True
    return gpu


def _cluster_start(m: _Model, cl: np.ndarray, affinity: np.ndarray, per_gpu: int, n_phantom: int,
                   slack: float = 0.02) -> np.ndarray | None:
    """Co-activated experts on one node: copies by descending load, each to the node (with free slots, load within
    ``slack`` of the node mean, fewer than g copies of the same expert) with the most affinity (the pair terms b:
    positive for experts picked together more often than by chance) to it; then longest-processing-time packing
    inside every node."""
    G, g, N = m.topo.num_gpus, m.g, m.N
    if N < 2:
        return None
    n = len(m.ce)
    gpu = np.full(n, -1, dtype=np.int64)
    phantoms = np.flatnonzero(m.ce == m.E)
    gpu[phantoms] = _phantom_gpus(G, g, n_phantom)
    node_of = np.where(gpu >= 0, m.node[np.maximum(gpu, 0)], -1)
    room = per_gpu * g - np.bincount(node_of[node_of >= 0], minlength=N)
    cap = cl.sum() / N * (1.0 + slack)
    load = np.zeros(N)
    co = np.zeros((n, N))
    count = np.zeros((m.E + 1, N), dtype=np.int64)
    for c in np.argsort(-cl, kind="stable"):
        if node_of[c] >= 0:
            continue
        e = m.ce[c]
        ok = (room > 0) & (load + cl[c] <= cap) & (count[e] < g)
        if not ok.any():
            ok = (room > 0) & (count[e] < g)
        if not ok.any():
            return None
        nd = int(np.argmax(np.where(ok, co[c] - 1e-9 * load, -np.inf)))
        node_of[c], load[nd], room[nd] = nd, load[nd] + cl[c], room[nd] - 1
        count[e, nd] += 1
        co[:, nd] += affinity[:, c]
    for nd in range(N):
        gl = np.zeros(g)
        free = np.full(g, per_gpu) - np.bincount(gpu[(gpu >= 0) & (m.node[np.maximum(gpu, 0)] == nd)] - nd * g,
                                                 minlength=g)
        held = np.zeros((m.E + 1, g), dtype=bool)
        held[m.E] = free < per_gpu  # a GPU with an empty slot takes no second one
        members = np.flatnonzero((node_of == nd) & (gpu < 0))
        for c in members[np.argsort(-cl[members], kind="stable")]:
            ok = (free > 0) & ~held[m.ce[c]]
            if not ok.any():
                return None
            j = int(np.argmin(np.where(ok, gl, np.inf)))
            gpu[c], gl[j], free[j] = nd * g + j, gl[j] + cl[c], free[j] - 1
            held[m.ce[c], j] = True
    return gpu


# ---- figures -----------------------------------------------------------------------------------------------------
def _metrics(st: _State, expert_bytes=None) -> dict:
    m = st.m
    real = m.ce < m.E
    load = st.Ag
    t = st.times()
    worst = int(np.argmax(t))
    tok_g = m.distinct(st.Ag, st.alg, st.beg) * m.tok_g
    tok_n = m.distinct(st.An, st.aln, st.ben) * m.tok_n if m.node_links else np.zeros(0)
    tokens = np.concatenate([tok_g, tok_n])
    copies = np.bincount(st.gpu[real], minlength=m.topo.num_gpus)
    name = (f"nvlink gpu {worst}" if m.mode == "two-level" else f"link into gpu {worst}") if worst < len(st.tg) \
        else f"ib node {worst - len(st.tg)}"
    return {
        "max_over_mean": float(load.max() / load.mean()) if load.mean() > 0 else float("nan"),
        "max_over_mean_gpu_load": float(load.max() / load.mean()) if load.mean() > 0 else float("nan"),  # alias
        "max_gpu_load": float(load.max()),
        "mean_gpu_load": float(load.mean()),
        "max_link_load": float(tokens[worst]),  # tokens on the link that takes longest
        "max_link_us": float(t.max()),
        "max_link": name,
        "max_nvlink_tokens": float(tok_g.max()),
        "max_ib_tokens": float(tok_n.max()) if tok_n.size else 0.0,
        "gpu_load": [float(x) for x in load],
        "copies_per_gpu": [int(x) for x in copies],
        "memory_per_gpu": [float(x) * float(expert_bytes) for x in copies] if expert_bytes is not None else None,
        "model": m.mode,
    }


def _prepare(E, load, coactivation, top_k, tokens):
    """(L pairs per expert, C co-activated pairs [E, E], T tokens, whether C was given) from the user's inputs."""
    if tokens is not None:
        check_int("tokens", tokens, lo=1)
    L = _as_load(load, E) if load is not None else np.full(E, float(top_k))
    T = L.sum() / top_k  # an expert with more pairs than T (not from top-k routing) counts as picked by all
    given = coactivation is not None
    if given:  # counts above min(L_e, L_f) cannot happen; clip them (e.g. counts from another window)
        C = np.minimum(_as_coact(coactivation, E), np.minimum(L[:, None], L[None, :]))
    else:  # nothing known: experts picked independently
        C = np.outer(L, L) / T
        np.fill_diagonal(C, 0.0)
    if tokens is not None:
        f = tokens / T
        L, C, T = L * f, C * f, float(tokens)
    return L, C, T, given


def evaluate(placement: Placement, load=None, coactivation=None, topology: Topology | None = None, *,
             gpus_per_node: int = 8, link_bandwidth=None, link_latency=None, top_k: int = 2, tokens=None,
             bytes_per_token: int = 7168, expert_bytes=None) -> dict:
    """The model's figures for any placement (the keys of ``Placement.report()``): max GPU load / mean, the busiest
    link's tokens and time, per-GPU load, copies and memory. Arguments as for ``place_experts`` (``topology``, if
    given, replaces gpus_per_node / link_bandwidth / link_latency)."""
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a Placement, got {type(placement).__name__}")
    E, G = placement.num_experts, placement.num_ranks
    check_int("top_k", top_k, lo=1, hi=E)
    if topology is None:
        check_int("gpus_per_node", gpus_per_node, lo=1)
        g = min(gpus_per_node, G)
        if G % g:
            raise ValueError(f"gpus_per_node ({gpus_per_node}) must divide the {G} ranks")
        topology = _topology(G, g, link_bandwidth, link_latency)
    L, C, T, _ = _prepare(E, load, coactivation, top_k, tokens)
    ce, cw, cg = [], [], []
    for e in range(E):
        for r, w in placement.copies(e):
            ce.append(e), cw.append(w), cg.append(r)
    m = _Model(topology, L, C, ce, T, bytes_per_token)
    return _metrics(_State(m, np.asarray(cg), np.asarray(cw)), expert_bytes)


# ---- the planner -------------------------------------------------------------------------------------------------
def place_experts(
    num_experts: int,
    num_gpus: int,
    gpus_per_node: int = 8,
    load=None,
    link_bandwidth=None,
    link_latency=None,
    coactivation=None,
    top_k: int = 2,
    tokens: int | None = None,
    gpu_memory: float | None = None,
    expert_bytes: float | None = None,
    max_replicas: int | None = None,
    *,
    bytes_per_token: int = 7168,
    balance_slack: float = 0.0,
    max_iters: int = 200,
    initial: str = "lpt",
) -> Placement:
    """Place E experts on G GPUs: minimise the busiest link's time while no GPU's load exceeds the balanced start's.

    Args:
        num_experts, num_gpus, gpus_per_node: E, G and g (g must divide G; g >= G is one node).
        load: expected (token, expert) pairs per expert, [E] (historical counts, any distribution; list, array or
            tensor); None: uniform. ``routing_stats(topk_ids, E)`` turns recorded routing into load + coactivation.
        link_bandwidth: None (NVLink 450 GB/s per GPU port, InfiniBand 50 GB/s per GPU), a pair
            (nvlink_gbps, ib_gbps_per_gpu), or a [G, G] matrix of GB/s (row sends to column).
        link_latency: microseconds a link costs when it carries anything: a number, or [G, G] with a matrix.
        coactivation: [E, E] tokens that chose both experts (co-activated experts together save link traffic).
        top_k: experts per token (the uniform load when ``load`` is None; the scale with ``tokens``).
        tokens: tokens per step; the loads are rescaled to tokens x top_k pairs so that the link loads in
            ``report()`` are tokens per step (None: the loads' own units).
        gpu_memory, expert_bytes: bytes per GPU and per expert copy; a plan that needs more raises ValueError.
        max_replicas: extra copies of hot experts, in total (None: E <= G fills the G - E spare GPUs, E > G the
            (-E) mod G slots that make every GPU hold the same number of copies). E <= G allows at most G - E.
        bytes_per_token: bytes one dispatched token moves (7168 x 1 byte: hidden 7168 in FP8).
        balance_slack: the cap on any GPU's load is max(balanced start's largest, (1 + slack) x mean).
        max_iters: moves per local-search run.
        initial: "lpt" (load-ordered round-robin, the default) or "round_robin" (copy c on GPU c mod G).
    Returns a ``Placement``: ``expert_to_rank`` the primary (largest-share) copy of each expert, ``replicas`` every
    copy with its share (None without replicas), ``report()`` the figures of ``evaluate`` plus the balanced start's
    (``start_*``), ``cap_gpu_load`` and the search's runs.
    """
    check_int("num_experts", num_experts, lo=1)
    check_int("num_gpus", num_gpus, lo=1)
    check_int("gpus_per_node", gpus_per_node, lo=1)
    check_int("top_k", top_k, lo=1, hi=num_experts)
    check_int("max_iters", max_iters, lo=0)
    check_int("bytes_per_token", bytes_per_token, lo=1)
    if check_number("balance_slack", balance_slack) < 0:
        raise ValueError(f"balance_slack must be >= 0, got {balance_slack}")
    if initial not in ("lpt", "round_robin"):
        raise ValueError(f"initial must be 'lpt' or 'round_robin', got {initial!r}")
    E, G = num_experts, num_gpus
    g = min(gpus_per_node, G)
    if G % g:
        raise ValueError(f"gpus_per_node ({gpus_per_node}) must divide num_gpus ({num_gpus})")
    L, C, T, have_coact = _prepare(E, load, coactivation, top_k, tokens)
    if max_replicas is None:
        max_replicas = G - E if E <= G else (-E) % G
    check_int("max_replicas", max_replicas, lo=0)
    if E <= G and max_replicas > G - E:
        raise ValueError(f"max_replicas={max_replicas}: with num_experts <= num_gpus a GPU holds at most one expert, "
                         f"so at most the {G - E} spare GPUs can hold replicas")
    if max_replicas > E * (G - 1):
        raise ValueError(f"max_replicas={max_replicas}: each of the {E} experts has at most one copy per GPU "
                         f"({E * (G - 1)} replicas at most)")
    slots = E + max_replicas
    per_gpu = -(-slots // G)  # ceil: the most copies any GPU holds (memory is balanced: the others hold one less)
    if (gpu_memory is None) != (expert_bytes is None):
        raise ValueError("gpu_memory and expert_bytes go together: pass both (bytes) or neither")
    if gpu_memory is not None:
        if check_number("gpu_memory", gpu_memory) <= 0 or check_number("expert_bytes", expert_bytes) <= 0:
            raise ValueError(f"gpu_memory and expert_bytes must be positive bytes, got {gpu_memory}, {expert_bytes}")
        if per_gpu * float(expert_bytes) > float(gpu_memory):
            raise ValueError(
                f"gpu_memory={gpu_memory:.4g} bytes holds {int(gpu_memory // expert_bytes)} experts of expert_bytes="
                f"{expert_bytes:.4g}, but {E} experts + {max_replicas} replicas on {G} GPUs put {per_gpu} on some "
                f"GPU: use more GPUs, fewer max_replicas, or more gpu_memory")

    topo = _topology(G, g, link_bandwidth, link_latency)
    n = copies_for(L, slots, max_copies=G)
    n_phantom = per_gpu * G - slots
    ce = np.concatenate([np.repeat(np.arange(E), n), np.full(n_phantom, E)])
    cw = np.concatenate([1.0 / np.repeat(n, n), np.ones(n_phantom)])
    m = _Model(topo, L, C, ce, T, bytes_per_token)
    if initial == "round_robin":
        gpu = (np.arange(len(ce)) % G).astype(np.int64)
    else:
        gpu = _lpt_start(m, m.L[ce] * cw, per_gpu, n_phantom)
    start = _State(m, gpu, cw)
    cap = max(float(start.Ag.max()), float(start.Ag.mean()) * (1.0 + balance_slack))
    starts = [("balanced", start)]
    if have_coact and initial == "lpt":
        alt = _cluster_start(m, start.cl, start.bm, per_gpu, n_phantom)
        if alt is not None:
            starts.append(("co-activation", _State(m, alt, cw)))
    pairs = _shift_pairs(m)
    runs, trace = [], []
    mean = float(start.Ag.mean())
    for name, s in starts:
        seen = set()
        for relax in (0.0, *_RELAX):
            search_cap = max(cap, mean * (1 + relax), float(s.Ag.max()))
            if search_cap in seen or (search_cap > cap and max_iters == 0):
                continue
            seen.add(search_cap)
            st = s.copy()
            if search_cap > cap:  # search with room to spare, then repair to the cap
                st, _ = _descend(st, search_cap, max_iters, pairs)
                if not _repair(st, cap, pairs, max_iters):
                    runs.append(dict(start=name, relax=relax, repaired=False))
                    continue
            best, iters = _descend(st, cap, max_iters, pairs, trace if (name, relax) == ("balanced", 0.0) else None)
            runs.append(dict(start=name, relax=relax, repaired=True, iters=iters, max_link_us=best.max_link(),
                             max_gpu_load=float(best.Ag.max()), _state=best))
    ok = [r for r in runs if r.get("repaired")]
    win = min(ok, key=lambda r: (r["max_link_us"], r["max_gpu_load"]))
    final = win.pop("_state")
    win["polish_moves"] = _polish(final, cap, pairs, max_iters)
    for r in ok:
        r.pop("_state", None)
    stats = _metrics(final, expert_bytes)
    s0 = _metrics(start, expert_bytes)
    stats.update(start_max_link_us=s0["max_link_us"], start_max_link_load=s0["max_link_load"],
                 start_max_over_mean=s0["max_over_mean"], cap_gpu_load=cap, copies=int(slots),
                 replicated_experts=int((n > 1).sum()), runs=runs, search_trace=trace, chosen=dict(win))
    return _to_placement(m, final, E, G, stats)


def _to_placement(m: _Model, st: _State, E, G, stats) -> Placement:
    reps: list[list[tuple[int, float]]] = [[] for _ in range(E)]
    for c in range(len(m.ce)):
        if m.ce[c] < E:
            reps[int(m.ce[c])].append((int(st.gpu[c]), float(st.cw[c])))
    out = []
    for r in reps:
        total = sum(w for _, w in r)
        r = [(j, w / total) for j, w in r]
        first = min(r, key=lambda x: (-x[1], x[0]))  # the primary: the largest share, ties to the lower rank
        out.append((first, *sorted(x for x in r if x is not first)))
    primary = tuple(r[0][0] for r in out)
    replicas = tuple(out) if any(len(r) > 1 for r in out) else None
    return Placement(primary, G, replicas=replicas, stats=stats)
