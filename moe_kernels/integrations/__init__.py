from .hf import mla_from_hf, moe_from_hf, patch_model

__all__ = ["mla_from_hf", "moe_from_hf", "patch_model"]
