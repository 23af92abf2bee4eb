"""mk.ops.rms_norm / mk.RMSNorm (Llama-style RMSNorm in one kernel) and patch_model's norm swap.

The op against the formula in float64 (relative error) and against the torch formula in the output's dtype (HF's
roundings: a few ulps apart at most, ``ulp_bound``; the interpreter's fp32 -> bf16 cast truncates, see
docs/numerics.md). Bad input: tests/test_bad_input_table.py (`norm-*` rows of docs/bad_input.md).
"""
import copy
import importlib
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.reference import llama_rms_norm  # noqa: E402
from _helpers import assert_close_rel  # noqa: E402

norm_mod = importlib.import_module("moe_kernels.ops.norm")
hf_mod = importlib.import_module("moe_kernels.integrations.hf")
EPS = 1e-6
# relative error against float64: two roundings to the output dtype (bf16: truncations in the interpreter);
# measured at most 7.0e-3 / 3.6e-4 / 7.6e-8 in the interpreter (10 draws of each test shape)
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 6e-4, torch.float32: 2e-7}


def inputs(rows, H, dtype, w_dtype=None, device="cpu", scale=None):
    """x [rows, H] with a magnitude that varies by row (1/8 to 8 about), a weight of random sign, never 0."""
    scale = torch.exp2(torch.randint(-3, 4, (rows, 1)).float()) if scale is None else scale
    x = (torch.randn(rows, H) * scale).to(dtype)
    sign = torch.where(torch.rand(H) < 0.5, -1.0, 1.0)
    w = (sign * (0.25 + 1.5 * torch.rand(H))).to(w_dtype or dtype)
    return x.to(device), w.to(device)


def formula64(x, w, eps=EPS):
    x64 = x.double()
    return w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def max_ulps(out, ref) -> float:
    """Largest |out - ref| in units in the last place of out's dtype at ref's magnitude."""
    if not out.numel():
        return 0.0
    fi = torch.finfo(out.dtype)
    r = ref.double().abs().clamp(min=fi.tiny)
    ulp = torch.exp2(torch.floor(torch.log2(r))) * fi.eps
    return float(((out.double() - ref.double()).abs() / ulp).max())


def ulp_bound(t: torch.Tensor) -> int:
    """How far from torch's formula an output may be, in ulps: fp32 sums the squares in another order (4 ulps of
    an fp32 output seen); that last-bit difference can flip the rounding of the normalised row, which the weight
    product turns into up to 2 ulps of a bf16/fp16 output (|w| > 1); the interpreter truncates to bf16 (3 seen)."""
    if t.dtype == torch.float32:
        return 8
    return 3 if t.dtype == torch.bfloat16 and not t.is_cuda else 2


def check(out, x, w, eps=EPS, what="rms_norm"):
    """out against the float64 formula (relative error) and against the torch formula (HF's roundings, ulps)."""
    ref = llama_rms_norm(x, w, eps)
    assert out.shape == x.shape and out.dtype == ref.dtype, f"{what}: {out.shape} {out.dtype}"
    assert not out.isnan().any(), f"{what}: NaN in the output (rows or columns never written?)"
    if out.numel():
        assert_close_rel(out.cpu(), formula64(x, w, eps).cpu(), REL_TOL[out.dtype], what)
    ulps = max_ulps(out, ref)
    assert ulps <= ulp_bound(out), f"{what}: {ulps} ulps from the torch formula"


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# the big H in one row (or none) only: the interpreter runs a program at a time
SHAPES = [(1, 7168), (0, 7168), (5, 2048), (1, 1000), (5, 1000), (5, 37), (1, 37), (0, 37)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,H", SHAPES)
def test_rms_norm(rows, H, dtype, device):
    x, w = inputs(rows, H, dtype, device=device)
    out = mk.ops.rms_norm(x, w, EPS)
    check(out, x, w)
    if x.is_cuda or norm_mod.use_triton(x):  # the launcher into a NaN-filled buffer: every element is written
        buf = torch.full((rows, H), float("nan"), dtype=dtype, device=device)
        norm_mod._rms_norm_triton(x, w, EPS, buf)
        assert torch.equal(buf, out)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)], ids=str)
def test_rms_norm_mixed_dtypes(x_dtype, w_dtype, device):
    """The product in torch's promotion of (weight, x): fp32 here; the normalised row still rounded to x's dtype."""
    x, w = inputs(5, 200, x_dtype, w_dtype, device=device)
    out = mk.ops.rms_norm(x, w, EPS)
    assert out.dtype == torch.float32
    ref = llama_rms_norm(x, w, EPS)
    assert max_ulps(out.to(x_dtype), ref.to(x_dtype)) <= ulp_bound(x), "the normalised row, in x's dtype"
    assert_close_rel(out, ref, 1e-2 if x_dtype == torch.bfloat16 else 2e-3, "mixed dtypes")


def test_rms_norm_eps_and_layouts(device):
    """eps counts (small rows, a large eps); leading dims, a transposed view and a non-unit last stride give the
    contiguous input's bits."""
    x, w = inputs(6, 96, torch.float32, device=device, scale=0.05)
    check(mk.ops.rms_norm(x, w, 0.5), x, w, 0.5, "eps 0.5")
    x3, w = inputs(24, 96, torch.bfloat16, device=device)
    x3 = x3.view(2, 3, 4, 96)
    want = mk.ops.rms_norm(x3.contiguous(), w)
    assert torch.equal(mk.ops.rms_norm(x3, w), want)
    t = x3.transpose(0, 1).contiguous().transpose(0, 1)  # unit last stride, leading dims not one stride
    assert torch.equal(mk.ops.rms_norm(t, w), want)
    s = torch.stack([x3, x3], -1)[..., 0]  # last stride 2
    assert s.stride(-1) == 2 and torch.equal(mk.ops.rms_norm(s, w), want)


def test_rms_norm_is_a_custom_op_that_compiles(device):
    """Schema and fake tensor (mixed dtypes: the fake output has the promoted dtype); a compiled module that calls
    it (fullgraph) gives the eager result."""
    x, w = inputs(5, 64, torch.bfloat16, torch.float32, device=device)
    torch.library.opcheck(torch.ops.moe_kernels.rms_norm.default, (x, w, EPS),
                          test_utils=("test_schema", "test_faketensor"))
    m = mk.RMSNorm(64, device=device).requires_grad_(False)
    m.use_kernels = True
    with torch.no_grad():
        m.weight.copy_(w)
        assert torch.equal(torch.compile(m, fullgraph=True, backend="eager")(x), m(x))


def test_launch_config():
    """Small H: several rows a program; 7168: one row, 16 warps; within 32 warps and the row limit."""
    assert norm_mod._launch_config(37) == (64, 32, 4)
    assert norm_mod._launch_config(1000)[:2] == (1024, 2)
    assert norm_mod._launch_config(7168) == (8192, 1, 16)
    assert norm_mod._launch_config(norm_mod.MAX_H) == (norm_mod.MAX_H, 1, 32)


# ---- the module ------------------------------------------------------------------------------------------------

def test_module_kernel_and_formula_paths():
    """use_kernels=True (interpreter) runs the op; the default runs the formula on the CPU; gradients required
    run the formula (warned once) and get the formula's gradients."""
    x, w = inputs(4, 64, torch.bfloat16)
    m = mk.RMSNorm(64, eps=1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(w)
    assert m.variance_epsilon == 1e-5 and "eps=1e-05" in repr(m)
    with torch.no_grad():
        assert torch.equal(m(x), llama_rms_norm(x, w, 1e-5))  # use_kernels None on the CPU: the formula
        m.use_kernels = True
        assert torch.equal(m(x), mk.ops.rms_norm(x, w, 1e-5))
    xg = x.float().requires_grad_()
    with pytest.warns(UserWarning, match="gradients are required"):
        out = m(xg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        m(xg)
    out.float().square().sum().backward()
    x2, w2 = xg.detach().clone().requires_grad_(), w.clone().requires_grad_()
    ref = llama_rms_norm(x2, w2, 1e-5)
    assert torch.equal(out, ref)
    ref.float().square().sum().backward()
    assert torch.equal(xg.grad, x2.grad) and torch.equal(m.weight.grad, w2.grad)


def test_module_from_module_shares_the_weight():
    """from_module keeps the norm's own Parameter (same object) and reads variance_epsilon, else eps."""
    hf_like = nn.Module()
    hf_like.weight, hf_like.variance_epsilon = nn.Parameter(torch.rand(32)), 1e-5
    m = mk.RMSNorm.from_module(hf_like.eval())
    assert m.weight is hf_like.weight and m.eps == 1e-5 and not m.training
    assert list(m.state_dict()) == ["weight"]
    t = nn.RMSNorm(32, eps=1e-3)
    assert mk.RMSNorm.from_module(t).eps == 1e-3 and mk.RMSNorm.from_module(t).weight is t.weight
    with pytest.raises(TypeError, match="1-D weight Parameter"):
        mk.RMSNorm.from_module(nn.RMSNorm(32, elementwise_affine=False))
    with pytest.raises(TypeError, match="no numeric variance_epsilon or eps"):
        mk.RMSNorm.from_module(nn.RMSNorm(32))  # eps None: torch's "the dtype's epsilon"


# ---- HF's norms and patch_model --------------------------------------------------------------------------------

# where the installed transformers defines each SUPPORTED_NORMS class
NORM_HOMES = {"LlamaRMSNorm": "llama", "Llama4TextRMSNorm": "llama4", "DeepseekV3RMSNorm": "deepseek_v3",
              "DeepseekV2RMSNorm": "deepseek_v2", "Glm4MoeRMSNorm": "glm4_moe", "Glm4MoeLiteRMSNorm": "glm4_moe_lite",
              "MixtralRMSNorm": "mixtral", "Qwen3MoeRMSNorm": "qwen3_moe", "Qwen2MoeRMSNorm": "qwen2_moe",
              "OlmoeRMSNorm": "olmoe", "MiniMaxM2RMSNorm": "minimax_m2", "Mistral4RMSNorm": "mistral4",
              "MistralLarge4RMSNorm": "mistral_large4", "HunYuanMoEV1RMSNorm": "hunyuan_v1_moe"}


def hf_class(sub, name):
    try:
        return getattr(importlib.import_module(f"transformers.models.{sub}.modeling_{sub}"), name, None)
    except ImportError:
        return None


def test_supported_norms_compute_the_formula_bit_for_bit():
    """Every SUPPORTED_NORMS class of the installed transformers: HF's forward gives reference.llama_rms_norm's
    bits (bf16 / fp16 / fp32 x, and an fp32 weight under bf16 x); all but Llama 4's pass the source rule."""
    pytest.importorskip("transformers")
    assert set(NORM_HOMES) == set(hf_mod.SUPPORTED_NORMS)
    checked = []
    for name, sub in NORM_HOMES.items():
        cls = hf_class(sub, name)
        if cls is None:
            continue
        checked.append(name)
        assert hf_mod._computes_llama_rms_norm(cls) == (name != "Llama4TextRMSNorm"), name
        for x_dtype, w_dtype in [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float32,) * 2,
                                 (torch.bfloat16, torch.float32)]:
            hf = cls(48, eps=1e-5).to(w_dtype)
            x, w = inputs(3, 48, x_dtype, w_dtype)
            with torch.no_grad():
                hf.weight.copy_(w)
                assert torch.equal(hf(x), llama_rms_norm(x, w, 1e-5)), (name, x_dtype, w_dtype)
    assert "LlamaRMSNorm" in checked and "DeepseekV3RMSNorm" in checked, checked


class CopiedRMSNorm(nn.Module):
    """LlamaRMSNorm's forward under another name and with other comments (remote code does this): taken."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)  # the statistics in fp32
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRMSNorm(CopiedRMSNorm):
    """A class with transformers' name outside transformers, whose forward rounds once after the product: left."""

    def forward(self, hidden_states):
        h = hidden_states.float()
        return (self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(
            hidden_states.dtype)


def test_patch_model_takes_llama_style_norms_only(caplog):
    """Llama-style norms are swapped (weight shared, not reported as skipped); Gemma's (1 + w), Olmo 2's and
    GPT-OSS's (one rounding after the product), Qwen3-Next's, an impostor named LlamaRMSNorm and a norm whose
    forward is wrapped on the instance stay, without a warning; norms=False swaps none."""
    import logging

    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm as HFLlamaRMSNorm  # noqa: PLC0415

    model = nn.Module()
    model.llama, model.copied, model.impostor = HFLlamaRMSNorm(16), CopiedRMSNorm(16), LlamaRMSNorm(16)
    model.hooked = HFLlamaRMSNorm(16)
    model.hooked.forward = model.hooked.forward  # as accelerate's hooks wrap it
    left = ["impostor", "hooked"]
    for sub, name in [("gemma", "GemmaRMSNorm"), ("olmo2", "Olmo2RMSNorm"), ("gpt_oss", "GptOssRMSNorm"),
                      ("qwen3_next", "Qwen3NextRMSNorm")]:
        cls = hf_class(sub, name)
        if cls is not None:
            setattr(model, sub, cls(16))
            left.append(sub)
    weights = {n: m.weight for n, m in model.named_children()}
    with caplog.at_level(logging.WARNING, logger="moe_kernels"):
        assert mk.patch_model(copy.deepcopy(model), norms=False) == 0
        report = mk.patch_model(model)
    assert sorted(s.name for s in report.swapped) == ["copied", "llama"] and not report.skipped, str(report)
    assert {s.family for s in report.swapped} == {"RMSNorm"} and "swapped 1 CopiedRMSNorm (RMSNorm)" in str(report)
    for n in ("llama", "copied"):
        assert isinstance(getattr(model, n), mk.RMSNorm) and getattr(model, n).weight is weights[n]
    for n in left:
        assert not isinstance(getattr(model, n), mk.RMSNorm), n
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert mk.patch_model(model) == 0, "a patched model again: nothing new"


def _use_kernels(model):
    for m in model.modules():
        if isinstance(m, mk.RMSNorm):
            m.use_kernels = True  # through the interpreter on the CPU


def test_patch_model_deepseek_v3_norms():
    """Tiny DeepSeek-V3: 7 norms swapped (2 a layer and the final one; MLA's own two a layer are the attention's,
    or swapped as norms with attention=False), weights shared, the logits HF's (norm kernels in the interpreter)."""
    pytest.importorskip("transformers")
    from test_hf_equivalence import ds_config, hf_ds, randomize  # noqa: PLC0415

    torch.manual_seed(0)
    model = randomize(hf_ds.DeepseekV3ForCausalLM(ds_config()), std=0.05)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    patched = copy.deepcopy(model)
    report = mk.patch_model(patched, precision=None)
    norms = [s.name for s in report.swapped if s.family == "RMSNorm"]
    assert len(norms) == 7 and len(report.swapped) == 12 and not report.skipped, str(report)
    assert all(isinstance(patched.get_submodule(n), mk.RMSNorm) for n in norms)
    _use_kernels(patched)
    with torch.no_grad():
        assert_close_rel(patched(ids).logits, ref, 1e-5, "patched DeepSeek-V3 logits (norm kernels)")
    # attention=False: MLA's norms too (2 MoE blocks + 13 norms), each over the HF module's own Parameter
    before = {n: m.weight for n, m in model.named_modules() if type(m).__name__ == "DeepseekV3RMSNorm"}
    assert mk.patch_model(model, precision=None, attention=False) == 2 + 13
    assert all(isinstance(model.get_submodule(n), mk.RMSNorm) and model.get_submodule(n).weight is w
               for n, w in before.items())


@pytest.mark.parametrize("family", ["olmoe", "llama4"])
def test_patch_model_family_norms(family):
    """OLMoE (q/k norms over the whole projection too) and Llama 4 (its own way of writing the formula; its
    weightless q/k norms stay): every norm swapped, the logits HF's with the norm kernels (interpreter)."""
    pytest.importorskip("transformers")
    from test_hf_families import FAMILIES, build  # noqa: PLC0415

    model = build(FAMILIES, family)
    n_norms = sum(type(m).__name__ in hf_mod.SUPPORTED_NORMS for m in model.modules())
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    report = mk.patch_model(model, precision=None)
    assert sum(s.family == "RMSNorm" for s in report.swapped) == n_norms > 0, str(report)
    _use_kernels(model)
    with torch.no_grad():
        assert_close_rel(model(ids).logits, ref, 1e-5, f"{family} logits (norm kernels)")


# ---- GPU: real sizes -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_deepseek_size_gpu(dtype):
    """4096 x 7168 (a DeepSeek-V3 prefill's hidden states): within ulp_bound of torch's formula (HF's kernels),
    and nearly every element the same bits."""
    x, w = inputs(4096, 7168, dtype, device="cuda")
    out = mk.ops.rms_norm(x, w, EPS)
    ref = llama_rms_norm(x, w, EPS)
    ulps = max_ulps(out, ref)
    frac = float((out != ref).float().mean())
    print(f"{dtype}: max {ulps} ulp, {frac:.2e} of the elements differ from torch's")
    # fp32: a row whose sum of squares differs in the last bit differs everywhere; 16-bit: the rounding hides it
    assert ulps <= ulp_bound(out) and (dtype == torch.float32 or frac < 1e-3)
    assert_close_rel(out, formula64(x, w).float(), REL_TOL[dtype], "4096 x 7168")


@pytest.mark.gpu
def test_rms_norm_int64_offsets_gpu():
    """rows x H past 2^31 elements: the last rows are read and written at int64 offsets."""
    rows, H = (1 << 31) // 7168 + 8, 7168
    x = torch.empty(rows, H, dtype=torch.bfloat16, device="cuda")
    x[-16:].normal_()
    x[:-16] = 1.0
    w = torch.rand(H, device="cuda", dtype=torch.bfloat16) + 0.5
    out = mk.ops.rms_norm(x, w, EPS)
    assert max_ulps(out[-16:], llama_rms_norm(x[-16:], w, EPS)) <= ulp_bound(out)
    assert torch.equal(out[0], w * torch.ones_like(w))  # x = 1: rsqrt(1 + 1e-6) rounds to 1 in bf16


@pytest.mark.gpu
def test_patched_norm_module_gpu():
    """A HF DeepseekV3RMSNorm and our RMSNorm over its weight, bf16 on CUDA: within ulp_bound."""
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm  # noqa: PLC0415

    hf = DeepseekV3RMSNorm(7168).to("cuda", torch.bfloat16)
    x, w = inputs(512, 7168, torch.bfloat16, device="cuda")
    with torch.no_grad():
        hf.weight.copy_(w)
        ours = mk.RMSNorm.from_module(hf)
        out = ours(x)
        assert max_ulps(out, hf(x)) <= ulp_bound(out)
