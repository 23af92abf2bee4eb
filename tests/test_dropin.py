"""What a new user meets when dropping the layers into a model (issue 21): FP8 layers under autograd and module
dtype casts, the small odd-sized models people test with, NaN through the FP8 expert MLP.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py); sizes are kept small.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from _helpers import assert_close_rel  # noqa: E402

F8 = torch.float8_e4m3fn


def _layer_reference(layer: mk.MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output by moe_kernels.reference, on its own weights (fp32 where they are not e4m3)."""
    ex, sh = layer.experts, layer.shared_experts
    f = lambda t: t if t is None or t.dtype == F8 else t.float()  # noqa: E731
    kw = dict(w13_scale=ex.w13_scale, w2_scale=ex.w2_scale)
    if sh is not None:
        kw.update(shared_w13=f(sh.w13[0]), shared_w2=f(sh.w2[0]),
                  shared_w13_scale=None if sh.w13_scale is None else sh.w13_scale[0],
                  shared_w2_scale=None if sh.w2_scale is None else sh.w2_scale[0])
    g = layer.gate
    return R.moe_layer(x.float(), g.weight.float(), f(ex.w13), f(ex.w2), layer.top_k, scoring=g.scoring,
                       norm_topk_prob=g.norm_topk_prob, **kw).float()


# ---- defect 1: an FP8 layer under autograd with bf16 input ---------------------------------------------------

def test_fp8_layer_bf16_input_requiring_grad(device):
    """A bf16 model patched to FP8, called outside torch.no_grad(): the rows require a gradient and take the
    straight-through FP8 path. It raised "x_scale must have dtype float32, got bfloat16"."""
    torch.manual_seed(0)
    layer = mk.MoELayer(hidden_size=256, intermediate_size=128, num_experts=8, top_k=2, precision="fp8",
                        dtype=torch.bfloat16, device=device)
    x = torch.randn(6, 256, dtype=torch.bfloat16, device=device, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (6, 256)
    with torch.no_grad():
        y_inference = layer(x)
    assert_close_rel(y.detach().float(), y_inference.float(), 1e-2, "grad path vs no_grad path")
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0 and layer.gate.weight.grad is not None


# ---- defect 2: module dtype casts keep e4m3 weights and their scales -------------------------------------------

CASTS = {
    "to_bf16": lambda m: m.to(torch.bfloat16),
    "half": lambda m: m.half(),
    "float": lambda m: m.float(),
    "bfloat16": lambda m: m.bfloat16(),
    "to_cpu": lambda m: m.to("cpu"),
    "to_cpu_fp16": lambda m: m.to("cpu", torch.float16),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_fp8_layer_survives_module_casts(cast):
    """``.to(dtype)`` / ``.half()`` / ``.float()`` cast the gate (and any bf16 parameters) but leave the e4m3
    weights e4m3 and their scales fp32, bit for bit; the layer (shared expert included) still runs and matches
    the reference on its weights. A nested module (a patched model) gets the same."""
    torch.manual_seed(0)
    layer = mk.MoELayer(hidden_size=256, intermediate_size=128, num_experts=4, top_k=2, precision="fp8",
                        n_shared_experts=1, dtype=torch.float32)
    model = nn.Sequential(nn.Identity(), layer)
    names = ("w13", "w2", "w13_scale", "w2_scale")
    before = {(m, n): getattr(getattr(layer, m), n).clone() for m in ("experts", "shared_experts") for n in names}
    out = CASTS[cast](model)
    assert out is model
    for (m, n), t in before.items():
        now = getattr(getattr(layer, m), n)
        assert now.dtype == t.dtype and now.device == t.device, f"{m}.{n}: {t.dtype} -> {now.dtype}"
        assert torch.equal(now.view(torch.uint8) if now.dtype == F8 else now,
                           t.view(torch.uint8) if t.dtype == F8 else t), f"{m}.{n} changed"
    want = {"to_bf16": torch.bfloat16, "half": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16,
            "to_cpu": torch.float32, "to_cpu_fp16": torch.float16}[cast]
    assert layer.gate.weight.dtype == want
    assert layer.gate.load.dtype == torch.float32  # the load monitor is a statistic: it stays fp32
    x = torch.randn(5, 256).to(want)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == want
    assert_close_rel(y.float(), _layer_reference(layer, x), 2e-2, f"after {cast}")


@pytest.mark.gpu
def test_fp8_layer_device_moves_gpu():
    """Device moves still move the e4m3 weights and scales (alone or with a cast), and the layer runs there."""
    layer = mk.MoELayer(hidden_size=256, intermediate_size=128, num_experts=4, top_k=2, precision="fp8",
                        n_shared_experts=1)
    w13 = layer.experts.w13.clone()
    layer.cuda().half()
    ex = layer.experts
    assert ex.w13.is_cuda and ex.w13.dtype == F8 and ex.w13_scale.is_cuda and ex.w13_scale.dtype == torch.float32
    assert layer.shared_experts.w2.is_cuda and layer.gate.weight.dtype == torch.float16
    assert torch.equal(ex.w13.cpu().view(torch.uint8), w13.view(torch.uint8))
    x = torch.randn(33, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        y = layer(x)
    assert_close_rel(y.float(), _layer_reference(layer, x), 2e-2, "on cuda after .cuda().half()")
    layer.to("cpu", torch.bfloat16)
    assert ex.w13.device.type == "cpu" and ex.w13.dtype == F8 and ex.w2_scale.dtype == torch.float32


def test_bf16_layer_casts_its_weights():
    """Parameters (bf16 / fp32 experts) are not held back: a cast casts them."""
    layer = mk.MoELayer(hidden_size=64, intermediate_size=48, num_experts=4, top_k=2, precision="fp32")
    layer.to(torch.bfloat16)
    assert layer.experts.w13.dtype == layer.experts.w2.dtype == layer.gate.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- defect 8: bf16 / fp32 layers take any hidden / intermediate size -------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("H, I, T, shared", [(64, 48, 7, 0), (96, 48, 5, 1), (72, 40, 1, 0), (96, 48, 0, 0)],
                         ids=["H64_I48", "H96_I48_shared", "H72_I40_T1", "T0"])
def test_small_odd_sizes(precision, H, I, T, shared, device):
    """Small random HF models have hidden 64/96, intermediate 48: only FP8 needs 128-aligned sizes."""
    torch.manual_seed(1)
    layer = mk.MoELayer(hidden_size=H, intermediate_size=I, num_experts=5, top_k=2, precision=precision,
                        n_shared_experts=shared, device=device)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    x = torch.randn(T, H, device=device).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (T, H) and y.dtype == dtype
    if T:
        assert_close_rel(y.float().cpu(), _layer_reference(layer, x).cpu(), 1e-5 if precision == "fp32" else 2e-2)


def test_small_odd_sizes_train(device):
    """The backward (grouped GEMMs on transposed views, grouped_wgrad) with K and N not multiples of any block."""
    torch.manual_seed(2)
    layer = mk.MoELayer(hidden_size=96, intermediate_size=48, num_experts=3, top_k=2, precision="fp32",
                        device=device)
    x = torch.randn(9, 96, device=device, requires_grad=True)
    layer(x).square().sum().backward()
    leaves = [x, layer.experts.w13, layer.experts.w2]
    got = [t.grad.clone() for t in leaves]
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ex = layer.experts
    out = R.moe_layer(ref_leaves[0], layer.gate.weight.detach().cpu().double(), ref_leaves[1], ref_leaves[2], 2)
    out.square().sum().backward()
    for name, g, r in zip(("x", "w13", "w2"), got, ref_leaves):
        assert_close_rel(g.cpu(), r.grad, 1e-4, f"d{name}")
    assert ex.w13.grad.shape == ex.w13.shape


def test_tiny_hf_model_patches():
    """A small random HF Mixtral (hidden 64, intermediate 48) is patched in fp32 and keeps its logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
    mk.patch_model(model, precision="fp32")
    assert any(isinstance(m, mk.MoELayer) for m in model.modules())
    with torch.no_grad():
        got = model(ids).logits
    assert_close_rel(got, want, 1e-5, "patched logits")


def test_tiny_hf_model_fp8_trains_and_casts():
    """Defects 1 and 2 end to end: a bf16 HF Mixtral patched to FP8 runs ``model(ids)`` outside torch.no_grad()
    (the embeddings get a gradient) and still runs after ``model.half()``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(ids).logits.float()
    mk.patch_model(model, precision="fp8")
    got = model(ids).logits.float()
    assert_close_rel(got.detach(), want, 3e-2, "fp8 logits with gradients on")
    got.square().sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.half()
    with torch.no_grad():
        assert_close_rel(model(ids).logits.float(), want, 3e-2, "fp8 logits after .half()")


def test_unknown_moe_looking_module_is_reported_not_skipped_in_silence(caplog):
    """Defect 4: a module with experts and a router that is no supported family is left with a reason in the report
    (and a warning) naming what is supported, strict=True raises naming it, and the module stays."""
    import logging

    class ExpertsHolder(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 4, bias=False)
            self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            return x

    model = nn.Sequential()
    model.add_module("odd", ExpertsHolder())
    with pytest.raises(TypeError, match=r"cannot swap odd \(ExpertsHolder\): MoE block ExpertsHolder is not a "
                                        r"supported family"):
        mk.patch_model(model, strict=True)
    with caplog.at_level(logging.WARNING, logger="moe_kernels"):
        report = mk.patch_model(model)
    assert report == 0 and [(s.name, s.kind) for s in report.skipped] == [("odd", "ExpertsHolder")], str(report)
    assert "not a supported family" in report.skipped[0].reason and "PhimoeSparseMoeBlock" in report.skipped[0].reason
    assert any(r.levelno == logging.WARNING and "odd" in r.getMessage() for r in caplog.records)
    assert isinstance(model.odd, ExpertsHolder)


def test_fp8_sizes_say_why():
    for kw in (dict(hidden_size=96, intermediate_size=128), dict(hidden_size=256, intermediate_size=48)):
        with pytest.raises(ValueError, match=r"precision='fp8' needs \w+_size to be a multiple of 128.*bf16"):
            mk.MoELayer(num_experts=4, top_k=2, precision="fp8", **kw)


# ---- defect 6: NaN through the FP8 expert MLP ---------------------------------------------------------------------

def _fp8_mlp_operands(M=10, E=3, H=256, I=128):
    torch.manual_seed(3)
    w13, s13 = mk.ops.quantize_weight_fp8(torch.randn(E, 2 * I, H) * H**-0.5)
    w2, s2 = mk.ops.quantize_weight_fp8(torch.randn(E, H, I) * I**-0.5)
    x, xs = R.quantize_fp8(torch.randn(M, H))
    offsets = torch.tensor([0, 4, 4, M], dtype=torch.int32)  # expert 0: rows 0-3, expert 1: none, expert 2: 4-9
    return dict(x=x, x_scale=xs, offsets=offsets, w13=w13, w13_scale=s13, w2=w2, w2_scale=s2)


# which scale gets a NaN, and the rows that must come out NaN (the others must be untouched)
NAN_CASES = {
    "x_scale": (lambda a: a["x_scale"].__setitem__((2, 1), float("nan")), [2]),
    "w13_scale": (lambda a: a["w13_scale"].__setitem__((2, 1, 0), float("nan")), list(range(4, 10))),
    "w2_scale": (lambda a: a["w2_scale"].__setitem__((0, 1, 0), float("nan")), [0, 1, 2, 3]),
}
@pytest.mark.parametrize("path", ["reference", "kernel"])
@pytest.mark.parametrize("where", list(NAN_CASES))
def test_expert_mlp_nan_scale_gives_nan_rows(where, path, device, monkeypatch, request):
    """docs/numerics.md: NaN is not rejected (a sync per call); it spreads. A NaN scale makes NaN the rows it
    touches (an x scale: its row; a weight scale: the rows of its expert) and leaves every other row as it was."""
    if path == "reference":
        if device == "cuda":
            pytest.skip("the reference path is the CPU one")
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: the reference
    args = _fp8_mlp_operands()
    clean = R.expert_mlp(args["x"], args["offsets"], args["w13"], args["w2"], args["x_scale"], args["w13_scale"],
                         args["w2_scale"], out_dtype=torch.float32)
    poison, nan_rows = NAN_CASES[where]
    poison(args)
    y = mk.ops.expert_mlp(**{k: v.to(device) for k, v in args.items()}).float().cpu()
    rows = torch.isnan(y).any(1)
    assert rows.nonzero().flatten().tolist() == nan_rows
    assert_close_rel(y[~rows], clean[~rows], 2e-2, "rows without NaN")
