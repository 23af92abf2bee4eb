"""Tuned launch configs of the grouped GEMM kernels: data files looked up by device name and shape.

A config file ``configs/grouped_gemm_{kind}_N{N}_K{K}_{device_name}.json`` maps a rows-per-expert bucket
(the average rows one expert gets: 64, 256, 1024, 4096, ...) to one launch config::

    {"256": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4,
             "USE_TMA": 1}, ...}

(``PAIR_N``: 1 makes a program of the plain GEMM compute two adjacent BLOCK_N column tiles; ``WGMMA``: 1 runs the
FP8 config on the Gluon kernel for sm_90, ``grouped_gemm_wgmma``; absent means 0.)

``kind`` is ``fp8``/``bf16`` (plain grouped GEMM) or ``fp8_swiglu``/``bf16_swiglu`` (the w13 GEMM with the SwiGLU
epilogue, where N is the intermediate size I, the columns it writes). The lookup takes the nearest bucket. A
device without a file of its own borrows the file of a tuned device of the same chip (``SAME_CHIP``: the H200 is an
H100 with more memory) and says so once; a shape without any file gets the kind's default. ``moe-kernels tune`` (``moe_kernels/tune.py``) rewrites the
files. Nothing autotunes at import or at run time.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import torch

__all__ = ["CONFIG_DIR", "KINDS", "DEFAULTS", "config_filename", "get_config", "load_table", "device_name"]

CONFIG_DIR = Path(__file__).parent / "configs"  # shipped as package data: moe_kernels/ops/configs/*.json
KINDS = ("fp8", "fp8_swiglu", "bf16", "bf16_swiglu")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "USE_TMA", "PAIR_N", "WGMMA",
               "UNROLL", "WS", "PERSISTENT")

# Defaults for a GPU or shape without a file. FP8: the Gluon kernel's config that the H200 sweep picked at 256-4096
# rows per expert for all three kinds (bench/results/grouped_gemm_tune_wgmma-NVIDIA_H200.json); off Hopper the same
# tile runs the Triton kernel. bf16: the H100 sweep's pick at 1024-4096 rows per expert.
DEFAULTS = {
    "fp8": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1, WGMMA=1),
    "fp8_swiglu": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=1,
                       WGMMA=1),
    "bf16": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, USE_TMA=1),
    "bf16_swiglu": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, USE_TMA=1),
}
# Triton's CPU interpreter: small tiles keep the tests fast and still cut every expert into several tiles.
INTERPRETER = {
    "fp8": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=1, USE_TMA=0),
    "bf16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1, USE_TMA=0),
}


# Devices whose SMs are the same chip: a config tuned on one is the best guess for the others
SAME_CHIP = (("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H100", "NVIDIA H800"),)


def config_filename(kind: str, N: int, K: int, device: str) -> str:
    return f"grouped_gemm_{kind}_N{N}_K{K}_{device.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=None)
def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> dict[int, dict] | None:
    """{bucket: config} from one JSON file, or None when the file is missing or unreadable."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    table = {}
    for bucket, cfg in raw.items():
        if bucket.isdigit() and isinstance(cfg, dict) and all(k in cfg for k in CONFIG_KEYS[:6]):
            table[int(bucket)] = {k: int(cfg[k]) for k in CONFIG_KEYS if k in cfg}
    return table or None


def get_config(kind: str, N: int, K: int, rows_per_expert: int, device: torch.device) -> dict:
    """The launch config for ``kind`` at (N, K) on ``device``, for about ``rows_per_expert`` rows per expert."""
    if device.type != "cuda":
        return dict(INTERPRETER[kind.split("_")[0]])
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(_cuda_config(kind, N, K, max(int(rows_per_expert), 1), index))


@functools.lru_cache(maxsize=None)
def _table_for(kind: str, N: int, K: int, device: str) -> dict[int, dict] | None:
    """This device's table, else a same-chip device's (warned once per kind and shape), else None."""
    table = load_table(str(CONFIG_DIR / config_filename(kind, N, K, device)))
    if table:
        return table
    for family in SAME_CHIP:
        if not any(device.startswith(name) for name in family):
            continue
        for other in family:
            table = load_table(str(CONFIG_DIR / config_filename(kind, N, K, other)))
            if table:
                warnings.warn(f"moe_kernels: no {kind} grouped GEMM configs tuned on {device!r} for N={N}, K={K}: "
                              f"using those tuned on {other!r} (same chip); `moe-kernels tune` makes this GPU's own",
                              stacklevel=3)
                return table
    return None


@functools.lru_cache(maxsize=4096)
def _cuda_config(kind: str, N: int, K: int, rows: int, index: int) -> dict:
    table = _table_for(kind, N, K, device_name(index))
    if not table:
        return DEFAULTS[kind]
    bucket = min(table, key=lambda m: abs(math.log2(max(m, 1) / rows)))  # nearest on a log scale
    return dict(DEFAULTS[kind], **table[bucket])
