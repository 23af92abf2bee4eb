"""Assertion helpers shared by the tests."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp(min=1e-30))


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> float:
    """Relative Frobenius error <= tol, no NaN; the message names the worst element."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {int((~torch.isfinite(out)).sum())} non-finite elements"
    err = rel_err(out, ref)
    if err > tol:
        diff = (out.double() - ref.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; worst at {idx}: {out[idx].item()} vs {ref[idx].item()}"
        )
    return err


def poison_allocator(shape, dtype, device) -> None:
    """Leave a NaN-filled block of this size in the allocator's cache, so the op's next torch.empty of the same size
    most likely gets it: rows a kernel forgets to write then show up as NaN instead of plausible garbage."""
    t = torch.full(shape, float("nan"), dtype=torch.float32, device=device).to(dtype)
    del t


def skip_unless_cuda(device: str) -> None:
    import pytest

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def import_bench(name: str):
    """Import bench/<name>.py as a module. bench/_common.py turns the value checks off for timing
    (MOE_KERNELS_VALUE_CHECKS=0); the setting from before the import is put back, so the other tests keep them."""
    import importlib
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench")
    saved = os.environ.get("MOE_KERNELS_VALUE_CHECKS")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)
        if saved is None:
            os.environ.pop("MOE_KERNELS_VALUE_CHECKS", None)
        else:
            os.environ["MOE_KERNELS_VALUE_CHECKS"] = saved


def zipf_counts(total: int, experts: int = 32, empty=(5, 17), seed: int = 0) -> list:
    """Rows per expert for ``total`` rows, Zipf-like (weight 1 / rank^1.2, seeded) with the ``empty`` experts at
    0 rows; expert 0 takes what the emptied ones had, so the counts sum to ``total``."""
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    counts = torch.multinomial(w, total, replacement=True, generator=g).bincount(minlength=experts).tolist()
    for e in empty:
        counts[e] = 0
    counts[0] += total - sum(counts)
    return counts


def offsets_for(counts, device="cpu") -> torch.Tensor:
    """int32 group offsets [E + 1] (exclusive prefix sums) of per-expert row counts."""
    o = [0]
    for c in counts:
        o.append(o[-1] + c)
    return torch.tensor(o, dtype=torch.int32, device=device)


def grouped_dw_f64(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradients dW_e = dY_e^T X_e of each expert's rows, in float64 ([E, N, K])."""
    o = offsets.tolist()
    return torch.stack([dy[lo:hi].double().t() @ x[lo:hi].double() for lo, hi in zip(o, o[1:])])
