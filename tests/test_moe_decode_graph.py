"""Decode steps in one CUDA graph: the MoE layer (route -> permute -> experts -> unpermute, shared experts on a side
stream) captured once and replayed with new tokens and therefore new routing; a patched model under
torch.compile(mode="reduce-overhead"); the layer's own graphs of inference steps at decode sizes. On the CPU: the
layer's copy and pickle round trips (the side stream, the graphs)."""
import copy
import pickle

import pytest
import torch

import moe_kernels as mk
from _helpers import assert_close_rel


def _layer(precision, device="cuda"):
    torch.manual_seed(0)
    return mk.MoELayer(hidden_size=512, intermediate_size=256, num_experts=64, top_k=8, scoring="sigmoid",
                       n_group=8, topk_group=4, routed_scaling_factor=2.5, n_shared_experts=1, precision=precision,
                       device=device, dtype=torch.bfloat16)


def test_layer_copies_and_pickles():
    layer = mk.MoELayer(hidden_size=128, intermediate_size=128, num_experts=4, top_k=2, n_shared_experts=1,
                        precision="bf16", dtype=torch.bfloat16)
    layer._side_streams[torch.device("cpu")] = object()  # what a CUDA run leaves there: no copy may carry it
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._side_streams == {}
        assert other._graphs is not layer._graphs and other._graphs.replays == 0
        x = torch.randn(2, 128, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(other(x), layer(x))
    layer._graphs._graphs[("a key",)] = None
    layer.to(torch.float32)  # moved or cast: no graph survives
    assert layer._graphs._graphs == {}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
@pytest.mark.parametrize("T", [1, 4, 37])
def test_layer_captured_once_replays_new_routing(precision, T):
    layer = _layer(precision)
    static_x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(static_x)  # compile every kernel outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        seen = set()
        for step in range(4):
            static_x.copy_(torch.randn(T, 512, device="cuda", dtype=torch.bfloat16))
            graph.replay()
            want = layer(static_x)  # eager, same kernels: the replay must follow the new tokens' routing
            seen.add(tuple(layer.gate(static_x)[1].flatten().tolist()))
            assert_close_rel(static_y.float(), want.float(), 1e-3, f"replay {step}")
    assert len(seen) == 4, "the new tokens should route differently"


@pytest.mark.gpu
def test_load_monitor_follows_replays():
    """While a step is captured the load monitor's update runs on a stream of its own (a branch of the graph):
    after the replays the monitor holds what the same steps give eagerly."""
    a, b = _layer("bf16"), _layer("bf16")
    xs = [torch.randn(5, 512, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    static_x = xs[0].clone()
    with torch.no_grad():
        a(static_x), b(static_x)  # one eager step each (and every kernel compiled outside the capture)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            a(static_x)
        assert a._observe_streams, "the capture should have put the update on its own stream"
        for x in xs:
            static_x.copy_(x)
            graph.replay()
            b(x)
    torch.cuda.synchronize()
    assert int(a.gate.steps) == int(b.gate.steps) == 4
    assert torch.equal(a.gate.load, b.gate.load)


@pytest.mark.gpu
def test_patched_model_under_reduce_overhead_compile():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    # fp32: bf16 rounding differences between inductor's kernels and eager ones flip a few routing choices, and a
    # flipped top-k moves logits by far more than any bound that would still catch a stale replay
    model = transformers.MixtralForCausalLM(cfg).to("cuda", torch.float32).eval()
    mk.patch_model(model, precision="fp32")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=False)
    with torch.no_grad():
        for step in range(3):
            ids = torch.randint(0, 128, (2, 5), device="cuda")
            got = compiled(ids).logits.float()
            want = model(ids).logits.float()
            assert_close_rel(got, want, 1e-3, f"compiled step {step}")


def _own_graph_pair(precision, monkeypatch):
    """A layer that makes its own graphs and an eager twin with the same weights (value checks off: graphs on)."""
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "0")
    monkeypatch.delenv("MOE_KERNELS_CUDA_GRAPHS", raising=False)
    layer = _layer(precision).eval()
    twin = copy.deepcopy(layer)
    twin.cuda_graphs = False
    return layer, twin


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_layer_replays_its_own_graphs_with_new_tokens(precision, monkeypatch):
    layer, twin = _own_graph_pair(precision, monkeypatch)
    with torch.no_grad():
        # T = 1 and 5 run eagerly once each, then capture and replay; 300 rows exceed the graphs' 256: eager
        for step, T in enumerate((1, 5, 1, 5, 1, 300, 5)):
            x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)  # new tokens: new routing every call
            got, want = layer(x), twin(x)
            assert got.shape == (T, 512) and got.dtype == torch.bfloat16
            assert_close_rel(got.float(), want.float(), 1e-6, f"step {step} T={T}")
        assert layer._graphs.replays == 4 and twin._graphs.replays == 0
        # a 3-D input (batch, seq, hidden) of 5 tokens is the T = 5 step
        x = torch.randn(1, 5, 512, device="cuda", dtype=torch.bfloat16)
        assert_close_rel(layer(x).float(), twin(x).float(), 1e-6, "3-D input")
        assert layer._graphs.replays == 5


@pytest.mark.gpu
def test_layer_graphs_follow_weight_updates(monkeypatch):
    layer, twin = _own_graph_pair("bf16", monkeypatch)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        assert layer._graphs.replays == 2
        for m in (layer, twin):  # in place: the replay reads the new values
            m.experts.w2.mul_(0.5)
            m.gate.weight.mul_(-1.0)
        assert_close_rel(layer(x).float(), twin(x).float(), 1e-6, "in-place update")
        assert layer._graphs.replays == 3
        new_w13 = torch.randn_like(layer.experts.w13) * 0.02
        for m in (layer, twin):  # a new tensor: a new key (eager once, then a new graph), never the old address
            m.experts.w13 = torch.nn.Parameter(new_w13.clone())
        for _ in range(2):
            assert_close_rel(layer(x).float(), twin(x).float(), 1e-6, "replaced weight")
        assert layer._graphs.replays == 4


@pytest.mark.gpu
def test_layer_graphs_stay_off_where_a_replay_would_skip_work(monkeypatch):
    layer, _ = _own_graph_pair("bf16", monkeypatch)
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # autograd: eager
        layer(x.requires_grad_())
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "1")  # value checks read tensors on the host: eager
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "0")
    monkeypatch.setenv("MOE_KERNELS_CUDA_GRAPHS", "0")
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert layer._graphs.replays == 0


def test_decode_graphs_policy_on_the_cpu(monkeypatch):
    """The bookkeeping of DecodeGraphs with the capture stubbed: a key's first call eager, its second captured
    and replayed, later calls replayed; a full table sends new keys eager (no recapture loop); a failed capture
    leaves its key eager; a replaced parameter is a new key."""
    from moe_kernels.modules import _graphs

    class FakeGraph:
        def __init__(self, fn, x_in, y_out):
            self.fn, self.x_in, self.y_out = fn, x_in, y_out

        def replay(self):
            self.y_out.copy_(self.fn(self.x_in))

    captured = []

    def capture(self, fn, x, key):
        if x.shape[0] == 3:  # stands for a step a capture refuses
            self._graphs[key] = None
            return None
        x_in = x.clone()
        graph = FakeGraph(fn, x_in, fn(x_in))
        self._graphs[key] = (graph, x_in, graph.y_out)
        captured.append(x.shape[0])
        return self._graphs[key]

    monkeypatch.setattr(_graphs.DecodeGraphs, "_capture", capture)
    module = torch.nn.Linear(4, 4)
    graphs = _graphs.DecodeGraphs(max_graphs=3)

    def fn(x):
        return module(x)

    with torch.no_grad():
        for T in (1, 1, 1, 2, 2, 3, 3, 3, 5, 5, 5):
            x = torch.randn(T, 4)
            assert torch.allclose(graphs(fn, module, x), module(x))
        # T=1: 2 replays, T=2: 1; T=3: refused (its entry holds the third place); T=5: the table is full
        assert captured == [1, 2] and graphs.replays == 3 and graphs._graphs[next(
            k for k in graphs._graphs if k[0] == (3, 4))] is None
        module.weight = torch.nn.Parameter(torch.randn(4, 4))  # a new address: T=1 is a new key (eager first)
        n = graphs.replays
        graphs(fn, module, torch.randn(1, 4))
        assert graphs.replays == n  # eager: the table is full, so the new key never captures


def test_decode_graphs_pool_is_the_modules_own_and_goes_with_its_last_graph(monkeypatch):
    """The capture with torch's CUDA-graph API stubbed: each DecodeGraphs takes a pool of its own; clear() (a move
    or cast) and a failed capture that leaves no graph drop it, so the next capture takes a fresh one (a pool whose
    graphs are all gone may not take a new capture: the caching allocator asserts, H100 2026-12-07); a failed
    capture beside live graphs keeps it."""
    import contextlib

    from moe_kernels.modules import _graphs

    handles, used = iter(range(100)), []

    class FakeGraph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None):
        used.append(pool)
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(handles)))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def ok(x):
        return x + 1

    def refused(x):
        raise RuntimeError("operation not permitted when stream is capturing")

    a, b = _graphs.DecodeGraphs(), _graphs.DecodeGraphs()
    x = torch.zeros(2, 4)
    assert a._capture(ok, x, "k1") is not None and b._capture(ok, x, "k1") is not None
    assert used == [("pool", 0), ("pool", 1)]  # one pool each
    a._capture(ok, x, "k2")
    with pytest.warns(UserWarning, match="could not be captured"):
        assert a._capture(refused, x, "k3") is None
    assert a._pool == ("pool", 0) and used[-1] == ("pool", 0)  # live graphs beside the failure: same pool
    a.clear()
    assert a._pool is None
    a._capture(ok, x, "k1")
    assert used[-1] == ("pool", 2)  # after clear(): a fresh pool
    c = _graphs.DecodeGraphs()
    with pytest.warns(UserWarning, match="could not be captured"):
        c._capture(refused, x, "k1")
    assert c._pool is None  # no graph holds it: the next capture takes a fresh one
    c._capture(ok, x, "k2")
    assert used[-1] == ("pool", 4)
