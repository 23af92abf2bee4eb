"""Where a whole model's prefill spends its GPU time, HF grouped_mm against patched fp8: torch.profiler's CUDA time
per kernel, summed by what the kernel is (our MoE kernels, our MLA kernels, GEMMs, attention, elementwise, ...).

    PYTHONPATH=. python bench/profile_hf_prefill.py [--models deepseek] [--tokens 4096] [--top 20]

The models are ``bench_hf_model.py``'s (2 layers; DeepSeek-V3-shaped with 64 experts). Prints per (model,
variant) the milliseconds of one 1 x ``--tokens`` prefill by category and the top kernels; writes
results/hf_prefill_profile-<device>.txt. Says what stands between the patched model's prefill and 2x HF's.
"""
import argparse
import copy
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, write_text  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)
from bench_hf_model import build, set_experts_impl  # noqa: E402

import moe_kernels as mk  # noqa: E402

# first match wins: (substring of the kernel name, category)
CATEGORIES = (
    ("_mla", "ours: MLA"), ("_latent_", "ours: MLA"), ("_prefill_", "ours: MLA"), ("_rms_norm", "ours: RMSNorm"),
    ("_grouped_gemm", "ours: expert GEMMs"), ("_route", "ours: routing"),
    ("_scatter", "ours: permute"), ("_permute", "ours: permute"), ("_unpermute", "ours: unpermute"),
    ("_observe", "ours: routing"), ("_quant", "ours: quantise"), ("flash", "attention"), ("fmha", "attention"),
    ("attention", "attention"), ("softmax", "softmax"), ("grouped", "torch grouped GEMM"),
    ("gemm", "torch GEMMs"), ("nvjet", "torch GEMMs"), ("sm90_xmma", "torch GEMMs"), ("cutlass", "torch GEMMs"),
    ("reduce", "reductions"), ("elementwise", "elementwise"), ("copy", "copies / casts"), ("cat", "copies / casts"),
    ("index", "gather / scatter"), ("scatter", "gather / scatter"), ("gather", "gather / scatter"),
    ("sort", "sort / topk"), ("topk", "sort / topk"),
)


def category(name: str) -> str:
    low = name.lower()
    return next((c for key, c in CATEGORIES if key in low), "other")


def profile(model, ids, steps=3):
    """{kernel: ms a prefill}, {category: ms a prefill} (on the CPU: its ops' own CPU time, for the smoke test)."""
    cuda = ids.is_cuda
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.no_grad():
        for _ in range(2):
            model(ids)
        if cuda:
            torch.cuda.synchronize()
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(steps):
                model(ids)
            if cuda:
                torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    per_kernel = {e.key: getattr(e, attr) / steps / 1e3 for e in prof.key_averages() if getattr(e, attr) > 0}
    by_cat = defaultdict(float)
    for k, ms in per_kernel.items():
        by_cat[category(k)] += ms
    return per_kernel, dict(by_cat)


def report(title, per_kernel, by_cat, top):
    """A profile's lines: the title, ms and share per category (largest first), the ``top`` kernels."""
    total = sum(by_cat.values())
    lines = [title]
    lines += [f"  {c:24s} {ms:8.3f} ms  {ms / total:5.1%}" for c, ms in sorted(by_cat.items(), key=lambda t: -t[1])]
    lines.append("  top kernels:")
    lines += [f"    {ms:8.3f} ms  {k[:110]}" for k, ms in sorted(per_kernel.items(), key=lambda t: -t[1])[:top]]
    return lines


def profile_all(names, run_one, out_name):
    """``run_one(name)`` -> lines for each name: printed as they come, then all of them in results/<out_name>."""
    out = []
    for name in names:
        lines = run_one(name)
        print("\n".join(lines), flush=True)
        out += lines
        torch.cuda.empty_cache()
    write_text(out_name, "\n".join(out) + "\n")


def run(name, tokens, layers=2, experts=64, top=20, device="cuda", tiny=False):
    """The report's lines for HF grouped_mm and ours fp8 on one model."""
    model = build(name, layers, experts, device, tiny).to(torch.bfloat16)
    set_experts_impl(model, "grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    ours = copy.deepcopy(model)
    mk.patch_model(ours, precision="fp8")
    lines = []
    for variant, m in (("hf_grouped_mm", model), ("ours_fp8", ours)):
        per_kernel, by_cat = profile(m, ids)
        where = device_name() if device != "cpu" else "cpu"
        title = f"## {name} {variant} prefill 1x{tokens} ({where}): kernels {sum(by_cat.values()):.2f} ms"
        lines += report(title, per_kernel, by_cat, top)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="deepseek")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    profile_all(args.models.split(","), lambda name: run(name, args.tokens, args.layers, args.experts, args.top),
                "hf_prefill_profile")


if __name__ == "__main__":
    main()
