"""Swapping HuggingFace transformers blocks for moe_kernels modules.

Supported MoE blocks (``SUPPORTED_MOE``; each checked against the unpatched model in tests/test_hf_*.py):

==================  ==========================  =====================================================================
family              HF block                    routing -> our layer
==================  ==========================  =====================================================================
DeepSeek-V3 / R1    DeepseekV3MoE               sigmoid, group-limited (best-two sum), bias, norm, scale; shared
(and Kimi-K2)
GLM-4.5 / 4.6       Glm4MoeMoE                  as DeepSeek-V3
DeepSeek-V2         DeepseekV2Moe               softmax, greedy (no norm), scale; shared experts
Mistral 4 / Large 4 Mistral4MoE, MistralLarge4  softmax under DeepSeek-V3's group rule, norm, scale; shared
Mixtral             MixtralSparseMoeBlock       softmax top-k, renormalised
Qwen3-MoE / OLMoE   Qwen3Moe / Olmoe...Block    softmax top-k, norm_topk_prob as configured
Qwen2-MoE           Qwen2MoeSparseMoeBlock      softmax top-k; shared expert gated by sigmoid(x . g) (FamilyMoELayer)
MiniMax-M2          MiniMaxM2SparseMoeBlock     sigmoid, selection biased by the block's correction bias, norm
Hunyuan-A13B        HunYuanMoEV1Moe             softmax top-k, renormalised (router gate.wg); shared_mlp
Llama 4             Llama4TextMoe               sigmoid of the top-k logits applied to the experts' input; shared
PhiMoE (Phi-3.5)    PhimoeSparseMoeBlock        sparsemixer top-2 (TopKRouter scoring="sparsemixer", torch ops;
                                                Gumbel-sampled in training, HF's draws); input jitter as HF's
==================  ==========================  =====================================================================

and the blocks whose code is one of these up to class names (``CLONES``: Dots1, Kimi-Linear, Exaone-MoE,
MiniCPM5-MoE, MiMo-V2-Flash (no shared expert), Dots3-Note, GLM-4.5 Lite / GLM-4.5V / GLM-MoE-DSA, DeepSeek-V3.2,
Solar-Open, DeepSeek-OCR2, Unlimited-OCR, FlexOlmo, Mellum, MiniMax, Qwen3-Next, Qwen4-Exp, Qwen3-Omni's thinker
and talker; Qwen3.5-MoE and Qwen3-VL-MoE, whose routers always renormalise). MLA attention: DeepseekV3Attention,
DeepseekV2Attention, and DeepseekV3Attention's clones Glm4MoeLiteAttention, YoutuAttention. RMSNorm: transformers'
``LlamaRMSNorm`` and every class whose forward is its forward up to the class name (140 in transformers 5.25:
DeepSeek-V2/V3's, GLM-4.5's, Mixtral's, Qwen2/3-MoE's, OLMoE's, ... ``SUPPORTED_NORMS``), and Llama 4's, which
computes the same formula written otherwise; not Gemma's or Qwen3-Next's (1 + weight), nor those that round once
after the weight product (Olmo 2, FlexOlmo, GPT-OSS). Refused with a reason
(``REFUSED_MOE``): GPT-OSS (biased, clamped SwiGLU); DeepSeek-V2's
``group_limited_greedy`` (groups scored by their best expert); any expert activation other than SiLU (the kernels
compute SwiGLU = silu(gate) * up); expert biases. Any other module with ``experts`` and a router (or MLA-like
projections) is reported as not supported.

Weights are read in the layouts of transformers 5 (fused ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I];
Llama 4's transposed [E, H, 2I] / [E, I, H]) and of earlier releases (a ModuleList of per-expert MLPs with
``gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2``), and DeepSeek's FP8 checkpoints (e4m3 ``weight`` with
its ``weight_scale_inv``) are taken as they are.

Importing this module registers ``moe_from_hf`` / ``mla_from_hf`` as the "hf" converters of ``MoELayer`` /
``MultiHeadLatentAttention`` (``modules.converters``), which their ``from_hf`` classmethods call.
"""
from __future__ import annotations

import ast
import functools
import inspect
import logging
import numbers
import os
import re
import textwrap
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FP8_DTYPE
from ..modules.converters import register_converter
from ..modules.linear import FP8Linear
from ..modules.mla import DECODE_MAX_TOKENS, MultiHeadLatentAttention
from ..modules.moe import MoELayer
from ..modules.norm import RMSNorm
from ..modules.router import TopKRouter
from ..reference.quant import dequantize_weight_fp8
from .layers import FamilyMoELayer

__all__ = ["moe_from_hf", "mla_from_hf", "patch_model", "PatchReport", "UnsupportedModule", "SUPPORTED_MOE",
           "SUPPORTED_ATTENTION", "SUPPORTED_NORMS", "REFUSED_MOE"]

logger = logging.getLogger("moe_kernels")

# HF block class -> family (as the README's table names it)
SUPPORTED_MOE = {
    "DeepseekV3MoE": "DeepSeek-V3", "Glm4MoeMoE": "GLM-4.5 (GLM4-MoE)", "DeepseekV2Moe": "DeepSeek-V2",
    "MixtralSparseMoeBlock": "Mixtral", "Qwen3MoeSparseMoeBlock": "Qwen3-MoE", "OlmoeSparseMoeBlock": "OLMoE",
    "Qwen2MoeSparseMoeBlock": "Qwen2-MoE", "Llama4TextMoe": "Llama 4", "PhimoeSparseMoeBlock": "PhiMoE",
}
# blocks whose code (block, router, experts, shared expert) is, up to class names, that of a supported one: found by
# comparing transformers 5.25's sources (the model files copy it through transformers' modular system)
CLONES = {
    "Dots1MoE": "DeepseekV3MoE", "KimiLinearMoE": "DeepseekV3MoE", "ExaoneMoeSparseMoEBlock": "DeepseekV3MoE",
    "MiniCPM5MoeMoE": "DeepseekV3MoE", "Dots3NoteTextMoE": "Glm4MoeMoE",
    "MiMoV2FlashMoE": "DeepseekV3MoE",  # its router and experts; no shared expert
    "Glm4MoeLiteMoE": "Glm4MoeMoE", "Glm4vMoeTextMoE": "Glm4MoeMoE", "DeepseekV32MoE": "Glm4MoeMoE",
    "GlmMoeDsaMoE": "Glm4MoeMoE", "SolarOpenMoE": "Glm4MoeMoE",
    "DeepseekOcr2TextMoe": "DeepseekV2Moe", "UnlimitedOcrTextMoe": "DeepseekV2Moe",
    "FlexOlmoSparseMoeBlock": "OlmoeSparseMoeBlock", "MellumSparseMoeBlock": "Qwen3MoeSparseMoeBlock",
    "MiniMaxSparseMoeBlock": "MixtralSparseMoeBlock",
    "Qwen3NextSparseMoeBlock": "Qwen2MoeSparseMoeBlock", "Qwen4ExpTextSparseMoeBlock": "Qwen2MoeSparseMoeBlock",
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": "Qwen3MoeSparseMoeBlock",
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": "Qwen2MoeSparseMoeBlock",
    # the same but for a routing constant (_ROUTING_OVERRIDES)
    "Qwen3_5MoeSparseMoeBlock": "Qwen2MoeSparseMoeBlock", "Qwen3VLMoeTextSparseMoeBlock": "Qwen3MoeSparseMoeBlock",
}
# routers that always renormalise their top-k weights (no norm_topk_prob flag)
_ROUTING_OVERRIDES = {"Qwen3_5MoeSparseMoeBlock": dict(norm_topk_prob=True),
                      "Qwen3VLMoeTextSparseMoeBlock": dict(norm_topk_prob=True),
                      "MistralLarge4TextMoE": dict(norm_topk_prob=True)}
SUPPORTED_MOE.update({clone: f"{SUPPORTED_MOE[base]}-like ({clone})" for clone, base in CLONES.items()})
SUPPORTED_MOE.update({"MiniMaxM2SparseMoeBlock": "MiniMax-M2", "Mistral4MoE": "Mistral 4",
                      "MistralLarge4TextMoE": "Mistral Large 4", "HunYuanMoEV1Moe": "Hunyuan-A13B (HunYuan-MoE-V1)"})
_SOFTMAX_GROUPED = ("Mistral4MoE", "MistralLarge4TextMoE")
SUPPORTED_ATTENTION = {"DeepseekV3Attention": "DeepSeek-V3 MLA", "DeepseekV2Attention": "DeepSeek-V2 MLA",
                       # DeepseekV3Attention's code under other names
                       "Glm4MoeLiteAttention": "DeepSeek-V3 MLA (GLM-4.5 Lite)",
                       "YoutuAttention": "DeepSeek-V3 MLA (Youtu)"}
REFUSED_MOE = {
    "GptOssMLP": "GPT-OSS experts are not a plain SwiGLU: biased projections, interleaved gate/up columns, "
                 "gate and up clamped to swiglu_limit, gate * sigmoid(alpha * gate) * (up + 1); the kernels compute "
                 "silu(x W1) * (x W3) W2 without bias or clamp",
}
# transformers' RMSNorm classes (of the supported families) that compute LlamaRMSNorm's formula, by reading
# transformers 5.25's sources: all but Llama 4's have its forward up to the class name; Llama 4's writes it as
# `_norm(x.float()).type_as(x) * weight` (tests/test_norm.py checks every one bit for bit against the formula).
# Any other class whose forward is LlamaRMSNorm's up to its name is taken too (_computes_llama_rms_norm).
SUPPORTED_NORMS = {
    "LlamaRMSNorm": "Llama", "DeepseekV3RMSNorm": "DeepSeek-V3", "DeepseekV2RMSNorm": "DeepSeek-V2",
    "Glm4MoeRMSNorm": "GLM-4.5", "Glm4MoeLiteRMSNorm": "GLM-4.5 Lite", "MixtralRMSNorm": "Mixtral",
    "Qwen3MoeRMSNorm": "Qwen3-MoE", "Qwen2MoeRMSNorm": "Qwen2-MoE", "OlmoeRMSNorm": "OLMoE",
    "MiniMaxM2RMSNorm": "MiniMax-M2", "Mistral4RMSNorm": "Mistral 4", "MistralLarge4RMSNorm": "Mistral Large 4",
    "HunYuanMoEV1RMSNorm": "Hunyuan-A13B", "Llama4TextRMSNorm": "Llama 4",
}
_SOFTMAX_TOPK = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock",
                 "HunYuanMoEV1Moe")
_SIGMOID_GROUPED = ("DeepseekV3MoE", "Glm4MoeMoE")


class UnsupportedModule(TypeError):
    """A HF module that looks like an MoE block (or MLA) but cannot be swapped; the message says why."""


def _linear_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, weight_scale_inv or None) of a Linear-like module."""
    if getattr(m, "bias", None) is not None:
        raise UnsupportedModule(f"{type(m).__name__} has a bias; the expert kernels have none")
    w = m.weight.detach()
    s = getattr(m, "weight_scale_inv", None)
    return w, (s.detach() if s is not None else None)


def _mlp_weights(mlp: nn.Module):
    """One SwiGLU MLP -> (w13 [2I, H], w2 [H, I], w13_scale, w2_scale)."""
    names = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")]
    for g, u, d in names:
        if hasattr(mlp, g):
            (wg, sg), (wu, su), (wd, sd) = (_linear_weight(getattr(mlp, n)) for n in (g, u, d))
            s13 = torch.cat([sg, su], 0) if sg is not None else None
            return torch.cat([wg, wu], 0), wd, s13, sd
    raise UnsupportedModule(f"unsupported MLP {type(mlp).__name__}: expected gate_proj/up_proj/down_proj or w1/w3/w2")


def _expert_weights(experts: nn.Module, transposed: bool = False):
    """All routed experts -> (w13 [E, 2I, H], w2 [E, H, I], w13_scale | None, w2_scale | None).

    ``transposed``: the fused parameters are stored [E, H, 2I] / [E, I, H] (Llama 4)."""
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: fused 3-D parameters
        if getattr(experts, "gate_up_proj_bias", None) is not None or getattr(experts, "down_proj_bias", None) \
                is not None:
            raise UnsupportedModule("the experts' projections have biases; the expert kernels have none")
        w13, w2 = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if transposed:
            if w13.dtype == FP8_DTYPE:
                raise UnsupportedModule("FP8 weights in the transposed expert layout are not supported")
            return w13.transpose(1, 2), w2.transpose(1, 2), None, None
        s13 = getattr(experts, "gate_up_proj_scale_inv", None)
        s2 = getattr(experts, "down_proj_scale_inv", None)
        return w13, w2, s13, s2
    per = [_mlp_weights(e) for e in experts]
    w13, w2, s13, s2 = zip(*per)
    stack = lambda ts: torch.stack(ts) if ts[0] is not None else None  # noqa: E731
    return torch.stack(w13), torch.stack(w2), stack(s13), stack(s2)


_PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)


def _is_silu(act) -> bool:
    """Whether the callable computes x * sigmoid(x) (checked on values, so any class or function HF uses)."""
    try:
        y = act(_PROBE)
    except Exception:  # noqa: BLE001 (anything that cannot even run on a tensor is not SiLU)
        return False
    return isinstance(y, torch.Tensor) and y.shape == _PROBE.shape and torch.allclose(y, F.silu(_PROBE),
                                                                                        rtol=1e-6, atol=1e-9)


def _activations(module: nn.Module):
    """(where, activation callable) of every expert MLP in an HF MoE block."""
    found = []
    for where in ("experts", "shared_experts", "shared_expert", "shared_mlp"):
        sub = getattr(module, where, None)
        if sub is None:
            continue
        subs = list(sub) if isinstance(sub, nn.ModuleList) else [sub]
        for i, m in enumerate(subs):
            for attr in ("act_fn", "activation_fn", "act"):
                act = getattr(m, attr, None)
                if act is not None:
                    found.append((f"{where}[{i}]" if len(subs) > 1 else where, act))
                    break
    return found


def _activation_name(act) -> str:
    """transformers' name of an activation (its ``hidden_act``: "gelu", "relu"...), else its class name."""
    try:
        from transformers.activations import ACT2CLS  # noqa: PLC0415
    except ImportError:
        ACT2CLS = {}  # noqa: N806
    for name, entry in ACT2CLS.items():
        if type(act) is (entry[0] if isinstance(entry, tuple) else entry):
            return name
    return getattr(act, "__name__", type(act).__name__)


def _check_activation(module: nn.Module) -> None:
    """Refuse a block whose experts' activation is not SiLU, naming the activation."""
    cfg = getattr(module, "config", None)
    cfg_act = getattr(cfg, "hidden_act", None)
    acts = _activations(module)
    if not acts:
        if cfg_act in ("silu", "swish"):
            return
        raise UnsupportedModule(f"cannot tell the experts' activation (no act_fn, hidden_act={cfg_act!r}); the "
                                f"kernels compute SwiGLU = silu(gate) * up")
    for where, act in acts:
        if not _is_silu(act):
            name = _activation_name(act)
            raise UnsupportedModule(f"{where} use the activation {name!r} ({type(act).__name__}), not SiLU: the "
                                    f"kernels compute SwiGLU = silu(gate) * up only")


def _pick_precision(precision: str | None, w: torch.Tensor) -> str:
    if precision is not None:
        return precision
    if w.dtype == FP8_DTYPE:
        return "fp8"
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16"}.get(w.dtype, "bf16")


def _router(module: nn.Module) -> tuple[str, nn.Module]:
    for name in ("gate", "router"):
        r = getattr(module, name, None)
        if isinstance(r, nn.Module) and _router_weight(r) is not None:
            return name, r
    raise UnsupportedModule(f"{type(module).__name__} has no router (gate / router with a weight)")


def _router_weight(r: nn.Module) -> torch.Tensor | None:
    """The [E, H] router matrix: the router's ``weight``, or its ``wg`` Linear's (HunYuan)."""
    w = getattr(r, "weight", None)
    if w is None and isinstance(getattr(r, "wg", None), nn.Linear):
        if r.wg.bias is not None:
            raise UnsupportedModule(f"{type(r).__name__}.wg has a bias")
        w = r.wg.weight
    return w


def _attr(objs, *names, default=None):
    """The first of ``names`` found on any of ``objs`` (the router, then the block, then its config)."""
    for o in objs:
        for n in names:
            v = getattr(o, n, None) if o is not None else None
            if v is not None:
                return v
    return default


def _routing(module: nn.Module, gate: nn.Module) -> dict:
    """The routing keyword arguments of MoELayer (and FamilyMoELayer's weights_on_input) for one HF block."""
    kw = _base_routing(module, gate)
    kw.update(_ROUTING_OVERRIDES.get(type(module).__name__, {}))
    return kw


def _base_routing(module: nn.Module, gate: nn.Module) -> dict:
    kind = CLONES.get(type(module).__name__, type(module).__name__)
    src = (gate, module, getattr(module, "config", None))
    top_k = _attr(src, "top_k", "num_experts_per_tok", "moe_topk")
    if kind in _SIGMOID_GROUPED or kind in _SOFTMAX_GROUPED:  # DeepSeek-V3's group rule (best-two sums)
        if getattr(gate, "bias", None) is not None:
            raise UnsupportedModule(f"{kind}'s router has a bias term")
        return dict(top_k=top_k, scoring="sigmoid" if kind in _SIGMOID_GROUPED else "softmax",
                    n_group=_attr(src, "num_group", "n_group", default=1),
                    topk_group=_attr(src, "topk_group", default=1),
                    norm_topk_prob=bool(_attr(src, "norm_topk_prob", default=True)),
                    routed_scaling_factor=float(_attr(src, "routed_scaling_factor", default=1.0)))
    if kind == "DeepseekV2Moe":
        method = _attr(src, "topk_method", default="greedy")
        n_group, topk_group = _attr(src, "num_group", "n_group", default=1), _attr(src, "topk_group", default=1)
        if method == "group_limited_greedy" and n_group and topk_group and 1 < n_group and topk_group < n_group:
            raise UnsupportedModule("DeepSeek-V2's group_limited_greedy routing scores a group by its best expert; "
                                    "the routing kernel scores it by its best two (DeepSeek-V3's rule)")
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModule(f"DeepSeek-V2 topk_method {method!r} is not supported")
        return dict(top_k=top_k, scoring="softmax", norm_topk_prob=False,
                    routed_scaling_factor=float(_attr(src, "routed_scaling_factor", default=1.0)))
    if kind in _SOFTMAX_TOPK:
        always = ("MixtralSparseMoeBlock", "HunYuanMoEV1Moe")
        norm = True if kind in always else bool(_attr(src, "norm_topk_prob", default=False))
        return dict(top_k=top_k, scoring="softmax", norm_topk_prob=norm)
    if kind == "MiniMaxM2SparseMoeBlock":  # sigmoid, selection biased by the block's correction bias, renormalised
        return dict(top_k=top_k, scoring="sigmoid", norm_topk_prob=True)
    if kind == "Llama4TextMoe":  # top-k of the logits = top-k of their sigmoid; weights sigmoid(logit), unnormalised
        return dict(top_k=top_k, scoring="sigmoid", norm_topk_prob=False, weights_on_input=True)
    if kind == "PhimoeSparseMoeBlock":
        if getattr(gate, "bias", None) is not None:
            raise UnsupportedModule("PhiMoE's router has a bias term")
        eps = _attr(src, "router_jitter_noise", default=None)
        if eps is None:
            raise UnsupportedModule("PhiMoE's router has no router_jitter_noise (sparsemixer's threshold)")
        # transformers' sparsemixer always picks 2 experts, whatever num_experts_per_tok says
        return dict(top_k=2, scoring="sparsemixer", norm_topk_prob=False, jitter_eps=float(eps))
    if kind in REFUSED_MOE:
        raise UnsupportedModule(REFUSED_MOE[kind])
    raise UnsupportedModule(f"unsupported MoE block {kind}; supported: {', '.join(SUPPORTED_MOE)}")


def _shared(module: nn.Module):
    """(shared MLP module or None, its sigmoid gate Linear or None)."""
    shared = None
    for name in ("shared_experts", "shared_expert", "shared_mlp"):  # DeepSeek / Qwen2 / HunYuan
        shared = getattr(module, name, None) if shared is None else shared
    gate = getattr(module, "shared_expert_gate", None)
    if gate is not None and (getattr(gate, "bias", None) is not None or gate.weight.shape[0] != 1):
        raise UnsupportedModule("shared_expert_gate must be a Linear(H, 1) without bias")
    return shared, gate


@torch.no_grad()
def moe_from_hf(module: nn.Module, precision: str | None = None) -> MoELayer:
    """A MoELayer (or its ``FamilyMoELayer`` variant) with the weights of a HF MoE block.

    ``precision``: "fp8" / "bf16" / "fp32", or None to keep the block's own expert weight dtype (FP8 checkpoint
    weights stay FP8). Raises ``UnsupportedModule`` (a TypeError) naming why a block cannot be taken.
    """
    kind = type(module).__name__
    if kind in REFUSED_MOE:
        raise UnsupportedModule(REFUSED_MOE[kind])
    if kind not in SUPPORTED_MOE:
        raise UnsupportedModule(f"unsupported MoE block {kind}; supported: {', '.join(SUPPORTED_MOE)}")
    _, gate = _router(module)
    kw = _routing(module, gate)
    jitter_eps = kw.pop("jitter_eps", None)  # sparsemixer's threshold: the router's argument, not the layer's
    _check_activation(module)
    router_w = _router_weight(gate).detach()
    E, H = router_w.shape
    w13, w2, s13, s2 = _expert_weights(module.experts, transposed=CLONES.get(kind, kind) == "Llama4TextMoe")
    I = w2.shape[-1]
    precision = _pick_precision(precision, w13)
    shared, shared_gate = _shared(module)
    shared_w = _mlp_weights(shared) if shared is not None else None
    Is = shared_w[1].shape[-1] if shared_w is not None else 0
    dtype = router_w.dtype if router_w.dtype != FP8_DTYPE else torch.bfloat16
    common = dict(hidden_size=H, intermediate_size=I, num_experts=E, precision=precision, device=router_w.device,
                  dtype=dtype)
    if kw.get("weights_on_input") or shared_gate is not None or Is % I:
        layer = FamilyMoELayer(shared_intermediate_size=Is, shared_gate=shared_gate is not None, **common, **kw)
        shared_dst = layer.shared_expert
        if shared_gate is not None:
            layer.shared_expert_gate.weight.copy_(shared_gate.weight)
    else:
        layer = MoELayer(n_shared_experts=Is // I, **common, **kw)
        shared_dst = layer.shared_experts
    if jitter_eps is not None:
        g = layer.gate
        layer.gate = TopKRouter(H, E, g.top_k, g.scoring, norm_topk_prob=g.norm_topk_prob, jitter_eps=jitter_eps,
                                dtype=dtype, device=router_w.device)
    layer.gate.weight.copy_(router_w)
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is None:  # MiniMax-M2 keeps it on the block
        bias = getattr(module, "e_score_correction_bias", None)
    if bias is not None:
        layer.gate.e_score_correction_bias.copy_(bias.float())
    layer.experts.load_weights(w13, w2, s13, s2)
    if shared_w is not None:
        w13s, w2s, s13s, s2s = shared_w
        unsq = lambda t: t.unsqueeze(0) if t is not None else None  # noqa: E731
        shared_dst.load_weights(w13s.unsqueeze(0), w2s.unsqueeze(0), unsq(s13s), unsq(s2s))
    return layer.train(module.training)


def _rope_parameters(config, device):
    """(inv_freq, attention_scaling) as the HF model's rotary embedding computes them (yarn included)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        from ..reference.mla import default_inv_freq  # noqa: PLC0415

        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return default_inv_freq(config.qk_rope_head_dim, theta).to(device), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
    return inv_freq.float(), float(scaling)


def _activation_dtype(module: nn.Module, weights: list[torch.Tensor]) -> torch.dtype:
    """The dtype an attention with (some) FP8 projection weights computes in: a float weight's (the layernorms'),
    else the model config's torch_dtype, else bf16."""
    for w in weights:
        if w.dtype != FP8_DTYPE and w.is_floating_point():
            return w.dtype
    cfg_dtype = getattr(module.config, "torch_dtype", None) or getattr(module.config, "dtype", None)
    return cfg_dtype if isinstance(cfg_dtype, torch.dtype) and cfg_dtype != FP8_DTYPE else torch.bfloat16


@torch.no_grad()
def mla_from_hf(module: nn.Module, weight_dtype: str | None = None,
                kv_cache_dtype: str = "auto") -> MultiHeadLatentAttention:
    """A MultiHeadLatentAttention with the weights of a HF ``DeepseekV3Attention`` / ``DeepseekV2Attention``.
    DeepSeek-V2's interleaved (complex) RoPE is the rope_interleave=True layout (q.k is the same).

    ``weight_dtype``: None keeps the checkpoint's: FP8 projections (e4m3 ``weight`` with ``weight_scale_inv``
    128x128 block scales, DeepSeek-V3's checkpoints) become ``FP8Linear`` over the same tensors, float ones stay
    float; "fp8" also quantises float projections; "auto" dequantises FP8 ones to the activation dtype.
    ``kv_b_proj`` is always held in the activation dtype (an FP8 one is dequantised).
    ``kv_cache_dtype``: "auto" caches the latent rows in the activation dtype, "fp8" as the FP8 latent cache (e4m3
    with one scale per token, 656 bytes a DeepSeek-V3 row instead of 1152; docs/numerics.md), in the module's own
    ``MLACache`` and, through ``HFMLAAttention``, in HF's cache under ``generate``."""
    kind = type(module).__name__
    if kind not in SUPPORTED_ATTENTION:
        raise UnsupportedModule(f"unsupported attention {kind}; supported: {', '.join(SUPPORTED_ATTENTION)}")
    if weight_dtype not in (None, "auto", "fp8"):
        raise ValueError(f"weight_dtype must be None, 'auto' or 'fp8', got {weight_dtype!r}")
    cfg = module.config
    if getattr(module.kv_a_proj_with_mqa, "bias", None) is not None:
        raise UnsupportedModule("MLA with attention_bias=True is not supported")
    names = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    names += ["q_proj"] if module.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
    weights = {n: _linear_weight(getattr(module, n)) for n in names}
    for n, (w, s) in weights.items():
        if w.dtype == FP8_DTYPE and s is None:
            raise UnsupportedModule(f"{n} has e4m3 weights without block scales (weight_scale_inv)")
        if s is not None and (s.dim() != 2 or tuple(s.shape) != (-(-w.shape[0] // 128), -(-w.shape[1] // 128))):
            raise UnsupportedModule(f"{n}.weight_scale_inv has shape {list(s.shape)}; only 128x128 block scales of "
                                    f"a {list(w.shape)} weight ({[-(-w.shape[0] // 128), -(-w.shape[1] // 128)]}) "
                                    f"are supported")
    dtype = _activation_dtype(module, [module.kv_a_layernorm.weight] + [w for w, _ in weights.values()])
    ref = module.kv_a_layernorm.weight
    mla = MultiHeadLatentAttention(
        hidden_size=cfg.hidden_size, num_heads=module.num_heads, q_lora_rank=module.q_lora_rank,
        kv_lora_rank=module.kv_lora_rank, qk_nope_head_dim=module.qk_nope_head_dim,
        qk_rope_head_dim=module.qk_rope_head_dim, v_head_dim=module.v_head_dim,
        rope_interleave=bool(getattr(cfg, "rope_interleave", True)),
        rms_norm_eps=module.kv_a_layernorm.variance_epsilon,
        softmax_scale=module.scaling, kv_cache_dtype=kv_cache_dtype, device=ref.device, dtype=dtype,
    )
    norms = ["kv_a_layernorm"] + ([] if module.q_lora_rank is None else ["q_a_layernorm"])
    for n in norms:
        getattr(mla, n).weight.copy_(getattr(module, n).weight)
    any_fp8 = any(s is not None for _, s in weights.values())
    keep_fp8 = weight_dtype == "fp8" or (weight_dtype is None and any_fp8)
    if keep_fp8:
        mla._check_fp8_widths()
    for n, (w, s) in weights.items():
        if s is not None and keep_fp8 and n != "kv_b_proj":
            setattr(mla, n, FP8Linear.from_fp8(w, s))  # the checkpoint's tensors, not copies
            continue
        dense = dequantize_weight_fp8(w, s.float()) if s is not None else w
        getattr(mla, n).weight.copy_(dense)
    if keep_fp8:
        mla.quantize_weights_()  # the float projections left (a mixed or a float checkpoint)
    inv_freq, scaling = _rope_parameters(cfg, ref.device)
    mla.inv_freq = inv_freq
    mla.attention_scaling = scaling
    return mla.train(module.training)


register_converter(MoELayer, "hf", moe_from_hf)
register_converter(MultiHeadLatentAttention, "hf", mla_from_hf)


class HFMLAAttention(nn.Module):
    """Adapter with DeepseekV3Attention's / DeepseekV2Attention's call signature around a MultiHeadLatentAttention.

    Takes the model's position embeddings (DeepSeek-V3's (cos, sin), each [B, S, rope] = cat(freqs, freqs), or
    DeepSeek-V2's complex freqs_cis [B, S, rope/2]), its attention mask and its cache object, so that ``generate``
    works unchanged; returns ``(output, None)`` as HF attention modules do.
    """

    def __init__(self, mla: MultiHeadLatentAttention, layer_idx: int):
        super().__init__()
        self.mla = mla
        self.layer_idx = layer_idx

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        m = self.mla
        # transformers renamed the cache argument `past_key_values` -> `cache` (5.2x); take either
        past_key_values = cache if cache is not None else past_key_values
        if position_embeddings is None:
            raise ValueError("HFMLAAttention needs the model's position_embeddings")
        if isinstance(position_embeddings, torch.Tensor) and position_embeddings.is_complex():  # DeepSeek-V2
            cos, sin = position_embeddings.real.float(), position_embeddings.imag.float()
        else:
            cos, sin = position_embeddings
            half = m.qk_rope_head_dim // 2
            cos, sin = cos[..., :half].float(), sin[..., :half].float()  # HF's are cat(freqs, freqs)
        update = None
        if past_key_values is not None:
            def update(rows):
                # HF's cache keeps [B, 1, L, d] keys and values per layer: the latent cache rows (MLA's one shared
                # "head", as MultiHeadLatentAttention.encode_rows makes them: bf16 or packed FP8) are the keys, the
                # values are empty. A DynamicLayer concatenates, so the rows come back contiguous.
                keys, _ = past_key_values.update(rows.unsqueeze(1), rows.new_empty(*rows.shape[:2], 0).unsqueeze(1),
                                                 self.layer_idx)
                return keys.squeeze(1)
        S = hidden_states.shape[1]
        decode = (S <= DECODE_MAX_TOKENS and past_key_values is not None and _latent_decode_on()
                  and _grows_by_concatenation(past_key_values, self.layer_idx) and _plain_causal(attention_mask, S))
        return m.attention(hidden_states, cos, sin, mask=attention_mask, update=update, decode=decode), None


# id(mask) -> (a weak reference to it, its version counter, the verdict); ids are checked against the reference
# (a tensor's == is elementwise, so tensors cannot be dictionary keys themselves)
_MASK_VERDICTS: dict = {}


def _latent_decode_on() -> bool:
    """$MOE_KERNELS_HF_LATENT_DECODE: unset or 1, HFMLAAttention decodes over the latent rows where it can; 0, every
    step takes the masked attention path over the expanded keys (as before the eleventh session: for A/B timing)."""
    return os.environ.get("MOE_KERNELS_HF_LATENT_DECODE", "1").strip() != "0"


def _plain_causal(mask, S: int) -> bool:
    """Whether HF's attention mask (None, or 4-D [B, 1, S, L] bool keep-mask / additive float) is the plain causal
    one of S new tokens after L - S cached keys: token s sees keys 0 .. L - S + s, no padding hidden (for S = 1:
    every key). A tensor costs one host sync; the model passes the same mask object to all its layers, so the
    verdict is kept per mask (and its version counter) and the sync happens once a step."""
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != S:
        return False
    seen = _MASK_VERDICTS.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == mask._version:
        return seen[2]
    L = mask.shape[-1]
    keep = mask if mask.dtype == torch.bool else mask == 0
    pos = torch.arange(L, device=mask.device)
    want = pos[None, :] <= (L - S + torch.arange(S, device=mask.device))[:, None]  # [S, L]
    verdict = L >= S and bool((keep == want).all())
    if len(_MASK_VERDICTS) > 64:  # the masks of steps gone
        _MASK_VERDICTS.clear()
    _MASK_VERDICTS[id(mask)] = (weakref.ref(mask), mask._version, verdict)
    return verdict


def _grows_by_concatenation(cache, layer_idx: int) -> bool:
    """Whether the HF cache's layer returns exactly the keys seen so far (a ``DynamicLayer``: concatenation), as the
    absorbed decode over its rows needs. Static, sliding-window, offloaded or quantised layers return more, fewer
    or transformed keys: their steps take the masked attention path."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return False
    return type(layers[layer_idx]).__name__ == "DynamicLayer"


def _router_logits_module(router_cls: type, gate) -> nn.Module | None:
    """A module that transformers' output recorder takes for the block's router (an instance of a subclass of
    HF's router class, holding no parameter of its own): its forward returns (router logits [tokens, E],) * 2 from
    our gate's weight, differentiably (the recorders read index 0, Llama 4's index 1), so ``output_router_logits``
    and the load-balancing loss of Mixtral / Qwen-MoE training work on a patched model. None for a router that is a
    plain Linear (transformers < 5)."""
    if router_cls is nn.Linear or not issubclass(router_cls, nn.Module):
        return None

    def forward(self, hidden_states):
        g = self._gate
        dt = torch.promote_types(hidden_states.dtype, g.weight.dtype)  # fp32 routers (DeepSeek) compute in fp32
        logits = F.linear(hidden_states.reshape(-1, g.hidden_size).to(dt), g.weight.to(dt))
        return logits, logits

    # what HF code reads off its router (its _init_weights, router statistics) is our gate's, not a copy
    views = {"weight": property(lambda self: self._gate.weight),
             "e_score_correction_bias": property(lambda self: self._gate.e_score_correction_bias),
             "top_k": property(lambda self: self._gate.top_k),
             "num_experts": property(lambda self: self._gate.num_experts),
             "hidden_dim": property(lambda self: self._gate.hidden_size)}
    if issubclass(router_cls, nn.Linear):  # Llama 4's router: HF's Linear init reads .bias
        views["bias"] = property(lambda self: None)
    cls = type(f"{router_cls.__name__}Logits", (router_cls,), {"forward": forward, "__module__": __name__, **views})
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    object.__setattr__(m, "_gate", gate)  # not a submodule: the gate's weight stays under moe.gate only
    return m


class HFMoEBlock(nn.Module):
    """Adapter: a MoELayer where HF calls its MoE block (same input, same output).

    ``router_cls``: the HF block's router class, kept under its HF name ``router_name`` ("gate" or "router").
    transformers records router logits (``output_router_logits``, the auxiliary load-balancing loss) by hooking
    modules of that class, so the adapter keeps one and runs it when such a hook is installed: one extra
    [tokens, E] GEMM, differentiable into our gate's weight. ``returns_logits``: the HF block returns
    ``(output, router_logits)`` (Llama 4), so this adapter does too. ``jitter_noise``: in training the input is
    scaled by U(1 - j, 1 + j), drawn ``jitter_draws`` times (Mixtral's block draws once; PhiMoE's block and then
    its router each draw once, both scaling the experts' input too), from the generator as HF's block does.
    """

    def __init__(self, moe: MoELayer, router_cls: type | None = None, router_name: str = "gate",
                 returns_logits: bool = False, jitter_noise: float = 0.0, jitter_draws: int = 1):
        super().__init__()
        self.moe = moe
        self.router_name = router_name
        self.returns_logits = returns_logits
        self.jitter_noise = float(jitter_noise)  # Mixtral-style: x *= U(1 - j, 1 + j) in training
        self.jitter_draws = int(jitter_draws)
        router = _router_logits_module(router_cls, moe.gate) if router_cls is not None else None
        setattr(self, router_name, router)

    def forward(self, hidden_states):
        if self.training and self.jitter_noise > 0:  # as HF's block does in training (its own random draws)
            j = self.jitter_noise
            for _ in range(self.jitter_draws):
                hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - j, 1.0 + j)
        router = getattr(self, self.router_name)
        logits = None
        if router is not None and (router._forward_hooks or self.returns_logits):
            logits = router(hidden_states)[0]  # for transformers' recorder; the layer routes with its own kernel
        out = self.moe(hidden_states)
        return (out, logits) if self.returns_logits else out


class Swap(NamedTuple):
    name: str  # the module's path in the model
    kind: str  # its HF class
    family: str


class Skip(NamedTuple):
    name: str
    kind: str
    reason: str


class PatchReport(int):
    """What ``patch_model`` did. An ``int`` (the number of modules swapped), so ``n = patch_model(model)``,
    ``assert patch_model(model) == 5`` and arithmetic keep working for callers that used the count; it also carries
    ``swapped`` (a list of ``Swap(name, kind, family)``) and ``skipped`` (``Skip(name, kind, reason)`` for every
    MoE- or MLA-looking module left as it was). ``str(report)`` is a readable summary (the norms one line a class)."""

    swapped: list
    skipped: list

    def __new__(cls, swapped: list, skipped: list):
        obj = super().__new__(cls, len(swapped))
        obj.swapped, obj.skipped = list(swapped), list(skipped)
        return obj

    def __reduce__(self):  # copy / pickle
        return (PatchReport, (self.swapped, self.skipped))

    def __repr__(self) -> str:
        return f"PatchReport(swapped={len(self.swapped)}, skipped={len(self.skipped)})"

    def __str__(self) -> str:
        lines = [f"patch_model: swapped {len(self.swapped)}, skipped {len(self.skipped)}"]
        lines += [f"  swapped {s.name or '<model>'} ({s.kind}, {s.family})" for s in self.swapped
                  if s.family != "RMSNorm"]
        norm_kinds = [s.kind for s in self.swapped if s.family == "RMSNorm"]
        lines += [f"  swapped {norm_kinds.count(k)} {k} (RMSNorm)" for k in sorted(set(norm_kinds))]
        lines += [f"  skipped {s.name or '<model>'} ({s.kind}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _looks_like_moe(mod: nn.Module) -> bool:
    experts = getattr(mod, "experts", None)
    return isinstance(experts, nn.Module) and any(isinstance(getattr(mod, n, None), nn.Module)
                                                  for n in ("gate", "router"))


def _looks_like_mla(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "kv_a_proj_with_mqa", None), nn.Module) and hasattr(mod, "kv_b_proj")


@functools.lru_cache(maxsize=None)
def _forward_code(cls: type) -> str | None:
    """``cls.forward``'s syntax tree as text, with the name of the class that defines it replaced: comments,
    docstring and layout do not count. None where the source cannot be read."""
    fn = getattr(cls, "forward", None)
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        owner = fn.__qualname__.split(".")[-2]  # "LlamaRMSNorm.forward" -> "LlamaRMSNorm"
        tree = ast.parse(re.sub(rf"\b{re.escape(owner)}\b", "_", src)).body[0]
    except (OSError, TypeError, IndexError, AttributeError, SyntaxError):
        return None
    if not isinstance(tree, ast.FunctionDef):
        return None
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        tree.body = tree.body[1:]  # the docstring
    return ast.dump(tree)


@functools.lru_cache(maxsize=None)
def _computes_llama_rms_norm(cls: type) -> bool:
    """Whether ``cls.forward`` is transformers' ``LlamaRMSNorm.forward`` up to the class name (the model files copy
    it through transformers' modular system, and remote code often does too)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: PLC0415
    except ImportError:
        return False
    code = _forward_code(cls)
    return code is not None and code == _forward_code(LlamaRMSNorm)


def _is_llama_rms_norm(mod: nn.Module) -> bool:
    """A norm that patch_model swaps for our RMSNorm: a 1-D weight Parameter and a numeric ``variance_epsilon``,
    the forward of its class (not one wrapped on the instance, as accelerate's offloading hooks do), and a class
    of transformers' own in SUPPORTED_NORMS or one whose forward is LlamaRMSNorm's. Gemma's (1 + weight), Olmo 2's
    and GPT-OSS's (the weight product in fp32, then one rounding), ... compute something else and stay."""
    weight, eps = getattr(mod, "weight", None), getattr(mod, "variance_epsilon", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return False
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or "forward" in vars(mod):
        return False
    cls = type(mod)
    if cls.__name__ in SUPPORTED_NORMS and cls.__module__.startswith("transformers."):
        return True
    return _computes_llama_rms_norm(cls)


def _convert(mod: nn.Module, kind: str, precision: str | None, attention_precision: str | None = None,
             kv_cache_dtype: str = "auto") -> nn.Module:
    if kind in SUPPORTED_ATTENTION:
        return HFMLAAttention(mla_from_hf(mod, attention_precision, kv_cache_dtype),
                              mod.layer_idx).train(mod.training)
    name, router = _router(mod)
    if kind == "PhimoeSparseMoeBlock":  # the block's input jitter, then its router's (the same tensor, in place)
        jitter = dict(jitter_noise=getattr(mod, "input_jitter_noise", 0.0) or 0.0, jitter_draws=2)
    else:
        jitter = dict(jitter_noise=getattr(mod, "jitter_noise", 0.0) or 0.0)
    block = HFMoEBlock(moe_from_hf(mod, precision), type(router), name,
                       returns_logits=CLONES.get(kind, kind) == "Llama4TextMoe", **jitter)
    return block.train(mod.training)  # an eval model's adapter must not jitter its input


def patch_model(model: nn.Module, precision: str | None = "fp8", attention: bool = True,
                strict: bool = False, norms: bool = True, attention_precision: str | None = None,
                kv_cache_dtype: str = "auto") -> PatchReport:
    """Swap every supported MoE block (and, with ``attention``, every MLA attention; with ``norms``, every
    Llama-style RMSNorm) in place.

    ``precision``: "fp8" (block-scaled e4m3 experts), "bf16"/"fp32", or None to keep each block's weight dtype.
    ``attention_precision``: the MLA projections' weights: None keeps the checkpoint's (DeepSeek-V3's FP8 ones
    stay e4m3 with their block scales, float ones stay float), "fp8" quantises float ones to block-scaled e4m3
    too (DeepSeek-V3's inference recipe; ``MultiHeadLatentAttention(weight_dtype="fp8")``), "auto" dequantises
    FP8 ones to the model's dtype.
    ``kv_cache_dtype``: the MLA attentions' latent cache: "auto" in the model's dtype, "fp8" as the FP8 latent cache
    (1.76x the tokens in the same memory; ``mla_from_hf``). Under ``generate`` the rows live in HF's cache
    object; a step of up to ``DECODE_MAX_TOKENS`` tokens over a ``DynamicCache`` with the plain causal mask (no
    padding) runs the absorbed latent decode kernel over them (others the masked attention path).
    ``strict``: raise (``UnsupportedModule``, a TypeError, or the layer's ValueError, naming the module and why) on
    the first MoE- or MLA-looking module that cannot be taken, before anything is swapped; otherwise such modules
    are left as they are and reported.
    ``norms``: RMSNorms whose class is in ``SUPPORTED_NORMS`` or whose forward is transformers' ``LlamaRMSNorm``'s
    become ``moe_kernels.RMSNorm`` (one fused kernel, the same formula and roundings) over the same weight
    Parameter; any other norm is left as it is, unreported. Norms inside a swapped block (MLA's q_a_layernorm /
    kv_a_layernorm) are that block's.

    Returns a ``PatchReport``: an int (how many modules were swapped, norms included) with ``.swapped`` /
    ``.skipped`` lists (a norm's family is "RMSNorm"). Each block swap is logged at INFO, the norms in one line,
    and each skip at WARNING on the "moe_kernels" logger (Python prints warnings to stderr when logging is not
    configured).
    """
    if attention_precision not in (None, "auto", "fp8"):
        raise ValueError(f"attention_precision must be None, 'auto' or 'fp8', got {attention_precision!r}")
    if kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
    swaps, swapped, skipped = [], [], []
    taken: list[str] = []  # modules swapped or skipped: their submodules are theirs
    for name, mod in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        kind = type(mod).__name__
        if isinstance(mod, (HFMoEBlock, HFMLAAttention, MoELayer, MultiHeadLatentAttention, RMSNorm)):
            taken.append(name)  # ours already (a model patched before): nothing to do
            continue
        if norms and name and _is_llama_rms_norm(mod):
            swaps.append((name, RMSNorm.from_module(mod)))
            swapped.append(Swap(name, kind, "RMSNorm"))
            continue
        is_attn = kind in SUPPORTED_ATTENTION or _looks_like_mla(mod)
        if not (kind in SUPPORTED_MOE or kind in REFUSED_MOE or _looks_like_moe(mod) or is_attn):
            continue
        if is_attn and not attention:
            continue
        taken.append(name)
        try:
            if not name:
                raise UnsupportedModule("the model itself is the block: patch the model that holds it, or build the "
                                        "layer with MoELayer.from_hf / MultiHeadLatentAttention.from_hf")
            if kind not in SUPPORTED_MOE and kind not in SUPPORTED_ATTENTION:
                if kind in REFUSED_MOE:
                    raise UnsupportedModule(REFUSED_MOE[kind])
                what = "MLA attention" if is_attn else "MoE block"
                raise UnsupportedModule(f"{what} {kind} is not a supported family (supported: "
                                        f"{', '.join(SUPPORTED_ATTENTION if is_attn else SUPPORTED_MOE)})")
            new = _convert(mod, kind, precision, attention_precision, kv_cache_dtype)
        except (TypeError, ValueError) as e:
            if strict:
                raise type(e)(f"patch_model(strict=True): cannot swap {name or '<model>'} ({kind}): {e}") from e
            skipped.append(Skip(name, kind, str(e)))
            logger.warning("moe_kernels.patch_model: left %s (%s) as it is: %s", name or "<model>", kind, e)
            continue
        family = SUPPORTED_MOE.get(kind) or SUPPORTED_ATTENTION[kind]
        swaps.append((name, new))
        swapped.append(Swap(name, kind, family))
        logger.info("moe_kernels.patch_model: swapped %s (%s, %s)", name or "<model>", kind, family)
    n_norms = sum(s.family == "RMSNorm" for s in swapped)
    if n_norms:
        logger.info("moe_kernels.patch_model: swapped %d RMSNorm modules (%s)", n_norms,
                    ", ".join(sorted({s.kind for s in swapped if s.family == "RMSNorm"})))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return PatchReport(swapped, skipped)
