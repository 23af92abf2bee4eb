"""One MoE block at decode sizes (T = 1..256 tokens a step): CUDA-graph replays against the weight-read bound.

    PYTHONPATH=. python bench/bench_moe_decode.py [--tokens 1,2,4,...] [--cases deepseek,mixtral-like] [--quick]
        [--precisions fp8,bf16] [--no-baselines] [--ab "nopdl:MOE_KERNELS_PDL=0;rows64:MOE_KERNELS_DECODE_MAX_ROWS=64"]

Cases (hidden 7168, expert intermediate 2048, bf16 activations, random weights):
  * ``deepseek``: transformers' ``DeepseekV3MoE``: 256 routed experts top-8 (sigmoid, n_group 8, topk_group 4,
    routed_scaling_factor 2.5) + 1 shared expert.
  * ``mixtral-like``: transformers' ``MixtralSparseMoeBlock``: 8 experts top-2 (softmax).

Every implementation is captured once in a CUDA graph and replayed (``triton.testing.do_bench_cudagraph``, median):
  * **hf_grouped_mm**: the transformers block itself with ``experts_implementation="grouped_mm"``.
  * **ours bf16 / fp8**: ``mk.MoELayer.from_hf(block, precision)`` (fp8: the same weights quantised 128x128).
  * **composition bf16 / fp8**: torch ops on the same weights: fp32 router + top-k (the group-limited selection as
    torch ops), stable argsort, ``torch._grouped_mm`` / ``torch._scaled_grouped_mm`` (rowwise e4m3), SwiGLU,
    second grouped GEMM, weighted ``index_add_``; the shared expert as a one-group grouped GEMM.

The bound: the weight bytes a step must read, i.e. the distinct routed experts its tokens hit (counted from our
router's ids on the same tokens) times one expert's bytes, plus the shared experts (fp8: e4m3 + fp32 128x128
scales; bf16: 2 bytes a weight), over the device-to-device copy bandwidth measured in this run.
``frac_weight_bound`` = (bytes / copy bandwidth) / time. Writes results/moe_decode-<device>.json; summary:
``min_frac_weight_bound_T_ge_8`` and ``frac_weight_bound_T1`` (ours fp8, min over the cases) and
``min_vs_hf_grouped_mm`` (HF block time / ours fp8, min over cases and T).

``--ab name:ENV=VAL[,ENV2=VAL2];name2:...``: after ours, each variant times ours again with those environment
variables set (restored after): per row ``ours_us_<name>``, ``frac_weight_bound_<name>``, ``<name>_speedup`` (ours
/ the variant) and ``err_vs_hf_<name>`` (the variant's output, eager, against the HF block); in the summary
``min_frac_weight_bound_T_ge_8_<name>`` and ``frac_weight_bound_T1_<name>``. ``--no-baselines``: HF's block is
run for the reference only and the composition not at all; their times and ratios are NaN.
"""
import argparse
import contextlib
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, copy_bandwidth, markdown, save  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)
from bench_moe_layer import rowwise_fp8  # noqa: E402  (the rowwise e4m3 format torch._scaled_grouped_mm takes)

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PRECISIONS = ("fp8", "bf16")
CASES = {
    "deepseek": dict(num_experts=256, top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
                     routed_scaling_factor=2.5, n_shared=1),
    "mixtral-like": dict(num_experts=8, top_k=2, scoring="softmax", n_group=1, topk_group=1,
                         routed_scaling_factor=1.0, n_shared=0),
}


def hf_block(case: str, H: int, I: int, device="cuda"):
    """The transformers MoE block of the case, grouped_mm experts, random bf16 weights (1/sqrt(fan-in))."""
    c = CASES[case]
    if case == "deepseek":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block

        cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=c["num_experts"],
                               num_experts_per_tok=c["top_k"], n_group=c["n_group"], topk_group=c["topk_group"],
                               n_shared_experts=c["n_shared"], routed_scaling_factor=c["routed_scaling_factor"],
                               norm_topk_prob=True, hidden_act="silu", experts_implementation="grouped_mm")
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=c["num_experts"],
                            num_experts_per_tok=c["top_k"], hidden_act="silu", experts_implementation="grouped_mm")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = Block(cfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            if p.is_floating_point():
                std = 0.01 if "bias" in name else p.shape[-1] ** -0.5
                p.normal_(0.0, std, generator=g)
    return block.eval()


class Composition:
    """The torch-op pipeline on our bf16 layer's weights (router, bias and experts shared with it)."""

    def __init__(self, layer, case, fp8):
        c = CASES[case]
        self.c, self.fp8, self.k, self.E = c, fp8, c["top_k"], c["num_experts"]
        self.gate_w = layer.gate.weight.detach()
        self.bias = getattr(layer.gate, "e_score_correction_bias", None) if c["scoring"] == "sigmoid" else None
        self.I = layer.intermediate_size
        groups = [(layer.experts.w13.detach(), layer.experts.w2.detach())]
        if layer.shared_experts is not None:
            groups.append((layer.shared_experts.w13.detach(), layer.shared_experts.w2.detach()))
        self.groups = []
        for w13, w2 in groups:
            if fp8:
                q13, s13 = zip(*(rowwise_fp8(w13[i:i + 8]) for i in range(0, w13.shape[0], 8)))
                q2, s2 = zip(*(rowwise_fp8(w2[i:i + 8]) for i in range(0, w2.shape[0], 8)))
                self.groups.append((torch.cat(q13), torch.cat(s13), torch.cat(q2), torch.cat(s2)))
            else:
                self.groups.append((w13, None, w2, None))

    def _mlp(self, xs, ends, w13, s13, w2, s2):
        I = w2.shape[-1]
        if self.fp8:
            q, s = rowwise_fp8(xs)
            h = torch._scaled_grouped_mm(q, w13.transpose(-2, -1), s, s13, offs=ends, out_dtype=torch.bfloat16)
            q, s = rowwise_fp8(F.silu(h[:, :I]) * h[:, I:])
            return torch._scaled_grouped_mm(q, w2.transpose(-2, -1), s, s2, offs=ends, out_dtype=torch.bfloat16)
        h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=ends)
        return torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2.transpose(-2, -1), offs=ends)

    def __call__(self, x):
        c = self.c
        logits = F.linear(x.float(), self.gate_w.float())
        w, ids = R.routing.select_experts(logits, self.k, c["scoring"], n_group=c["n_group"],
                                          topk_group=c["topk_group"], norm_topk_prob=True,
                                          routed_scaling_factor=c["routed_scaling_factor"], bias=self.bias)
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.E, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        ends = torch.cumsum(counts, 0, dtype=torch.int32)
        y = self._mlp(x[order // self.k], ends, *self.groups[0])
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, order // self.k, y.float() * w.reshape(-1)[order, None])
        if len(self.groups) > 1:
            one = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
            out += self._mlp(x, one, *self.groups[1]).float()
        return out.to(x.dtype)


def expert_bytes(layer) -> tuple[int, int]:
    """(bytes of one routed expert, bytes of the shared experts) as stored: weights plus their scales."""
    def size(m):
        return sum(t.numel() * t.element_size() for t in (m.w13, m.w2, getattr(m, "w13_scale", None),
                                                         getattr(m, "w2_scale", None)) if t is not None)
    return size(layer.experts) // layer.num_experts, size(layer.shared_experts) if layer.shared_experts else 0


def parse_ab(spec: str | None) -> dict[str, dict[str, str]]:
    """``name:ENV=VAL[,ENV2=VAL2];name2:ENV=VAL`` -> {name: {ENV: VAL, ...}} in the given order (names: letters,
    digits, _; they end row keys). ValueError naming the part that is not of that form."""
    variants = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        name, colon, assigns = (s.strip() for s in part.partition(":"))
        if not colon or not re.fullmatch(r"\w+", name):
            raise ValueError(f"--ab: {part!r} is not name:ENV=VAL[,ENV2=VAL2] (name: letters, digits, _)")
        if name in variants:
            raise ValueError(f"--ab: variant {name!r} given twice")
        env = {}
        for a in assigns.split(","):
            var, eq, val = a.strip().partition("=")
            if not eq or not re.fullmatch(r"[A-Za-z_]\w*", var):
                raise ValueError(f"--ab: {a.strip()!r} in variant {name!r} is not ENV=VAL")
            env[var] = val
        variants[name] = env
    return variants


@contextlib.contextmanager
def env_set(env: dict[str, str]):
    """``env`` in os.environ for the block; afterwards each variable as it was (unset where it was unset)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_graph(fn, rep):
    try:
        return bench_ms(fn, rep=rep, cudagraph=True), True
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be captured is timed eagerly, and says so
        print(f"    capture failed ({type(e).__name__}: {str(e)[:160]}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return bench_ms(fn, rep=rep), False


def run_case(case, tokens, H, I, rep, gbps, precisions=PRECISIONS, variants=None, baselines=True, device="cuda"):
    block = hf_block(case, H, I, device)
    # the composition runs on the bf16 layer's weights, fp8 too
    layers = {p: mk.MoELayer.from_hf(block, precision=p) for p in PRECISIONS
              if p in precisions or (baselines and p == "bf16")}
    rows, hf_ms = [], {}
    xs = {T: torch.randn(T, H, device=device, dtype=torch.bfloat16) for T in tokens}
    with torch.no_grad():
        for T in tokens:
            hf_ms[T] = time_graph(lambda: block(xs[T][None]), rep) if baselines else (math.nan, None)
        refs = {T: block(xs[T][None])[0].float() for T in tokens}
        del block
        torch.cuda.empty_cache()
        for prec in precisions:
            layer = layers[prec]
            comp = Composition(layers["bf16"], case, fp8=prec == "fp8") if baselines else None
            per_expert, shared = expert_bytes(layer)
            for T in tokens:
                x = xs[T]
                hit = int(torch.unique(layer.gate(x)[1]).numel())
                nbytes = hit * per_expert + shared
                t_ours, _ = time_graph(lambda: layer(x), rep)
                t_comp, comp_graph = time_graph(lambda: comp(x), rep) if baselines else (math.nan, None)
                t_hf, hf_graph = hf_ms[T]
                bound_ms = nbytes / gbps / 1e6
                err = rel_err(layer(x), refs[T])
                row = dict(case=case, precision=prec, T=T, experts_hit=hit, weight_mb=nbytes / 1e6,
                           ours_us=t_ours * 1e3, composition_us=t_comp * 1e3, hf_grouped_mm_us=t_hf * 1e3,
                           bound_us=bound_ms * 1e3, frac_weight_bound=bound_ms / t_ours,
                           vs_hf_grouped_mm=t_hf / t_ours, vs_composition=t_comp / t_ours,
                           hf_graph=hf_graph, composition_graph=comp_graph, err_vs_hf=err)
                line = (f"  {case} {prec} T={T}: ours {row['ours_us']:.1f} us ({row['frac_weight_bound']:.0%} of the "
                        f"{row['bound_us']:.1f} us bound, {hit} experts)")
                if baselines:
                    line += (f", HF {row['hf_grouped_mm_us']:.1f} us (x{row['vs_hf_grouped_mm']:.2f}), composition "
                             f"{row['composition_us']:.1f} us (x{row['vs_composition']:.2f})")
                for name, env in (variants or {}).items():
                    with env_set(env):
                        if x.is_cuda:
                            torch.cuda.synchronize()
                        # eager first, the layer's own graphs off (one captured without the variant would replay):
                        # the variant's own output, and its kernels compiled before the timing's capture
                        graphs, layer.cuda_graphs = layer.cuda_graphs, False
                        try:
                            err_v = rel_err(layer(x), refs[T])
                        finally:
                            layer.cuda_graphs = graphs
                        t_v, _ = time_graph(lambda: layer(x), rep)
                    row.update({f"ours_us_{name}": t_v * 1e3, f"frac_weight_bound_{name}": bound_ms / t_v,
                                f"{name}_speedup": t_ours / t_v, f"err_vs_hf_{name}": err_v})
                    line += f"; {name} {t_v * 1e3:.1f} us (x{t_ours / t_v:.2f}, err {err_v:.1e})"
                rows.append(row)
                print(f"{line}; err vs HF {err:.1e}", flush=True)
            del comp
            torch.cuda.empty_cache()
    del layers
    torch.cuda.empty_cache()
    return rows


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def summarize(rows, variants=()):
    f8 = [r for r in rows if r["precision"] == "fp8"]

    def pick(rs, key):  # NaN (a baseline not timed) is no value
        return min((r[key] for r in rs if not math.isnan(r[key])), default=math.nan)

    summary = dict(
        min_frac_weight_bound_T_ge_8=pick([r for r in f8 if r["T"] >= 8], "frac_weight_bound"),
        frac_weight_bound_T1=pick([r for r in f8 if r["T"] == 1], "frac_weight_bound"),
        min_vs_hf_grouped_mm=pick(f8, "vs_hf_grouped_mm"),
        min_vs_hf_grouped_mm_bf16=pick([r for r in rows if r["precision"] == "bf16"], "vs_hf_grouped_mm"),
        min_vs_composition_fp8=pick(f8, "vs_composition"),
    )
    for name in variants:
        summary[f"min_frac_weight_bound_T_ge_8_{name}"] = pick([r for r in f8 if r["T"] >= 8],
                                                               f"frac_weight_bound_{name}")
        summary[f"frac_weight_bound_T1_{name}"] = pick([r for r in f8 if r["T"] == 1], f"frac_weight_bound_{name}")
    return summary


def table(rows, variants=()) -> str:
    cols = ["case", "precision", "T", "experts_hit", "ours_us", "bound_us", "frac_weight_bound", "hf_grouped_mm_us",
            "vs_hf_grouped_mm", "composition_us", "vs_composition", "err_vs_hf"]
    formats = {"ours_us": ".1f", "bound_us": ".1f", "frac_weight_bound": ".2f", "hf_grouped_mm_us": ".1f",
               "vs_hf_grouped_mm": ".2f", "composition_us": ".1f", "vs_composition": ".2f", "err_vs_hf": ".1e"}
    for name in variants:
        cols += [f"ours_us_{name}", f"frac_weight_bound_{name}", f"{name}_speedup", f"err_vs_hf_{name}"]
        formats.update({f"ours_us_{name}": ".1f", f"frac_weight_bound_{name}": ".2f", f"{name}_speedup": ".2f",
                        f"err_vs_hf_{name}": ".1e"})
    return markdown(rows, cols, formats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--rep", type=int, default=50, help="ms of graph replays per measurement")
    ap.add_argument("--quick", action="store_true", help="T in {1, 8, 64}")
    ap.add_argument("--ab", default="", help="variants of ours, each timed with its environment variables set: "
                                             "name:ENV=VAL[,ENV2=VAL2];name2:ENV=VAL")
    ap.add_argument("--no-baselines", action="store_true", help="time neither HF's block nor the composition")
    args = ap.parse_args()
    try:
        variants = parse_ab(args.ab)
    except ValueError as e:
        ap.error(str(e))
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or set(precisions) - set(PRECISIONS):
        ap.error(f"--precisions: a list of {', '.join(PRECISIONS)}, got {args.precisions!r}")
    if not torch.cuda.is_available():
        sys.exit("bench_moe_decode.py needs a CUDA GPU")
    tokens = [1, 8, 64] if args.quick else [int(t) for t in args.tokens.split(",")]
    roof = copy_bandwidth()
    print(f"copy bandwidth {roof['gbps']:.0f} GB/s", flush=True)
    rows = []
    for case in args.cases.split(","):
        rows += run_case(case, tokens, args.hidden, args.intermediate, args.rep, roof["gbps"], precisions, variants,
                         not args.no_baselines)
        summary = dict(summarize(rows, variants), copy_gbps=roof["gbps"])
        save("moe_decode", rows, summary)  # after every case: a run cut short keeps its rows
    print(table(rows, variants))
    print(summary)


if __name__ == "__main__":
    main()
