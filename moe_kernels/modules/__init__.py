from .experts import GroupedExperts
from .linear import FP8Linear
from .mla import MLACache, MultiHeadLatentAttention
from .moe import MoELayer
from .norm import RMSNorm
from .router import TopKRouter

__all__ = ["FP8Linear", "GroupedExperts", "MLACache", "MoELayer", "MultiHeadLatentAttention", "RMSNorm", "TopKRouter"]
