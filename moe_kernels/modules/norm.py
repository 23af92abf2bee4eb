"""RMSNorm: HuggingFace's Llama-style RMSNorm (``reference.llama_rms_norm``) as one kernel (``ops.rms_norm``).

``patch_model`` puts it in place of transformers' ``LlamaRMSNorm`` and its copies (DeepseekV3RMSNorm,
Qwen3MoeRMSNorm, ...), sharing their weight Parameters, so that a model's outputs stay HF's to the last bit or so.
"""
from __future__ import annotations

import numbers
import warnings

import torch
from torch import nn

from .._checks import check_int, check_number
from ..ops._common import use_triton
from ..ops.norm import DTYPES, rms_norm
from ..reference.norm import llama_rms_norm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``, the statistics in fp32: transformers'
    ``LlamaRMSNorm`` (the same rounding steps; see ``moe_kernels.ops.rms_norm``). ``variance_epsilon`` is ``eps``
    under HF's name.

    ``use_kernels``: None (default) runs the kernel on CUDA tensors and the torch formula on the CPU; True also runs
    it on CPU tensors when TRITON_INTERPRET=1; False always runs the formula. The kernel has no backward: with
    gradients required (x's or the weight's) the formula runs, and says so once; so does an x or weight dtype the
    kernel does not take (fp64).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        check_int("hidden_size", hidden_size, lo=1)
        self.eps = check_number("eps", eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.use_kernels: bool | None = None
        self._warned = False

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = check_number("variance_epsilon", value)

    @classmethod
    def from_module(cls, norm: nn.Module) -> "RMSNorm":
        """An RMSNorm over ``norm``'s own weight Parameter (the same tensor object: loading or training one updates
        the other) with its epsilon (``variance_epsilon``, HF's name, else ``eps``). That ``norm`` computes the
        Llama-style formula is the caller's to know (``patch_model`` checks its class)."""
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            got = type(weight).__name__ + (f" of shape {list(weight.shape)}" if weight is not None else "")
            raise TypeError(f"{type(norm).__name__} must have a 1-D weight Parameter to build an RMSNorm from, got {got}")
        eps = getattr(norm, "variance_epsilon", None)
        eps = getattr(norm, "eps", None) if eps is None else eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"{type(norm).__name__} has no numeric variance_epsilon or eps (got {eps!r})")
        new = cls(weight.shape[0], float(eps), device="meta")  # a placeholder weight, replaced by norm's
        new.weight = weight
        return new.train(norm.training)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

    def _kernels(self, x: torch.Tensor) -> bool:
        """Whether this call runs the kernel (see ``use_kernels``)."""
        wanted = x.is_cuda if self.use_kernels is None else (self.use_kernels and use_triton(x))
        if not wanted:
            return False
        why = None
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            why = "gradients are required (the kernel has no backward); use torch.no_grad() for inference"
        elif x.dtype not in DTYPES or self.weight.dtype not in DTYPES:
            why = "the kernel takes bf16/fp16/fp32 x and weight only"
        if why is not None and not self._warned:
            warnings.warn(f"RMSNorm: the torch formula runs, not the kernel: {why}")
            self._warned = True
        return why is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels(x):
            return rms_norm(x, self.weight, self.eps)
        return llama_rms_norm(x, self.weight, self.eps)
