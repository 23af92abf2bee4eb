"""TopKRouter: router GEMM + scoring + top-k, with per-expert load monitoring and dynamic balancing."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._checks import check_choice, check_int, check_number, check_routing_args, check_tensor
from ..ops.routing import MAX_EXPERTS, MAX_TOP_K
from ._keep_dtype import apply_keeping_dtype

BALANCE_RULES = (None, "adaptive", "bias")


class TopKRouter(nn.Module):
    """Chooses ``top_k`` of ``num_experts`` experts for every token.

    Args:
        hidden_size, num_experts, top_k: the gate is an [num_experts, hidden_size] matrix.
        scoring: ``"softmax"`` (Mixtral) or ``"sigmoid"`` (DeepSeek-V3, with ``e_score_correction_bias``).
        n_group, topk_group: group-limited selection (DeepSeek-V3: 8 groups, 4 kept).
        norm_topk_prob, routed_scaling_factor: renormalise the k weights to sum 1, then scale them.
        balance: ``None``; ``"adaptive"`` scales selection scores by ``1 + alpha * (1 - load_e / mean_load)``
            with the load an exponential moving average of per-expert counts (every forward, train or eval);
            ``"bias"``: DeepSeek-V3's auxiliary-loss-free update ``b_e += gamma * sign(mean_load - load_e)``
            after each training-mode forward. Both change only which experts are chosen, not the weights.
        alpha: the adaptive rule's strength, in [0.1, 0.3]. gamma: the bias rule's step.
        load_decay: EMA decay of the load monitor.

    ``forward(x [T, H]) -> (topk_weights fp32 [T, k], topk_ids int32 [T, k], counts int32 [E])``. The counts come
    from the routing kernel itself, so monitoring costs nothing extra; ``load_stats()`` reports them.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        scoring: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        balance: str | None = None,
        alpha: float = 0.2,
        gamma: float = 1e-3,
        load_decay: float = 0.9,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        check_int("hidden_size", hidden_size, lo=1)
        check_routing_args(num_experts, top_k, n_group, topk_group)
        if num_experts > MAX_EXPERTS:  # the routing kernel's limit: say so here, not at the first forward
            raise ValueError(f"num_experts must be <= {MAX_EXPERTS} (the routing kernel's limit), got {num_experts}")
        if top_k > MAX_TOP_K:
            raise ValueError(f"top_k must be <= {MAX_TOP_K}, got {top_k}")
        check_choice("scoring", scoring, ("softmax", "sigmoid"))
        check_choice("balance", balance, BALANCE_RULES)
        if not 0.1 <= alpha <= 0.3:
            raise ValueError(f"alpha must lie in [0.1, 0.3], got {alpha}")
        if not 0.0 <= load_decay < 1.0:
            raise ValueError(f"load_decay must lie in [0, 1), got {load_decay}")
        routed_scaling_factor = check_number("routed_scaling_factor", routed_scaling_factor)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.scoring, self.n_group, self.topk_group = scoring, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.balance, self.alpha, self.gamma, self.load_decay = balance, float(alpha), float(gamma), float(load_decay)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.float32, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))

    def _apply(self, fn, recurse=True):
        """Module casts (``.to(torch.bfloat16)``, ``.half()``) cast the gate, but the load monitor stays fp32 (an EMA
        of token counts in bf16 stops moving once counts pass 256); device moves apply to everything."""
        return apply_keeping_dtype(self, fn, recurse, ("load",), super()._apply)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"scoring={self.scoring!r}, n_group={self.n_group}, topk_group={self.topk_group}, balance={self.balance!r}"
        )

    def _expert_scale(self) -> torch.Tensor | None:
        if self.balance != "adaptive":
            return None
        mean = self.load.mean()
        # before any load is seen (mean 0) the scale is exactly 1
        rel = torch.where(mean > 0, self.load / mean.clamp(min=1e-12), torch.ones_like(self.load))
        return 1.0 + self.alpha * (1.0 - rel)

    def _use_bias(self) -> bool:
        return self.scoring == "sigmoid" or self.balance == "bias"

    def forward(self, x: torch.Tensor):
        check_tensor("x", x, ndim=2, shape=(None, self.hidden_size), device=self.weight.device)
        weights, ids, counts = ops.route(
            x,
            self.weight,
            self.top_k,
            scoring=self.scoring,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            bias=self.e_score_correction_bias if self._use_bias() else None,
            expert_scale=self._expert_scale(),
        )
        self._observe(counts)
        return weights, ids, counts

    @torch.no_grad()
    def _observe(self, counts: torch.Tensor) -> None:
        """Fold one step's counts into the load monitor, and take the bias step when training."""
        c = counts.float()
        first = self.steps == 0
        self.load.copy_(torch.where(first, c, self.load_decay * self.load + (1 - self.load_decay) * c))
        self.steps.add_(1)
        if self.balance == "bias" and self.training:
            self.e_score_correction_bias.add_(self.gamma * torch.sign(c.mean() - c))

    @torch.no_grad()
    def load_stats(self) -> dict:
        """Current load: ``max_over_mean`` (1.0 is perfect balance), ``per_expert`` EMA counts, ``steps``."""
        mean = float(self.load.mean())
        return {
            "max_over_mean": float(self.load.max()) / mean if mean > 0 else float("nan"),
            "per_expert": self.load.detach().cpu().clone(),
            "steps": int(self.steps),
        }

    def reset_load(self) -> None:
        self.load.zero_()
        self.steps.zero_()
