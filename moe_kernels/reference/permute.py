"""Token permutation: group the (token, k) pairs by expert, and the weighted way back.

Row order of the permuted buffer: by expert, then by ascending token index inside one expert (stable). Every
(token, k) pair gets exactly one row; nothing is dropped and nothing is padded.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .quant import quantize_fp8

__all__ = ["Permuted", "permute_indices", "permute", "unpermute"]


class Permuted(NamedTuple):
    """Rows grouped by expert.

    x            [T*k, H]    the rows (bf16/fp32, or e4m3 when permuted with fp8=True)
    scale        [T*k, H/128] fp32 per-1x128-group dequantisation scales, or None
    offsets      [E+1] int32 expert e owns rows offsets[e]:offsets[e+1]
    token_index  [T*k] int32 source token of every row
    slot         [T, k] int32 the row of pair (t, j): the way back for unpermute
    """

    x: torch.Tensor
    scale: torch.Tensor | None
    offsets: torch.Tensor
    token_index: torch.Tensor
    slot: torch.Tensor


def permute_indices(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (offsets int32 [E+1], token_index int32 [T*k], slot int32 [T, k])."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # pair p = t*k + j; stable keeps tokens ascending per expert
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    slot = torch.empty(T * k, dtype=torch.int64, device=topk_ids.device)
    slot[order] = torch.arange(T * k, device=topk_ids.device)
    return offsets.to(torch.int32), (order // max(k, 1)).to(torch.int32), slot.view(T, k).to(torch.int32)


def permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, fp8: bool = False) -> Permuted:
    offsets, token_index, slot = permute_indices(topk_ids, num_experts)
    rows = x.index_select(0, token_index.long())
    scale = None
    if fp8:
        rows, scale = quantize_fp8(rows)
    return Permuted(rows, scale, offsets, token_index, slot)


def unpermute(y: torch.Tensor, permuted: Permuted, topk_weights: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * y[slot[t, j]], summed in fp32; y [T*k, N] -> [T, N]."""
    T, k = permuted.slot.shape
    gathered = y.float().index_select(0, permuted.slot.reshape(-1).long()).view(T, k, y.shape[1])
    out = (gathered * topk_weights.float().unsqueeze(-1)).sum(1)
    return out.to(out_dtype or y.dtype)
