"""Our modules against randomly initialised HuggingFace transformers blocks and models."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, MixtralConfig  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as hf_mx  # noqa: E402

try:
    from transformers import Qwen3MoeConfig  # noqa: E402
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_q3  # noqa: E402
except ImportError:  # an older transformers
    hf_q3 = None

import moe_kernels as mk  # noqa: E402
from _helpers import assert_close_rel, rel_err  # noqa: E402

# FP8 (e4m3, 3 mantissa bits) weights and activations, 1x128/128x128 scales, two GEMMs: measured ~6e-2
# relative error on random weights; the bound leaves room for draws without hiding a broken kernel (>0.3).
FP8_BOUND = 0.1


def ds_config(**kw):
    base = dict(
        vocab_size=97, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, routed_scaling_factor=2.5, num_hidden_layers=3, first_k_dense_replace=1,
        max_position_embeddings=64,
    )
    base.update(kw)
    cfg = DeepseekV3Config(**base)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def mixtral_config(**kw):
    base = dict(vocab_size=97, hidden_size=256, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    base.update(kw)
    cfg = MixtralConfig(**base)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def qwen3_moe_config(**kw):
    base = dict(vocab_size=97, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_experts=8,
                num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                num_hidden_layers=2, max_position_embeddings=64, norm_topk_prob=True)
    base.update(kw)
    cfg = Qwen3MoeConfig(**base)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def randomize(module, std=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)
        for name, b in module.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(std=0.01)
    return module.eval()


@pytest.mark.parametrize("precision", [None, "fp8"])
def test_deepseek_v3_moe_block(precision):
    hf = randomize(hf_ds.DeepseekV3MoE(ds_config()))
    x = torch.randn(2, 9, 256)
    with torch.no_grad():
        ref = hf(x)
        out = mk.MoELayer.from_hf(hf, precision=precision)(x)
    err = assert_close_rel(out, ref, 1e-5 if precision is None else FP8_BOUND, f"DeepseekV3MoE ({precision})")
    print(f"DeepseekV3MoE precision={precision}: relative error {err:.2e}")


@pytest.mark.parametrize("precision", [None, "fp8"])
def test_mixtral_block(precision):
    hf = randomize(hf_mx.MixtralSparseMoeBlock(mixtral_config()))
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        ref = hf(x)
        out = mk.MoELayer.from_hf(hf, precision=precision)(x)
    err = assert_close_rel(out, ref, 1e-5 if precision is None else FP8_BOUND, f"Mixtral ({precision})")
    print(f"MixtralSparseMoeBlock precision={precision}: relative error {err:.2e}")


def test_deepseek_v3_moe_block_at_hidden_7168():
    cfg = ds_config(hidden_size=7168, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                    n_group=4, topk_group=2)
    hf = randomize(hf_ds.DeepseekV3MoE(cfg), std=0.02)
    x = torch.randn(1, 5, 7168)
    with torch.no_grad():
        ref = hf(x)
        out = mk.MoELayer.from_hf(hf)(x)
        out8 = mk.MoELayer.from_hf(hf, precision="fp8")(x)
    assert_close_rel(out, ref, 1e-5, "DeepseekV3MoE at 7168")
    err8 = assert_close_rel(out8, ref, FP8_BOUND, "DeepseekV3MoE at 7168, fp8")
    print(f"DeepseekV3MoE hidden 7168 fp8: relative error {err8:.2e}")


def attention_inputs(cfg, B=2, S=11):
    """(x [B, S, hidden], cos, sin, the additive causal mask): what a HF DeepseekV3Attention is called with."""
    x = torch.randn(B, S, cfg.hidden_size)
    cos, sin = hf_ds.DeepseekV3RotaryEmbedding(cfg)(x, torch.arange(S).expand(B, S))
    causal = torch.full((S, S), float("-inf")).triu(1).expand(B, 1, S, S)
    return x, cos, sin, causal


@pytest.mark.parametrize("rope", ["interleave", "half", "yarn"])
def test_deepseek_v3_attention(rope):
    kw = {"rope_interleave": rope != "half"}
    if rope == "yarn":
        kw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = ds_config(**kw)
    hf = randomize(hf_ds.DeepseekV3Attention(cfg, 0))
    x, cos, sin, causal = attention_inputs(cfg)
    with torch.no_grad():
        ref, _ = hf(x, (cos, sin), causal)
        out = mk.MultiHeadLatentAttention.from_hf(hf)(x)
    assert_close_rel(out, ref, 1e-5, f"DeepseekV3Attention ({rope})")


def test_patch_model_deepseek_v3_forward():
    torch.manual_seed(0)
    model = randomize(hf_ds.DeepseekV3ForCausalLM(ds_config()), std=0.05)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        n = mk.patch_model(model, precision=None)
        out = model(ids).logits
    # 3 layers: 3 attentions + 2 MoE blocks (the first layer is dense) + 7 RMSNorms (2 a layer and the final one;
    # MLA's q_a / kv_a layernorms are the attention's)
    assert n == 5 + 7
    assert_close_rel(out, ref, 1e-5, "patched DeepseekV3ForCausalLM logits")


def test_patch_model_mixtral_forward_and_fp8():
    model = randomize(hf_mx.MixtralForCausalLM(mixtral_config()))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        assert mk.patch_model(model, precision=None) == 2 + 5  # + 2 RMSNorms a layer and the final one
        out = model(ids).logits
    assert_close_rel(out, ref, 1e-5, "patched Mixtral logits")
    model8 = randomize(hf_mx.MixtralForCausalLM(mixtral_config()))
    with torch.no_grad():
        ref8 = model8(ids).logits
        mk.patch_model(model8, precision="fp8")
        err = rel_err(model8(ids).logits, ref8)
    print(f"patched Mixtral fp8 logits: relative error {err:.2e}")
    assert err < FP8_BOUND


class _FP8Linear(torch.nn.Module):
    """A Linear as DeepSeek's FP8 checkpoints store it: e4m3 ``weight`` + fp32 ``weight_scale_inv``."""

    def __init__(self, w):
        super().__init__()
        q, s = mk.reference.quantize_weight_fp8(w)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale_inv", s)

    def dequantized(self):
        return mk.reference.dequantize_weight_fp8(self.weight, self.weight_scale_inv)


def _fp8_checkpoint_block(hf):
    """The same block in the pre-v5 layout (ModuleList of MLPs) with FP8 checkpoint weights."""
    I = hf.experts.down_proj.shape[-1]

    def mlp(w13, w2):
        m = torch.nn.Module()
        m.gate_proj, m.up_proj, m.down_proj = _FP8Linear(w13[:I]), _FP8Linear(w13[I:]), _FP8Linear(w2)
        return m

    block = type("DeepseekV3MoE", (torch.nn.Module,), {})()
    block.config, block.gate = hf.config, hf.gate
    block.experts = torch.nn.ModuleList(mlp(a, b) for a, b in zip(hf.experts.gate_up_proj, hf.experts.down_proj))
    sh = hf.shared_experts
    block.shared_experts = mlp(torch.cat([sh.gate_proj.weight, sh.up_proj.weight]), sh.down_proj.weight)
    return block


def test_deepseek_fp8_checkpoint_weights_taken_as_they_are():
    """e4m3 weights with weight_scale_inv load bit-for-bit, and the layer computes the dequantised model."""
    hf = randomize(hf_ds.DeepseekV3MoE(ds_config()))
    block = _fp8_checkpoint_block(hf)
    layer = mk.MoELayer.from_hf(block)
    assert layer.precision == "fp8"
    e3 = block.experts[3]
    I = e3.gate_proj.weight.shape[0]
    assert torch.equal(layer.experts.w13[3, :I].view(torch.uint8), e3.gate_proj.weight.view(torch.uint8))
    assert torch.equal(layer.experts.w13_scale[3, : I // 128 or 1], e3.gate_proj.weight_scale_inv)
    assert torch.equal(layer.experts.w2_scale[3], e3.down_proj.weight_scale_inv)
    # the dequantised checkpoint as plain HF weights: our fp8 layer must match it to fp8-activation accuracy
    with torch.no_grad():
        for e, m in enumerate(block.experts):
            hf.experts.gate_up_proj[e] = torch.cat([m.gate_proj.dequantized(), m.up_proj.dequantized()])
            hf.experts.down_proj[e] = m.down_proj.dequantized()
        sh = block.shared_experts
        hf.shared_experts.gate_proj.weight.copy_(sh.gate_proj.dequantized())
        hf.shared_experts.up_proj.weight.copy_(sh.up_proj.dequantized())
        hf.shared_experts.down_proj.weight.copy_(sh.down_proj.dequantized())
        x = torch.randn(2, 7, 256)
        ref, out = hf(x), layer(x)
    err = assert_close_rel(out, ref, FP8_BOUND, "FP8 checkpoint block")
    print(f"FP8 checkpoint block: relative error {err:.2e} (activations quantised, weights exact)")


def _step_logits(model, tokens, n_prompt):
    """Logits of every decode step, teacher-forced on `tokens`: one prefill of the prompt, then one token at a time
    through the model's KV cache (the path generate() takes)."""
    from transformers import DynamicCache  # noqa: PLC0415

    cache = DynamicCache()
    out = model(tokens[:, :n_prompt], past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1].float()]
    for t in range(n_prompt, tokens.shape[1] - 1):
        out = model(tokens[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)  # [B, new tokens, vocab]


@pytest.mark.skipif(hf_q3 is None, reason="this transformers has no Qwen3-MoE")
@pytest.mark.parametrize("precision", [None, "fp8"])
def test_qwen3_moe_block(precision):
    hf = randomize(hf_q3.Qwen3MoeSparseMoeBlock(qwen3_moe_config()))
    x = torch.randn(2, 9, 256)
    with torch.no_grad():
        ref = hf(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = mk.MoELayer.from_hf(hf, precision=precision)(x)
    err = assert_close_rel(out, ref, 1e-5 if precision is None else FP8_BOUND, f"Qwen3MoeSparseMoeBlock ({precision})")
    print(f"Qwen3MoeSparseMoeBlock ({precision}): relative error {err:.2e}")


def _family_model(family):
    if family == "deepseek_v3":
        return hf_ds.DeepseekV3ForCausalLM(ds_config())
    if family == "qwen3_moe":
        if hf_q3 is None:
            pytest.skip("this transformers has no Qwen3-MoE")
        return hf_q3.Qwen3MoeForCausalLM(qwen3_moe_config())
    return hf_mx.MixtralForCausalLM(mixtral_config())


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral", "qwen3_moe"])
def test_generation_same_tokens_after_patching(family, device):
    """Greedy generation with a small random bf16 model: the same tokens before and after patch_model.

    bf16 rounds differently in our fused path and in HF's (we keep fp32 inside), so on a random model, whose top
    logits can sit within rounding of each other, the two may part at a near-tie. The test therefore demands: the
    step logits through the KV cache agree to bf16 accuracy (teacher-forced on HF's tokens), and the generated
    tokens are identical up to the first step whose top-2 gap in HF's own logits is within that rounding; from
    there the sequences are different inputs and are not compared.
    """
    torch.manual_seed(0)
    model = randomize(_family_model(family), std=0.1).to(device=device, dtype=torch.bfloat16)
    n_new, n_prompt = 6, 6
    prompt = torch.randint(0, 97, (2, n_prompt), device=device)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=n_new, do_sample=False)
        ref_logits = _step_logits(model, ref, n_prompt)
        assert mk.patch_model(model, precision=None) > 0
        out = model.generate(prompt, max_new_tokens=n_new, do_sample=False)
        our_logits = _step_logits(model, ref, n_prompt)
    assert torch.equal(ref_logits.argmax(-1), ref[:, n_prompt:]), "teacher forcing does not reproduce generate()"
    # DeepSeek's MLA decodes over the latent rows on CUDA (the absorbed form rounds q W_UK in bf16 where HF rounds
    # c_kv W_UK^T): at a sharp-softmax step of this random model that alone moved one step's logits by 7e-2
    # (tests/test_hf_mla_cache.py's docstring); a broken kernel gives > 0.3
    bound = 5e-2 if family == "deepseek_v3" else 2e-2
    err = assert_close_rel(our_logits, ref_logits, bound, "decode-step logits through the KV cache")
    tol = 4 * err * ref_logits.abs().amax().item() + 1e-3  # what a rounding difference of this size can move
    for b in range(prompt.shape[0]):
        for t in range(n_new):
            if out[b, n_prompt + t] == ref[b, n_prompt + t]:
                continue
            top2 = ref_logits[b, t].topk(2).values
            gap = float(top2[0] - top2[1])
            ours = int(out[b, n_prompt + t])
            assert gap <= tol and ref_logits[b, t, ours] >= top2[1] - 1e-6, (
                f"row {b} step {t}: token {ours} instead of {int(ref[b, n_prompt + t])}, HF's top-2 gap {gap:.4f} "
                f"is more than rounding ({tol:.4f})")
            print(f"{family} row {b}: parted at step {t} on a near-tie (gap {gap:.4f} <= {tol:.4f})")
            break


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral", "qwen3_moe"])
def test_patched_model_trains_with_hf_gradients(family):
    """One training step's gradients (fp32, cross-entropy on random labels, plus the router load-balancing loss
    for Mixtral / Qwen-MoE) are HF's after patch_model: the MoE blocks' backward formulas (and DeepSeek's MLA,
    which runs its reference path under autograd) carry the same gradient to the embeddings, the attention, the
    routers and the head as HF's own blocks do."""
    import copy
    import warnings

    torch.manual_seed(0)
    model = randomize(_family_model(family), std=0.1)
    aux = family != "deepseek_v3"  # Mixtral / Qwen-MoE train with the router's load-balancing loss
    patched = copy.deepcopy(model)
    assert mk.patch_model(patched, precision=None) > 0
    ids = torch.randint(0, 97, (2, 9))
    labels = torch.randint(0, 97, (2, 9))
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLA says once that it runs its reference path under autograd
        for m in (model, patched):
            m.zero_grad()
            out = m(ids, labels=labels, output_router_logits=aux)
            out.loss.backward()
            outs.append(out)
    if aux:  # the router logits reach transformers' recorder, so the auxiliary loss is HF's
        assert outs[1].aux_loss is not None and len(outs[1].router_logits) == len(outs[0].router_logits)
        assert_close_rel(outs[1].aux_loss.detach(), outs[0].aux_loss.detach(), 1e-5, "aux loss")
        assert_close_rel(outs[1].router_logits[0].detach(), outs[0].router_logits[0].detach(), 1e-5, "router logits")
    ref = dict(model.named_parameters())
    compared = []
    for name, p in patched.named_parameters():  # every parameter both models name alike, and the routers
        hf_name = name.replace(".mlp.moe.gate.weight", ".mlp.gate.weight")
        if hf_name in ref and ref[hf_name].grad is not None:
            assert p.grad is not None, f"no gradient for {name}"
            assert_close_rel(p.grad, ref[hf_name].grad, 1e-4, f"grad {name}")
            compared.append(name)
    assert any("embed_tokens" in n for n in compared) and any("layers.0." in n for n in compared), compared
    assert any(".mlp.moe.gate.weight" in n for n in compared), compared  # the router trains as HF's does


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_patched_router_stand_in_is_our_gate(family):
    """The stand-in of HF's router (kept for transformers' logits recorder) reads and writes our gate: HF's own
    weight initialisation re-initialises the router we route with, and no parameter is held twice."""
    model = randomize(_family_model(family), std=0.1)
    mk.patch_model(model, precision=None)
    blocks = [m for m in model.modules() if isinstance(m, mk.integrations.hf.HFMoEBlock)]
    assert blocks
    for block in blocks:
        assert block.gate.weight is block.moe.gate.weight
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.endswith("mlp.gate.weight") for n in names)
    before = blocks[0].moe.gate.weight.detach().clone()
    model.apply(model._init_weights)  # HF's initialisation, which knows its router class
    assert not torch.equal(blocks[0].moe.gate.weight.detach(), before)



_ACT_CASES = [("mixtral", "gelu"), ("qwen3_moe", "gelu"), ("deepseek_v3", "relu")]


@pytest.mark.parametrize("family,act", _ACT_CASES)
def test_patch_model_refuses_non_silu_experts(family, act):
    """The kernels compute SwiGLU = silu(gate) * up: a block whose experts use another activation is refused with
    the activation named (strict=True raises before anything is swapped; otherwise it is left and reported), and
    the model's logits stay HF's. (Before: patched silently, relative logits error 1e-2 .. 2e-1.)"""
    if family == "qwen3_moe" and hf_q3 is None:
        pytest.skip("this transformers has no Qwen3-MoE")
    make = {"mixtral": mixtral_config, "qwen3_moe": qwen3_moe_config, "deepseek_v3": ds_config}[family]
    cls = {"mixtral": hf_mx.MixtralForCausalLM, "deepseek_v3": hf_ds.DeepseekV3ForCausalLM}.get(family) or \
        (hf_q3.Qwen3MoeForCausalLM if hf_q3 is not None else None)
    model = randomize(cls(make(hidden_act=act)), std=0.1)
    block = next(m for m in model.modules() if type(m).__name__ in mk.integrations.hf.SUPPORTED_MOE)
    with pytest.raises(TypeError, match=f"'{act}'.*not SiLU"):
        mk.MoELayer.from_hf(block)
    with pytest.raises(TypeError, match=f"'{act}'"):
        mk.patch_model(model, precision=None, attention=False, strict=True)
    assert not any(isinstance(m, mk.integrations.hf.HFMoEBlock) for m in model.modules())
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        report = mk.patch_model(model, precision=None, attention=False)
        out = model(ids).logits
    # no block swapped (the RMSNorms are: the torch formula on the CPU, HF's bits)
    assert {s.family for s in report.swapped} == {"RMSNorm"}, str(report)
    assert report.skipped and all(act in s.reason for s in report.skipped), str(report)
    assert torch.equal(out, ref)


def test_patch_model_swish_is_silu():
    """"swish" is SiLU under another name: taken (the activation is checked on values, not by name)."""
    model = randomize(hf_mx.MixtralForCausalLM(mixtral_config(hidden_act="swish")))
    assert mk.patch_model(model, precision=None) == 2 + 5  # 2 MoE blocks, 5 RMSNorms


def test_patch_report_int_lists_log_and_strict(caplog):
    """patch_model's report: an int (the count, as before) carrying .swapped / .skipped, logged; with one block it
    cannot take, strict=True raises naming that block and swaps nothing, strict=False swaps the rest and the
    model still computes HF's logits."""
    import logging

    model = randomize(hf_mx.MixtralForCausalLM(mixtral_config()))
    model.model.layers[1].mlp.experts.act_fn = torch.nn.GELU()  # one block the kernels cannot compute
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp .*GELU"):
        mk.patch_model(model, precision=None, strict=True)
    assert not any(isinstance(m, mk.integrations.hf.HFMoEBlock) for m in model.modules())
    # norms=False: the blocks alone, one swap (tests/test_norm.py has the norms in the report)
    with caplog.at_level(logging.INFO, logger="moe_kernels"), torch.no_grad():
        report = mk.patch_model(model, precision=None, norms=False)
        out = model(ids).logits
    assert isinstance(report, int) and report == 1 and report + 1 == 2 and int(report) == 1
    assert [s.name for s in report.swapped] == ["model.layers.0.mlp"]
    assert [(s.name, s.kind) for s in report.skipped] == [("model.layers.1.mlp", "MixtralSparseMoeBlock")]
    assert "GELU" in report.skipped[0].reason and "skipped model.layers.1.mlp" in str(report)
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "moe_kernels"]
    assert any(lv == logging.INFO and "swapped model.layers.0.mlp" in m for lv, m in logged), logged
    assert any(lv == logging.WARNING and "model.layers.1.mlp" in m and "GELU" in m for lv, m in logged), logged
    assert_close_rel(out, ref, 1e-5, "Mixtral with one block patched")
    again = mk.patch_model(model, precision=None, norms=False)  # ours are neither swapped again nor reported
    assert again == 0 and [s.name for s in again.skipped] == ["model.layers.1.mlp"], str(again)
    import pickle

    assert pickle.loads(pickle.dumps(report)).swapped == report.swapped


def test_modules_import_no_integration():
    """The modules know no HF: no module under moe_kernels/modules imports moe_kernels.integrations; from_hf
    reaches the integration through the converter registry, which says what is missing when nothing is there."""
    import ast
    import pathlib

    from moe_kernels.modules import converters

    for path in pathlib.Path(converters.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "integrations" not in (node.module or ""), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any("integrations" in a.name for a in node.names), f"{path.name} imports integrations"
    assert converters.get_converter(mk.MoELayer, "hf") is mk.integrations.hf.moe_from_hf
    assert converters.get_converter(mk.MultiHeadLatentAttention, "hf") is mk.integrations.hf.mla_from_hf

    class Sub(mk.MoELayer):
        pass

    assert converters.get_converter(Sub, "hf") is mk.integrations.hf.moe_from_hf  # inherited through the MRO
    with pytest.raises(LookupError, match="no 'nope' converter is registered for MoELayer"):
        converters.get_converter(mk.MoELayer, "nope")


def test_patched_mixtral_keeps_router_jitter_in_training():
    """Mixtral's router_jitter_noise scales the block's input by U(1-j, 1+j) in training: the adapter does too
    (its own draw), and nothing in eval."""
    model = randomize(hf_mx.MixtralForCausalLM(mixtral_config(router_jitter_noise=0.2)))
    mk.patch_model(model, precision=None)
    block = model.model.layers[0].mlp
    assert block.jitter_noise == pytest.approx(0.2)
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        ref = block.moe(x)
        assert torch.equal(block.eval()(x), ref)
        assert rel_err(block.train()(x), ref) > 1e-3
