"""Module dtype casts (``.to(torch.bfloat16)``, ``.half()``, ``.float()``) that leave some tensors' dtypes alone.

FP8 layers hold e4m3 weights with fp32 block scales: a cast of either to bf16 / fp16 / fp32 silently breaks the
layer (the next forward fails, and the scales have lost precision for good). The modules that hold such tensors
override ``nn.Module._apply`` (the one place ``.to``, ``.half``, ``.cuda``, ``.to_empty`` ... go through) and hand
it a function that still moves these tensors between devices but never changes their dtype.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["apply_keeping_dtype"]


def _move_only(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` when fn keeps t's dtype (a device move, ``share_memory_``, ``to_empty``); otherwise t moved to
    the device fn would have put it on, in its own dtype. fn is first tried on an empty tensor of t's dtype and
    device, so a cast never materialises a converted copy of a large weight."""
    probe = fn(t.new_empty(0))
    if probe.dtype == t.dtype:
        return fn(t)
    return t.to(device=probe.device)


def apply_keeping_dtype(module: nn.Module, fn: Callable, recurse: bool, names: Iterable[str],
                        base_apply: Callable) -> nn.Module:
    """Run ``base_apply(fn', recurse)`` (the module's ``super()._apply``) with fn' = fn, except that the tensors
    ``module.<name>`` for ``name`` in ``names`` keep their dtype (device moves still apply)."""
    kept = {id(t) for t in (getattr(module, n, None) for n in names) if isinstance(t, torch.Tensor)}

    def fn_keeping(t: torch.Tensor) -> torch.Tensor:
        return _move_only(fn, t) if id(t) in kept else fn(t)

    return base_apply(fn_keeping, recurse)
