"""Which rank holds which expert.

A ``Placement`` is a partition of the experts over the ranks of an expert-parallel group: every expert lives on
exactly one rank, and each rank keeps its experts in ascending global order (its "local" experts 0..E_r-1). This
is the minimal default placement; the planner's ``place_experts`` (load- and link-aware) will return the same type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .._checks import check_int

__all__ = ["Placement", "default_placement"]


@dataclass(frozen=True)
class Placement:
    """Experts partitioned over ``num_ranks`` ranks.

    expert_to_rank  tuple of E ints in [0, num_ranks): the rank holding each expert.
    num_ranks       the expert-parallel world size (ranks may hold no expert).
    rank_experts    derived: for each rank, its experts in ascending global order.
    local_index     derived: for each expert, its position among its rank's experts.
    """

    expert_to_rank: tuple[int, ...]
    num_ranks: int
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
        object.__setattr__(self, "rank_experts", tuple(tuple(p) for p in per_rank))
        object.__setattr__(self, "local_index", tuple(local))

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

    def loads(self, tokens_per_expert: Sequence[int] | None = None) -> list[int]:
        """(token, expert) pairs per rank for the given per-expert counts (experts per rank when None)."""
        counts = tokens_per_expert if tokens_per_expert is not None else [1] * self.num_experts
        out = [0] * self.num_ranks
        for e, r in enumerate(self.expert_to_rank):
            out[r] += int(counts[e])
        return out

    def fingerprint(self) -> int:
        """A 62-bit hash of the assignment, equal on every rank that holds the same placement."""
        h = 1469598103934665603
        for r in (self.num_ranks, *self.expert_to_rank):
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
