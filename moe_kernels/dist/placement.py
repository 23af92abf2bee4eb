"""Which rank holds which expert.

A ``Placement`` is a partition of the experts over the ranks of an expert-parallel group: every expert lives on
exactly one rank, and each rank keeps its experts in ascending global order (its "local" experts 0..E_r-1). A
placement may also carry *replicas*: further copies of hot experts on other ranks, each taking a share of the
expert's traffic (``replica_rank`` picks the copy of each (token, expert) pair). ``default_placement`` is the plain
contiguous split; ``moe_kernels.dist.place_experts`` (``place.py``) builds load- and link-aware ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .._checks import check_int

__all__ = ["Placement", "default_placement", "replica_rank", "replica_index", "copy_placement"]


@dataclass(frozen=True)
class Placement:
    """Experts partitioned over ``num_ranks`` ranks.

    expert_to_rank  tuple of E ints in [0, num_ranks): the rank holding each expert (its primary copy).
    num_ranks       the expert-parallel world size (ranks may hold no expert).
    replicas        optional: for each expert, ((rank, share), ...) of all its copies, the primary first; shares
                    sum to 1 (None: one copy per expert, share 1).
    stats           optional: what the planner measured for this plan (``report()``; ``metrics()`` for other loads).
    rank_experts    derived: for each rank, its experts in ascending global order.
    local_index     derived: for each expert, its position among its rank's experts.
    """

    expert_to_rank: tuple[int, ...]
    num_ranks: int
    replicas: tuple[tuple[tuple[int, float], ...], ...] | None = field(default=None, compare=False)
    stats: dict | None = field(default=None, compare=False, repr=False)
    rank_experts: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    local_index: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self):
        check_int("num_ranks", self.num_ranks, lo=1)
        e2r = tuple(int(r) for r in self.expert_to_rank)
        if not e2r:
            raise ValueError("expert_to_rank must name at least one expert")
        bad = [(e, r) for e, r in enumerate(e2r) if not 0 <= r < self.num_ranks]
        if bad:
            e, r = bad[0]
            raise ValueError(f"expert_to_rank[{e}] = {r} is not a rank in [0, {self.num_ranks})")
        per_rank: list[list[int]] = [[] for _ in range(self.num_ranks)]
        local = []
        for e, r in enumerate(e2r):
            local.append(len(per_rank[r]))
            per_rank[r].append(e)
        object.__setattr__(self, "expert_to_rank", e2r)
        if self.replicas is not None:
            object.__setattr__(self, "replicas", self._checked_replicas(e2r))
        object.__setattr__(self, "rank_experts", tuple(tuple(p) for p in per_rank))
        object.__setattr__(self, "local_index", tuple(local))

    def _checked_replicas(self, e2r):
        if len(self.replicas) != len(e2r):
            raise ValueError(f"replicas must list the copies of each of the {len(e2r)} experts, got {len(self.replicas)}")
        out = []
        for e, reps in enumerate(self.replicas):
            reps = tuple((int(r), float(w)) for r, w in reps)
            ranks = [r for r, _ in reps]
            if not reps or ranks[0] != e2r[e]:
                raise ValueError(f"replicas[{e}] must start with the primary copy on rank {e2r[e]}, got {reps}")
            if len(set(ranks)) != len(ranks) or not all(0 <= r < self.num_ranks for r in ranks):
                raise ValueError(f"replicas[{e}] must name distinct ranks in [0, {self.num_ranks}), got {ranks}")
            if any(w < 0 for _, w in reps) or abs(sum(w for _, w in reps) - 1.0) > 1e-6:
                raise ValueError(f"replicas[{e}]: shares must be >= 0 and sum to 1, got {[w for _, w in reps]}")
            out.append(reps)
        return tuple(out)

    def copies(self, expert: int) -> tuple[tuple[int, float], ...]:
        """((rank, share), ...) of every copy of ``expert``, the primary first."""
        if self.replicas is None:
            return ((self.expert_to_rank[expert], 1.0),)
        return self.replicas[expert]

    def slots_of(self, rank: int) -> tuple[int, ...]:
        """The experts of which ``rank`` holds a copy (primary or replica), ascending."""
        if self.replicas is None:
            return self.rank_experts[rank]
        return tuple(e for e, reps in enumerate(self.replicas) if any(r == rank for r, _ in reps))

    def _on(self, name: str, build, device) -> torch.Tensor:
        """A lookup table built once per placement and copied once per device (no host copy per dispatch)."""
        cache = self.__dict__.setdefault("_tables", {})
        key = (name, str(torch.device(device) if device is not None else "cpu"))
        if key not in cache:
            cache[key] = build().to(device) if device is not None else build()
        return cache[key]

    def _share_table(self, device=None) -> torch.Tensor:
        """float64 [E + 1, max copies]: cumulative shares of each expert's copies (2.0 past its last copy and in the
        extra row E)."""
        return self._on("shares", self._build_share_table, device)

    def _build_share_table(self) -> torch.Tensor:
        reps = self.replicas or tuple(((r, 1.0),) for r in self.expert_to_rank)
        table = torch.full((len(reps) + 1, max(len(r) for r in reps)), 2.0, dtype=torch.float64)
        for x, copies in enumerate(reps):
            acc = 0.0
            for i, (_, w) in enumerate(copies[:-1]):
                acc += w
                table[x, i] = acc  # the last copy keeps 2.0: rounding never leaves a pair without a copy
        return table

    def _copy_ranks(self, device=None) -> torch.Tensor:
        """int64 [E, max copies]: the rank of each copy of each expert (-1 past its last)."""
        return self._on("ranks", self._build_copy_ranks, device)

    def _build_copy_ranks(self) -> torch.Tensor:
        reps = self.replicas or tuple(((r, 1.0),) for r in self.expert_to_rank)
        table = torch.full((len(reps), max(len(r) for r in reps)), -1, dtype=torch.int64)
        for x, copies in enumerate(reps):
            table[x, : len(copies)] = torch.tensor([r for r, _ in copies])
        return table

    def report(self) -> dict:
        """The planner's figures for this plan, for the loads it was planned with: max_over_mean (GPU load),
        max_link_load (tokens on the busiest link), max_link_us, gpu_load, copies_per_gpu, memory_per_gpu, ...
        (``place_experts`` documents them). A placement made by hand reports ``metrics()`` for uniform load."""
        return dict(self.stats) if self.stats else self.metrics()

    def metrics(self, load=None, coactivation=None, **model) -> dict:
        """The same figures for any per-expert ``load`` [E] and ``coactivation`` [E, E] (None: uniform, none);
        ``model``: gpus_per_node (8), link_bandwidth, link_latency, top_k, tokens, bytes_per_token, expert_bytes, as
        for ``moe_kernels.dist.place_experts``."""
        from .place import evaluate  # noqa: PLC0415  (place imports this module)

        return evaluate(self, load, coactivation, **model)

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    def experts_of(self, rank: int) -> tuple[int, ...]:
        """The global ids of ``rank``'s experts, ascending (empty for an idle rank)."""
        return self.rank_experts[rank]

    def num_local(self, rank: int) -> int:
        return len(self.rank_experts[rank])

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert_to_rank int32 [E], local_index int32 [E]) on ``device``."""
        return (torch.tensor(self.expert_to_rank, dtype=torch.int32, device=device),
                torch.tensor(self.local_index, dtype=torch.int32, device=device))

    def loads(self, tokens_per_expert: Sequence[int] | None = None) -> list:
        """(token, expert) pairs per rank for the given per-expert counts (experts per rank when None); with
        replicas each copy counts its share (floats)."""
        counts = tokens_per_expert if tokens_per_expert is not None else [1] * self.num_experts
        if self.replicas is not None:
            shares = [0.0] * self.num_ranks
            for e, reps in enumerate(self.replicas):
                for r, w in reps:
                    shares[r] += w * float(counts[e])
            return shares
        out = [0] * self.num_ranks
        for e, r in enumerate(self.expert_to_rank):
            out[r] += int(counts[e])
        return out

    def fingerprint(self) -> int:
        """A 62-bit hash of the assignment, equal on every rank that holds the same placement."""
        h = 1469598103934665603
        words = [self.num_ranks, *self.expert_to_rank]
        if self.replicas is not None:
            words += [x for reps in self.replicas for r, w in reps for x in (r, round(w * 1e6))]
        for r in words:
            h = ((h ^ (r + 1)) * 1099511628211) & ((1 << 62) - 1)
        return h


def default_placement(num_experts: int, world_size: int) -> Placement:
    """Contiguous blocks: E >= G needs E % G == 0 (rank r holds experts r*E/G ... (r+1)*E/G - 1); E <= G puts
    expert e on rank e, and ranks E..G-1 hold none."""
    check_int("num_experts", num_experts, lo=1)
    check_int("world size", world_size, lo=1)
    if num_experts <= world_size:
        return Placement(tuple(range(num_experts)), world_size)
    if num_experts % world_size:
        raise ValueError(
            f"the default placement splits the {num_experts} experts into equal contiguous blocks: the world size "
            f"({world_size}) must divide num_experts, or be >= num_experts (one expert per GPU); "
            f"pass an explicit Placement otherwise"
        )
    per = num_experts // world_size
    return Placement(tuple(e // per for e in range(num_experts)), world_size)


def replica_index(placement: Placement, topk_ids: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Which copy of its expert each (token, expert) pair uses: an index into ``placement.copies(e)``.

    Deterministic and low-discrepancy, so that each copy gets its share of the pairs (to within a pair or two per
    expert per call, not a coin flip per pair): the pairs of expert e in this batch are numbered p = 0, 1, ... in
    token order; pair p draws u = frac(p * phi + rank * psi + e * c) (phi, psi, c fixed irrationals) and takes the
    first copy whose cumulative share exceeds u. ``rank`` (the caller's rank; None: its torch.distributed rank, 0
    without a process group) shifts every rank's sequence, so that ranks with only a few pairs of an expert do not
    all pick the same copy. ids of -1 give -1. Args: topk_ids int [T, k]. Returns int64 [T, k] on topk_ids' device.
    """
    ids = topk_ids.long()
    dev = ids.device
    valid = ids >= 0
    if placement.replicas is None:
        return torch.where(valid, torch.zeros_like(ids), -1)
    if rank is None:
        import torch.distributed as dist  # noqa: PLC0415

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    E = placement.num_experts
    cum = placement._share_table(dev)
    flat = torch.where(valid, ids, E).reshape(-1)  # E: no expert
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E + 1)
    first = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(flat)
    pos[order] = torch.arange(flat.numel(), device=dev) - first[flat[order]]  # p: the pair's number in its expert
    u = torch.frac(pos.double() * 0.6180339887498949 + float(rank) * 0.7548776662466927
                   + flat.double() * 0.5698402909980532)
    pick = (cum[flat] <= u[:, None]).sum(-1).reshape(ids.shape)  # the first copy whose cumulative share exceeds u
    return torch.where(valid, pick, -1)


def replica_rank(placement: Placement, topk_ids: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """The rank each (token, expert) pair is sent to: the copy ``replica_index`` picks (``rank``: the caller's rank,
    as there). ids of -1 give -1. Args: topk_ids int [T, k]. Returns int64 [T, k] on topk_ids' device."""
    ids = topk_ids.long()
    valid = ids >= 0
    e = ids.clamp(min=0)
    if placement.replicas is None:
        e2r = torch.tensor(placement.expert_to_rank, dtype=torch.int64, device=ids.device)
        return torch.where(valid, e2r[e], -1)
    ranks = placement._copy_ranks(ids.device)
    pick = replica_index(placement, topk_ids, rank).clamp(min=0)
    return torch.where(valid, ranks[e].gather(-1, pick[..., None]).squeeze(-1), -1)


def copy_placement(placement: Placement) -> tuple[Placement, list[int], list[int]]:
    """Every copy as an expert of its own: (the placement of the copies, expert of each copy, first copy of each
    expert). Copies of expert e are numbered first[e], first[e] + 1, ... in ``copies(e)`` order; this is how
    ``ExpertParallel`` moves replicas' traffic (a pair for copy i of e goes to "expert" first[e] + i)."""
    ranks, expert_of, first = [], [], []
    for e in range(placement.num_experts):
        first.append(len(ranks))
        for r, _ in placement.copies(e):
            ranks.append(r)
            expert_of.append(e)
    return Placement(tuple(ranks), placement.num_ranks), expert_of, first
