"""TopKRouter: router GEMM + scoring + top-k, with per-expert load monitoring and dynamic balancing."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import (
    check_choice, check_int, check_number, check_routing_args, check_tensor, value_checks_enabled,
)
from ..ops.load import observe_load
from ..ops.routing import MAX_EXPERTS, MAX_TOP_K
from ._keep_dtype import apply_keeping_dtype

BALANCE_RULES = (None, "adaptive", "bias")
SCORINGS = ("softmax", "sigmoid", "sparsemixer")


def sparsemixer(logits: torch.Tensor, jitter_eps: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's top-2 routing (transformers' ``sparsemixer``) on fp32 logits [T, E] -> (weights [T, 2], ids
    int64 [T, 2]).

    For each of the two picks, the logits more than ``2 * jitter_eps`` below the current maximum (relative to
    ``max(|logit|, maximum)``) are masked out; the weight is the pick's softmax over what is left. Evaluation picks
    the maximum, then the maximum of the rest (the first pick masked). Training samples each pick from the masked
    softmax (Gumbel-max: one ``exponential_`` draw [T, E] a pick), and scales its weight by 1 or 0.3333 (1 where
    the pick was the maximum or a ``rand`` draw [T, 1] exceeds 0.75: "Heun's third-order method") while its
    gradient is that of the unscaled weight (a straight-through estimator). The draws are transformers' own, in its
    order and shapes (the second pick's uniform is drawn twice, as ``rand_like(...).uniform_()``), so from the same
    generator state an fp32 model samples the same experts and weights as the unpatched one.
    """
    ws, picks = [], []
    rest = logits  # the logits with the earlier picks masked to -inf
    for k in range(2):
        with torch.no_grad():
            top, best = rest.max(dim=-1, keepdim=True)
            drop = ((top - logits) / logits.abs().clamp(min=top)) > 2 * jitter_eps
        gates = rest.masked_fill(drop, float("-inf"))
        if training:
            gumbel = torch.empty_like(gates, memory_format=torch.legacy_contiguous_format).exponential_().log()
            pick = (gates - gumbel).max(dim=-1)[1].unsqueeze(-1)
        else:
            pick = best
        probs = torch.softmax(gates, dim=-1)
        w = probs.gather(-1, pick)
        if training:
            with torch.no_grad():
                u = torch.rand_like(w) if k == 0 else torch.rand_like(w).uniform_()
                scale = torch.add(0.3333, (pick == probs.max(dim=-1, keepdim=True)[1]) | (u > 0.75), alpha=0.6667)
            w = w.detach() * scale.type_as(w) + (w - w.detach())  # value w * scale, gradient that of w
        ws.append(w)
        picks.append(pick)
        rest = torch.scatter(logits, -1, pick, float("-inf"))
    return torch.cat(ws, -1), torch.cat(picks, -1)


class TopKRouter(nn.Module):
    """Chooses ``top_k`` of ``num_experts`` experts for every token.

    Args:
        hidden_size, num_experts, top_k: the gate is an [num_experts, hidden_size] matrix.
        scoring: ``"softmax"`` (Mixtral) or ``"sigmoid"`` (DeepSeek-V3, with ``e_score_correction_bias``), or
            ``"sparsemixer"`` (PhiMoE; ``top_k=2``, no groups, no balancing): see ``sparsemixer``. It runs as torch
            ops on the fp32 logits (not the routing kernel) and, in training mode, samples its two experts.
        jitter_eps: sparsemixer's threshold (PhiMoE's ``router_jitter_noise``); unused by the other scorings.
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
        jitter_eps: float = 0.01,
    ):
        super().__init__()
        check_int("hidden_size", hidden_size, lo=1)
        check_routing_args(num_experts, top_k, n_group, topk_group)
        if num_experts > MAX_EXPERTS:  # the routing kernel's limit: say so here, not at the first forward
            raise ValueError(f"num_experts must be <= {MAX_EXPERTS} (the routing kernel's limit), got {num_experts}")
        if top_k > MAX_TOP_K:
            raise ValueError(f"top_k must be <= {MAX_TOP_K}, got {top_k}")
        check_choice("scoring", scoring, SCORINGS)
        check_choice("balance", balance, BALANCE_RULES)
        jitter_eps = check_number("jitter_eps", jitter_eps)
        if scoring == "sparsemixer":
            if top_k != 2:
                raise ValueError(f"scoring='sparsemixer' picks exactly 2 experts (PhiMoE's rule), got top_k={top_k}")
            if n_group != 1 or balance is not None:
                raise ValueError("scoring='sparsemixer' takes no group-limited selection (n_group=1) and no balance "
                                 "rule: its choice is its own")
            if jitter_eps < 0:
                raise ValueError(f"jitter_eps must be >= 0, got {jitter_eps}")
        if not 0.1 <= alpha <= 0.3:
            raise ValueError(f"alpha must lie in [0.1, 0.3], got {alpha}")
        if not 0.0 <= load_decay < 1.0:
            raise ValueError(f"load_decay must lie in [0, 1), got {load_decay}")
        routed_scaling_factor = check_number("routed_scaling_factor", routed_scaling_factor)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.scoring, self.n_group, self.topk_group = scoring, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.jitter_eps = float(jitter_eps)
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
            + (f", jitter_eps={self.jitter_eps}" if self.scoring == "sparsemixer" else "")
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

    def forward(self, x: torch.Tensor, observe: bool = True):
        """(weights [T, k] fp32, ids [T, k] int32, counts [E] int32). ``observe=False``: the caller folds ``counts``
        into the load monitor itself (``observe_counts``), e.g. off the critical path of a captured step."""
        check_tensor("x", x, ndim=2, shape=(None, self.hidden_size), device=self.weight.device)
        if self.scoring == "sparsemixer":
            weights, ids, counts = self._sparsemixer(x)
            if observe:
                self._observe(counts)
            return weights, ids, counts
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
        if observe:
            self._observe(counts)
        return weights, ids, counts

    def _sparsemixer(self, x: torch.Tensor):
        """scoring="sparsemixer": fp32 logits, ``sparsemixer`` (sampling in training mode), then the layer's
        renormalisation and scale; the weights are differentiable torch ops (into x and the gate)."""
        logits = F.linear(x.float(), self.weight.float())
        if logits.shape[0] and value_checks_enabled(x) and not bool(torch.isfinite(logits).all()):
            raise ValueError("router logits are non-finite: x or the router weight holds NaN or inf")
        weights, ids = sparsemixer(logits, self.jitter_eps, self.training)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        flat = ids.flatten()  # a scatter, not bincount: no device->host sync (CUDA graphs, torch.compile)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        return weights, ids.to(torch.int32), counts

    def observe_counts(self, counts: torch.Tensor) -> None:
        """Fold a step's ``counts`` (from ``forward(x, observe=False)``) into the load monitor."""
        self._observe(counts)

    @torch.no_grad()
    def _observe(self, counts: torch.Tensor) -> None:
        """Fold one step's counts into the load monitor, and take the bias step when training."""
        step_bias = self.balance == "bias" and self.training
        observe_load(counts, self.load, self.steps, self.load_decay,
                     self.e_score_correction_bias if step_bias else None, self.gamma)

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
