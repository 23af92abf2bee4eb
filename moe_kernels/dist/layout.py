"""The dispatch layout: which ranks each token must be sent to under expert parallelism.

Computed by the extension's kernel (``csrc/kernels/layout.cu`` for CUDA tensors, ``layout_cpu.cpp`` for CPU
tensors) when it is built, else by the PyTorch reference (``moe_kernels.reference.dispatch``), with one warning.
"""
from __future__ import annotations

import warnings

import torch

from .._checks import check_int, check_tensor, value_checks_enabled
from .._ext import extension_error, has_extension
from ..reference.dispatch import dispatch_layout as _reference

__all__ = ["dispatch_layout"]

_warned_fallback = False


def dispatch_layout(topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, num_ranks: int):
    """Where each token goes under expert parallelism.

    Args:
        topk_ids: int32 or int64 [T, k], expert ids in [0, E), or -1 for "no expert" (skipped).
        expert_to_rank: int32 or int64 [E], the rank holding each expert, values in [0, num_ranks); same device.
        num_ranks: R, the expert-parallel world size.
    Returns:
        tokens_per_rank int32 [R]: tokens each rank receives (a token counts once per rank, however many of its
        k experts live there); is_token_in_rank bool [T, R]; tokens_per_expert int32 [E]: (token, k) pairs per
        expert. All on topk_ids' device.
    Raises:
        TypeError / ValueError naming the argument, before any kernel launch. The value checks (ids and ranks
        in range) cost one device->host sync; they are skipped under CUDA-graph capture, torch.compile tracing or
        MOE_KERNELS_VALUE_CHECKS=0, where the CUDA kernel ignores out-of-range entries instead.
    """
    check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), ndim=2)
    check_tensor("expert_to_rank", expert_to_rank, dtype=(torch.int32, torch.int64), ndim=1,
                 device=topk_ids.device)
    check_int("num_ranks", num_ranks, lo=1)
    num_experts = expert_to_rank.shape[0]
    if value_checks_enabled(topk_ids):
        if topk_ids.numel():
            lo, hi = int(topk_ids.min()), int(topk_ids.max())
            if lo < -1 or hi >= num_experts:
                raise ValueError(f"topk_ids must lie in [-1, {num_experts}) (-1 = no expert), got values in "
                                 f"[{lo}, {hi}]")
        if num_experts:
            lo, hi = int(expert_to_rank.min()), int(expert_to_rank.max())
            if lo < 0 or hi >= num_ranks:
                raise ValueError(f"expert_to_rank must lie in [0, num_ranks={num_ranks}), got values in [{lo}, {hi}]")

    if has_extension():
        return torch.ops.moe_kernels_C.dispatch_layout(topk_ids, expert_to_rank.to(torch.int32), num_ranks)
    global _warned_fallback
    if not _warned_fallback:
        warnings.warn(f"moe_kernels._C is unavailable ({extension_error()}); dispatch_layout runs the PyTorch "
                      f"reference", RuntimeWarning, stacklevel=2)
        _warned_fallback = True
    return _reference(topk_ids, expert_to_rank, num_ranks)
