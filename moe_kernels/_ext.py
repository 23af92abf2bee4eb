"""The compiled extension ``moe_kernels._C``: whether it is there, and why not.

Importing ``moe_kernels._C`` registers its ops with torch's dispatcher as ``torch.ops.moe_kernels_C.*`` (CPU,
CUDA and Meta implementations). The import happens on the first call to ``has_extension()``, not at package
import, so that a missing or broken build never stops ``import moe_kernels``.
"""
from __future__ import annotations

_state: dict = {}  # "ok": bool, "error": str | None; filled once by _load()


def _load() -> bool:
    if not _state:
        try:
            import importlib

            import torch  # noqa: F401  (libtorch must be loaded before the extension's shared library)

            importlib.import_module(f"{__package__}._C")

            _state.update(ok=True, error=None)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}._C":
                raise
            _state.update(ok=False, error="not compiled: the install found a CPU-only torch or no nvcc "
                                          "(reinstall with pip install --no-build-isolation to build it)")
        except (ImportError, OSError) as e:  # e.g. built against another torch: undefined symbols
            _state.update(ok=False, error=f"compiled but does not load: {e}")
    return _state["ok"]


def has_extension() -> bool:
    """True when the C++/CUDA extension was built and loads (its ops are then registered)."""
    return _load()


def extension_error() -> str | None:
    """Why the extension is unavailable, or None when it is available."""
    _load()
    return _state["error"]
