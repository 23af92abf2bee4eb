"""Expert parallelism on CPU processes over gloo (world sizes 2, 4 and 16), and on GPUs under torchrun.

The CPU checks live in tests/_dist_worker.py. One group of processes per world size runs all its checks (process
start-up dominates: 16 processes share the CI machine's cores); each check is reported as its own test here.
The multigpu tests run under ``torchrun --nproc-per-node 2 -m pytest -m multigpu tests/test_dist.py``.
"""
from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

import _dist_worker

CHECKS_BY_WORLD = {
    2: list(_dist_worker.CHECKS),
    4: list(_dist_worker.CHECKS),
    # the timeout check needs seconds of idle waiting; TP and replica training are covered at 2 and 4 ranks
    16: [c for c in _dist_worker.CHECKS if c not in ("timeout", "tensor_parallel", "replica_training")],
}
_runs: dict = {}
DEADLINE_S = 240  # a hang (mismatched collectives) fails the checks instead of blocking the suite


def _run_world(world: int, tmp_root) -> dict:
    """Start ``world`` processes once, run every check, return {rank: {check: "ok" | traceback}}."""
    if world not in _runs:
        out_dir = tmp_root / f"world{world}"
        out_dir.mkdir()
        # forkserver: children fork from a clean server that imported torch once (CUDA never initialised)
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "moe_kernels", "_dist_worker"])
        _runs[world] = _dist_worker.spawn_world(
            _dist_worker.run, (world, str(out_dir / "init"), str(out_dir), CHECKS_BY_WORLD[world]), world, out_dir,
            CHECKS_BY_WORLD[world], "forkserver", DEADLINE_S)
    return _runs[world]


@pytest.fixture(scope="module")
def dist_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("world,check", [(w, c) for w, cs in CHECKS_BY_WORLD.items() for c in cs])
def test_dist_cpu(world, check, dist_tmp):
    why = _dist_worker.failure(_run_world(world, dist_tmp), check)
    if why:
        pytest.fail(why)


def test_placement_default():
    from moe_kernels.dist.placement import Placement, default_placement

    p = default_placement(8, 4)
    assert p.expert_to_rank == (0, 0, 1, 1, 2, 2, 3, 3) and p.experts_of(2) == (4, 5) and p.local_index[5] == 1
    q = default_placement(3, 8)
    assert q.expert_to_rank == (0, 1, 2) and q.experts_of(5) == () and q.num_local(2) == 1
    with pytest.raises(ValueError, match="world size"):
        default_placement(10, 4)
    with pytest.raises(ValueError, match="expert_to_rank"):
        Placement((0, 4), 4)
    assert Placement((1, 0, 1), 2).experts_of(1) == (0, 2)
    assert p.fingerprint() == default_placement(8, 4).fingerprint() != q.fingerprint()


# ---- multi-GPU: run under torchrun ------------------------------------------------------------------------------

def _torchrun_group():
    import torch.distributed as dist

    if "RANK" not in os.environ:
        pytest.skip("run under torchrun: torchrun --nproc-per-node 2 -m pytest -m multigpu tests/test_dist.py")
    if not dist.is_initialized():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    return dist.group.WORLD


@pytest.mark.multigpu
@pytest.mark.parametrize("backend", ["nccl", "p2p"])
@pytest.mark.parametrize("fp8", [False, True])
def test_multigpu_round_trip(backend, fp8):
    """Received rows bitwise equal to the source rows; top-1 identity round trip exact; repeated calls reuse
    the buffers (epochs) without reading stale data."""
    import torch.distributed as dist

    import moe_kernels as mk
    from moe_kernels import reference
    from moe_kernels.dist.ep import ExpertParallel

    group = _torchrun_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    for E, k in ((2 * world, 1), (4 * world, 4), (world, 2)):
        ep = ExpertParallel(group, E, backend=backend, timeout=30)
        for it in range(3):  # same buffers, new data each time
            def make(s, it=it, E=E, k=k):  # top-1 with weight 1: the round trip must return x exactly
                x, ids, w = _dist_worker.tokens(s, 64 + 13 * s, E, k, torch.bfloat16, seed=100 * it + E)
                return x, ids, (torch.ones_like(w) if k == 1 else w)

            x, ids, w = (t.to(dev) for t in make(rank))
            d = ep.dispatch(x, ids, w, fp8=fp8)
            want_x, want_w, counts = _dist_worker.expected_rows(rank, world, ep.placement, make)
            want_x = want_x.to(dev)
            if fp8:  # the sender's quantisation is row-wise: the same op on the gathered rows must match
                q, s = mk.ops.quantize_fp8(want_x)
                assert torch.equal(d.x.view(torch.uint8), q.view(torch.uint8)) and torch.equal(d.scale, s)
                y = reference.dequantize_fp8(d.x, d.scale).bfloat16()
            else:
                assert torch.equal(d.x.view(torch.uint8), want_x.view(torch.uint8))
                y = d.x
            assert d.tokens_per_expert == counts
            if k == 1:
                assert torch.equal(d.weights.cpu(), want_w)
            out = ep.combine(y, d)
            if k == 1 and not fp8:
                assert torch.equal(out.view(torch.uint8), x.view(torch.uint8))
            xq = reference.dequantize_fp8(*reference.quantize_fp8(x)) if fp8 else x.float()
            ref = w.sum(1, keepdim=True) * xq
            err = float((out.float() - ref).norm() / ref.norm())
            assert err < 1e-2, err
        ep.check()
        ep.close()


@pytest.mark.multigpu
@pytest.mark.parametrize("backend", ["nccl", "p2p"])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_multigpu_moe_layer(backend, precision):
    """The EP MoELayer (two pipelined micro-batches) equals the single-GPU layer on the same weights."""
    import torch.distributed as dist

    from moe_kernels import MoELayer
    from moe_kernels.dist.ep import ExpertParallel

    group = _torchrun_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    H, I, E = 256, 256, 8 * world
    torch.manual_seed(0)
    ref = MoELayer(H, I, E, top_k=2, precision=precision, device=dev, dtype=torch.bfloat16)
    ep = ExpertParallel(group, E, backend=backend, hidden_size=H, timeout=30)
    local = ep.shard_experts(ref.experts)
    g = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(333 + rank, H, device=dev, generator=g).bfloat16()
    w, ids, _ = ref.gate(x)
    out = ep.forward(x, w, ids, local)
    want = ref(x)
    err = float((out.float() - want.float()).norm() / want.float().norm())
    assert err < 2e-2, err
    ep.close()


@pytest.mark.multigpu
def test_multigpu_moe_layer_gradients():
    """Training through expert parallelism on GPUs (bf16 experts, the default backend): the tokens', the local
    experts' and the summed gate gradients equal the single-GPU layer's on every rank's tokens at once."""
    import torch.distributed as dist

    from moe_kernels import MoELayer

    group = _torchrun_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    H, I, E = 256, 256, 4 * world
    torch.manual_seed(0)
    ref = MoELayer(H, I, E, top_k=2, precision="bf16", device=dev)
    layer = MoELayer(H, I, E, top_k=2, precision="bf16", device=dev, ep_group=group)
    layer.gate.load_state_dict(ref.gate.state_dict())
    layer.experts = layer._ep.shard_experts(ref.experts)

    def make(s, salt=0):
        g = torch.Generator(device=dev).manual_seed(salt + s)
        return torch.randn(100 + 7 * s, H, device=dev, generator=g).bfloat16()

    x = make(rank).requires_grad_()
    (layer(x).float() * make(rank, 1000).float()).sum().backward()
    xs = [make(s).requires_grad_() for s in range(world)]
    (ref(torch.cat(xs)).float() * torch.cat([make(s, 1000) for s in range(world)]).float()).sum().backward()

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert rel(x.grad, xs[rank].grad) < 3e-2
    idx = torch.tensor(layer._ep.local_experts, device=dev)
    assert rel(layer.experts.w13.grad, ref.experts.w13.grad[idx]) < 3e-2
    g = layer.gate.weight.grad.clone()
    dist.all_reduce(g)
    assert rel(g, ref.gate.weight.grad) < 3e-2
    layer._ep.close()


@pytest.mark.multigpu
def test_multigpu_p2p_timeout():
    """A peer that never runs its combine: the P2P kernel gives up after the timeout and check() names it."""
    import torch.distributed as dist

    from moe_kernels.dist.ep import ExpertParallel

    group = _torchrun_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    ep = ExpertParallel(group, 2 * world, backend="p2p", timeout=2.0)
    x, ids, w = (t.to(dev) for t in _dist_worker.tokens(rank, 32, 2 * world, 2))
    d = ep.dispatch(x, ids, w)
    if rank == 0:
        ep.combine(d.x, d, async_op=True)
        with pytest.raises(TimeoutError, match="rank 1 never delivered"):
            ep.check()
    dist.barrier()
    ep.close()


@pytest.mark.multigpu
@pytest.mark.parametrize("check", ["ll_round_trip", "ll_graph", "ll_overflow", "ll_layer"])
def test_multigpu_low_latency(check):
    """The low-latency checks of the one-GPU suite (tests/test_ep_shared_device.py) on distinct GPUs."""
    import torch.distributed as dist

    _torchrun_group()
    _dist_worker._problems.clear()
    _dist_worker.GPU_CHECKS[check](dist.get_rank(), dist.get_world_size())
    assert not _dist_worker._problems, "\n".join(_dist_worker._problems)
