"""Fused Triton ops, registered as torch custom ops (``torch.ops.moe_kernels.*``).

CUDA tensors run the Triton kernels; CPU tensors run ``moe_kernels.reference`` unless TRITON_INTERPRET=1, in
which case the Triton kernels run on the CPU through the interpreter.
"""
from ..reference.permute import Permuted
from .grouped_gemm import (expert_mlp, expert_mlp_fp8_ste, expert_mlp_fp8_train, expert_mlp_train, grouped_gemm_bf16,
                           grouped_gemm_fp8, grouped_gemm_fp8_masked, grouped_wgrad)
from . import _autograd_mlp  # noqa: F401  (registers the ops' autograd)
from .linear import linear_fp8
from .mla import mla_decode, mla_latent_proj
from .norm import rms_norm
from .permute import permute, unpermute
from .quant import quantize_fp8, quantize_weight_fp8
from .routing import route

__all__ = [
    "Permuted",
    "route",
    "permute",
    "unpermute",
    "quantize_fp8",
    "quantize_weight_fp8",
    "grouped_gemm_fp8",
    "grouped_gemm_bf16",
    "grouped_gemm_fp8_masked",
    "expert_mlp",
    "expert_mlp_fp8_ste",
    "expert_mlp_fp8_train",
    "expert_mlp_train",
    "grouped_wgrad",
    "linear_fp8",
    "mla_latent_proj",
    "mla_decode",
    "rms_norm",
]
