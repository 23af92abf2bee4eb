"""mk.ops.linear_fp8 / mk.FP8Linear (DeepSeek-V3's block-scaled FP8 linear) and MLA with FP8 projection weights:
``MultiHeadLatentAttention(weight_dtype="fp8")``, FP8 checkpoint attention through ``from_hf`` / ``patch_model``.

The op against float64 of its exact meaning (x quantised 1x128, W dequantised by its blocks: what the kernel
multiplies, so only the accumulation order and the output rounding differ) and, loosely, against the unquantised
product (the FP8 error itself). Outputs of the kernel launcher are pre-filled with NaN.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.ops import linear as linear_mod  # noqa: E402
from moe_kernels.reference.quant import dequantize_fp8, dequantize_weight_fp8, quantize_fp8  # noqa: E402
from _helpers import assert_close_rel, rel_err  # noqa: E402

# the same product as the reference up to fp32 accumulation order, then one rounding to the output dtype; on the
# GPU the FP8 tensor cores' own accumulation of each 128-deep block is narrower than fp32 (docs/numerics.md,
# "Accumulation on the GPU"): measured 1.2e-4 for an fp32 output on an H100
EXACT_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}
EXACT_TOL_CUDA = {**EXACT_TOL, torch.float32: 1e-3}
# e4m3 activations and weights against the unquantised product: ~3-4e-2 on random data
FP8_BOUND = 0.1


def fp8_weight(N, K, device="cpu", std=0.05):
    w = torch.randn(N, K) * std * torch.exp2(torch.randint(-2, 3, (N, 1)).float())  # rows of different scales
    q, s = mk.ops.quantize_weight_fp8(w)
    return w.to(device), q.to(device), s.to(device)


def exact_reference(x, q, s):
    """float64 of dequant(quantise(x)) @ dequant(W)^T: the kernel's product, exactly."""
    xq, xs = quantize_fp8(x.float().reshape(-1, x.shape[-1]))
    a = dequantize_fp8(xq, xs).double()
    return (a @ dequantize_weight_fp8(q, s).double().t()).view(*x.shape[:-1], q.shape[0])


@pytest.mark.parametrize("M,N,K", [(1, 200, 256), (37, 384, 512), (130, 128, 128), (3, 96, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_fp8_matches_its_definition(device, M, N, K, dtype):
    _, q, s = fp8_weight(N, K, device)
    x = (torch.randn(M, K) * torch.exp2(torch.randint(-3, 4, (M, 1)).float())).to(device, dtype)
    y = mk.ops.linear_fp8(x, q, s)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = (EXACT_TOL_CUDA if device == "cuda" else EXACT_TOL)[dtype]
    assert_close_rel(y, exact_reference(x, q, s), tol, f"linear_fp8 {M}x{N}x{K} {dtype}")


def test_linear_fp8_against_the_unquantised_product_and_leading_dims(device):
    w, q, s = fp8_weight(256, 512, device)
    x = torch.randn(2, 3, 512, device=device, dtype=torch.bfloat16)
    y = mk.ops.linear_fp8(x, q, s, out_dtype=torch.float32)
    assert y.shape == (2, 3, 256) and y.dtype == torch.float32
    err = rel_err(y, x.double() @ w.double().t())
    assert 1e-3 < err < FP8_BOUND  # quantised for real (not a float path), and not broken


def test_linear_fp8_empty_rows(device):
    _, q, s = fp8_weight(256, 128, device)
    y = mk.ops.linear_fp8(torch.empty(0, 128, device=device), q, s)
    assert y.shape == (0, 256)


@pytest.mark.gpu
def test_linear_fp8_kernel_writes_every_element():
    """The launcher into a NaN-filled output: rows and columns that are not whole tiles, decode- and prefill-sized
    row counts (the weight-streaming and the wgmma kernels)."""
    for M, N, K in [(1, 7168, 1536), (16, 384, 256), (300, 7168, 512), (1000, 2112, 7168), (4096, 640, 16384)]:
        _, q, s = fp8_weight(N, K, "cuda")
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        linear_mod._linear_fp8_triton(x, q, s, out)
        assert_close_rel(out, exact_reference(x, q, s), EXACT_TOL[torch.bfloat16], f"linear_fp8 {M}x{N}x{K}")


@pytest.mark.gpu
def test_linear_fp8_graph_capture():
    _, q, s = fp8_weight(384, 512, "cuda")
    x = torch.randn(24, 512, device="cuda", dtype=torch.bfloat16)
    mk.ops.linear_fp8(x, q, s)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mk.ops.linear_fp8(x, q, s)
    x.copy_(torch.randn_like(x))
    g.replay()
    assert_close_rel(y, exact_reference(x, q, s), EXACT_TOL[torch.bfloat16], "replayed linear_fp8")


@pytest.mark.parametrize("bad,err", [
    (dict(x=torch.randn(4, 100)), ValueError),  # K not a multiple of 128
    (dict(weight=torch.zeros(64, 128)), TypeError),  # a float weight
    (dict(weight_scale=torch.ones(1, 2)), ValueError),  # scales of another shape
    (dict(weight_scale=torch.ones(1, 1, dtype=torch.float64)), TypeError),
    (dict(out_dtype=torch.int32), TypeError),
])
def test_linear_fp8_bad_input(bad, err):
    _, q, s = fp8_weight(64, 128)
    args = dict(x=torch.randn(4, 128), weight=q, weight_scale=s, out_dtype=None)
    args.update(bad)
    with pytest.raises(err):
        mk.ops.linear_fp8(**args)


def test_fp8_linear_module_keeps_dtypes_and_state_dict():
    lin = nn.Linear(256, 200, bias=False)
    f = mk.FP8Linear.from_linear(lin)
    assert f.weight.dtype == torch.float8_e4m3fn and f.weight_scale_inv.shape == (2, 2)
    f = f.to(torch.bfloat16)
    assert f.weight.dtype == torch.float8_e4m3fn and f.weight_scale_inv.dtype == torch.float32
    sd = f.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv"}  # DeepSeek-V3's checkpoint names
    g = mk.FP8Linear(256, 200)
    g.load_state_dict(sd)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    assert torch.equal(g(x), f(x))
    assert_close_rel(f(x), x.double() @ lin.weight.double().t(), FP8_BOUND, "FP8Linear")
    with pytest.raises(ValueError, match="multiple of 128"):
        mk.FP8Linear(100, 10)
    with pytest.raises(ValueError, match="bias"):
        mk.FP8Linear.from_linear(nn.Linear(128, 8))


# -- MLA with FP8 projections ------------------------------------------------------------------------------------

def small_mla(**kw):
    """128-wide inputs everywhere an FP8 projection needs it (hidden, q_lora_rank, heads * v_head_dim)."""
    torch.manual_seed(3)
    m = mk.MultiHeadLatentAttention(hidden_size=256, num_heads=4, q_lora_rank=128, kv_lora_rank=64,
                                    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.08)
    return m.eval()


def dequantised_copy(m8):
    """A float MLA whose weights are m8's FP8 weights dequantised: the model m8 computes, up to activations."""
    m = small_mla()
    with torch.no_grad():
        m.load_state_dict({k: v for k, v in m8.state_dict().items() if "weight_scale_inv" not in k and
                           v.dtype != torch.float8_e4m3fn}, strict=False)
        for name in m8._fp8_projections():
            getattr(m, name).weight.copy_(getattr(m8, name).dequantized())
    return m


def test_mla_fp8_weights_prefill_and_decode(device):
    m8 = small_mla()
    m8.quantize_weights_()
    assert m8.weight_dtype == "fp8" and isinstance(m8.o_proj, mk.FP8Linear)
    assert isinstance(m8.kv_b_proj, nn.Linear)  # stays float (absorbed at decode)
    ref_m = dequantised_copy(m8).to(device)
    m8 = m8.to(device=device, dtype=torch.bfloat16)
    assert m8.q_b_proj.weight.dtype == torch.float8_e4m3fn
    ref_m = ref_m.to(torch.bfloat16)
    m8.use_kernels = True
    x = torch.randn(2, 9, 256, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = ref_m(x)
        out = m8(x)
        m8.use_kernels = False
        out_ref_path = m8(x)
        m8.use_kernels = True
        cache, cache_ref = mk.MLACache(), mk.MLACache()
        steps = [m8(x[:, :6], cache=cache)] + [m8(x[:, t : t + 1], cache=cache) for t in range(6, 9)]
        steps_ref = [ref_m(x[:, :6], cache=cache_ref)] + [ref_m(x[:, t : t + 1], cache=cache_ref) for t in range(6, 9)]
    err = assert_close_rel(out, ref, FP8_BOUND, "MLA fp8 weights, kernels")
    assert err > 1e-4  # the activations were quantised: not the float path
    assert_close_rel(out_ref_path, ref, FP8_BOUND, "MLA fp8 weights, reference path")
    assert_close_rel(out, out_ref_path, 3e-2, "MLA fp8 weights: kernels against the reference path")
    assert_close_rel(torch.cat(steps, 1), torch.cat(steps_ref, 1), FP8_BOUND, "MLA fp8 weights, decode steps")


def test_mla_fp8_weight_dtype_argument_and_bad_widths():
    m = mk.MultiHeadLatentAttention(hidden_size=256, num_heads=4, q_lora_rank=128, kv_lora_rank=64,
                                    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, weight_dtype="fp8")
    assert m.weight_dtype == "fp8" and "weight_dtype=fp8" in repr(m)
    with pytest.raises(ValueError, match="q_lora_rank"):
        mk.MultiHeadLatentAttention(hidden_size=256, num_heads=4, q_lora_rank=96, kv_lora_rank=64,
                                    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, weight_dtype="fp8")
    with pytest.raises(ValueError, match="weight_dtype"):
        mk.MultiHeadLatentAttention(hidden_size=256, num_heads=4, weight_dtype="int8")


# -- HF: DeepSeek-V3's FP8 checkpoint attention ------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402
from test_hf_equivalence import attention_inputs, ds_config, randomize  # noqa: E402


class CheckpointFP8Linear(nn.Module):
    """A projection as DeepSeek-V3's FP8 checkpoints hold it: e4m3 ``weight`` + fp32 ``weight_scale_inv``."""

    def __init__(self, w):
        super().__init__()
        q, s = mk.reference.quantize_weight_fp8(w)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(s, requires_grad=False)


PROJ = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def fp8_checkpoint_attention(cfg):
    """(an HF attention whose projections are FP8 checkpoint tensors, the same attention with those weights
    dequantised: the model the checkpoint stands for)."""
    hf = randomize(hf_ds.DeepseekV3Attention(cfg, 0))
    ckpt = randomize(hf_ds.DeepseekV3Attention(cfg, 0))
    ckpt.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for n in PROJ:
            lin = CheckpointFP8Linear(getattr(hf, n).weight)
            setattr(ckpt, n, lin)
            getattr(hf, n).weight.copy_(dequantize_weight_fp8(lin.weight, lin.weight_scale_inv))
    return ckpt, hf


def test_fp8_checkpoint_attention_taken_as_it_is():
    cfg = ds_config()
    ckpt, hf = fp8_checkpoint_attention(cfg)
    m = mk.MultiHeadLatentAttention.from_hf(ckpt)
    assert m.weight_dtype == "fp8" and m.dtype == torch.float32
    for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        got = getattr(m, n)
        assert torch.equal(got.weight.view(torch.uint8), getattr(ckpt, n).weight.view(torch.uint8))
        assert torch.equal(got.weight_scale_inv, getattr(ckpt, n).weight_scale_inv)
    assert torch.equal(m.kv_b_proj.weight, hf.kv_b_proj.weight)  # dequantised
    x, cos, sin, causal = attention_inputs(cfg)
    with torch.no_grad():
        ref, _ = hf(x, (cos, sin), causal)
        out = m(x)
        dense = mk.MultiHeadLatentAttention.from_hf(ckpt, weight_dtype="auto")
        assert dense.weight_dtype == "auto" and isinstance(dense.o_proj, nn.Linear)
        out_dense = dense(x)
    err = assert_close_rel(out, ref, FP8_BOUND, "FP8 checkpoint attention")
    assert_close_rel(out_dense, ref, 1e-5, "FP8 checkpoint attention, dequantised")
    print(f"FP8 checkpoint attention: relative error {err:.2e} (activations quantised, weights exact)")


def test_patch_model_attention_precision():
    torch.manual_seed(0)
    model = randomize(hf_ds.DeepseekV3ForCausalLM(ds_config()), std=0.05)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        report = mk.patch_model(model, precision=None, attention_precision="fp8")
        out = model(ids).logits
    attn = [s for s in report.swapped if s.kind == "DeepseekV3Attention"]
    assert len(attn) == 3 and not report.skipped
    assert model.model.layers[0].self_attn.mla.weight_dtype == "fp8"
    err = assert_close_rel(out, ref, FP8_BOUND, "patched DeepseekV3 logits, fp8 attention")
    assert err > 1e-4
    with pytest.raises(ValueError, match="attention_precision"):
        mk.patch_model(model, attention_precision="bf16")
