"""Whole transformers models, patched and not: prefill and greedy decode time, peak memory, logits error vs fp32.

    PYTHONPATH=. python bench/bench_hf_model.py [--models deepseek,qwen3] [--layers 2] [--experts 64] [--quick]

Models (random weights from the model's own initialisation, seeded):
  * ``deepseek``: DeepSeek-V3-shaped: hidden 7168, MLA (128 heads, q_lora 1536, kv_lora 512, rope 64), every
    layer MoE: ``--experts`` routed experts (default 64: what fits beside an fp32 copy) top-8 with n_group 8,
    topk_group 4, one shared expert, moe_intermediate 2048.
  * ``qwen3``: Qwen3-MoE-30B-A3B-shaped: hidden 2048, 32 query / 4 KV heads of 128, 128 experts top-8,
    moe_intermediate 768.
Variants, one model object each time: ``hf_eager`` and ``hf_grouped_mm`` (transformers' experts implementations),
``ours_bf16`` and ``ours_fp8`` (``mk.patch_model`` on a copy: MoE blocks and, for DeepSeek, MLA attention), and
for DeepSeek ``ours_fp8_attn``: ``ours_fp8`` with the MLA projections in block-scaled FP8 too
(``attention_precision="fp8"``: DeepSeek-V3's own checkpoint format and inference recipe). ``--variants`` picks
some (hf_grouped_mm, the baseline, always runs).

Measured: prefill (1x4096 and 4x1024 tokens; median of ``triton.testing.do_bench``), greedy decode of 16
sequences (a 16-token prompt, then 32 new tokens: (time of 33 tokens - time of 1) / 32 per step, CUDA-synchronised
wall clock, median of 3), peak memory of each variant's runs, and the logits' relative error (Frobenius) against the
fp32 model on a 2x256-token input. ``generate`` runs the model eagerly; value checks are off here (``_common``), so
the patched MoE layers replay their own CUDA graphs at decode sizes (``MoELayer(cuda_graphs=True)``, the default;
``MOE_KERNELS_CUDA_GRAPHS=0`` times them eager). HF's blocks run eagerly, as a user's would. Writes results/hf_model-<device>.json; summary ``prefill_vs_hf_grouped_mm`` and
``decode_vs_hf_grouped_mm`` (ours fp8 on the DeepSeek shape: HF grouped_mm time / ours; prefill at 1x4096), and
the same of ``ours_fp8_attn`` as ``prefill_vs_hf_grouped_mm_fp8_attn`` / ``decode_vs_hf_grouped_mm_fp8_attn``;
``ours_fp8_kv8`` (DeepSeek shape: ``patch_model(kv_cache_dtype="fp8")``, the FP8 latent cache in HF's cache) as
``decode_vs_hf_grouped_mm_fp8_kv8``. ``--decode-prompt N`` decodes after an N-token prompt instead of 16
(results/hf_model-prompt<N>-<device>.json): HF's MLA expands every cached key through kv_b_proj each step, the
patched attention decodes over the latent rows (``HFMLAAttention``).
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, markdown, save  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)

import moe_kernels as mk  # noqa: E402

PREFILL = ((1, 4096), (4, 1024))
DECODE_BATCH, DECODE_PROMPT, DECODE_NEW = 16, 16, 32


# Toy sizes of the same model families (the CPU smoke test in tests/test_bench_smoke.py): every code path, no timing
TINY = dict(deepseek=dict(vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128,
                          qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
            qwen3=dict(vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8))


def build(name: str, layers: int, experts: int, device="cuda", tiny=False):
    import transformers

    if name == "deepseek":
        kw = dict(vocab_size=32000, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                  num_hidden_layers=layers, first_k_dense_replace=0, n_routed_experts=experts, num_experts_per_tok=8,
                  n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5, num_attention_heads=128,
                  num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                  qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=8192)
        cfg_cls, cls = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    else:
        kw = dict(vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                  num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=8192)
        cfg_cls, cls = transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    if tiny:
        kw.update(TINY[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg_cls(**kw))
    return model.eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def set_experts_impl(model, impl: str) -> None:
    for m in [model, *model.modules()]:
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_experts_implementation"):
            c._experts_implementation = impl


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def time_decode(model, prompt, new_tokens=DECODE_NEW, repeats=3):
    def gen(n):
        _sync(prompt.device)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(prompt.device)
        return time.perf_counter() - t0

    if repeats > 1:
        gen(2)  # warm-up: compiles our kernels, allocates the cache
    steps = [(gen(new_tokens + 1) - gen(1)) / new_tokens for _ in range(repeats)]
    return statistics.median(steps) * 1e3


def run_variant(model, variant, name, ids_err, ref, prefill_ids, prompt, new_tokens=DECODE_NEW):
    cuda = ids_err.device.type == "cuda"
    _sync(ids_err.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = dict(model=name, variant=variant)
    with torch.no_grad():
        row["logits_err_vs_fp32"] = rel_err(model(ids_err).logits.float(), ref)
        for (b, s), ids in prefill_ids.items():
            ms = bench_ms(lambda: model(ids), warmup=2, rep=300)
            row[f"prefill_{b}x{s}_ms"] = ms
            row[f"prefill_{b}x{s}_tok_s"] = b * s / ms * 1e3
        ms = time_decode(model, prompt, new_tokens, 3 if new_tokens == DECODE_NEW else 1)
    row["decode_ms_per_step"] = ms
    row["decode_tok_s"] = prompt.shape[0] / ms * 1e3
    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    print(f"  {name} {variant}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)),
          flush=True)
    return row


VARIANTS = ("hf_eager", "hf_grouped_mm", "ours_bf16", "ours_fp8", "ours_fp8_attn", "ours_fp8_kv8")
PATCH = dict(ours_bf16=dict(precision="bf16"), ours_fp8=dict(precision="fp8"),
             ours_fp8_attn=dict(precision="fp8", attention_precision="fp8"),
             ours_fp8_kv8=dict(precision="fp8", kv_cache_dtype="fp8"))
MLA_ONLY = ("ours_fp8_attn", "ours_fp8_kv8")  # the FP8 attention projections and the FP8 latent cache are MLA's


def run_model(name, layers, experts, prefill, device="cuda", tiny=False, variants=VARIANTS,
              decode_prompt=DECODE_PROMPT):
    """Every variant of one model: rows with times, errors and ratios to HF grouped_mm. ``tiny``: toy sizes (a
    smoke run; 2 decode steps of 2 sequences). ``decode_prompt``: the prompt's tokens before the timed decode
    steps (each step of HF's MLA expands every cached key through kv_b_proj; the patched model's decode reads the
    latent rows)."""
    model = build(name, layers, experts, device, tiny)
    vocab = model.config.vocab_size
    ids_err = torch.randint(0, vocab, (2, 16 if tiny else 256), device=device)
    prefill_ids = {(b, s): torch.randint(0, vocab, (b, s), device=device) for b, s in prefill}
    prompt = torch.randint(0, vocab, (2 if tiny else DECODE_BATCH, decode_prompt), device=device)
    new_tokens = 2 if tiny else DECODE_NEW
    with torch.no_grad():
        ref = model(ids_err).logits.float()  # the fp32 model: every variant's error is against it
    model.to(torch.bfloat16)
    rows = []
    for impl in ("eager", "grouped_mm"):
        if f"hf_{impl}" not in variants and impl != "grouped_mm":
            continue
        set_experts_impl(model, impl)
        rows.append(run_variant(model, f"hf_{impl}", name, ids_err, ref, prefill_ids, prompt, new_tokens))
    set_experts_impl(model, "grouped_mm")
    for variant, kw in PATCH.items():
        if variant not in variants or (variant in MLA_ONLY and name != "deepseek"):
            continue
        ours = copy.deepcopy(model)
        report = mk.patch_model(ours, **kw)
        print(f"  patched {int(report)} modules ({variant})", flush=True)
        rows.append(run_variant(ours, variant, name, ids_err, ref, prefill_ids, prompt, new_tokens))
        del ours
        if device != "cpu":
            torch.cuda.empty_cache()
    del model
    base = next(r for r in rows if r["variant"] == "hf_grouped_mm")
    for r in rows:
        r["decode_vs_hf_grouped_mm"] = base["decode_ms_per_step"] / r["decode_ms_per_step"]
        for b, s in prefill:
            r[f"prefill_{b}x{s}_vs_hf_grouped_mm"] = base[f"prefill_{b}x{s}_ms"] / r[f"prefill_{b}x{s}_ms"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="deepseek,qwen3")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64, help="routed experts of the DeepSeek shape")
    ap.add_argument("--quick", action="store_true", help="prefill 1x1024 only")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    ap.add_argument("--decode-prompt", type=int, default=DECODE_PROMPT,
                    help="prompt tokens before the timed decode steps (a long context: results/hf_model-prompt<N>)")
    args = ap.parse_args()
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        sys.exit("bench_hf_model.py needs a CUDA GPU")
    prefill = ((1, 1024),) if args.quick else PREFILL
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.layers, args.experts, prefill, variants=variants,
                          decode_prompt=args.decode_prompt)
        ours = {r["variant"]: r for r in rows if r["model"] == "deepseek"}
        key = f"prefill_{prefill[0][0]}x{prefill[0][1]}_vs_hf_grouped_mm"
        summary = dict(prefill_vs_hf_grouped_mm=ours.get("ours_fp8", {}).get(key),
                       decode_vs_hf_grouped_mm=ours.get("ours_fp8", {}).get("decode_vs_hf_grouped_mm"),
                       prefill_vs_hf_grouped_mm_fp8_attn=ours.get("ours_fp8_attn", {}).get(key),
                       decode_vs_hf_grouped_mm_fp8_attn=ours.get("ours_fp8_attn", {}).get("decode_vs_hf_grouped_mm"),
                       decode_vs_hf_grouped_mm_fp8_kv8=ours.get("ours_fp8_kv8", {}).get("decode_vs_hf_grouped_mm"),
                       decode_prompt=args.decode_prompt, layers=args.layers, deepseek_experts=args.experts,
                       variants=list(variants))
        save("hf_model" if args.decode_prompt == DECODE_PROMPT else f"hf_model-prompt{args.decode_prompt}", rows,
             summary)
    cols = ["model", "variant", "logits_err_vs_fp32", "decode_ms_per_step", "decode_vs_hf_grouped_mm", "peak_mem_gb"]
    cols += [f"prefill_{b}x{s}_ms" for b, s in prefill]
    print(markdown(rows, cols, {"logits_err_vs_fp32": ".2e", "decode_ms_per_step": ".2f", "peak_mem_gb": ".1f",
                                "decode_vs_hf_grouped_mm": ".2f"}))
    print(summary)


if __name__ == "__main__":
    main()
