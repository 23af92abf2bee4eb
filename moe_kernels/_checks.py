"""Argument checks shared by ops and modules.

Every public entry point validates its inputs here, on the host, before any kernel is launched: a bad call
raises a TypeError (wrong type/dtype/device) or ValueError (wrong shape/value) naming the argument and what
was expected, never an illegal memory access or a silent wrong answer.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def check_tensor(
    name: str,
    t,
    *,
    dtype: torch.dtype | Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument; ``None`` entries in ``shape`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise TypeError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise TypeError(f"{n} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def check_number(name: str, value, *, finite: bool = True) -> float:
    """A real scalar (int or float, not bool); finite unless told otherwise. Returns it as a float."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_finite(name: str, t: torch.Tensor, *, allow_neg_inf: bool = False) -> None:
    """No NaN or inf in ``t`` (-inf allowed if asked). Reads values: one device->host sync, so call it under
    value_checks_enabled()."""
    if not t.numel():
        return
    bad = ~torch.isfinite(t)
    if allow_neg_inf:
        bad &= t != float("-inf")
    if bool(bad.any()):
        what = "NaN or +inf" if allow_neg_inf else "NaN or inf"
        raise ValueError(f"{name} must hold no {what}: it holds {int(bad.sum())} such value(s)"
                         + (" (-inf is allowed: it masks an entry out)" if allow_neg_inf else ""))


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_multiple(name: str, value: int, of: int) -> None:
    if value % of != 0:
        raise ValueError(f"{name} must be a multiple of {of}, got {value}")


def check_routing_args(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """The routing hyper-parameters that every routing entry point shares."""
    check_int("num_experts", num_experts, lo=1)
    check_int("top_k", top_k, lo=1, hi=num_experts)
    check_int("n_group", n_group, lo=1)
    if num_experts % n_group != 0:
        raise ValueError(f"n_group must divide num_experts={num_experts}, got n_group={n_group}")
    check_int("topk_group", topk_group, lo=1, hi=n_group)
    if n_group > 1 and num_experts // n_group < 2:
        raise ValueError(
            f"group-limited routing ranks groups by their best two experts: num_experts/n_group must be >= 2, "
            f"got {num_experts}/{n_group}"
        )
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(
            f"top_k={top_k} exceeds the experts in the {topk_group} kept groups "
            f"({topk_group * (num_experts // n_group)})"
        )


def check_ids(name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Range check of expert ids (one device->host sync: use on validation paths only)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(
            f"{name} must lie in [0, {num_experts}), got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def value_checks_enabled(t: torch.Tensor | None = None) -> bool:
    """Checks that read tensor values (ids in range, finite logits) cost a device->host sync.

    They run unless MOE_KERNELS_VALUE_CHECKS=0 is set, and never while a CUDA graph is being captured or
    torch.compile is tracing (where a sync is not allowed).
    """
    import os

    if os.environ.get("MOE_KERNELS_VALUE_CHECKS", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if t is not None and t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True
