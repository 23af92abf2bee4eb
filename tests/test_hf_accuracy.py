"""Accuracy at scale, judged against fp32 (GPU): a DeepSeek-V3-shaped model (hidden 7168, MLA with DeepSeek-V3's
head dimensions, 8 groups / top-8 routing, shared expert) at reduced depth and width of the expert pool, random
weights (HF's own initialisation), in bf16.

The reference is the same model in fp32 (HF eager). HF's bf16 eager model and our patched bf16 model are both
compared with it; ours must be within 1.25x HF's error, for the prefill logits and for decode steps through the
KV cache (our absorbed MLA decode). The patched FP8 model's error is measured and stated (bounded loosely, to catch
a broken path). With ``OUT`` set, the numbers are also written to ``$OUT/hf_accuracy.json``.
"""
import copy
import datetime
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache  # noqa: E402

import moe_kernels as mk  # noqa: E402
from _helpers import rel_err  # noqa: E402

RATIO = 1.25  # ours / HF's error against fp32, at most
FP8_BOUND = 0.25  # a broken FP8 path is O(1); measured values are reported


def _config(small: bool = False):
    dims = dict(
        vocab_size=4096, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=32,
        num_experts_per_tok=8, n_group=8, topk_group=4, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    )
    if small:  # the same script at toy sizes (CPU, so that a script error shows in CI)
        dims = dict(vocab_size=97, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
                    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, num_attention_heads=4,
                    num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=16)
    cfg = DeepseekV3Config(n_shared_experts=1, routed_scaling_factor=2.5, num_hidden_layers=2 if small else 3,
                           first_k_dense_replace=1, max_position_embeddings=4096, **dims)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def _logits(model, ids, n_prompt):
    """(prefill logits [B, n_prompt, V], decode-step logits [B, steps, V]) in fp32: one prefill, then one token at
    a time through the model's cache, teacher-forced on ids."""
    cache = DynamicCache()
    out = model(ids[:, :n_prompt], past_key_values=cache, use_cache=True)
    prefill = out.logits.float()
    steps = []
    for t in range(n_prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits[:, -1].float())
    return prefill, torch.stack(steps, 1)


def _bf16_copy(model):
    """The model in bf16 as a checkpoint loads it: routers (gate weight, correction bias) kept in fp32."""
    m = copy.deepcopy(model).to(torch.bfloat16)
    for name, mod in m.named_modules():
        if name.endswith("mlp.gate"):
            mod.float().load_state_dict(model.get_submodule(name).state_dict())
    return m


@torch.no_grad()
def _errors(device: str, small: bool) -> dict:
    """{what: (prefill, decode) relative error of the logits against the fp32 model}."""
    torch.manual_seed(0)
    cfg = _config(small)
    with torch.device(device):
        fp32 = DeepseekV3ForCausalLM(cfg).eval()
        for name, b in fp32.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(std=0.01)
    B, n_prompt, n_dec = 2, 48 if not small else 6, 4 if not small else 2
    ids = torch.randint(0, cfg.vocab_size, (B, n_prompt + n_dec), device=device)
    ref_pre, ref_dec = _logits(fp32, ids, n_prompt)

    hf = _bf16_copy(fp32)
    del fp32
    res = {}
    pre, dec = _logits(hf, ids, n_prompt)
    res["hf_bf16_eager"] = (rel_err(pre, ref_pre), rel_err(dec, ref_dec))

    fp8 = copy.deepcopy(hf)
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert mk.patch_model(hf, precision="bf16", attention=False, norms=False) == n_moe  # MoE blocks only
    pre, dec = _logits(hf, ids, n_prompt)
    res["ours_bf16_moe_only"] = (rel_err(pre, ref_pre), rel_err(dec, ref_dec))
    report = mk.patch_model(hf, precision="bf16")  # then the MLA attentions too, and the RMSNorms (the default)
    assert sum(s.family != "RMSNorm" for s in report.swapped) == cfg.num_hidden_layers
    pre, dec = _logits(hf, ids, n_prompt)
    res["ours_bf16"] = (rel_err(pre, ref_pre), rel_err(dec, ref_dec))
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()

    if small:  # the interpreter's FP8 kernels are slow; FP8 layers have their own CPU tests
        return res
    report = mk.patch_model(fp8, precision="fp8")
    assert sum(s.family != "RMSNorm" for s in report.swapped) == n_moe + cfg.num_hidden_layers
    pre, dec = _logits(fp8, ids, n_prompt)
    res["ours_fp8"] = (rel_err(pre, ref_pre), rel_err(dec, ref_dec))
    return res


def _check(res: dict, label: str) -> None:
    for k, (p, d) in res.items():
        print(f"{label} {k:20s} vs fp32: prefill {p:.4e}  decode {d:.4e}")
    hp, hd = res["hf_bf16_eager"]
    op, od = res["ours_bf16"]
    print(f"{label} ratio ours/HF: prefill {op / hp:.3f}  decode {od / hd:.3f} (must be <= {RATIO})")
    assert op <= RATIO * hp, f"patched bf16 prefill error {op:.3e} > {RATIO} x HF bf16's {hp:.3e}"
    assert od <= RATIO * hd, f"patched bf16 decode error {od:.3e} > {RATIO} x HF bf16's {hd:.3e}"
    if "ours_fp8" in res:
        assert max(res["ours_fp8"]) < FP8_BOUND, f"FP8 error {res['ours_fp8']}"


def test_accuracy_script_at_toy_size():
    """The GPU test's script on the CPU at toy sizes (the reference MLA path, fp32 inside our layers)."""
    _check(_errors("cpu", small=True), "toy DeepSeek-V3 (CPU)")


@pytest.mark.gpu
def test_deepseek_v3_shaped_bf16_error_against_fp32():
    res = _errors("cuda", small=False)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "hf_accuracy.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "transformers": transformers.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": "python -m pytest -m gpu tests/test_hf_accuracy.py (OUT set)",
                       "model": "DeepSeek-V3 shape, 3 layers, 32 experts",
                       "rel_err_vs_fp32 (prefill, decode)": res}, f, indent=1)
    _check(res, "DeepSeek-V3-shaped (3 layers, 32 experts, H100/H200)")
