"""FP8Linear: a bias-free linear layer with DeepSeek-V3's block-scaled FP8 weights (``ops.linear_fp8``).

The weight is e4m3 [out_features, in_features] with one fp32 scale per 128x128 block (``weight_scale_inv``, the
name and layout of DeepSeek-V3's checkpoints, so their state dicts load as they are); each call quantises the
input rows 1x128 and multiplies on the FP8 tensor cores with fp32 accumulation. Inference only: the weight is a
frozen buffer and the op has no backward.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import FP8_DTYPE, check_int, check_tensor
from ..ops.linear import OUT_DTYPES, linear_fp8
from ..reference.quant import dequantize_weight_fp8
from ..ops.quant import quantize_weight_fp8
from ._keep_dtype import apply_keeping_dtype

__all__ = ["FP8Linear"]

BLOCK = 128


class FP8Linear(nn.Module):
    """``y = x @ W^T`` with W stored as e4m3 ``weight`` [out_features, in_features] and fp32 ``weight_scale_inv``
    [ceil(out/128), in/128] (W ~= weight * its block's scale); in_features a multiple of 128. The output has x's
    dtype. ``.to(dtype)`` / ``.half()`` move the buffers between devices but never change their dtypes.

    Build with ``FP8Linear.from_linear(linear)`` (quantises a float ``nn.Linear``'s weight, once) or
    ``FP8Linear.from_fp8(weight, weight_scale_inv)`` (a checkpoint's tensors, taken as they are).
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        check_int("in_features", in_features, lo=1)
        check_int("out_features", out_features, lo=1)
        if in_features % BLOCK:
            raise ValueError(f"FP8Linear needs in_features to be a multiple of {BLOCK} (one activation scale per "
                             f"1x{BLOCK} group), got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(-(-out_features // BLOCK), in_features // BLOCK,
                                                            dtype=torch.float32, device=device))

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> "FP8Linear":
        """Over a checkpoint's e4m3 weight [N, K] and fp32 block scales [ceil(N/128), K/128] (the same tensors, not
        copies; any floating scale dtype, e.g. ue8m0 stored as float, is converted to fp32)."""
        check_tensor("weight", weight, dtype=FP8_DTYPE, ndim=2)
        N, K = weight.shape
        scale = weight_scale_inv.detach()
        if scale.dtype != torch.float32:
            scale = scale.float()
        check_tensor("weight_scale_inv", scale, shape=(-(-N // BLOCK), -(-K // BLOCK)), device=weight.device)
        new = cls(K, N, device="meta")
        new.weight = weight.detach()
        new.weight_scale_inv = scale
        return new

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "FP8Linear":
        """The block-scaled e4m3 quantisation of a bias-free float linear layer's weight (rounded to nearest)."""
        if getattr(linear, "bias", None) is not None:
            raise ValueError(f"FP8Linear has no bias, and {type(linear).__name__} has one")
        w = linear.weight.detach()
        check_tensor("weight", w, dtype=OUT_DTYPES, ndim=2)
        q, s = quantize_weight_fp8(w)
        return cls.from_fp8(q, s)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as a dense [out_features, in_features] tensor of ``dtype``."""
        return dequantize_weight_fp8(self.weight, self.weight_scale_inv).to(dtype)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, fn, recurse, ("weight", "weight_scale_inv"), super()._apply)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp8(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 with 128x128 scales"
