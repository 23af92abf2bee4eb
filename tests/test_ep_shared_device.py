"""The P2P expert-parallel backend on ONE GPU: 2 and 4 ranks, each its own process and CUDA context on GPU 0,
a gloo group over 127.0.0.1, ``ExpertParallel(..., allow_shared_device=True)``. Every rank's buffer is its own
allocation mapped by its peers through CUDA IPC, as between GPUs, so the P2P kernels, their protocol (flags,
epochs, timeouts) and the index math run here as on a multi-GPU node; the ranks time-share the GPU, so this
says nothing about speed. The checks live in tests/_dist_worker.py (``GPU_CHECKS``); one group of processes per
world size runs them all, each reported as its own test.

Also here (CPU, no GPU needed): the option's argument checks and the backend choice it changes.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch

import _dist_worker

# per world size: a hang fails the checks instead of blocking the run. tools/gpu/ep.sh sets a tighter one and an
# end time (MOE_KERNELS_EP_TEST_END, seconds since the epoch) that world 2 may use half of and world 4 the rest.
DEADLINE_S = float(os.environ.get("MOE_KERNELS_EP_TEST_DEADLINE", "300"))
END_TIME = float(os.environ.get("MOE_KERNELS_EP_TEST_END", "0")) or None


def _deadline(world: int) -> float:
    if END_TIME is None:
        return DEADLINE_S
    left = END_TIME - time.time()
    return max(10.0, min(DEADLINE_S, left * 0.5 if world == 2 else left - 2))
_runs: dict = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _p2p_available() -> str | None:
    """Why the shared-device tests cannot run here, or None."""
    from moe_kernels.dist.ep import _p2p_ops_available

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not _p2p_ops_available():
        from moe_kernels._ext import extension_error

        return f"the extension's P2P ops are not available: {extension_error()}"
    return None


def _run_world(world: int, tmp_root) -> dict:
    if world not in _runs:
        out_dir = tmp_root / f"gpu_world{world}"
        out_dir.mkdir()
        names = list(_dist_worker.GPU_CHECKS)
        # spawn: fresh interpreters, each creating its own CUDA context on GPU 0
        _runs[world] = _dist_worker.spawn_world(_dist_worker.run_gpu, (world, _free_port(), str(out_dir), names),
                                                world, out_dir, names, "spawn", _deadline(world))
        for r, res in _runs[world].items():
            print(f"[shared-device] world {world} rank {r} seconds per check: {res.get('_seconds')}")
    return _runs[world]


@pytest.fixture(scope="module")
def gpu_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("ep_shared")


@pytest.mark.gpu
@pytest.mark.parametrize("world,check", [(w, c) for w in (2, 4) for c in _dist_worker.GPU_CHECKS])
def test_shared_device(world, check, gpu_tmp):
    why = _p2p_available()
    if why:
        pytest.skip(why)
    why = _dist_worker.failure(_run_world(world, gpu_tmp), check)
    if why:
        pytest.fail(f"(one GPU shared by the ranks) {why}")


# ---- CPU: the option itself -------------------------------------------------------------------------------------

def _one_rank_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    return dist.group.WORLD


def test_allow_shared_device_option(tmp_path):
    """Off by default; a bool only; on a machine without CUDA, p2p stays impossible and says why."""
    import torch.distributed as dist

    from moe_kernels.dist.ep import ExpertParallel

    group = _one_rank_group(tmp_path)
    try:
        ep = ExpertParallel(group, 2, backend="nccl")
        assert ep.allow_shared_device is False and ep.backend == "nccl"
        with pytest.raises(TypeError, match="allow_shared_device"):
            ExpertParallel(group, 2, allow_shared_device=1)
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="allow_shared_device=True, but some ranks see no CUDA device"):
                ExpertParallel(group, 2, backend="p2p", allow_shared_device=True)
            with pytest.raises(RuntimeError, match="or allow_shared_device=True"):
                ExpertParallel(group, 2, backend="p2p")
            ep = ExpertParallel(group, 2, backend="auto", allow_shared_device=True)  # falls back quietly on the CPU
            assert ep.backend == "nccl"
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_low_latency_layout_bytes():
    """The extension's low-latency layout (csrc/kernels/p2p.h) against its closed form: counts [L][R] and flags
    [R][20] (uint64), the epoch word, 16-byte alignment, then L x R x N records of row + scales + 16 bytes; the
    combine region N x k x H bf16. Bad layouts raise."""
    from moe_kernels._ext import has_extension

    if not has_extension() or not hasattr(torch.ops.moe_kernels_C, "p2p_ll_bytes"):
        pytest.skip("the extension (with the low-latency kernels) is not built")
    R, L, N, k, row, sc, H = 4, 3, 50, 8, 7168, 224, 7168
    head = -(-(8 * L * R + 8 * R * 20 + 8) // 16) * 16
    got = torch.ops.moe_kernels_C.p2p_ll_bytes(R, [L, N, k, row, sc, H, 12, 3])
    assert list(got) == [head + L * R * N * (row + sc + 16), 2 * N * k * H]
    for bad in ([L, N, 33, row, sc, H, 12, 3], [L, N, k, row + 8, sc, H, 12, 3], [0, N, k, row, sc, H, 12, 3]):
        with pytest.raises(RuntimeError):
            torch.ops.moe_kernels_C.p2p_ll_bytes(R, bad)
