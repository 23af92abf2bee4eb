"""Routing: router GEMM, scoring, top-k selection and per-expert counts (the definition of correct).

Two scorings:
  * ``"softmax"`` (Mixtral, Qwen-MoE): p = softmax(x W^T); the k best experts are chosen; their probabilities,
    renormalised to sum to one when ``norm_topk_prob``, are the combine weights.
  * ``"sigmoid"`` (DeepSeek-V3): s = sigmoid(x W^T); selection uses s + bias (the auxiliary-loss-free balancing
    bias, ``e_score_correction_bias``) restricted to the ``topk_group`` groups whose best two biased scores sum
    highest; the combine weights are the unbiased s of the chosen experts, renormalised when ``norm_topk_prob``.
Both multiply the weights by ``routed_scaling_factor``. Group-limited selection applies to either scoring
when ``n_group > 1``.

Balancing terms change which experts are chosen, never how their outputs are weighted: the selection score is
``score * expert_scale + bias`` (``expert_scale`` is the "adaptive" rule's multiplier, ``bias`` the "bias" rule's
offset), the weight is ``score``.

Ties: among equal selection scores the lower expert index wins, and the k outputs are ordered by descending
selection score. Every kernel follows the same rule.
"""
from __future__ import annotations

import torch

__all__ = ["router_logits", "expert_scores", "select_experts", "expert_weights", "route", "expert_counts"]


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """[T, H] x [E, H] -> fp32 [T, E]; inputs are rounded to their own dtype, the product accumulates in fp32."""
    return x.float() @ router_weight.float().t()


def _stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a stable descending sort keeps the lower index first among equal scores
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def expert_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """fp32 logits [T, E] -> the scores the weights are taken from: softmax over experts, or sigmoid."""
    if scoring == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits.float())
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def select_experts(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    bias: torch.Tensor | None = None,
    expert_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, E] -> (weights fp32 [T, k], ids int64 [T, k])."""
    logits = logits.float()
    T, E = logits.shape
    scores = expert_scores(logits, scoring)

    choice = scores
    if expert_scale is not None:
        choice = choice * expert_scale.float()
    if bias is not None:
        choice = choice + bias.float()

    if n_group > 1:
        per_group = E // n_group
        grouped = choice.view(T, n_group, per_group)
        group_score = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)  # best two per group
        _, keep = _stable_topk(group_score, topk_group)
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf"))

    _, ids = _stable_topk(choice, top_k)
    return expert_weights(scores, ids, norm_topk_prob, routed_scaling_factor), ids


def expert_weights(scores: torch.Tensor, ids: torch.Tensor, norm_topk_prob: bool = True,
                   routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """The routing weights of the chosen experts: scores [T, E] (softmax or sigmoid, before bias and scale)
    gathered at ids [T, k], renormalised and scaled. Differentiable in scores."""
    weights = scores.gather(1, ids.long())
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: int32 [E]."""
    return torch.bincount(ids.reshape(-1).long(), minlength=num_experts).to(torch.int32)


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    bias: torch.Tensor | None = None,
    expert_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], router_weight [E, H] -> (weights fp32 [T, k], ids int32 [T, k], counts int32 [E])."""
    logits = router_logits(x, router_weight)
    weights, ids = select_experts(
        logits, top_k, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor, bias, expert_scale
    )
    return weights, ids.to(torch.int32), expert_counts(ids, router_weight.shape[0])
