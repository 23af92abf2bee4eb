from .hf import PatchReport, UnsupportedModule, mla_from_hf, moe_from_hf, patch_model

__all__ = ["PatchReport", "UnsupportedModule", "mla_from_hf", "moe_from_hf", "patch_model"]
