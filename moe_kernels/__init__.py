"""moe-kernels: fast Mixture-of-Experts kernels for NVIDIA Hopper.

    import moe_kernels as mk
    layer = mk.MoELayer(hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=2, precision="fp8")
    mk.patch_model(hf_model)            # swap HF DeepSeek-V3 / Mixtral blocks in place

``mk.ops`` holds the fused kernels, ``mk.reference`` their pure-PyTorch definitions.
"""
__version__ = "0.1.0"

from . import dist, ops, reference
from ._ext import has_extension
from .integrations import patch_model
from .modules import FP8Linear, GroupedExperts, MLACache, MoELayer, MultiHeadLatentAttention, RMSNorm, TopKRouter

__all__ = [
    "FP8Linear",
    "GroupedExperts",
    "MLACache",
    "MoELayer",
    "MultiHeadLatentAttention",
    "RMSNorm",
    "TopKRouter",
    "dist",
    "has_extension",
    "ops",
    "patch_model",
    "reference",
]
