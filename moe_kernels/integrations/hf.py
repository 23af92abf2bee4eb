"""Swapping HuggingFace transformers blocks for moe_kernels modules.

Supported: DeepseekV3MoE, DeepseekV3Attention (DeepSeek-V3 / R1 / Kimi-K2 shaped models), MixtralSparseMoeBlock,
Qwen2MoeSparseMoeBlock/Qwen3MoeSparseMoeBlock when their routers are plain softmax top-k. Weights are read in the
layouts of transformers 5 (fused ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]) and of earlier releases
(a ModuleList of per-expert MLPs with ``gate_proj/up_proj/down_proj`` or Mixtral's ``w1/w3/w2``), and DeepSeek's
FP8 checkpoints (e4m3 ``weight`` with its ``weight_scale_inv``) are taken as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import FP8_DTYPE
from ..modules.mla import MultiHeadLatentAttention
from ..modules.moe import MoELayer

__all__ = ["moe_from_hf", "mla_from_hf", "patch_model", "SUPPORTED_MOE", "SUPPORTED_ATTENTION"]

SUPPORTED_MOE = ("DeepseekV3MoE", "MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
SUPPORTED_ATTENTION = ("DeepseekV3Attention",)


def _linear_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, weight_scale_inv or None) of a Linear-like module."""
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
    raise TypeError(f"unsupported MLP {type(mlp).__name__}: expected gate_proj/up_proj/down_proj or w1/w3/w2")


def _expert_weights(experts: nn.Module):
    """All routed experts -> (w13 [E, 2I, H], w2 [E, H, I], w13_scale | None, w2_scale | None)."""
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: fused 3-D parameters
        s13 = getattr(experts, "gate_up_proj_scale_inv", None)
        s2 = getattr(experts, "down_proj_scale_inv", None)
        return experts.gate_up_proj.detach(), experts.down_proj.detach(), s13, s2
    per = [_mlp_weights(e) for e in experts]
    w13, w2, s13, s2 = zip(*per)
    stack = lambda ts: torch.stack(ts) if ts[0] is not None else None  # noqa: E731
    return torch.stack(w13), torch.stack(w2), stack(s13), stack(s2)


def _pick_precision(precision: str | None, w: torch.Tensor) -> str:
    if precision is not None:
        return precision
    if w.dtype == FP8_DTYPE:
        return "fp8"
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16"}.get(w.dtype, "bf16")


@torch.no_grad()
def moe_from_hf(module: nn.Module, precision: str | None = None) -> MoELayer:
    """MoELayer with the weights of a HF MoE block. precision None keeps the block's own weight dtype."""
    kind = type(module).__name__
    gate = module.gate
    router_w = gate.weight.detach()
    E, H = router_w.shape
    w13, w2, s13, s2 = _expert_weights(module.experts)
    I = w2.shape[-1]
    precision = _pick_precision(precision, w13)
    kw: dict = {}
    if kind == "DeepseekV3MoE":
        cfg = module.config
        kw = dict(
            top_k=cfg.num_experts_per_tok, scoring="sigmoid", n_group=cfg.n_group, topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
        )
    elif kind in SUPPORTED_MOE:
        top_k = getattr(gate, "top_k", None) or getattr(module, "top_k")
        norm = getattr(gate, "norm_topk_prob", getattr(module, "norm_topk_prob", True))
        kw = dict(top_k=top_k, scoring="softmax", norm_topk_prob=norm)
        if getattr(module, "shared_expert_gate", None) is not None:
            raise TypeError(f"{kind} with a gated shared expert is not supported")
    else:
        raise TypeError(f"unsupported MoE block {kind}; supported: {', '.join(SUPPORTED_MOE)}")

    shared = getattr(module, "shared_experts", None)
    n_shared, shared_w = 0, None
    if shared is not None:
        shared_w = _mlp_weights(shared)
        n_shared = shared_w[1].shape[-1] // I
    layer = MoELayer(
        hidden_size=H, intermediate_size=I, num_experts=E, precision=precision, n_shared_experts=n_shared,
        device=router_w.device, dtype=router_w.dtype if router_w.dtype != FP8_DTYPE else torch.bfloat16, **kw,
    )
    layer.gate.weight.copy_(router_w)
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is not None:
        layer.gate.e_score_correction_bias.copy_(bias.float())
    layer.experts.load_weights(w13, w2, s13, s2)
    if shared_w is not None:
        w13s, w2s, s13s, s2s = shared_w
        unsq = lambda t: t.unsqueeze(0) if t is not None else None  # noqa: E731
        layer.shared_experts.load_weights(w13s.unsqueeze(0), w2s.unsqueeze(0), unsq(s13s), unsq(s2s))
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


@torch.no_grad()
def mla_from_hf(module: nn.Module) -> MultiHeadLatentAttention:
    cfg = module.config
    ref = module.kv_a_proj_with_mqa.weight
    if ref.dtype == FP8_DTYPE:
        raise TypeError("FP8 attention weights are not supported yet: dequantise them first")
    if getattr(module.kv_a_proj_with_mqa, "bias", None) is not None:
        raise TypeError("MLA with attention_bias=True is not supported")
    mla = MultiHeadLatentAttention(
        hidden_size=cfg.hidden_size, num_heads=module.num_heads, q_lora_rank=module.q_lora_rank,
        kv_lora_rank=module.kv_lora_rank, qk_nope_head_dim=module.qk_nope_head_dim,
        qk_rope_head_dim=module.qk_rope_head_dim, v_head_dim=module.v_head_dim,
        rope_interleave=bool(getattr(cfg, "rope_interleave", True)), rms_norm_eps=module.kv_a_layernorm.variance_epsilon,
        softmax_scale=module.scaling, device=ref.device, dtype=ref.dtype,
    )
    names = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
    names += ["q_proj"] if module.q_lora_rank is None else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
    for n in names:
        getattr(mla, n).weight.copy_(getattr(module, n).weight)
    inv_freq, scaling = _rope_parameters(cfg, ref.device)
    mla.inv_freq = inv_freq
    mla.attention_scaling = scaling
    return mla.train(module.training)


class HFMLAAttention(nn.Module):
    """Adapter with DeepseekV3Attention's call signature around a MultiHeadLatentAttention.

    Takes the model's cos/sin (``position_embeddings``), its attention mask and its cache object, so that
    ``generate`` works unchanged; returns ``(output, None)`` as HF attention modules do.
    """

    def __init__(self, mla: MultiHeadLatentAttention, layer_idx: int):
        super().__init__()
        self.mla = mla
        self.layer_idx = layer_idx

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        m = self.mla
        # transformers renamed the cache argument `past_key_values` -> `cache` (5.2x); take either
        past_key_values = cache if cache is not None else past_key_values
        B, S, _ = hidden_states.shape
        cos, sin = position_embeddings
        half = m.qk_rope_head_dim // 2
        cos, sin = cos[..., :half].float(), sin[..., :half].float()  # HF's are cat(freqs, freqs)
        q_nope, q_rope, c_kv, k_rope = m.latents(hidden_states, cos, sin)
        if past_key_values is not None:
            dt = hidden_states.dtype
            c4, k4 = past_key_values.update(c_kv.to(dt).unsqueeze(1), k_rope.to(dt).unsqueeze(1), self.layer_idx)
            c_kv, k_rope = c4.squeeze(1).float(), k4.squeeze(1).float()
        offset = c_kv.shape[1] - S
        out = m.attend(q_nope, q_rope, c_kv, k_rope, offset, hidden_states.dtype, mask=attention_mask)
        return out, None


def _router_logits_module(router_cls: type, gate) -> nn.Module | None:
    """A module that transformers' output recorder takes for the block's router (an instance of a subclass of
    HF's router class, holding no parameter of its own): its forward returns (router logits [tokens, E],) from our
    gate's weight, differentiably, so ``output_router_logits`` and the load-balancing loss of Mixtral / Qwen-MoE
    training work on a patched model. None for a router that is a plain Linear (transformers < 5)."""
    if router_cls is nn.Linear or not issubclass(router_cls, nn.Module):
        return None

    def forward(self, hidden_states):
        g = self._gate
        return (torch.nn.functional.linear(hidden_states.reshape(-1, g.hidden_size), g.weight),)

    # what HF code reads off its router (its _init_weights, router statistics) is our gate's, not a copy
    views = {"weight": property(lambda self: self._gate.weight),
             "e_score_correction_bias": property(lambda self: self._gate.e_score_correction_bias),
             "top_k": property(lambda self: self._gate.top_k),
             "num_experts": property(lambda self: self._gate.num_experts),
             "hidden_dim": property(lambda self: self._gate.hidden_size)}
    cls = type(f"{router_cls.__name__}Logits", (router_cls,), {"forward": forward, "__module__": __name__, **views})
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    object.__setattr__(m, "_gate", gate)  # not a submodule: the gate's weight stays under moe.gate only
    return m


class HFMoEBlock(nn.Module):
    """Adapter: a MoELayer where HF calls its MoE block (same input, same output).

    ``router_cls``: the HF block's router class. transformers records router logits (``output_router_logits``,
    the auxiliary load-balancing loss) by hooking modules of that class, so the adapter keeps one (``gate``) and
    runs it when such a hook is installed: one extra [tokens, E] GEMM, differentiable into our gate's weight.
    """

    def __init__(self, moe: MoELayer, router_cls: type | None = None):
        super().__init__()
        self.moe = moe
        self.gate = _router_logits_module(router_cls, moe.gate) if router_cls is not None else None

    def forward(self, hidden_states):
        if self.gate is not None and self.gate._forward_hooks:
            self.gate(hidden_states)  # for transformers' recorder; the layer routes with its own kernel
        return self.moe(hidden_states)


def patch_model(model: nn.Module, precision: str | None = "fp8", attention: bool = True) -> int:
    """Swap every supported MoE block (and, with ``attention``, every MLA attention) in place; returns how many.

    ``precision``: "fp8" (block-scaled e4m3 experts), "bf16"/"fp32", or None to keep each block's weight dtype.
    """
    swaps = []
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind in SUPPORTED_MOE:
            swaps.append((name, HFMoEBlock(moe_from_hf(mod, precision), type(mod.gate))))
        elif attention and kind in SUPPORTED_ATTENTION:
            swaps.append((name, HFMLAAttention(mla_from_hf(mod), mod.layer_idx)))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return len(swaps)
