"""Dispatch layout: where each token must go under expert parallelism (the definition of correct)."""
from __future__ import annotations

import torch

__all__ = ["dispatch_layout"]


def dispatch_layout(topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, num_ranks: int):
    """topk_ids int [T, k] (-1 = no expert), expert_to_rank int [E] (values in [0, num_ranks)) ->
    (tokens_per_rank int32 [R], is_token_in_rank bool [T, R], tokens_per_expert int32 [E]).

    A token is sent to a rank once, however many of its k experts live there; tokens_per_expert counts every
    (token, k) pair.
    """
    num_tokens, num_experts = topk_ids.shape[0], expert_to_rank.shape[0]
    token, slot = (topk_ids >= 0).nonzero(as_tuple=True)  # the (token, k) pairs that have an expert
    expert = topk_ids[token, slot].long()
    is_token_in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=topk_ids.device)
    is_token_in_rank[token, expert_to_rank.long()[expert]] = True
    tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    tokens_per_expert = torch.bincount(expert, minlength=num_experts).to(torch.int32)
    return tokens_per_rank, is_token_in_rank, tokens_per_expert
