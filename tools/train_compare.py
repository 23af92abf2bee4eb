"""300 training steps of a small patched Mixtral on synthetic data, bf16 experts vs FP8 experts with master weights.

    PYTHONPATH=. python tools/train_compare.py [--steps 300] [--out DIR] [--device cuda]

Both runs start from the same weights and see the same batches. The model: a 2-layer ``MixtralForCausalLM``
(hidden 512, 8 experts top-2, expert intermediate 256, vocabulary 512), its MoE blocks swapped by
``mk.patch_model(model, precision="bf16")``; the FP8 run then gives every MoE layer FP8 experts with trainable
bf16 master weights (``GroupedExperts(precision="fp8", trainable=True)`` sharing the initial weights): forward,
dgrad and wgrad GEMMs in e4m3 with 1x128 / 128x128 scales, the e4m3 copies made once per optimiser step. Data: a
synthetic language with structure to learn: each sequence is a random walk through a fixed random bigram table
(each token has 4 likely successors), so the loss can fall from ln(512) ~ 6.2 towards the table's entropy
(ln 4 ~ 1.4). AdamW, lr 1e-3 with 20 warm-up steps, bf16 activations (the non-expert weights in bf16 too).

"Agree within noise": the noise is measured, not assumed: a second bf16 run with another data seed gives the
run-to-run spread of the loss; the FP8 curve's mean gap to bf16 over the last 50 steps is compared with it.
Writes train_compare.json (both curves, the spread, the gap, seconds per run) and train_compare.png to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

os.environ.setdefault("MOE_KERNELS_VALUE_CHECKS", "0")  # value checks are host syncs: not in a training loop

import moe_kernels as mk
from moe_kernels.modules.experts import GroupedExperts


def make_model(device, seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=512, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256, router_aux_loss_coef=0.0, output_router_logits=False)
    model = MixtralForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    mk.patch_model(model, precision="bf16")
    return model


def to_fp8_training(model) -> int:
    """Give every MoELayer FP8 experts whose bf16 master weights are the current bf16 ones; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, mk.MoELayer) and m.precision == "bf16":
            old = m.experts
            new = GroupedExperts(old.num_experts, old.hidden_size, old.intermediate_size, "fp8", device="meta",
                                 trainable=True)
            new.w13, new.w2 = old.w13, old.w2  # the same parameters: they become the masters
            m.experts, m.precision = new, "fp8"
            n += 1
    return n


def batches(steps, batch, seq, vocab, device, seed):
    """A random walk through a fixed bigram table (4 likely successors per token), one batch per step."""
    g = torch.Generator().manual_seed(1234)  # the language: the same for every run
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    g = torch.Generator().manual_seed(seed)  # the sample of it
    for _ in range(steps):
        tok = torch.empty(batch, seq, dtype=torch.long)
        tok[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            tok[:, t] = succ[tok[:, t - 1], torch.randint(0, 4, (batch,), generator=g)]
        yield tok.to(device)


def train(model, steps, device, data_seed, batch=16, seq=128, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    losses = []
    t0 = time.perf_counter()
    for tok in batches(steps, batch, seq, model.config.vocab_size, device, data_seed):
        loss = model(input_ids=tok, labels=tok).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    return losses, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench",
                                                  "results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = {}
    for name, fp8, data_seed in (("bf16", False, 0), ("fp8", True, 0), ("bf16_seed1", False, 1)):
        model = make_model(args.device)
        if fp8:
            assert to_fp8_training(model) == 2
        losses, secs = train(model, args.steps, args.device, data_seed, args.batch, args.seq)
        runs[name] = dict(losses=losses, seconds=secs)
        print(f"{name}: first {losses[0]:.3f} last {losses[-1]:.3f} ({secs:.1f} s)", flush=True)
        del model
    tail = 50

    def mean_tail(name):
        v = runs[name]["losses"][-tail:]
        return sum(v) / len(v)

    gap = mean_tail("fp8") - mean_tail("bf16")
    spread = abs(mean_tail("bf16_seed1") - mean_tail("bf16"))
    # per-step noise: the std of bf16's last steps around their mean
    v = runs["bf16"]["losses"][-tail:]
    step_std = (sum((x - mean_tail("bf16")) ** 2 for x in v) / len(v)) ** 0.5
    result = dict(steps=args.steps, batch=args.batch, seq=args.seq, device=torch.cuda.get_device_name() if
                  args.device == "cuda" else args.device, tail_steps=tail, fp8_minus_bf16_tail_mean=gap,
                  bf16_seed_spread_tail_mean=spread, bf16_tail_step_std=step_std,
                  within_noise=bool(abs(gap) <= max(spread, step_std / math.sqrt(tail)) * 3),
                  runs=runs, command=" ".join(sys.argv))
    path = os.path.join(args.out, "train_compare.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print({k: v for k, v in result.items() if k != "runs"})
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, style in (("bf16", "-"), ("fp8", "-"), ("bf16_seed1", ":")):
            ax.plot(runs[name]["losses"], style, label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"patched Mixtral (2 layers, 8 experts top-2): FP8 - bf16 over the last {tail} steps "
                     f"{gap:+.3f} (seed spread {spread:.3f})", fontsize=9)
        ax.legend()
        fig.savefig(path.replace(".json", ".png"), dpi=110, bbox_inches="tight")
        print("wrote", path, path.replace(".json", ".png"))
    except ImportError:
        print("wrote", path, "(no matplotlib: no PNG)")


if __name__ == "__main__":
    main()
