from .experts import GroupedExperts
from .mla import MLACache, MultiHeadLatentAttention
from .moe import MoELayer
from .norm import RMSNorm
from .router import TopKRouter

__all__ = ["GroupedExperts", "MLACache", "MoELayer", "MultiHeadLatentAttention", "RMSNorm", "TopKRouter"]
