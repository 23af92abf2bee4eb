"""RMSNorm as HuggingFace's Llama-style models compute it (``LlamaRMSNorm.forward`` in transformers):

    h   = x.to(float32)
    h   = h * rsqrt(mean(h * h, -1) + eps)
    out = weight * h.to(x.dtype)          # in torch's promotion of (weight.dtype, x.dtype)

Two roundings for bf16/fp16 input: the normalised row to x's dtype, then the product with the weight (computed in
fp32 and rounded once: what torch's bf16 * bf16 does). MLA's ``reference.rms_norm`` is the unrounded fp32 form of
the same formula (``x * rsqrt(...) * weight`` in fp32, fp32 out), which the MLA kernels follow.
"""
from __future__ import annotations

import torch

__all__ = ["llama_rms_norm"]


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in promote_types(weight.dtype, x.dtype); differentiable."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
