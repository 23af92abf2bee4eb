"""One training step (forward + backward) of an MoE layer on one GPU: ``mk.MoELayer`` against torch autograd.

    PYTHONPATH=. python bench/bench_training.py [--tokens 4096,8192,16384] [--cases mixtral-like,deepseek]
        [--precisions bf16,fp8] [--no-fp32] [--profile-tokens 8192] [--err-tokens 1024]

Cases are bench_moe_layer.py's (H=7168, I=2048, bf16 activations): mixtral-like (32 experts, top-2, softmax) and
deepseek (256 experts, top-8, sigmoid group-limited). What is timed (median of ``triton.testing.do_bench``, warm-up
first): ``layer(x)`` then ``out.backward(g)`` with x, the gate and the expert weights requiring gradients (the
gradients are set to None before each step, so every step allocates them as a training step does).
  * **ours bf16**: ``MoELayer(precision="bf16")``: the forward kernels; the expert MLP's backward through the
    grouped GEMM kernel (h13 again, dA and dX on transposed weight views) and ``grouped_wgrad``.
  * **ours fp8**: ``MoELayer(precision="fp8", trainable=True)`` on the same (bf16 master) weights: forward,
    dgrad and wgrad in FP8 with 1x128 / 128x128 scales. The e4m3 copies of the weights are made once per optimiser
    step (and their transposes, for the backward's dA / dX): ``ours_ms`` is a step on cached copies (a
    micro-batch of gradient accumulation), ``weight_quant_ms`` one quantisation (+ transposition) of all expert
    weights, ``vs_composition_with_quant`` the ratio with it added to every step.
  * **ours fp8_bf16wgrad**: the fp8 layer with ``experts.fp8_wgrad = False``: FP8 forward and dgrad, the weight
    gradients from the bf16 operands (``grouped_wgrad(fp8=False)``); an A/B of the FP8 wgrad kernel.
  * **ours fp32** (once, mixtral-like at the first T): fp32 weights and tokens.
  * **torch composition**: bench_moe_layer.py's bf16 composition (router, ``torch.topk``, argsort, two
    ``torch._grouped_mm``, ``index_add_``) on the same weights, differentiated by autograd: the baseline of every
    row (torch has no FP8 grouped GEMM with a backward).
Peak memory: ``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it (weights and
x), ours and the composition's, in the same run; it includes the weight gradients (the same size on both sides).
The fp8 rows' e4m3 weight copies stay resident between steps: ``fp8_weight_copies_mb``, not in the step's peak. Gradient errors (mixtral-like, ``--err-tokens`` tokens): relative
(Frobenius) against a float64 formulation (softmax routing on our choice of experts, per-expert MLPs) of x's, the
gate's and the expert weights' gradients; the deepseek case's float64 weights would not fit beside the layer.
``--profile-tokens``: a torch.profiler table of the backward alone (per CUDA kernel) for each case and precision,
printed and saved to results/training_profile-<device>.txt.
Writes results/training-<device>.json (summary: min_vs_composition_bf16, min_vs_composition_fp8,
max_peak_mem_ratio) and (with matplotlib) its .png.
The CUDA allocator runs with expandable segments unless PYTORCH_CUDA_ALLOC_CONF says otherwise: the deepseek fp8
rows hold 22 GB of masters, 22 GB of e4m3 copies and their 22 GB of gradients, and on an H100 (2026-12-07) the
14 GiB dW13 did not fit in 13.7 GiB reserved-but-free beside 51 GiB allocated.
"""
import argparse
import os
import sys

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch touches CUDA

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plots  # noqa: E402
from _common import RESULTS, bench_ms, markdown, save  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)
from bench_moe_layer import CASES, TorchMoE, rel_err  # noqa: E402

import moe_kernels as mk  # noqa: E402

H, I = 7168, 2048  # monkeypatched smaller by tests/test_bench_smoke.py


def step(fn, x, params, g):
    """One forward + backward; the gradients of the previous step are dropped first."""
    for p in params:
        p.grad = None
    x.grad = None
    fn(x).backward(g)


def peak_mb(fn) -> float:
    """MB allocated at the peak of fn() above what was allocated before it (CUDA; NaN elsewhere)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def build(case, device, precisions):
    """{precision: MoELayer} sharing one gate and one set of expert weights (bf16 masters; fp32 its own copy)."""
    cfg = CASES[case]
    torch.manual_seed(0)
    base = mk.MoELayer(hidden_size=H, intermediate_size=I, precision="bf16", device=device, dtype=torch.bfloat16,
                       **cfg)
    if cfg["scoring"] == "sigmoid":
        with torch.no_grad():
            base.gate.e_score_correction_bias.normal_(std=0.01)
    layers = {"bf16": base}
    for prec in (p for p in precisions if p in FP8_VARIANTS):
        # no weights of its own: the bf16 layer's gate and expert weights are its masters
        f8 = mk.MoELayer(hidden_size=H, intermediate_size=I, precision="fp8", trainable=True, device="meta",
                         dtype=torch.bfloat16, **cfg)
        f8.gate = base.gate
        f8.experts.w13, f8.experts.w2 = base.experts.w13, base.experts.w2
        f8.experts.fp8_wgrad = FP8_VARIANTS[prec]
        layers[prec] = f8
    return layers


# trainable FP8 layers the bench knows: precision name -> experts.fp8_wgrad (the weight gradients in FP8 or not)
FP8_VARIANTS = {"fp8": True, "fp8_bf16wgrad": False}


def dense_reference_grads(layer, x, g):
    """float64 gradients of (x, gate weight, w13, w2) of a softmax-routed layer, on the experts our gate chose."""
    with torch.no_grad():
        _, ids, _ = layer.gate(x)
    x64, gw, w13, w2 = (t.detach().double().requires_grad_() for t in
                        (x, layer.gate.weight, layer.experts.w13, layer.experts.w2))
    scores = torch.softmax(x64 @ gw.t(), -1)
    w = scores.gather(1, ids.long())
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x64)
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        tok, j = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            h = x64[tok] @ w13[e].t()
            y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].t()
            out = out.index_add(0, tok, y * w[tok, j, None])
    out.backward(g.double())
    return [t.grad for t in (x64, gw, w13, w2)]


def grad_errors(layer, precision, T, device):
    """{err_grad_x, err_grad_gate, err_grad_w13, err_grad_w2} of one step of ``layer`` on T random tokens."""
    dt = torch.float32 if precision == "fp32" else torch.bfloat16
    x = torch.randn(T, H, device=device, dtype=dt, requires_grad=True)
    g = torch.randn(T, H, device=device, dtype=dt)
    params = [layer.gate.weight, layer.experts.w13, layer.experts.w2]
    step(layer, x, params, g)
    want = dense_reference_grads(layer, x, g)
    got = [x.grad] + [p.grad for p in params]
    errs = {f"err_grad_{n}": rel_err(a, b) for n, a, b in zip(("x", "gate", "w13", "w2"), got, want)}
    for p in params:
        p.grad = None
    return errs


def profile_backward(layer, x, g, label):
    """A torch.profiler table of one backward (the forward runs outside the profile): time per CUDA kernel."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    out = layer(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out.backward(g)
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="device_time_total", row_limit=20, max_name_column_width=70)
    groups = {}
    for ev in events:
        t = getattr(ev, "device_time_total", 0.0)
        if t > 0:
            name = next((g for key, g in KERNEL_GROUPS if key in ev.key), "other (torch ops)")
            groups[name] = groups.get(name, 0.0) + t / 1e3
    total = sum(groups.values()) or float("nan")
    lines = [f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {name}" for name, ms in
             sorted(groups.items(), key=lambda kv: -kv[1])]
    return f"## backward: {label}: {total:.3f} ms of kernels\n" + "\n".join(lines) + f"\n{table}\n"


# kernel name fragment -> what the backward spends it on (the first match wins); the torch kernels by kind, so that
# the glue (casts, fills, index ops) shows apart from the GEMMs
KERNEL_GROUPS = [("_grouped_wgrad_kernel", "weight gradients (grouped_wgrad, Triton)"),
                 ("_grouped_wgrad_wgmma", "weight gradients (grouped_wgrad, Gluon wgmma)"),
                 ("_grouped_dgrad_kernel", "dgrad dA, dX (TMA kernel)"),
                 ("_swiglu_kernel", "SwiGLU derivative (fused, in place)"),
                 ("_grouped_gemm_kernel", "grouped GEMM: h13 again, dA, dX (Triton)"),
                 ("wgmma", "grouped GEMM (Gluon wgmma)"), ("quantize", "FP8 quantisation of activations"),
                 ("_unpermute", "permute / unpermute backward (Triton gather / scatter)"),
                 ("grouped_mm", "torch grouped GEMM"), ("Cijk", "torch grouped GEMM"),
                 ("gemm", "dense GEMMs (router, torch)"), ("nvjet", "dense GEMMs (router, torch)"),
                 ("index", "torch index ops"), ("scatter", "torch index ops"), ("gather", "torch index ops"),
                 ("direct_copy", "torch casts / copies"), ("FillFunctor", "torch fills"),
                 ("reduce_kernel", "torch reductions")]


def run_case(case, tokens, device="cuda", precisions=("bf16",), fp32=False, err_tokens=64, profile_tokens=0):
    layers = build(case, device, precisions)
    base = layers["bf16"]
    k, E = CASES[case]["top_k"], CASES[case]["num_experts"]
    bias = base.gate.e_score_correction_bias if CASES[case]["scoring"] == "sigmoid" else None
    # the composition differentiates the same storage as leaves of its own (no copy of the weights)
    tm = TorchMoE(*(t.detach().requires_grad_() for t in (base.gate.weight,)), bias,
                  *(t.detach().requires_grad_() for t in (base.experts.w13, base.experts.w2)), CASES[case])
    torch_params = [tm.gate_w, tm.w13, tm.w2]
    rows, profiles = [], []
    errs = {}
    if err_tokens and CASES[case]["scoring"] == "softmax":
        errs = {p: grad_errors(layers[p], p, err_tokens, device) for p in precisions}
    # precision by precision: the fp8 rows reuse the bf16 rows' composition (the same weights, tokens and T), and
    # the e4m3 copies (deepseek: 21 GiB with their transposes) never sit beside the composition's gradients
    runs = [(p, T) for p in precisions for T in tokens]
    comp_at = {}
    if fp32 and tokens:
        runs.append(("fp32", tokens[0]))
    for prec, T in runs:
        if prec == "fp32":  # its own fp32 copy of the weights, composition in fp32 too
            layer = mk.MoELayer(hidden_size=H, intermediate_size=I, precision="fp32", device=device,
                                dtype=torch.float32, **CASES[case])
            with torch.no_grad():
                layer.gate.weight.copy_(base.gate.weight)
                layer.experts.load_weights(base.experts.w13.float(), base.experts.w2.float())
            comp = TorchMoE(*(t.detach().requires_grad_() for t in (layer.gate.weight,)), bias,
                            *(t.detach().requires_grad_() for t in (layer.experts.w13, layer.experts.w2)),
                            CASES[case])
            cparams = [comp.gate_w, comp.w13, comp.w2]
            if err_tokens and CASES[case]["scoring"] == "softmax":
                errs["fp32"] = grad_errors(layer, "fp32", err_tokens, device)
        else:
            layer, comp, cparams = layers[prec], tm, torch_params
        dt = torch.float32 if prec == "fp32" else torch.bfloat16
        x = torch.randn(T, H, device=device, dtype=dt, requires_grad=True)
        g = torch.randn(T, H, device=device, dtype=dt)
        ours_params = [layer.gate.weight, layer.experts.w13, layer.experts.w2]
        flops = 3 * (6.0 * T * k * H * I + 2.0 * T * H * E)
        run_ours = lambda: step(layer, x, ours_params, g)  # noqa: E731
        run_comp = lambda: step(lambda x: comp.composition(x, False), x, cparams, g)  # noqa: E731
        run_ours()  # compile / quantise the weights once (the cache then holds until the weights change)
        mem_ours = peak_mb(run_ours)
        t_ours = bench_ms(run_ours, warmup=5, rep=30)
        for p in ours_params:  # (deepseek: 22 GB of weight gradients each side)
            p.grad = None
        if prec != "fp32" and T in comp_at:
            t_comp, mem_comp = comp_at[T]
        else:
            try:
                mem_comp = peak_mb(run_comp)
                t_comp = bench_ms(run_comp, warmup=5, rep=30)
            except Exception as e:  # a torch build without the grouped GEMM's backward (or in fp32)
                print(f"  composition failed ({prec}): {type(e).__name__}: {str(e)[:200]}")
                t_comp = mem_comp = float("nan")
            if prec != "fp32":
                comp_at[T] = (t_comp, mem_comp)
        quant_ms = copies_mb = float("nan")
        if layer.experts.fp8_master:  # one quantisation of the master weights (once per optimiser step)
            quant_ms = bench_ms(lambda: (layer.experts.fp8_weights(force=True), layer.experts.fp8_weights_t()),
                                warmup=2, rep=20)
            # resident between steps (beside the masters), so not in the step's peak: reported on their own
            # (no name keeps them: a local would hold the last layer's 21 GiB (deepseek) into the next layer's row)
            copies_mb = sum(t.numel() * t.element_size()
                            for pair in layer.experts.fp8_weights() + layer.experts.fp8_weights_t() for t in pair) / 2**20
        for p in ours_params + cparams:
            p.grad = None
        x.grad = None
        row = dict(case=case, experts=E, top_k=k, precision=prec, T=T, ours_ms=t_ours, composition_ms=t_comp,
                   ours_tflops=flops / t_ours / 1e9, composition_tflops=flops / t_comp / 1e9,
                   vs_composition=t_comp / t_ours, weight_quant_ms=quant_ms,
                   vs_composition_with_quant=t_comp / (t_ours + quant_ms) if quant_ms == quant_ms else t_comp / t_ours,
                   ours_peak_mb=mem_ours, composition_peak_mb=mem_comp, fp8_weight_copies_mb=copies_mb,
                   peak_mem_ratio=mem_ours / mem_comp if mem_comp == mem_comp and mem_comp > 0 else float("nan"),
                   **errs.get(prec, {}))
        rows.append(row)
        print(f"  {case} {prec} T={T}: ours {t_ours:.2f} ms (+ {quant_ms:.2f} ms weight quantisation) ({row['ours_tflops']:.0f} TFLOP/s, {mem_ours:.0f} MB), "
              f"composition {t_comp:.2f} ms ({mem_comp:.0f} MB): {row['vs_composition']:.2f}x, memory "
              f"{row['peak_mem_ratio']:.2f}x", flush=True)
        if profile_tokens and T == profile_tokens and torch.cuda.is_available():
            profiles.append(profile_backward(layer, x, g, f"{case} {prec} T={T}"))
            print(profiles[-1], flush=True)
            if "composition" not in "".join(profiles):  # the composition's once per case
                for p in ours_params:
                    p.grad = None
                profiles.append(profile_backward(lambda x: comp.composition(x, False), x, g,
                                                 f"{case} torch composition T={T}"))
            for p in ours_params + cparams:
                p.grad = None
        if prec == "fp32":
            del layer, comp, cparams
        elif prec in FP8_VARIANTS and T == tokens[-1]:
            layer.experts._fp8_cache.clear()  # the e4m3 copies go with the last row of this fp8 layer
    return (rows, profiles) if profile_tokens else rows


def summarize(rows):
    def ratios(prec, key):
        return [r[key] for r in rows if r["precision"] == prec and r[key] == r[key]]

    bf, f8 = ratios("bf16", "vs_composition"), ratios("fp8", "vs_composition")
    mem = [r["peak_mem_ratio"] for r in rows if r["precision"] != "fp32" and r["peak_mem_ratio"] == r["peak_mem_ratio"]]
    f8q = ratios("fp8", "vs_composition_with_quant")
    f8w = ratios("fp8_bf16wgrad", "vs_composition")
    summary = dict(min_vs_composition_bf16=min(bf) if bf else None, min_vs_composition_fp8=min(f8) if f8 else None,
                   min_vs_composition_fp8_with_weight_quant=min(f8q) if f8q else None,
                   max_peak_mem_ratio=max(mem) if mem else None)
    if f8w:
        summary["min_vs_composition_fp8_bf16wgrad"] = min(f8w)
    summary.update({f"{r['case']}/{r['precision']}/T={r['T']}": dict(
        vs_composition=r["vs_composition"], ours_ms=r["ours_ms"], peak_mem_ratio=r["peak_mem_ratio"]) for r in rows})
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="4096,8192,16384")
    ap.add_argument("--cases", default="mixtral-like,deepseek")
    ap.add_argument("--precisions", default="bf16,fp8",
                    help="of bf16, fp8, fp8_bf16wgrad (FP8 forward / dgrad, bf16 weight gradients)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the one fp32 row (mixtral-like, first T)")
    ap.add_argument("--err-tokens", type=int, default=1024, help="tokens of the float64 gradient check (0: none)")
    ap.add_argument("--profile-tokens", type=int, default=8192, help="T of the backward's profile (0: none)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_training.py needs a CUDA GPU")
    rows, profiles = [], []
    precisions = tuple(args.precisions.split(","))
    tokens = [int(t) for t in args.tokens.split(",")]
    for case in args.cases.split(","):
        r, p = run_case(case, tokens, precisions=precisions, fp32=not args.no_fp32 and case == "mixtral-like",
                        err_tokens=args.err_tokens, profile_tokens=args.profile_tokens or -1)
        rows += r
        profiles += p
        torch.cuda.empty_cache()
        cols = ["case", "precision", "T", "ours_ms", "composition_ms", "vs_composition", "weight_quant_ms",
                "vs_composition_with_quant", "ours_tflops",
                "ours_peak_mb", "composition_peak_mb", "peak_mem_ratio", "err_grad_x", "err_grad_gate",
                "err_grad_w13", "err_grad_w2"]
        print(markdown(rows, cols, {c: ".3g" for c in cols[3:]}))
        summary = summarize(rows)
        print({k: v for k, v in summary.items() if "/" not in k})
        path = save("training", rows, summary)
        if profiles:
            prof_path = path.replace(".json", ".txt").replace("training-", "training_profile-")
            with open(prof_path, "w") as f:
                f.write("\n".join(profiles))
            print("wrote", prof_path)
        print("wrote", path, plots.training(path))


if __name__ == "__main__":
    main()
