"""MoE layer variants some model families need beyond ``MoELayer``'s DeepSeek-V3 / Mixtral formulation.

They live here, next to the converters that build them, as subclasses of ``MoELayer`` (so that
``MoELayer.from_hf`` returns a ``MoELayer`` for every family and the router, experts, precision and load
monitoring are the layer's own); ``modules/moe.py`` stays the one formulation its kernels were written for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..modules.experts import GroupedExperts
from ..modules.moe import MoELayer

__all__ = ["FamilyMoELayer"]


class FamilyMoELayer(MoELayer):
    """``MoELayer`` with two variations (keyword arguments on top of MoELayer's, which it takes with
    ``n_shared_experts=0`` and no expert parallelism):

    - ``weights_on_input`` (Llama 4): expert e computes on ``w_e * x`` and the k outputs are summed unweighted,
      ``sum_j f_j(w_j x)``, instead of ``sum_j w_j f_j(x)`` (not the same for a gated MLP). Each token's k rows are
      formed scaled (in x's dtype, as HF does), routed as k single-expert rows, and un-permuted with weight 1.
    - ``shared_intermediate_size`` > 0: a shared SwiGLU expert of that size on every token (``shared_expert``,
      any size, not a multiple of the routed one), gated per token by ``sigmoid(x . shared_expert_gate)`` when
      ``shared_gate`` (Qwen2-MoE).

    ``forward(x [..., H]) -> [..., H]`` in x's dtype; the shared expert's output is added in fp32.
    """

    def __init__(self, *, weights_on_input: bool = False, shared_intermediate_size: int = 0,
                 shared_gate: bool = False, **kw):
        for name in ("n_shared_experts", "ep_group", "placement"):
            if kw.get(name):
                raise ValueError(f"FamilyMoELayer does not take {name} (its shared expert is its own)")
        super().__init__(**kw)
        if shared_gate and not shared_intermediate_size:
            raise ValueError("shared_gate needs a shared expert (shared_intermediate_size > 0)")
        self.weights_on_input = bool(weights_on_input)
        H, dev = self.hidden_size, self.gate.weight.device
        self.shared_expert = (GroupedExperts(1, H, shared_intermediate_size, self.precision, device=dev)
                              if shared_intermediate_size else None)
        self.shared_expert_gate = (nn.Linear(H, 1, bias=False, device=dev, dtype=kw.get("dtype"))
                                   if shared_gate else None)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weights_on_input={self.weights_on_input}, "
                f"shared_expert_gate={self.shared_expert_gate is not None}")

    def _routed_on_weighted_inputs(self, x2: torch.Tensor) -> torch.Tensor:
        """sum_j f_{ids[t,j]}(w[t,j] * x[t]) for x2 [T, H] -> fp32 [T, H]."""
        weights, ids, _ = self.gate(x2)
        T, k = ids.shape
        H = self.hidden_size
        rows = (x2.unsqueeze(1) * weights.to(x2.dtype).unsqueeze(-1)).reshape(T * k, H)  # k scaled copies a token
        grad = torch.is_grad_enabled() and (rows.requires_grad or getattr(self.experts, "fp8_master", False))
        p = ops.permute(rows, ids.reshape(T * k, 1), self.num_experts, fp8=self.precision == "fp8" and not grad)
        y = self.experts(p.x, p.offsets, p.scale)
        ones = torch.ones(T * k, 1, dtype=torch.float32, device=x2.device)
        return ops.unpermute(y, p, ones).float().reshape(T, k, H).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weights_on_input:
            out = super().forward(x)  # routed experts (MoELayer checks x)
        else:
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
                raise ValueError(f"x must be a tensor [..., {self.hidden_size}], got "
                                 f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            out = self._routed_on_weighted_inputs(x.reshape(-1, self.hidden_size))
        if self.shared_expert is None:
            return out.to(x.dtype).reshape(x.shape)
        x2 = x.reshape(-1, self.hidden_size)
        offsets = torch.arange(2, dtype=torch.int32, device=x.device) * x2.shape[0]  # [0, T]
        shared = self.shared_expert(x2, offsets).float()
        if self.shared_expert_gate is not None:
            shared = shared * torch.sigmoid(F.linear(x2, self.shared_expert_gate.weight.to(x2.dtype)).float())
        return (out.float().reshape(x2.shape) + shared).to(x.dtype).reshape(x.shape)
