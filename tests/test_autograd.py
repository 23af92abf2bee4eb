"""Gradients: the kernels run forward, the ops' registered backward formulas (torch ops) run backward.

Every gradient is checked against an independent float64 formulation written here with plain torch ops and
differentiated by autograd: routing weights gathered from softmax / sigmoid scores, a dense per-token sum over the
chosen experts' SwiGLU MLPs. On the CPU the forward kernels run through Triton's interpreter (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from _helpers import assert_close_rel, offsets_for as _offsets
from moe_kernels import ops
from moe_kernels import reference as R
from moe_kernels.ops import grouped_gemm as gg

FP8 = torch.float8_e4m3fn


def _dense_moe(x, gate_w, w13, w2, ids, scoring, norm, scaling, shared=None):
    """float64: sum_j weight[t, j] * MLP_{ids[t, j]}(x[t]) (+ the shared MLP), every token on its own."""
    logits = x @ gate_w.t()
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    weights = scores.gather(1, ids.long())
    if norm:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * scaling
    out = torch.zeros_like(x)
    I = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] = out[t] + weights[t, j] * (w2[e] @ (F.silu(h[:I]) * h[I:]))
    if shared is not None:
        s13, s2 = shared
        h = x @ s13.t()
        out = out + (F.silu(h[:, : s2.shape[1]]) * h[:, s2.shape[1]:]) @ s2.t()
    return out


ROUTING = [dict(scoring="softmax", top_k=2), dict(scoring="softmax", top_k=1, norm_topk_prob=False),
           dict(scoring="sigmoid", top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)]


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 4e-2)])
@pytest.mark.parametrize("routing", ROUTING, ids=lambda r: "{scoring}_k{top_k}".format(**r))
def test_moe_layer_gradients_match_a_dense_float64_formulation(precision, tol, routing, device):
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    T, H, I, E = 13, 256, 128, 8  # odd T; an expert or two gets no token
    shared = int(routing["scoring"] == "sigmoid")  # DeepSeek-style routing comes with a shared expert
    m = mk.MoELayer(hidden_size=H, intermediate_size=I, num_experts=E, n_shared_experts=shared,
                    precision=precision, device=device, **routing)
    x = torch.randn(T, H, requires_grad=True, device=device)
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    with torch.no_grad():
        _, ids, _ = m.gate(x)  # the same choice (the gate's selection does not depend on its load monitor here)

    leaves = [t.detach().double().requires_grad_() for t in (x, m.gate.weight, m.experts.w13, m.experts.w2)]
    sh = [t.detach().double().requires_grad_() for t in (m.shared_experts.w13[0], m.shared_experts.w2[0])] \
        if shared else []
    ref = _dense_moe(*leaves, ids, routing["scoring"], routing.get("norm_topk_prob", True),
                     routing.get("routed_scaling_factor", 1.0), sh or None)
    assert_close_rel(out.detach(), ref.detach(), tol, "forward")
    ref.backward(g.double())
    names = ["x", "gate.weight", "experts.w13", "experts.w2"] + (["shared.w13", "shared.w2"] if shared else [])
    ours = [x.grad, m.gate.weight.grad, m.experts.w13.grad, m.experts.w2.grad]
    if shared:
        ours += [m.shared_experts.w13.grad[0], m.shared_experts.w2.grad[0]]
    for name, got, want in zip(names, ours, [t.grad for t in leaves + sh]):
        assert got is not None, f"no gradient for {name}"
        assert_close_rel(got.float(), want, tol, f"grad {name}")


@pytest.mark.parametrize("T", [0, 1])
def test_gradients_of_zero_and_one_token(T):
    """T = 0: every gradient exists and is zero (the experts' too); T = 1: the dense formulation's."""
    m = mk.MoELayer(hidden_size=256, intermediate_size=128, num_experts=4, top_k=2, precision="fp32")
    x = torch.randn(T, 256, requires_grad=True)
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    grads = {"x": x.grad, "gate": m.gate.weight.grad, "w13": m.experts.w13.grad, "w2": m.experts.w2.grad}
    if T == 0:
        assert all(v is not None and v.abs().sum() == 0 for v in grads.values()), grads
        return
    with torch.no_grad():
        _, ids, _ = m.gate(x)
    leaves = [t.detach().double().requires_grad_() for t in (x, m.gate.weight, m.experts.w13, m.experts.w2)]
    _dense_moe(*leaves, ids, "softmax", True, 1.0).backward(g.double())
    for (name, got), want in zip(grads.items(), leaves):
        assert_close_rel(got, want.grad, 1e-4, f"grad {name}")


def test_gradients_when_every_token_picks_one_expert():
    """top-1 routing of every token to expert 2 (a gate that sees only it): the other experts get zero gradients,
    expert 2 the dense formulation's."""
    m = mk.MoELayer(hidden_size=256, intermediate_size=128, num_experts=4, top_k=1, precision="fp32")
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[2] = 1.0
    x = (torch.rand(9, 256) + 0.1).requires_grad_()  # positive: expert 2's logit is the largest for every token
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    ids = torch.full((9, 1), 2, dtype=torch.int32)
    leaves = [t.detach().double().requires_grad_() for t in (x, m.gate.weight, m.experts.w13, m.experts.w2)]
    _dense_moe(*leaves, ids, "softmax", True, 1.0).backward(g.double())
    assert m.experts.w13.grad[[0, 1, 3]].abs().sum() == 0 and m.experts.w2.grad[[0, 1, 3]].abs().sum() == 0
    for name, got, want in zip(("x", "w13", "w2"), (x.grad, m.experts.w13.grad, m.experts.w2.grad),
                               (leaves[0].grad, leaves[2].grad, leaves[3].grad)):
        assert_close_rel(got, want, 1e-4, f"grad {name}")


@pytest.mark.parametrize("dtype,H,tol", [(torch.float32, 64, 1e-5), (torch.bfloat16, 1500, 1e-2)])
def test_unpermute_and_permute_gradients(dtype, H, tol):
    """The backward kernels (interpreter): H = 1500 spans two column blocks (partial dot products for the routing
    weights' gradient, a masked tail) in bf16."""
    T, k, E = 9, 3, 5
    x = torch.randn(T, H).to(dtype).requires_grad_()
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    w = torch.rand(T, k, requires_grad=True)
    p = ops.permute(x, ids, E)
    y = p.x * torch.linspace(0.5, 2.0, H).to(dtype)  # a row-independent op between the two
    out = ops.unpermute(y, p, w)
    g = torch.randn_like(out)
    out.backward(g)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            ref[t] += w64[t, j] * x64[t] * torch.linspace(0.5, 2.0, H, dtype=torch.float64)
    ref.backward(g.double())
    assert x.grad.dtype == dtype
    assert_close_rel(x.grad, x64.grad, tol, "grad x")
    assert_close_rel(w.grad, w64.grad, tol, "grad topk_weights")


@pytest.mark.parametrize("formulation", ["default", "fp32"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_weight_gradients(scoring, dtype, tol, formulation, device, monkeypatch):
    """x's and the gate's gradients in their own dtype; bf16 (tensor-core GEMMs on bf16 dL with fp32
    accumulation; MOE_KERNELS_ROUTER_BWD=fp32: fp32 GEMMs on fp32 copies) against float64 on the same bf16
    values."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    if formulation == "fp32":
        monkeypatch.setenv("MOE_KERNELS_ROUTER_BWD", "fp32")
    T, H, E, k = 11, 128, 16, 3
    x = torch.randn(T, H, device=device).to(dtype).requires_grad_()
    gate = (torch.randn(E, H, device=device) * H**-0.5).to(dtype).requires_grad_()
    weights, ids, _ = ops.route(x, gate, k, scoring=scoring, routed_scaling_factor=1.5)
    g = torch.randn_like(weights)
    weights.backward(g)
    assert x.grad.dtype == dtype and gate.grad.dtype == dtype
    x64, gate64 = x.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    logits = x64 @ gate64.t()
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    w = scores.gather(1, ids.long())
    (w / w.sum(-1, keepdim=True) * 1.5).backward(g.double())
    assert_close_rel(x.grad, x64.grad, tol, "grad x")
    assert_close_rel(gate.grad, gate64.grad, tol, "grad gate")


def test_bf16_layer_backward_has_no_fp32_activation_copies_or_fills(device):
    """The glue of a bf16 layer's backward (bf16 tokens and gate): no aten op makes an fp32 tensor of activation
    shape ([T, ...] or [T*k, ...] rows, at least [T, H] elements: x.float(), an fp32 gradient cast back) and none
    fills one (autograd's zero stand-ins for the gradients of outputs that have none: h13, ids, slots). On the CPU
    the router's logits are recomputed from fp32 copies (torch.mm has no fp32 output for bf16 there): that frame is
    allowed off CUDA. The watcher must see the backward's ops (the mm of the router's backward), else it proves
    nothing. The package's own backward ops (expert MLP, unpermute) are seen whole: by what they return."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    T, H, I, E, k = 64, 256, 128, 8, 2
    m = mk.MoELayer(hidden_size=H, intermediate_size=I, num_experts=E, top_k=k, precision="bf16", device=device,
                    dtype=torch.bfloat16)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = m(x)
    bad, seen = [], []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            name = str(func)
            seen.append(name)
            for t in res if isinstance(res, (tuple, list)) else (res,):
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] not in (T, T * k) or \
                        t.numel() < T * H:
                    continue
                fills = any(f in name for f in ("zeros", "fill", "zero_", "ones", "full"))
                if t.dtype == torch.float32 or fills:
                    frames = [f"{f.filename.split('/')[-1]}:{f.name}" for f in traceback.extract_stack()]
                    if device == "cpu" and any("routing.py:router_logits" in f for f in frames):
                        continue
                    bad.append((name, t.dtype, tuple(t.shape), [f for f in frames if "moe_kernels" in f or
                                                                 "routing" in f or "permute" in f][-2:]))
            return res

    with Watch():
        out.backward(torch.randn_like(out))
    assert sum("aten.mm" in n for n in seen) >= 2, seen  # the router's dX and dW GEMMs at least
    assert not bad, bad
    assert x.grad.dtype == torch.bfloat16 and m.gate.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_layer_backward_traces_under_torch_compile(precision, device):
    """torch.compile (AOTAutograd, backend aot_eager: the traced graphs run as traced) of a training step: every
    backward that launches kernels does so through an op with a fake implementation (a raw launch on a fake tensor
    fails the trace); the compiled step's gradients equal the eager step's bit for bit (the same kernels)."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    torch.manual_seed(0)
    m = mk.MoELayer(hidden_size=128, intermediate_size=128, num_experts=4, top_k=2, precision=precision,
                    trainable=precision == "fp8", device=device, dtype=torch.bfloat16)
    x = torch.randn(16, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(16, 128, device=device, dtype=torch.bfloat16)
    leaves = [x, m.gate.weight, m.experts.w13, m.experts.w2]
    m(x).backward(g)
    eager = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch._dynamo.reset()
    torch.compile(m, backend="aot_eager")(x).backward(g)
    for name, want, t in zip(("x", "gate", "w13", "w2"), eager, leaves):
        assert t.grad is not None and torch.equal(t.grad, want), name


def test_grouped_gemm_bf16_gradients():
    counts = [5, 0, 12, 1]
    E, N, K = len(counts), 48, 64
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    a = torch.randn(sum(counts), K, requires_grad=True)
    w = torch.randn(E, N, K, requires_grad=True)
    out = ops.grouped_gemm_bf16(a, w, offsets)
    g = torch.randn_like(out)
    out.backward(g)
    a64, w64 = a.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    ref = torch.einsum("mk,mnk->mn", a64, w64[expert])
    ref.backward(g.double())
    assert_close_rel(a.grad, a64.grad, 1e-5, "grad a")
    assert_close_rel(w.grad, w64.grad, 1e-5, "grad w")


def test_fp8_layer_gradients_are_straight_through(device):
    """precision="fp8": tokens that need a gradient stay bf16 through permute and the FP8 experts quantise them in
    a differentiable op whose backward takes the quantisations as identities (dA, dX as FP8 GEMMs on the
    transposed e4m3 weights). Against float64 on the dequantised weights: FP8-sized errors (the forward's ~4%)."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    T, H, I, E = 13, 256, 128, 8
    m = mk.MoELayer(hidden_size=H, intermediate_size=I, num_experts=E, top_k=2, precision="fp8", device=device)
    x = torch.randn(T, H, requires_grad=True, device=device)
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    assert m.experts.w13.grad is None  # e4m3 buffers: no gradient
    with torch.no_grad():
        _, ids, _ = m.gate(x)
    w13 = R.dequantize_weight_fp8(m.experts.w13, m.experts.w13_scale)
    w2 = R.dequantize_weight_fp8(m.experts.w2, m.experts.w2_scale)
    leaves = [t.detach().double().requires_grad_() for t in (x, m.gate.weight, w13, w2)]
    ref = _dense_moe(*leaves, ids, "softmax", True, 1.0)
    ref.backward(g.double())
    assert_close_rel(out.detach(), ref.detach(), 0.1, "fp8 forward")
    assert_close_rel(x.grad, leaves[0].grad, 0.1, "fp8 grad x")
    assert_close_rel(m.gate.weight.grad, leaves[1].grad, 0.1, "fp8 grad gate")


def test_e4m3_rows_have_no_gradient():
    p = ops.permute(torch.randn(6, 256, requires_grad=True), torch.randint(0, 4, (6, 2)).int(), 4, fp8=True)
    with pytest.raises(RuntimeError, match="no backward"):
        p.x.float().sum().backward()


def test_bf16_experts_take_fp32_tokens():
    """A bf16-precision layer fed fp32 tokens casts them for its experts and answers in fp32."""
    m = mk.MoELayer(hidden_size=256, intermediate_size=128, num_experts=4, top_k=2, precision="bf16")
    x = torch.randn(7, 256)
    with torch.no_grad():
        out = m(x)
        weights, ids, _ = m.gate(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        p = R.permute(x, ids, 4)
        y = R.expert_mlp(p.x.bfloat16(), p.offsets, m.experts.w13, m.experts.w2, out_dtype=torch.float32)
        ref = R.unpermute(y, p, weights, out_dtype=torch.float32)
    assert_close_rel(out, ref, 2e-2, "fp32 tokens through bf16 experts")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_grouped_wgrad_kernel(dtype, tol, device):
    """dW[e] = dY_e^T X_e: odd sizes, an empty expert (its gradient is zeros, written), one single-row expert;
    experts of 133 and 70 rows: full row steps (TMA on Hopper) then a partial one (pointer loads)."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    counts = [7, 0, 133, 1, 70]
    E, N, K = len(counts), 48, 80
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=device)
    dy = torch.randn(sum(counts), N, device=device).to(dtype)
    x = torch.randn(sum(counts), K, device=device).to(dtype)
    dw = ops.grouped_wgrad(dy, x, offsets, E, out_dtype=torch.float32)
    bounds = offsets.tolist()
    want = torch.stack([dy[lo:hi].double().t() @ x[lo:hi].double() for lo, hi in zip(bounds, bounds[1:])])
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))
    assert_close_rel(dw, want, tol, "grouped_wgrad")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_expert_mlp_backward_kernels(dtype, tol, device):
    """The kernel backward of expert_mlp (the path CUDA and the interpreter take) against float64 autograd through
    a per-row formulation; a routing weight per row; empty experts; rows not a multiple of any tile."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    counts = [5, 0, 17, 1, 0, 9]
    E, H, I = len(counts), 128, 64
    M = sum(counts)
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=device)
    x = torch.randn(M, H, device=device).to(dtype).requires_grad_()
    w13 = (torch.randn(E, 2 * I, H, device=device) * H**-0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(E, H, I, device=device) * I**-0.5).to(dtype).requires_grad_()
    tw = torch.rand(M, device=device, requires_grad=True)
    out = ops.expert_mlp(x, None, offsets, w13, None, w2, None, tw)
    g = torch.randn_like(out)
    out.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (x, w13, w2, tw)]
    x64, w13_64, w2_64, tw64 = leaves
    expert = torch.repeat_interleave(torch.arange(E, device=device), torch.tensor(counts, device=device))
    h = torch.einsum("mh,mih->mi", x64, w13_64[expert])
    y = torch.einsum("mi,mhi->mh", F.silu(h[:, :I]) * h[:, I:], w2_64[expert]) * tw64[:, None]
    y.backward(g.double())
    for name, got, want in zip(("x", "w13", "w2", "topk_weight"), (x.grad, w13.grad, w2.grad, tw.grad),
                               [t.grad for t in leaves]):
        assert_close_rel(got.float(), want, tol, f"grad {name}")


def test_default_grouped_gemm_configs_fit_shared_memory():
    """Every default config (fp32 ones included: the backward's bf16/fp32 GEMMs run them) asks for no more shared
    memory than its GPU has, by ``smem_bytes``'s bound; the bf16 tile run on fp32 operands (the old fp32 config)
    does not fit sm_90, which is what the bound must catch."""
    from moe_kernels.ops import grouped_gemm_configs as cfgs

    for cap, limit in cfgs.SMEM_LIMIT.items():
        for kind in cfgs.KINDS:
            if kind.startswith("fp8") and cap not in cfgs.FP8_ARCHS:
                continue
            cfg = cfgs.default_config(kind, cap)
            need = cfgs.smem_bytes(kind, cfg)
            assert need <= limit, f"sm_{cap[0]}{cap[1]} {kind}: {cfg} needs {need} bytes, limit {limit}"
    # the measured failure: 278,584 bytes on Triton 3.6 for bf16_swiglu's tile on fp32 operands
    assert cfgs.smem_bytes("fp32_swiglu", cfgs.DEFAULTS["bf16_swiglu"]) >= 278584 > cfgs.SMEM_LIMIT[(9, 0)]
    assert cfgs.default_config("fp32", (8, 9)) != cfgs.default_config("fp32", (9, 0))  # the 99 KiB parts' own


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_wgrad_quantises_the_transposed_operands_along_rows(dtype, device):
    """grouped_wgrad(fp8=True): 1x128 groups along the rows (the reduction axis), starting at each expert's first
    row: an expert of 130 rows has a full group and a 2-row one. Agreement with the torch formulation of the
    recipe (to rounding in the interpreter, to the tensor cores' accumulation on a GPU), FP8-sized error against
    float64; an empty expert's gradient is zeros."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    counts = [130, 0, 7, 1]
    E, N, K = len(counts), 48, 80
    offsets = _offsets(counts, device)
    dy = torch.randn(sum(counts), N, device=device).to(dtype)
    x = torch.randn(sum(counts), K, device=device).to(dtype)
    x[3] *= 1000.0  # one large row: its group's scales are its own, the second group of expert 0 is unaffected
    dw = ops.grouped_wgrad(dy, x, offsets, E, out_dtype=torch.float32, fp8=True)
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))
    emulated = gg._wgrad_fp8_reference(dy, x, offsets, E)
    # the interpreter multiplies the e4m3 values exactly; Hopper's FP8 tensor cores accumulate a 128-deep product
    # in reduced precision (DeepSeek-V3's reason to promote every 128 to fp32): 4.5e-4 measured on an H200
    assert_close_rel(dw, emulated, 1e-5 if device == "cpu" else 2e-3, "fp8 wgrad vs its torch formulation")
    bounds = offsets.tolist()
    exact = torch.stack([dy[lo:hi].double().t() @ x[lo:hi].double() for lo, hi in zip(bounds, bounds[1:])])
    assert_close_rel(dw, exact, 8e-2, "fp8 wgrad vs float64")
    assert_close_rel(dw[0, :, :], exact[0], 8e-2, "fp8 wgrad vs float64, expert 0")


def _fp8_trainable_layer_check(T, H, I, E, top_k, device, tol, transposed_copies=True, fp8_wgrad=True):
    m = mk.MoELayer(hidden_size=H, intermediate_size=I, num_experts=E, top_k=top_k, precision="fp8",
                    trainable=True, device=device)
    m.experts.fp8_transposed_copies = transposed_copies
    m.experts.fp8_wgrad = fp8_wgrad
    assert isinstance(m.experts.w13, torch.nn.Parameter) and m.experts.w13.dtype == torch.bfloat16
    x = torch.randn(T, H, requires_grad=True, device=device)
    out = m(x)
    g = torch.randn_like(out)
    out.backward(g)
    with torch.no_grad():
        _, ids, _ = m.gate(x)
    # float64 on the bf16 master weights: the FP8 layer's error is its quantisations' (a few percent)
    leaves = [t.detach().double().requires_grad_() for t in (x, m.gate.weight, m.experts.w13, m.experts.w2)]
    ref = _dense_moe(*leaves, ids, "softmax", True, 1.0)
    ref.backward(g.double())
    assert_close_rel(out.detach(), ref.detach(), tol, "fp8 forward")
    for name, got, want in zip(("x", "gate", "w13", "w2"),
                               (x.grad, m.gate.weight.grad, m.experts.w13.grad, m.experts.w2.grad), leaves):
        assert got is not None, f"no gradient for {name}"
        # the gate's gradient sums differences of nearby expert outputs: FP8's relative error grows there
        assert_close_rel(got.float(), want.grad, 2.5 * tol if name == "gate" else tol, f"fp8 trainable grad {name}")
    return m


@pytest.mark.parametrize("transposed_copies,fp8_wgrad", [(True, True), (False, True), (True, False)])
def test_fp8_trainable_layer_gradients_match_float64(transposed_copies, fp8_wgrad, monkeypatch):
    """MoELayer(precision="fp8", trainable=True): bf16 master weights get gradients from FP8 forward / dgrad /
    wgrad GEMMs, within FP8 error of float64 on the masters (interpreter, small sizes); dA / dX from the
    transposed e4m3 copies or from transposed views of the copies; ``experts.fp8_wgrad = False``: the two weight
    gradients from the bf16 operands (grouped_wgrad asked for fp8=False both times)."""
    wgrad = gg.grouped_wgrad
    asked = []
    monkeypatch.setattr(gg, "grouped_wgrad", lambda *a, **k: asked.append(k.get("fp8")) or wgrad(*a, **k))
    # tol: e4m3 rounds by up to 2^-4 relative, twice on the way (x, h); measured 0.055-0.077 over 30 draws
    _fp8_trainable_layer_check(T=6, H=128, I=128, E=4, top_k=2, device="cpu", tol=0.12,
                               transposed_copies=transposed_copies, fp8_wgrad=fp8_wgrad)
    assert asked == [fp8_wgrad, fp8_wgrad]


@pytest.mark.gpu
def test_fp8_trainable_layer_gradients_at_real_size():
    """The same at DeepSeek-V3's expert shape (H=7168, I=2048), 8 experts top-2, 512 tokens, on CUDA."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda("cuda")
    _fp8_trainable_layer_check(T=512, H=7168, I=2048, E=8, top_k=2, device="cuda", tol=0.1)


def test_fp8_master_weights_are_quantised_once_per_update(monkeypatch):
    """The e4m3 copies (and their transposes) are made again only when a master changes in place (an optimiser
    step): nothing on a second call; after the step they hold quantize_weight_fp8's values of the new masters
    (of W^T for the transposes: the blocks transposed with their scales)."""
    import moe_kernels.modules.experts as experts_mod

    ex = mk.GroupedExperts(2, 128, 128, precision="fp8", trainable=True)
    calls = []
    quantize = experts_mod.quantize_master_fp8
    monkeypatch.setattr(experts_mod, "quantize_master_fp8", lambda w, *a: calls.append(w.shape) or quantize(w, *a))
    (_, s13), _ = ex.fp8_weights()
    s13 = s13.clone()
    assert len(calls) == 2
    ex.fp8_weights()
    ex.fp8_weights_t()
    assert len(calls) == 2  # cached, transposes included
    ex.w13.grad, ex.w2.grad = ex.w13.detach().clone(), torch.zeros_like(ex.w2)
    torch.optim.SGD(ex.parameters(), lr=0.5).step()  # w13 halves in place; w2 is written too (by zero)
    (q13, s13_new), _ = ex.fp8_weights()
    (t13, ts13), _ = ex.fp8_weights_t()
    assert len(calls) == 4
    for got_q, got_s, w in ((q13, s13_new, ex.w13.detach()), (t13, ts13, ex.w13.detach().transpose(1, 2))):
        want_q, want_s = ops.quantize_weight_fp8(w)
        assert torch.equal(got_q.float(), want_q.float()) and torch.equal(got_s, want_s)  # (-0 == +0)
    assert_close_rel(s13_new, 0.5 * s13, 1e-6, "scales of the halved weights")
    ex.fp8_transposed_copies = False  # transposes on demand from the copies
    with torch.no_grad():
        ex.w13.mul_(-1.0)
    (t13b, _), _ = ex.fp8_weights_t()
    assert len(calls) == 5 and torch.equal(t13b.float(), ex.fp8_weights()[0][0].transpose(1, 2).float())


@pytest.mark.parametrize("dtype,N", [(torch.bfloat16, 256), (torch.float32, 200)])
def test_quantize_master_fp8_kernel(dtype, N, device):
    """The once-per-step weight quantisation kernel: quantize_weight_fp8's values (zero block, one huge value, a
    partial row block) and the transposed copy, NaN-free, into buffers filled with garbage first. In the
    interpreter too (the transposed copy is read back from the e4m3 codes the program stored)."""
    E, K = 3, 384
    w = (torch.randn(E, N, K, device=device) * 3).to(dtype)
    w[1, :128, :128] = 0
    w[2, 5, 7] = 1e4
    q = torch.full((E, N, K), 1.0, device=device).to(FP8)
    s = torch.full((E, -(-N // 128), 3), float("nan"), device=device)
    gg.quantize_master_fp8(w, q, s)
    want_q, want_s = ops.quantize_weight_fp8(w)
    assert torch.equal(q.float(), want_q.float()) and torch.equal(s, want_s)
    if N % 128 == 0:
        qt = torch.full((E, K, N), 1.0, device=device).to(FP8)
        st = torch.full((E, 3, N // 128), float("nan"), device=device)
        q.fill_(1.0)
        gg.quantize_master_fp8(w, q, s, qt, st)
        assert torch.equal(q.float(), want_q.float())
        assert torch.equal(qt.float(), want_q.transpose(1, 2).float()) and torch.equal(st, want_s.transpose(1, 2))


def test_tma_dgrad_kernel_against_float64():
    """The backward's dA / dX kernel (W read as stored, [E, K, N], B tiles through TMA descriptors; on sm_90 for
    bf16): odd row counts, an empty expert, a partial column tile; NaN-filled output rows are all written. In the
    interpreter (fp32 tiles, small config): the kernel's indexing, not its speed."""
    if gg.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    if torch.cuda.is_available():
        pytest.skip("the interpreter's run of the kernel (on CUDA the gradient tests cover it)")
    counts = [37, 0, 5, 90]
    E, K, N = len(counts), 128, 96
    offsets = _offsets(counts)
    a = torch.randn(sum(counts), K)
    w = torch.randn(E, K, N)
    out = torch.full((sum(counts), N), float("nan"))
    gg._dgrad_launch(a, offsets, w, out, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4,
                                              num_stages=1))
    assert_close_rel(out, R.grouped_gemm(a.double(), w.transpose(1, 2).double(), offsets), 1e-5, "dgrad")


def test_fp8_trainable_experts_infer_as_they_train():
    """Under no_grad the trainable FP8 experts run the inference kernels (fused SwiGLU + e4m3 re-quantisation) on
    the same cached e4m3 copies; the training forward (unfused, h13 rounded to bf16 before SwiGLU) agrees within
    an e4m3 rounding step of A. Bad arguments name themselves."""
    ex = mk.GroupedExperts(2, 128, 128, precision="fp8", trainable=True, master_dtype=torch.float32)
    assert ex.w13.dtype == torch.float32 and ex.w13_scale is None
    x = torch.randn(5, 128)
    offsets = _offsets([3, 2])
    with torch.no_grad():
        y_infer = ex(x, offsets)
    y_train = ex(x.clone().requires_grad_(), offsets)
    assert y_train.requires_grad
    assert_close_rel(y_train.detach().float(), y_infer.float(), 0.05, "training vs inference forward")
    with pytest.raises(TypeError, match="trainable"):
        mk.GroupedExperts(2, 128, 128, precision="fp8", trainable=1)
    with pytest.raises(TypeError, match="master_dtype"):
        mk.GroupedExperts(2, 128, 128, precision="fp8", trainable=True, master_dtype=torch.float16)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_expert_mlp_train_keeps_h13(dtype, tol, device, monkeypatch):
    """ops.expert_mlp_train (what bf16 / fp32 experts run when a gradient is wanted): float64 gradients; the
    backward runs two grouped GEMMs (dA, dX), not a third for h13; a second backward (retain_graph) gives the same
    gradients, so the saved h13 survives the first."""
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    counts = [5, 0, 17, 1]
    E, H, I = len(counts), 128, 64
    offsets = _offsets(counts, device)
    x = torch.randn(sum(counts), H, device=device).to(dtype).requires_grad_()
    w13 = (torch.randn(E, 2 * I, H, device=device) * H**-0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(E, H, I, device=device) * I**-0.5).to(dtype).requires_grad_()
    out = ops.expert_mlp_train(x, offsets, w13, w2)
    g = torch.randn_like(out)
    calls = []
    gemm = gg._gemm
    monkeypatch.setattr(gg, "_gemm", lambda *a, **k: calls.append(1) or gemm(*a, **k))
    out.backward(g, retain_graph=True)
    assert len(calls) == 2
    first = [t.grad.clone() for t in (x, w13, w2)]
    for t in (x, w13, w2):
        t.grad = None
    out.backward(g)
    for a, b in zip(first, (x.grad, w13.grad, w2.grad)):
        assert torch.equal(a, b)
    leaves = [t.detach().double().requires_grad_() for t in (x, w13, w2)]
    x64, w13_64, w2_64 = leaves
    expert = torch.repeat_interleave(torch.arange(E, device=device), torch.tensor(counts, device=device))
    h = torch.einsum("mh,mih->mi", x64, w13_64[expert])
    y = torch.einsum("mi,mhi->mh", F.silu(h[:, :I]) * h[:, I:], w2_64[expert])
    y.backward(g.double())
    assert_close_rel(out.detach().float(), y.detach(), tol, "forward")
    for name, got, want in zip(("x", "w13", "w2"), first, leaves):
        assert_close_rel(got.float(), want.grad, tol, f"grad {name}")
