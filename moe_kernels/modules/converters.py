"""A registry of converters: functions that build one of our modules from another library's module.

Why a registry: ``MoELayer.from_hf`` / ``MultiHeadLatentAttention.from_hf`` are public API, but the modules must
not know HuggingFace (nor import ``moe_kernels.integrations``, which imports the modules: a cycle, and a late
import inside the classmethod would still make ``modules`` depend on ``integrations``). So the dependency points
one way only: an integration registers ``(target class, source name) -> function`` when it is imported, and the
classmethods look the function up here. ``moe_kernels/__init__.py`` imports the integrations, so the registry is
filled whenever the package is; a converter missing from it raises a ``LookupError`` saying which to import.
The lookup follows the target's MRO, so a subclass of ``MoELayer`` inherits its converters.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["register_converter", "get_converter"]

_CONVERTERS: dict[tuple[type, str], Callable] = {}


def register_converter(target: type, source: str, fn: Callable) -> None:
    """Make ``fn(module, **kwargs) -> target instance`` the converter from ``source`` (e.g. "hf") to ``target``."""
    if not isinstance(target, type):
        raise TypeError(f"target must be a class, got {type(target).__name__}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _CONVERTERS[(target, source)] = fn


def get_converter(target: type, source: str) -> Callable:
    """The converter registered for ``target`` (or its nearest base class) from ``source``."""
    for cls in getattr(target, "__mro__", (target,)):
        fn = _CONVERTERS.get((cls, source))
        if fn is not None:
            return fn
    raise LookupError(f"no {source!r} converter is registered for {target.__name__}: import the integration "
                      f"that provides it (moe_kernels.integrations.{source} registers it on import)")
