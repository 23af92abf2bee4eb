"""One zero fill for a decode step's split-K arrival counters (``ops._common.counter_arena``): disjoint zeroed slices
inside, fresh buffers outside, when full or switched off; the MoE layer opens one at decode sizes and its output is
the same bits with it as without (interpreted here; on a GPU eager and in a CUDA graph)."""
import pytest
import torch

import moe_kernels as mk
from moe_kernels.modules import moe as moe_module
from moe_kernels.ops import _common

CPU = torch.device("cpu")


def test_arena_hands_out_disjoint_zeroed_slices(monkeypatch):
    monkeypatch.delenv("MOE_KERNELS_COUNTER_ARENA", raising=False)
    with _common.counter_arena(CPU, 64) as buf:
        a = _common.arrival_counters(CPU, 10)
        b = _common.arrival_counters(CPU, 20)
        assert a.data_ptr() == buf.data_ptr() and b.data_ptr() == buf[10:].data_ptr()
        assert a.numel() == 10 and b.numel() == 20 and int(a.abs().sum() + b.abs().sum()) == 0
        big = _common.arrival_counters(CPU, 40)  # 30 + 40 > 64: fresh zeros, not a view of the arena
        assert big.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() and int(big.abs().sum()) == 0
        c = _common.arrival_counters(CPU, 34)  # the rest still fits
        assert c.data_ptr() == buf[30:].data_ptr()
        with _common.counter_arena(CPU, 8) as inner:  # nested: the innermost serves, the outer comes back after
            assert _common.arrival_counters(CPU, 8).data_ptr() == inner.data_ptr()
        assert _common.arrival_counters(CPU, 1).untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    out = _common.arrival_counters(CPU, 4)  # closed: fresh
    assert out.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()


def test_arena_serves_its_own_device_only(monkeypatch):
    monkeypatch.delenv("MOE_KERNELS_COUNTER_ARENA", raising=False)
    with _common.counter_arena(torch.device("meta"), 64) as buf:
        assert _common.arrival_counters(CPU, 4).device == CPU
        assert buf.device.type == "meta"


def test_arena_switched_off(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_COUNTER_ARENA", "0")
    with _common.counter_arena(CPU, 64) as buf:
        assert buf is None
        assert _common.arrival_counters(CPU, 4).numel() == 4


def _layer(device):
    torch.manual_seed(0)
    return mk.MoELayer(hidden_size=256, intermediate_size=128, num_experts=64, top_k=8, scoring="sigmoid",
                       n_group=8, topk_group=4, routed_scaling_factor=2.5, n_shared_experts=1, precision="fp8",
                       device=device, dtype=torch.bfloat16)


def test_layer_takes_its_counters_from_one_arena_at_decode_sizes(monkeypatch):
    """Interpreted (CI): a T = 1 step opens one arena and its router takes its counters from it (E 64 at T = 1:
    the GEMV splits the gate over expert blocks, so the router has an arrival counter); the output is the same bits
    with the arena switched off; a prefill-sized step opens none."""
    if not _common.interpret_mode():
        pytest.skip("the interpreter runs the layer's kernels on the CPU")
    layer = _layer("cpu")
    opened, served = [], []
    real_arena, real_counters = _common.counter_arena, _common.arrival_counters

    def arena(device, n=_common.ARENA_COUNTERS):
        opened.append(device)
        return real_arena(device, n)

    def counters(device, n):
        out = real_counters(device, n)
        served.append(getattr(_common._arena, "top", None) is not None)
        return out

    monkeypatch.setattr(moe_module, "counter_arena", arena)
    monkeypatch.setattr(_common, "arrival_counters", counters)
    from moe_kernels.ops import routing

    monkeypatch.setattr(routing, "arrival_counters", counters)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        assert opened == [CPU] and served and all(served)
        monkeypatch.setenv("MOE_KERNELS_COUNTER_ARENA", "0")
        assert torch.equal(layer(x), y)
        opened.clear()
        layer(torch.randn(moe_module.ARENA_MAX_T + 1, 256, dtype=torch.bfloat16))
        assert opened == []


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 16])
def test_layer_same_bits_with_and_without_the_arena_on_gpu(T, monkeypatch):
    """Eager and in a CUDA graph (the layer's own decode graphs), with the arena as without it."""
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "0")
    layer = _layer("cuda")
    x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MOE_KERNELS_COUNTER_ARENA", mode)
        layer._graphs.clear()
        with torch.no_grad():
            eager = layer._forward(x)
            graphed = [layer(x) for _ in range(3)]  # captured on a call, replayed on the next ones
        torch.cuda.synchronize()
        outs[mode] = (eager, graphed)
    assert torch.equal(outs["1"][0], outs["0"][0])
    for a, b in zip(outs["1"][1], outs["0"][1]):
        assert torch.equal(a, b)
    assert torch.equal(outs["1"][0], outs["1"][1][-1])
