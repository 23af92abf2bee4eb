"""patch_model on every MoE family of the installed transformers whose experts are gated MLPs, against the
unpatched model in fp32: logits, greedy generation, one training step's gradients; and the families refused.

Tiny random configs (hidden 128); a family the installed transformers lacks is skipped. On the CPU the kernels
run through Triton's interpreter (tests/conftest.py).
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import moe_kernels as mk  # noqa: E402
from _helpers import assert_close_rel  # noqa: E402

V = 97
_ATTN = dict(num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=64, vocab_size=V)

# family -> (config class, model class, config, MoE blocks + MLA attentions swapped, HF router attribute)
FAMILIES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
                       shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                       num_key_value_heads=2, norm_topk_prob=False, **_ATTN), 2, "gate"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(hidden_size=128, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                   num_key_value_heads=4, **_ATTN), 2, "gate"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=1, num_key_value_heads=4, q_lora_rank=64,
                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                         first_k_dense_replace=1, routed_scaling_factor=1.5, **_ATTN), 3, "gate"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                      num_key_value_heads=2, head_dim=32, routed_scaling_factor=1.5, **_ATTN), 1, "gate"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                      dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                           first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.5, **_ATTN),
                      3, "gate"),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_experts=8, moe_topk=2,
                            num_key_value_heads=4, head_dim=32, **_ATTN), 2, "gate.wg"),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(hidden_size=128, intermediate_size=64, intermediate_size_mlp=192, num_local_experts=4,
                    num_experts_per_tok=1, num_key_value_heads=2, head_dim=32, **_ATTN), 2, "router"),
    # router_jitter_noise 0.3: sparsemixer keeps a second logit for about half the tokens (at 0.01 nearly every
    # weight is 1); input jitter on, so that training draws it (twice, as HF does)
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(hidden_size=128, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                    router_jitter_noise=0.3, input_jitter_noise=0.01, num_key_value_heads=2, **_ATTN), 2, "router"),
}
REFUSED = {
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(hidden_size=128, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                     num_key_value_heads=2, head_dim=32, **_ATTN), "GptOssMLP", "SwiGLU"),
}


def blocks(report) -> int:
    """The MoE blocks and MLA attentions a report swapped: patch_model also swaps the models' Llama-style RMSNorms
    (family "RMSNorm", counted in the int; tests/test_norm.py checks those), which these tests leave out."""
    return sum(s.family != "RMSNorm" for s in report.swapped)


def build(table, family, seed=0, std=0.1, **overrides):
    """A random fp32 model of the family (eager attention and experts), or skip if transformers lacks it."""
    cfg_name, model_name, kw = table[family][:3]
    cfg_cls, model_cls = getattr(transformers, cfg_name, None), getattr(transformers, model_name, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    cfg = cfg_cls(**{**kw, **overrides})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(std=std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(std=0.01)
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_and_generation(family, monkeypatch):
    """fp32: the patched model's logits within 1e-5 (relative) of HF's (kernels through the interpreter), and
    greedy generation the same tokens (through the model's KV cache; the ops' references, to keep CI fast)."""
    model = build(FAMILIES, family)
    patched = copy.deepcopy(model)
    report = mk.patch_model(patched, precision=None)
    assert blocks(report) == FAMILIES[family][3] and not report.skipped, str(report)
    # and every Llama-style norm is ours (PhiMoE's are LayerNorms, Llama 4's q/k norms weightless: left)
    hf_norms = [n for n, m in patched.named_modules() if type(m).__name__ in mk.integrations.hf.SUPPORTED_NORMS]
    assert not hf_norms and report - blocks(report) == sum(isinstance(m, mk.RMSNorm) for m in patched.modules())
    # an eval model stays in eval mode (an adapter left training would jitter or sample: PhiMoE, Mixtral)
    assert not [n for n, m in patched.named_modules() if m.training]
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        ref, out = model(ids).logits, patched(ids).logits
        assert_close_rel(out, ref, 1e-5, f"{family} logits")
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: the reference ops
        gen_ref = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
        gen = patched.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, gen_ref), f"{family}: greedy tokens {gen.tolist()} != HF's {gen_ref.tolist()}"


def _hf_name(name: str, router: str) -> str:
    """The HF parameter a patched model's parameter stands for (same layout unless _hf_grad says otherwise)."""
    for ours, theirs in ((".moe.gate.weight", f".{router}.weight"), (".moe.experts.w13", ".experts.gate_up_proj"),
                         (".moe.experts.w2", ".experts.down_proj"), (".self_attn.mla.", ".self_attn."),
                         (".moe.shared_expert_gate.", ".shared_expert_gate.")):
        name = name.replace(ours, theirs)
    return name


def _shared_grad(ref: dict, name: str):
    """HF's shared-expert gradients as our fused [1, 2I, H] / [1, H, I] layout, or None if name is not one."""
    for ours in (".moe.shared_experts.", ".moe.shared_expert."):
        if ours in name:
            prefix = name[: name.index(ours)]
            base = next(prefix + t for t in (".shared_experts.", ".shared_expert.", ".shared_mlp.")
                        if prefix + t + "down_proj.weight" in ref)
            if name.endswith("w13"):
                return torch.cat([ref[base + "gate_proj.weight"].grad, ref[base + "up_proj.weight"].grad]).unsqueeze(0)
            return ref[base + "down_proj.weight"].grad.unsqueeze(0)
    return None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_training_step_gradients(family, monkeypatch):
    """One training step (cross-entropy on random labels, plus the load-balancing loss where the family has one;
    fp32): every parameter's gradient equals HF's, the routers, routed experts and shared experts included (Llama
    4's experts through its transposed layout), and transformers records the same router logits. The
    FamilyMoELayer variants (Qwen2-MoE, Llama 4) run the kernels' backward through the interpreter. Both models
    start from the same generator state: PhiMoE samples its experts in training (and jitters its input), and must
    draw what HF draws."""
    if family not in ("qwen2_moe", "llama4"):  # plain MoELayer: its kernels' backward has its own tests
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: the reference ops (fast)
    model = build(FAMILIES, family)
    router = FAMILIES[family][4]
    patched = copy.deepcopy(model)
    mk.patch_model(patched, precision=None)
    ids, labels = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLA says once that it runs its reference path under autograd
        outs = []
        for m in (model, patched):
            m.train()
            m.zero_grad()
            torch.manual_seed(1)
            outs.append(m(ids, labels=labels, output_router_logits=True))
            outs[-1].loss.backward()
    hf_out, our_out = outs
    assert len(our_out.router_logits) == len(hf_out.router_logits) > 0
    for a, b in zip(our_out.router_logits, hf_out.router_logits):
        assert_close_rel(a.detach(), b.detach(), 1e-5, f"{family} router logits")
    if getattr(hf_out, "aux_loss", None) is not None:
        assert_close_rel(our_out.aux_loss.detach(), hf_out.aux_loss.detach(), 1e-5, f"{family} aux loss")
    ref = dict(model.named_parameters())
    kinds = set()
    for name, p in patched.named_parameters():
        g_ref = _shared_grad(ref, name)
        if g_ref is None:
            hf = ref[_hf_name(name, router)]
            g_ref = hf.grad
            if family == "llama4" and ".experts." in name:
                g_ref = g_ref.transpose(1, 2)
        assert p.grad is not None and g_ref is not None, f"{family}: no gradient for {name}"
        assert_close_rel(p.grad, g_ref, 1e-4, f"{family} grad {name}")
        kinds.add(name.rsplit(".", 1)[-1] if ".moe." in name else "other")
    assert {"weight", "w13", "w2", "other"} <= kinds, kinds  # router, experts and the rest all compared


def test_qwen2_moe_block_gated_shared_expert_any_size():
    """Qwen2-MoE's shared expert (size not a multiple of the routed one) gated by sigmoid(x . g), alone."""
    model = build(FAMILIES, "qwen2_moe")
    block = model.model.layers[0].mlp
    layer = mk.MoELayer.from_hf(block)
    assert isinstance(layer, mk.MoELayer) and layer.shared_expert_gate is not None
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        assert_close_rel(layer(x), block(x), 1e-5, "Qwen2-MoE block")
        block.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2: the gate is applied, not ignored
        assert_close_rel(mk.MoELayer.from_hf(block)(x), block(x), 1e-5, "Qwen2-MoE block, gate 0")


@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_block_weights_on_input(top_k):
    """Llama 4 scales the experts' input by sigmoid(logit), not their output: top-1 and top-2 against HF."""
    model = build(FAMILIES, "llama4", num_experts_per_tok=top_k)
    block = model.model.layers[0].feed_forward
    layer = mk.MoELayer.from_hf(block)
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        ref, _ = block(x)
        assert_close_rel(layer(x).reshape(ref.shape), ref, 1e-5, f"Llama4 block top-{top_k}")


def _hf_sparsemixer():
    modeling = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    return modeling.sparsemixer


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_sparsemixer_matches_transformers(eps, training):
    """Our sparsemixer (moe_kernels.modules.router) against transformers' on fp32 logits, from the same generator
    state: the same two experts, the same weights, the same gradient into the logits (through HF's PhimoeMultiplier
    in training). In training the sampling and the 1 / 0.3333 scaling must both show (picks that are not the
    maximum; weights a third of their softmax), so evaluation's rule cannot pass for it."""
    from moe_kernels.modules.router import sparsemixer

    torch.manual_seed(0)
    logits = torch.randn(400, 8) * torch.rand(400, 1) * 3  # rows of every spread, some masking nothing
    g = torch.randn(400, 2)
    res = []
    for fn in (_hf_sparsemixer(), lambda lg, eps, tr: sparsemixer(lg, eps, tr)):
        lg = logits.clone().requires_grad_()
        torch.manual_seed(5)
        w, ids = fn(lg, eps, training)
        (w * g).sum().backward()
        res.append((w.detach(), ids, lg.grad))
    (w_hf, ids_hf, g_hf), (w, ids, grad) = res
    assert torch.equal(ids, ids_hf) and (ids[:, 0] != ids[:, 1]).all()
    assert_close_rel(w, w_hf, 1e-6, "sparsemixer weights")
    assert_close_rel(grad, g_hf, 1e-6, "sparsemixer gradient into the logits")
    # the first pick's softmax over the logits within the threshold of the maximum (the same for any pick)
    top = logits.max(-1, keepdim=True)[0]
    p1 = torch.softmax(logits.masked_fill((top - logits) / logits.abs().clamp(min=top) > 2 * eps, float("-inf")), -1)
    ratio = w[:, 0] / p1.gather(-1, ids[:, :1]).squeeze(-1)
    if not training:
        assert torch.equal(ids[:, 0], logits.argmax(-1)) and torch.allclose(ratio, torch.ones(400))
        if eps == 0.3:
            assert (w < 0.99).any() and (w == 1).any()  # the threshold keeps a second logit in some rows only
    else:
        assert (ids[:, 0] != logits.argmax(-1)).any(), "training did not sample"
        third = (ratio - 0.3333).abs() < 1e-5
        assert third.any() and (third | ((ratio - 1).abs() < 1e-6)).all(), ratio


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_phimoe_block(top_k, training):
    """PhiMoE's block, patched, against HF's in eval and (same generator state) in training, where HF jitters the
    input twice (block, then router) and samples; num_experts_per_tok=1 too, which HF's sparsemixer ignores (always
    two experts): the gradients into the input and the router weight as well."""
    model = build(FAMILIES, "phimoe", num_experts_per_tok=top_k, input_jitter_noise=0.05)
    holder = torch.nn.Sequential()
    holder.add_module("mlp", model.model.layers[0].mlp)
    block = copy.deepcopy(holder.mlp)
    assert mk.patch_model(holder, precision=None) == 1
    ours = holder.mlp
    assert ours.moe.gate.top_k == 2 and ours.moe.gate.scoring == "sparsemixer" and ours.moe.gate.jitter_eps == 0.3
    x = torch.randn(2, 7, 128)
    outs = []
    for m, w in ((block, block.router.weight), (ours, ours.moe.gate.weight)):
        m.train(training)
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = m(xi * 1.0)  # HF's block scales its input in place
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, w.grad))
    for a, b, what in zip(outs[1], outs[0], ("output", "grad x", "grad router")):
        assert_close_rel(a, b, 1e-5, f"PhiMoE block top_k={top_k} training={training} {what}")


def test_sparsemixer_router_layer_and_arguments():
    """TopKRouter / MoELayer with scoring="sparsemixer" outside HF: odd sizes, T = 0 and 1, against a float64
    per-token computation; counts; norm_topk_prob and routed_scaling_factor applied to its weights; the arguments
    it cannot take refused at construction, non-finite logits at the call."""
    from moe_kernels.modules.router import sparsemixer

    torch.manual_seed(0)
    layer = mk.MoELayer(hidden_size=72, intermediate_size=40, num_experts=5, top_k=2, scoring="sparsemixer",
                        norm_topk_prob=False, precision="fp32", dtype=torch.float32).eval()
    assert "jitter_eps=0.01" in repr(layer.gate)
    layer.gate.jitter_eps = 0.3
    ex = layer.experts
    for T in (0, 1, 13):
        x = torch.randn(T, 72)
        with torch.no_grad():
            y = layer(x)
            w, ids = sparsemixer(x.double() @ layer.gate.weight.double().t(), 0.3, False)
            ref = torch.zeros(T, 72, dtype=torch.float64)
            for t in range(T):
                for j in range(2):
                    e = int(ids[t, j])
                    h = ex.w13[e].double() @ x[t].double()
                    ref[t] += w[t, j] * (ex.w2[e].double() @ (F.silu(h[:40]) * h[40:]))
        assert y.shape == (T, 72)
        if T:
            assert_close_rel(y, ref, 1e-5, f"MoELayer sparsemixer T={T}")
    x = torch.randn(9, 72)
    with torch.no_grad():
        w, ids, counts = layer.gate(x)
        assert ids.dtype == torch.int32 and torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=5).int())
        layer.gate.norm_topk_prob, layer.gate.routed_scaling_factor = True, 2.5
        w2, ids2, _ = layer.gate(x)
    assert torch.equal(ids2, ids) and torch.allclose(w2, 2.5 * w / w.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="non-finite"):
        layer.gate(torch.full((2, 72), float("nan")))
    kw = dict(hidden_size=16, num_experts=4, scoring="sparsemixer")
    for bad, msg in ((dict(top_k=1), "exactly 2"), (dict(top_k=2, n_group=2, topk_group=1), "n_group"),
                     (dict(top_k=2, balance="bias"), "balance"), (dict(top_k=2, jitter_eps=-0.1), "jitter_eps"),
                     (dict(top_k=2, jitter_eps=float("nan")), "jitter_eps")):
        with pytest.raises(ValueError, match=msg):
            mk.modules.router.TopKRouter(**kw, **bad)


def test_deepseek_v2_group_limited_greedy_refused():
    """DeepSeek-V2's group_limited_greedy scores groups by their best expert: refused with that reason (strict),
    reported and left in place otherwise; with every group kept it is plain greedy and is taken."""
    model = build(FAMILIES, "deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(TypeError, match="group_limited_greedy"):
        mk.patch_model(copy.deepcopy(model), precision=None, strict=True)
    report = mk.patch_model(model, precision=None)
    assert blocks(report) == 2 and [s.kind for s in report.skipped] == ["DeepseekV2Moe"], str(report)
    model = build(FAMILIES, "deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=4)
    assert blocks(mk.patch_model(model, precision=None)) == 3


@pytest.mark.parametrize("family", list(REFUSED))
def test_refused_families_report_why(family):
    """GPT-OSS: left as they are with the reason in the report; strict=True raises it; the model's
    output is unchanged."""
    model = build(REFUSED, family)
    kind, why = REFUSED[family][3:]
    with pytest.raises(TypeError, match=why):
        mk.patch_model(copy.deepcopy(model), strict=True)
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
        report = mk.patch_model(model)
        out = model(ids).logits
    assert report == 0 and len(report.skipped) == 2, str(report)
    assert all(s.kind == kind and why in s.reason for s in report.skipped), str(report)
    assert torch.equal(out, ref)


def test_readme_family_table_matches_the_integration():
    """README's "Supported model families": every block class patch_model takes by its own rule (not a clone) and
    every MLA attention it swaps is named there, the clones' row points at CLONES, and each refused family is in
    the "Left as they are" paragraph, not in the table (a family added or refused shows up in the README)."""
    import pathlib

    hf = mk.integrations.hf
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Supported model families"):]
    section = section[:section.index("\n## ", 1)]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    left = section[section.index("Left as they are"):]
    for kind in set(hf.SUPPORTED_MOE) - set(hf.CLONES):
        assert f"`{kind}`" in table, f"{kind} ({hf.SUPPORTED_MOE[kind]}) is not in README's family table"
    for kind in hf.SUPPORTED_ATTENTION:
        assert f"`{kind}`" in section, f"{kind} is not in README's family section"
    assert "`integrations.hf.CLONES`" in table
    assert "PhiMoE" in table and "PhiMoE" not in left
    for kind, family in (("GptOssMLP", "GPT-OSS"),):
        assert kind in hf.REFUSED_MOE and family in left and family not in table
    assert set(hf.REFUSED_MOE) == {"GptOssMLP"}, "a newly refused family: name it in README and here"


@pytest.mark.parametrize("family", ["qwen2_moe", "llama4"])
def test_family_block_fp8(family):
    """The FamilyMoELayer variants with FP8 experts (weights quantised on load; 128-multiple sizes): within FP8's
    error of HF's block (measured ~3-6e-2 on the toy layers; a broken path is O(1))."""
    over = dict(moe_intermediate_size=128, shared_expert_intermediate_size=256) if family == "qwen2_moe" else \
        dict(intermediate_size=128, num_experts_per_tok=2)
    model = build(FAMILIES, family, std=0.05, **over)
    block = model.model.layers[0].mlp if family == "qwen2_moe" else model.model.layers[0].feed_forward
    layer = mk.MoELayer.from_hf(block, precision="fp8")
    assert layer.experts.w13.dtype == torch.float8_e4m3fn
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        ref = block(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        err = assert_close_rel(layer(x).reshape(ref.shape), ref, 0.1, f"{family} block, fp8")
    print(f"{family} block fp8: relative error {err:.2e}")


def test_youtu_mla_attention():
    """Youtu (a dense model whose attention is DeepseekV3Attention's code): its MLA swapped, logits HF's."""
    model = build({"youtu": ("YoutuConfig", "YoutuForCausalLM", dict(
        hidden_size=128, intermediate_size=192, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, **_ATTN))}, "youtu")
    patched = copy.deepcopy(model)
    report = mk.patch_model(patched, precision=None)
    assert blocks(report) == 2 and {s.kind for s in report.swapped} == {"YoutuAttention", "YoutuRMSNorm"}, str(report)
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        assert_close_rel(patched(ids).logits, model(ids).logits, 1e-5, "Youtu logits")


def test_deepseek_v2_lite_attention_without_q_lora():
    """DeepSeek-V2-Lite's MLA has no q LoRA (q_proj): the patched model's logits are HF's."""
    model = build(FAMILIES, "deepseek_v2", q_lora_rank=None)
    patched = copy.deepcopy(model)
    assert blocks(mk.patch_model(patched, precision=None)) == 3
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        assert_close_rel(patched(ids).logits, model(ids).logits, 1e-5, "DeepSeek-V2-Lite logits")


CLONE_MODULES = {
    "Dots1MoE": "dots1", "KimiLinearMoE": "kimi_linear", "Glm4MoeLiteMoE": "glm4_moe_lite",
    "Glm4vMoeTextMoE": "glm4v_moe", "DeepseekV32MoE": "deepseek_v32", "GlmMoeDsaMoE": "glm_moe_dsa",
    "SolarOpenMoE": "solar_open", "DeepseekOcr2TextMoe": "deepseek_ocr2", "UnlimitedOcrTextMoe": "unlimited_ocr",
    "FlexOlmoSparseMoeBlock": "flex_olmo", "MellumSparseMoeBlock": "mellum", "MiniMaxSparseMoeBlock": "minimax",
    "Qwen3NextSparseMoeBlock": "qwen3_next", "Qwen4ExpTextSparseMoeBlock": "qwen4_exp",
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": "qwen3_omni_moe", "Qwen3OmniMoeTalkerTextSparseMoeBlock": "qwen3_omni_moe",
    "Qwen3_5MoeSparseMoeBlock": "qwen3_5_moe", "Qwen3VLMoeTextSparseMoeBlock": "qwen3_vl_moe",
    "MiMoV2FlashMoE": "mimo_v2_flash", "ExaoneMoeSparseMoEBlock": "exaone_moe", "MiniCPM5MoeMoE": "minicpm5_moe",
    "Dots3NoteTextMoE": "dots3_note",
    "MiniMaxM2SparseMoeBlock": "minimax_m2", "Mistral4MoE": "mistral4", "MistralLarge4TextMoE": "mistral_large4",
    "HunYuanMoEV1Moe": "hunyuan_v1_moe",
}
# not clones: their own routing rule
_OWN_ROUTING = {"MiniMaxM2SparseMoeBlock", "Mistral4MoE", "MistralLarge4TextMoE", "HunYuanMoEV1Moe"}
# every name the families' configs use for these sizes (a config keeps what it does not know as an attribute)
_CLONE_CFG = dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64, n_routed_experts=8, num_experts=8,
                  num_local_experts=8, num_experts_per_tok=2, moe_topk=2, n_group=2, topk_group=1, n_shared_experts=1,
                  num_shared_experts=1, shared_experts_intermediate_size=64,
                  shared_expert_intermediate_size=96, routed_scaling_factor=1.5,
                  hidden_act="silu", topk_method="greedy", num_attention_heads=4, num_key_value_heads=4)


def _clone_block(kind, norm):
    """A randomly initialised block of the clone family (built from whichever of its config classes takes the
    tiny sizes), or skip."""
    import importlib
    import inspect

    mod = CLONE_MODULES[kind]
    try:
        modeling = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
        configuration = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no {mod}")
    block_cls = getattr(modeling, kind, None)
    if block_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {kind}")
    errors = []
    for name, cfg_cls in inspect.getmembers(configuration, inspect.isclass):
        if not name.endswith("Config") or cfg_cls.__module__ != configuration.__name__:
            continue
        try:
            block = block_cls(cfg_cls(**_CLONE_CFG, norm_topk_prob=norm))
        except Exception as e:  # noqa: BLE001 (the family's other config classes)
            errors.append(f"{name}: {e}")
            continue
        torch.manual_seed(0)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(std=0.1)
            for n, b in block.named_buffers():
                if "e_score_correction_bias" in n:
                    b.normal_(std=0.1)  # large enough to change the selection
        return block.eval()
    pytest.fail(f"no config of {mod} builds {kind}: {errors}")


@pytest.mark.parametrize("norm", [False, True], ids=["config_norm0", "config_norm1"])
@pytest.mark.parametrize("kind", list(CLONE_MODULES))
def test_clone_family_blocks(kind, norm, monkeypatch):
    """Blocks whose code is a supported family's (up to class names and routing constants;
    moe_kernels.integrations.hf.CLONES), MiniMax-M2, Mistral 4 / Large 4, Hunyuan: the block's output in fp32 within
    1e-5 of HF's with the config's norm_topk_prob either way (some routers ignore it), and patch_model takes them. What
    differs from the family's own test is the conversion (routing arguments, weights), so the ops run their
    references here (fast); the kernels run in the families' tests above."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: the reference ops
    assert set(CLONE_MODULES) == set(mk.integrations.hf.CLONES) | _OWN_ROUTING
    block = _clone_block(kind, norm)
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        ref = block(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        out = mk.MoELayer.from_hf(block)(x)
    assert_close_rel(out.reshape(ref.shape), ref, 1e-5, f"{kind} block")
    holder = torch.nn.Sequential()
    holder.add_module("mlp", block)
    report = mk.patch_model(holder, precision=None)
    assert report == 1 and report.swapped[0].kind == kind, str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_bf16_on_cuda(family):
    """On the GPU (the kernels themselves), bf16: the patched model's logits against the fp32 model's are within
    1.5x (+2e-3) of HF's own bf16 error, and FP8 experts (where the sizes allow) within FP8's error."""
    over = {"qwen2_moe": dict(moe_intermediate_size=128, shared_expert_intermediate_size=256),
            "llama4": dict(intermediate_size=128),
            "hunyuan_v1_moe": dict(moe_intermediate_size=128, intermediate_size=256)}.get(
                family, dict(moe_intermediate_size=128))
    if family in ("olmoe", "phimoe"):
        over = dict(intermediate_size=128)
    model = build(FAMILIES, family, **over).cuda()
    ids = torch.randint(0, V, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
        hf = copy.deepcopy(model).to(torch.bfloat16)
        hf_err = assert_close_rel(hf(ids).logits.float(), ref, 0.1, f"{family} HF bf16")
        ours = copy.deepcopy(hf)
        assert blocks(mk.patch_model(ours, precision=None)) == FAMILIES[family][3]
        err = assert_close_rel(ours(ids).logits.float(), ref, 1.5 * hf_err + 2e-3, f"{family} patched bf16")
        fp8 = copy.deepcopy(hf)
        assert blocks(mk.patch_model(fp8, precision="fp8")) == FAMILIES[family][3]
        err8 = assert_close_rel(fp8(ids).logits.float(), ref, 0.15, f"{family} patched fp8")
    print(f"{family} on CUDA vs fp32: HF bf16 {hf_err:.2e}, ours bf16 {err:.2e}, ours fp8 {err8:.2e}")
