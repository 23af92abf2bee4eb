"""Pure-PyTorch definitions of every op: readable, fp32 inside, and the definition of correct for the kernels."""
from .gemm import grouped_gemm, grouped_gemm_fp8, linear_fp8, swiglu
from .mla import apply_rope, mla_prefill, rms_norm, rope_cos_sin
from .moe import dense_mlp, expert_mlp, moe_layer
from .norm import llama_rms_norm
from .permute import Permuted, permute, permute_indices, unpermute
from .quant import dequantize_fp8, dequantize_weight_fp8, quantize_fp8, quantize_weight_fp8
from .routing import expert_counts, expert_scores, expert_weights, route, router_logits, select_experts
from .dispatch import dispatch_layout
