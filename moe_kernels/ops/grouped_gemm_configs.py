"""Tuned launch configs of the grouped GEMM kernels: data files looked up by device name and shape.

A config file ``configs/grouped_gemm_{kind}_N{N}_K{K}_{device_name}.json`` maps a rows-per-expert bucket
(the average rows one expert gets: 64, 256, 1024, 4096, ...) to one launch config::

    {"256": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4,
             "USE_TMA": 1}, ...}

(``PAIR_N``: 1 makes a program of the plain GEMM compute two adjacent BLOCK_N column tiles; ``WGMMA``: 1 runs the
FP8 config on the Gluon kernel for sm_90, ``grouped_gemm_wgmma``; absent means 0.)

``kind`` is ``fp8``/``bf16``/``fp32`` (plain grouped GEMM) or ``fp8_swiglu``/``bf16_swiglu``/``fp32_swiglu`` (the
w13 GEMM with the SwiGLU epilogue, where N is the intermediate size I, the columns it writes). fp32 operands (the
bf16 path run on fp32 tiles: IEEE products on CUDA cores, four bytes an element) have kinds of their own: a bf16
table's tile would ask for twice the shared memory.

Shared memory: ``smem_bytes`` bounds what a config asks for; every default fits ``SMEM_LIMIT`` of its compute
capability (``ARCH_DEFAULTS`` holds the smaller tiles of GPUs with less shared memory than sm_90), and a tuned
config that would not fit the device is replaced by the default, with a warning.

The lookup takes the nearest bucket. A device without a file of its own borrows the file of a tuned device of the
same chip (``SAME_CHIP``: the H200 is an H100 with more memory) and says so once; a shape without any file gets the
kind's default. ``moe-kernels tune`` (``moe_kernels/tune.py``) rewrites the files. Nothing autotunes at import or at
run time.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path

import torch

__all__ = ["CONFIG_DIR", "KINDS", "DEFAULTS", "ARCH_DEFAULTS", "SMEM_LIMIT", "config_filename", "get_config",
           "default_config", "smem_bytes", "load_table", "device_name"]

CONFIG_DIR = Path(__file__).parent / "configs"  # shipped as package data: moe_kernels/ops/configs/*.json
KINDS = ("fp8", "fp8_swiglu", "bf16", "bf16_swiglu", "fp32", "fp32_swiglu")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "USE_TMA", "PAIR_N", "WGMMA",
               "UNROLL", "WS", "PERSISTENT", "DECODE", "BLOCK_T")

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
# The decode kernel (``grouped_gemm_decode``: weight rows on the MMA's M side, tokens on N) for at most
# DECODE_MAX_ROWS rows per expert on average, where a table has no bucket that small. BLOCK_T is set by the launcher
# from the row count; BLOCK_N = 128 is one FP8 scale block (and the SwiGLU re-quantisation's group).
DECODE_MAX_ROWS = 16
DECODE_DEFAULT = dict(DECODE=1, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
# fp32 (sm_90, and sm_80's 163 KiB): products on CUDA cores (IEEE), so a smaller K step, and a tile that keeps the
# accumulator's epilogue conversion within shared memory (the bf16 tiles asked 278,584 bytes of sm_90's 232,448).
DEFAULTS.update(
    fp32=dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3, USE_TMA=0),
    fp32_swiglu=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, USE_TMA=0),
)
# Compute capabilities with less shared memory than sm_90: their own defaults where sm_90's would not fit
# ("89": sm_86 / sm_89, 99 KiB a block; "80": sm_80 / sm_87, 163 KiB). sm_80 has no FP8.
ARCH_DEFAULTS = {
    "89": dict(
        fp8=dict(DEFAULTS["fp8"], num_stages=2),
        fp8_swiglu=dict(DEFAULTS["fp8_swiglu"], BLOCK_M=64, num_warps=4, num_stages=2),
        bf16=dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, USE_TMA=0),
        bf16_swiglu=dict(DEFAULTS["bf16_swiglu"], BLOCK_N=64, num_stages=3),
        fp32=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, USE_TMA=0),
        fp32_swiglu=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, USE_TMA=0),
    ),
    "80": dict(
        bf16=dict(DEFAULTS["bf16"], BLOCK_N=128, num_stages=4, USE_TMA=0),
    ),
}
# The opt-in shared memory of one block (bytes) by compute capability; a device reports its own at run time
SMEM_LIMIT = {(9, 0): 232448, (8, 9): 101376, (8, 7): 166912, (8, 6): 101376, (8, 0): 166912}
FP8_ARCHS = ((9, 0), (8, 9))  # the capabilities with e4m3 tensor cores among SMEM_LIMIT's


def _arch_key(capability: tuple[int, int]) -> str | None:
    """The ARCH_DEFAULTS entry of a compute capability (None: sm_90's DEFAULTS)."""
    if capability[0] >= 9:
        return None
    return "80" if SMEM_LIMIT.get(tuple(capability), 0) >= SMEM_LIMIT[(8, 0)] else "89"


def default_config(kind: str, capability: tuple[int, int]) -> dict:
    """The default config of ``kind`` on a GPU of this compute capability (major, minor)."""
    return dict(ARCH_DEFAULTS.get(_arch_key(capability), {}).get(kind, DEFAULTS[kind]))


def smem_bytes(kind: str, cfg: dict) -> int:
    """An upper bound of the shared memory (bytes) one program of ``cfg`` asks for (checked against offline sm_90
    compiles with Triton 3.6 / 3.8): ``num_stages`` buffers of the A tile and the W tile(s) (Triton keeps
    num_stages with TMA, num_stages - 1 with pointer loads), fp32's accumulator conversion in the epilogue (the IEEE
    product's layout: BLOCK_M x BLOCK_N x 4 bytes, 278,584 = 3 x 81,920 + 32,768 + 56 on Triton 3.6), 1 KiB of
    barriers and the like."""
    elem = 1 if kind.startswith("fp8") else 4 if kind.startswith("fp32") else 2
    w_tiles = 2 if kind.endswith("swiglu") or cfg.get("PAIR_N") else 1
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    operands = (BM + w_tiles * BN) * BK * elem * cfg["num_stages"]
    epilogue = BM * BN * 4 if kind.startswith("fp32") else 0
    return operands + epilogue + 1024


# Triton's CPU interpreter: small tiles keep the tests fast and still cut every expert into several tiles.
INTERPRETER = {
    "fp8": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=1, USE_TMA=0),
    "bf16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1, USE_TMA=0),
}
INTERPRETER["fp32"] = INTERPRETER["bf16"]


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
    """The launch config for ``kind`` at (N, K) on ``device``, for about ``rows_per_expert`` rows per expert.
    ``MOE_KERNELS_DECODE_MAX_ROWS=R`` (an experiment's switch): up to R rows per expert take the decode kernel
    whatever the tables say."""
    if device.type != "cuda":
        return dict(INTERPRETER[kind.split("_")[0]])
    rows = max(int(rows_per_expert), 1)
    forced = os.environ.get("MOE_KERNELS_DECODE_MAX_ROWS")
    if forced and rows <= int(forced):
        return dict(DECODE_DEFAULT)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(_cuda_config(kind, N, K, rows, index))


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
    small = {m: cfg for m, cfg in (table or {}).items() if m <= DECODE_MAX_ROWS}
    if rows <= DECODE_MAX_ROWS and not small:
        return dict(DECODE_DEFAULT)  # no tuned decode bucket: the decode kernel's default
    cap, limit = _device_smem(index)
    default = default_config(kind, cap)
    if not table:
        return default
    bucket = min(table, key=lambda m: abs(math.log2(max(m, 1) / rows)))  # nearest on a log scale
    cfg = dict(DEFAULTS[kind], **table[bucket])
    if smem_bytes(kind, cfg) > limit:
        _warn_once(f"moe_kernels: the tuned {kind} config {cfg} for N={N}, K={K} needs about "
                   f"{smem_bytes(kind, cfg)} bytes of shared memory, more than this GPU's {limit}: the default runs")
        return default
    return cfg


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, opt-in shared memory of one block in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    cap = (props.major, props.minor)
    return cap, int(getattr(props, "shared_memory_per_block_optin", 0) or SMEM_LIMIT.get(cap, 101376))
