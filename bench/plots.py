"""PNG plots of the benchmark result JSONs: ours against the same run's baselines and the roofline.

    python bench/plots.py                                  # every result JSON in bench/results with a family
    python bench/plots.py bench/results/mla-NVIDIA_H200.json ...

The family is the file name up to its first "-" (routing, grouped_gemm, mla, moe_layer, placement, all_to_all;
others, e.g. grouped_gemm_probe-*, are left alone). Each PNG goes next to its JSON (same name, .png). x: tokens,
rows or the family's size axis (log2), y: throughput; placement and all_to_all: bars per case. Rooflines: the
device-to-device copy measured in the same run (routing, MLA decode), else the spec-sheet peak of the device
(``SPEC``; no line for a device not in it). Baseline rates not in the JSON are ours rescaled by the time ratio (same
work, other time). Needs matplotlib; without it every function prints a note and returns None. No torch: this runs
wherever the JSONs are.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OURS = "moe-kernels"

# NVIDIA spec sheets (SXM): dense tensor-core TFLOP/s (without 2:4 sparsity) and NVLink GB/s per direction per GPU
SPEC = {
    "NVIDIA H100 80GB HBM3": dict(fp8_tflops=1979, bf16_tflops=989, nvlink_gbps=450),
    "NVIDIA H200": dict(fp8_tflops=1979, bf16_tflops=989, nvlink_gbps=450),
}


def same_work(rate: float, us: float, other_us: float) -> float:
    """The rate of the same work (bytes or FLOPs) done in other_us instead of us: rate * us / other_us."""
    return rate * us / other_us


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _select(rows, by, **eq):
    return sorted((r for r in rows if all(r.get(k) == v for k, v in eq.items())), key=lambda r: r[by])


def _num(v):
    return float("nan") if v is None else v


def _env(res):
    env = res.get("environment", {})
    return env.get("device", res.get("device", "unknown device")), str(env.get("date", "undated"))[:10]


def _spec(res, key):
    return SPEC.get(_env(res)[0], {}).get(key)


def _roof(ax, y, label, ls=":", color="k"):
    ax.axhline(y, ls=ls, color=color, lw=1.3, label=label, gid="roofline")


def _spec_lines(ax, res, precisions):
    for p, ls in zip(precisions, (":", "-.")):
        peak = _spec(res, f"{p}_tflops")
        if peak:
            _roof(ax, peak, f"{p} dense peak (spec) {peak} TFLOP/s", ls=ls)


def _xlog2(ax, xs, xlabel, ylabel, title):
    """log2 x with a tick at every measured x, labelled in plain numbers; y from 0; grid."""
    from matplotlib import ticker

    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(t) for t in ticks]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    if len(ticks) > 1:
        pad = (math.log2(ticks[-1]) - math.log2(ticks[0])) * 0.08
        ax.set_xlim(2 ** (math.log2(ticks[0]) - pad), 2 ** (math.log2(ticks[-1]) + pad))
    ax.set_ylim(bottom=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)


def _finish(fig, res, what, ncols=4):
    """Title with the device and date; one legend for the figure, below the panels (no data under it)."""
    device, date = _env(res)
    fig.suptitle(f"{what}\n{device}, {date}", fontsize=10)
    seen = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    renderer = fig.canvas.get_renderer()
    for n in range(min(ncols, len(seen)), 0, -1):  # the most columns that fit the figure's width
        legend = fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=n, fontsize=8)
        if n == 1 or legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            return fig
        legend.remove()
    return fig


def _figure(plt, rows, cols, w, h, **kw):
    return plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained", **kw)


# ---- the families ----------------------------------------------------------------------------------------------
def _routing(res, plt):
    rows, copy = res["rows"], res["copy"]["gbps"]
    ks = sorted({r["k"] for r in rows})
    scorings = list(dict.fromkeys(r["scoring"] for r in rows))
    one = "softmax" if "softmax" in scorings else scorings[0]  # permute / unpermute do not depend on the scoring
    fig, axes = _figure(plt, 2, len(ks), 5.2, 3.6)
    for col, k in enumerate(ks):
        ax, rs = axes[0][col], _select(rows, "T", scoring=one, k=k)
        Ts = [r["T"] for r in rs]
        for op, key, base, color in (("permute bf16", "permute", "permute_torch", "C0"),
                                     ("permute fp8", "permute_fp8", None, "C1"),
                                     ("unpermute", "unpermute", "unpermute_torch", "C2")):
            ax.plot(Ts, [r[f"{key}_gbps"] for r in rs], "o-", color=color, label=f"{op}: {OURS}", gid=key)
            if base:
                ax.plot(Ts, [same_work(r[f"{key}_gbps"], r[f"{key}_us"], r[f"{base}_us"]) for r in rs], "s--",
                        color=color, label=f"{op}: torch", gid=base)
        _roof(ax, copy, f"roofline: device-to-device copy, same run ({copy:.0f} GB/s)")
        _xlog2(ax, Ts, "tokens T", "GB/s (fewest bytes the op moves)", f"permute / unpermute, top-{k}")
        ax = axes[1][col]
        for i, s in enumerate(scorings):
            rs = _select(rows, "T", scoring=s, k=k)
            Ts = [r["T"] for r in rs]
            ax.plot(Ts, [r["route_permute_us"] for r in rs], "o-", color=f"C{3 + i}",
                    label=f"route+permute, {s}: {OURS}", gid=f"route_permute {s}")
            ax.plot(Ts, [r["composition_us"] for r in rs], "s--", color=f"C{3 + i}",
                    label=f"route+permute, {s}: torch composition", gid=f"composition {s}")
        _xlog2(ax, Ts, "tokens T", "µs (lower is better)", f"route + permute time, top-{k}")
    shape = res.get("shape", {})
    return _finish(fig, res, f"routing and permutation (H={shape.get('H', '?')}, E={shape.get('E', '?')}, "
                             f"{res.get('timing', 'eager')} timing; permute / unpermute rows: {one} routing)")


def _is_zipf(r):
    return "zipf" in r["case"].lower()


def _grouped_gemm(res, plt):
    fp8 = [("ours_tflops", OURS, "C0"), ("scaled_grouped_mm_tflops", "torch._scaled_grouped_mm", "C1"),
           ("scaled_grouped_mm_fast_tflops", "torch._scaled_grouped_mm, fast accum", "C2")]
    bf16 = [("ours_bf16_tflops", OURS, "C0"), ("grouped_mm_bf16_tflops", "torch._grouped_mm", "C4")]
    mlp = [("mlp_ours_tflops", OURS, "C0"),
           ("mlp_composition_tflops", "torch composition (2 x _scaled_grouped_mm + SwiGLU)", "C3")]
    projs = list(dict.fromkeys(r["proj"] for r in res["rows"]))
    panels = [(f"{p}, FP8", [r for r in res["rows"] if r["proj"] == p], fp8, "fp8") for p in projs]
    if res.get("mlp_rows"):
        panels.append(("fused expert MLP (gate_up, SwiGLU, down), FP8", res["mlp_rows"], mlp, "fp8"))
    panels += [(f"{p}, bf16", [r for r in res["rows"] if r["proj"] == p], bf16, "bf16") for p in projs]
    ncols = min(3, len(panels))
    fig, axes = _figure(plt, -(-len(panels) // ncols), ncols, 4.8, 3.6)
    styles = ("o-", "s--", "^-.", "v:")
    Gs = sorted({r["G"] for _, rows, _, _ in panels for r in rows if not _is_zipf(r)})
    for ax, (name, rows, series, precision) in zip(axes.flat, panels):
        for key, label, color in series:
            ax.plot([], [], "-", color=color, label=label)
            for G, style in zip(Gs, styles):
                rs = [r for r in _select(rows, "M", G=G) if not _is_zipf(r) and key in r]
                ax.plot([r["M"] for r in rs], [r[key] for r in rs], style, color=color, gid=f"{key} G={G}")
            zipf = [r for r in rows if _is_zipf(r) and key in r]
            ax.plot([r["M"] for r in zipf], [r[key] for r in zipf], "*", ms=12, color=color, gid=f"{key} zipf")
        for G, style in zip(Gs, styles):
            ax.plot([], [], style, color="0.4", label=f"{G} experts, equal groups")
        zG = sorted({r["G"] for r in rows if _is_zipf(r)})
        if zG:
            ax.plot([], [], "*", ms=12, color="0.4", label=f"{'/'.join(map(str, zG))} experts, Zipf-skewed (no line)")
        _spec_lines(ax, res, (precision,))
        _xlog2(ax, [r["M"] for r in rows], "rows M (all experts)", "TFLOP/s", name)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    return _finish(fig, res, "grouped GEMM (gate_up N=4096 K=7168, down N=7168 K=2048) and the fused expert MLP "
                             "(H=7168, I=2048)", ncols=3)


def _mla(res, plt):
    rows, copy = res["rows"], res["summary"]["copy_GBps"]
    fig, axes = _figure(plt, 1, 2, 5.6, 4.4)
    ax = axes[0][0]
    decode = [r for r in rows if r["op"] == "decode"]
    for i, B in enumerate(sorted({r["B"] for r in decode})):
        rs = _select(decode, "S", B=B)
        S = [r["S"] for r in rs]
        ax.plot(S, [r["GBps"] for r in rs], "o-", color=f"C{i}", label=f"B={B}: {OURS}", gid=f"decode B={B}")
        ax.plot(S, [same_work(r["GBps"], r["ours_us"], r["torch_us"]) for r in rs], "s--", color=f"C{i}",
                label=f"B={B}: torch", gid=f"torch B={B}")
        # beside them, where the run has them: CUDA-graph replays (ours, FlashMLA: how a server runs decode) and
        # the FP8 cache (graphed where timed so); each the same work as ours over its own time
        if all(r.get("ours_graph_us") for r in rs):
            ax.plot(S, [same_work(r["GBps"], r["ours_us"], r["ours_graph_us"]) for r in rs], "o:", color=f"C{i}",
                    label=f"B={B}: {OURS}, CUDA graph", gid=f"graph B={B}")
        fm = "flashmla_graph_us" if all(r.get("flashmla_graph_us") for r in rs) else "flashmla_us"
        if all(r.get(fm) for r in rs):
            ax.plot(S, [same_work(r["GBps"], r["ours_us"], r[fm]) for r in rs], "^-", color=f"C{i + 2}",
                    label=f"B={B}: FlashMLA" + (", CUDA graph" if fm == "flashmla_graph_us" else ""),
                    gid=f"flashmla B={B}")
        f8 = _select([r for r in rows if r["op"] == "decode_fp8"], "S", B=B)
        if f8 and len(f8) == len(rs):  # the FP8 cache reads fewer bytes: its rate is the bf16 work over its time
            key = "ours_graph_us" if all(r.get("ours_graph_us") for r in f8) else "ours_us"
            ax.plot(S, [same_work(b["GBps"], b["ours_us"], r[key]) for b, r in zip(rs, f8)], "D-.", color=f"C{i}",
                    label=f"B={B}: {OURS}, FP8 cache" + (", CUDA graph" if key == "ours_graph_us" else ""),
                    gid=f"fp8 B={B}")
    for r in (r for r in rows if r["op"] == "decode_paged"):
        ax.plot([r["S"]], [r["GBps"]], "P", ms=9, color="k", label=f"paged cache, B={r['B']}: {OURS}",
                gid=f"decode_paged B={r['B']}")
        ax.plot([r["S"]], [same_work(r["GBps"], r["ours_us"], r["torch_us"])], "x", ms=9, color="k",
                label=f"paged cache, B={r['B']}: torch", gid=f"torch paged B={r['B']}")
    _roof(ax, copy, f"roofline: device-to-device copy, same run ({copy:.0f} GB/s)")
    _xlog2(ax, [r["S"] for r in rows if "S" in r], "cached tokens S per row", "GB/s (cache once + W_UV, q, out)",
           "absorbed decode (+ W_UV), 128 heads")
    ax = axes[0][1]
    down = [r for r in rows if r["op"] == "down_proj"]
    if not down:  # a run without the down-projection rows (bench_mla.py --no-sweep / --quick)
        ax.set_axis_off()
        return _finish(fig, res, "MLA decode (DeepSeek-V3 shapes: latents 512 + 64 RoPE)", ncols=3)
    for i, dtype in enumerate(dict.fromkeys(r["dtype"] for r in down)):
        rs = _select(down, "T", dtype=dtype)
        T = [r["T"] for r in rs]
        ax.plot(T, [r["TFLOPS"] for r in rs], "o-", color=f"C{i + 4}", label=f"{dtype}: {OURS}",
                gid=f"down_proj {dtype}")
        ax.plot(T, [same_work(r["TFLOPS"], r["ours_us"], r["baseline_us"]) for r in rs], "s--", color=f"C{i + 4}",
                label=f"{dtype}: unfused torch", gid=f"baseline {dtype}")
    _spec_lines(ax, res, ("fp8", "bf16"))
    _xlog2(ax, [r["T"] for r in down], "tokens T", "TFLOP/s", "latent down-projection (+ RMSNorm, RoPE)")
    return _finish(fig, res, "MLA (DeepSeek-V3 shapes: H 7168, latents 1536 / 512 + 64 RoPE)", ncols=3)


def _case_panels(res, plt, series, ylabel, what):
    """One panel per (case, precision) of a layer-level result, a line per (key, label, fmt, color) of series
    against tokens; keys a result lacks (the training bench has no naive loop) are left out."""
    rows = res["rows"]
    groups = sorted({(r["case"], r["precision"]) for r in rows})
    fig, axes = _figure(plt, 1, len(groups), max(4.2, 8.4 / len(groups)), 3.8)  # one panel: as wide as two
    for ax, (case, prec) in zip(axes[0], groups):
        rs = _select(rows, "T", case=case, precision=prec)
        Ts = [r["T"] for r in rs]
        for key, label, fmt, color in series:
            if any(key in r for r in rs):
                ax.plot(Ts, [r.get(key, float("nan")) for r in rs], fmt, color=color, label=label, gid=key)
        if ylabel == "TFLOP/s":
            _spec_lines(ax, res, (prec,))
        _xlog2(ax, Ts, "tokens" if ylabel == "TFLOP/s" else "tokens T", ylabel, f"{case}, {prec}")
    return _finish(fig, res, what)


def _moe_layer(res, plt, what="one MoE layer (H=7168, I=2048)"):
    series = [("ours_tflops", OURS, "o-", "C0"), ("composition_tflops", "torch composition", "o-", "C1"),
              ("naive_tflops", "naive torch loop", "o-", "C2")]
    return _case_panels(res, plt, series, "TFLOP/s", what)


def _training(res, plt):
    return _moe_layer(res, plt, "one training step, forward + backward (H=7168, I=2048; TFLOP/s = 3x the forward's)")


PLACEMENT_POLICIES = (("round_robin", "round-robin"), ("eplb_h", "EPLB hierarchical"), ("eplb_g", "EPLB global"),
                      ("ours", f"{OURS} place_experts"))


def _bars(ax, x, series, width=0.8):
    """Side-by-side bars: series = [(label, values, color, hatch)]; a missing value (None) leaves a gap."""
    w = width / len(series)
    for i, (label, vals, color, hatch) in enumerate(series):
        ax.bar([v + (i - (len(series) - 1) / 2) * w for v in x], [_num(v) for v in vals], w, label=label,
               color=color, hatch=hatch, edgecolor="white" if hatch else None)


def _placement(res, plt):
    rows = res["rows"]
    which = "fresh" if any("fresh_ours_gpu" in r for r in rows) else "planned"
    repeats = res.get("repeats", 1) > 1
    cases = [f"{r['load']} k={r['k']} G={r['G']}" + (f" #{r.get('repeat', 0)}" if repeats else "") for r in rows]
    x = range(len(rows))
    fig, axes = _figure(plt, 2, 1, max(8.0, 0.5 * len(rows) + 2), 3.2, sharex=True)
    for ax, metric, ylabel in ((axes[0][0], "gpu", "max / mean GPU load"),
                               (axes[1][0], "link_us", "busiest link, µs")):
        _bars(ax, x, [(name, [r.get(f"{which}_{p}_{metric}") for r in rows], f"C{i}", None)
                      for i, (p, name) in enumerate(PLACEMENT_POLICIES)])
        ax.set_ylabel(f"{ylabel}\n(lower is better)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_yscale("log")
    _roof(axes[0][0], 1.0, "perfect balance (max = mean)")
    axes[1][0].set_xticks(list(x), cases, rotation=55, ha="right", fontsize=8)
    axes[1][0].set_xlim(-0.6, len(rows) - 0.4)
    return _finish(fig, res, f"expert placement, E=256, 8 GPUs per node, scored on the {which} sample "
                             f"({res.get('tokens_per_sample', '?')} tokens; missing bar: policy does not apply)",
                   ncols=5)


def _all_to_all(res, plt):
    rows, cfg = res["rows"], res.get("config", {})
    cats = list(dict.fromkeys((r["k"], r["dtype"]) for r in rows))
    x = range(len(cats))
    fig, axes = _figure(plt, 1, 2, 5.6, 4.2)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    first = {}
    for r in rows:
        first.setdefault((r["impl"], r["k"], r["dtype"]), r)  # dispatch does not depend on the partials' dtype
    color = {i: f"C{n}" for n, i in enumerate(impls)}
    _bars(axes[0][0], x, [(i, [first.get((i, *c), {}).get("dispatch_GBps") for c in cats], color[i], None)
                          for i in impls])
    combos = list(dict.fromkeys((r["impl"], r["partials"]) for r in rows))
    by = {(r["impl"], r["partials"], r["k"], r["dtype"]): r["combine_GBps"] for r in rows}
    _bars(axes[0][1], x, [(f"{i}, partials {p}", [by.get((i, p, *c)) for c in cats], color[i],
                           "//" if p == "bfloat16" else None) for i, p in combos])  # bf16 partials hatched
    nvlink = _spec(res, "nvlink_gbps")
    for ax, what in zip(axes[0], ("dispatch", "combine")):
        if nvlink:
            _roof(ax, nvlink, f"NVLink per direction (spec) {nvlink} GB/s")
        ax.set_xticks(list(x), [f"top-{k}, {d} rows" for k, d in cats], fontsize=8)
        ax.set(ylabel="GB/s per rank (bytes to other ranks)", title=what)
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3, axis="y")
    return _finish(fig, res, f"expert-parallel dispatch / combine, {cfg.get('world_size', '?')} ranks, "
                             f"T={cfg.get('tokens_per_rank', '?')} per rank, H={cfg.get('hidden', '?')}, "
                             f"E={cfg.get('experts', '?')}", ncols=3)


def _moe_decode(res, plt):
    series = [("ours_us", OURS, "o-", "C0"), ("hf_grouped_mm_us", "transformers grouped_mm", "o-", "C1"),
              ("composition_us", "torch composition", "o-", "C2"),
              ("bound_us", "weight bytes / copy bandwidth", "--", "k")]
    # --ab variants (ours under other environment variables, timed in the same run): dashed, after ours
    names = sorted({k[len("ours_us_"):] for r in res["rows"] for k in r if k.startswith("ours_us_")})
    series[1:1] = [(f"ours_us_{n}", f"{OURS}, {n}", "s--", f"C{3 + i}") for i, n in enumerate(names)]
    return _case_panels(res, plt, series, "us per MoE block (CUDA graph)",
                        "one MoE block at decode sizes (H=7168, I=2048)")


FAMILIES = {"routing": _routing, "grouped_gemm": _grouped_gemm, "mla": _mla, "moe_layer": _moe_layer,
            "training": _training, "moe_decode": _moe_decode, "placement": _placement, "all_to_all": _all_to_all}


def family(path: str) -> str | None:
    """The family a result file belongs to, from its name (<family>-...json), or None."""
    name = os.path.basename(path)
    fam = name.split("-", 1)[0]
    return fam if name.endswith(".json") and "-" in name and fam in FAMILIES else None


def figure(path: str, fam: str | None = None):
    """The matplotlib figure of one result JSON of family fam (default: from the file name), not saved and not
    closed; None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fam = fam or family(path)
    if fam not in FAMILIES:
        raise ValueError(f"{path}: no plot family in the file name (known: {', '.join(FAMILIES)})")
    with open(path) as f:
        res = json.load(f)
    return FAMILIES[fam](res, plt)


def _write(path: str, fam: str | None = None) -> str | None:
    fig = figure(path, fam)
    if fig is None:
        print(f"matplotlib not installed: no plot for {path}")
        return None
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def routing(path: str) -> str | None:
    """routing-*.json (bench_routing.py) -> .png: per top-k, GB/s of permute bf16 / fp8 and unpermute, ours and torch,
    against the copy bandwidth of the same run; below, route+permute time against the torch composition."""
    return _write(path, "routing")


def grouped_gemm(path: str) -> str | None:
    """grouped_gemm-*.json (bench_grouped_gemm.py) -> .png: TFLOP/s against rows per projection (ours FP8 and bf16,
    torch._scaled_grouped_mm plain and fast-accum, torch._grouped_mm) and of the fused MLP against the composition;
    Zipf cases as stars; the spec dense peaks."""
    return _write(path, "grouped_gemm")


def mla(path: str) -> str | None:
    """mla-*.json (bench_mla.py) -> .png: decode GB/s against S per B, ours and torch, against the copy bandwidth of
    the same run; down-projection TFLOP/s against T per dtype, ours and the unfused torch path."""
    return _write(path, "mla")


def moe_layer(path: str) -> str | None:
    """moe_layer-*.json (bench_moe_layer.py) -> .png: TFLOP/s against tokens per (case, precision), ours, the torch
    composition and the naive loop, against that precision's spec dense peak."""
    return _write(path, "moe_layer")


def training(path: str) -> str | None:
    """training-*.json (bench_training.py) -> .png: as moe_layer, for one forward + backward."""
    return _write(path, "training")


def moe_decode(path: str) -> str | None:
    """moe_decode-*.json (bench_moe_decode.py) -> .png: us per block against T per (case, precision): ours, the
    transformers block, the torch composition and the weight-read bound of the same run."""
    return _write(path, "moe_decode")


def placement(path: str) -> str | None:
    """placement-*.json (bench_placement.py) -> .png: per case, max/mean GPU load and busiest link of round-robin,
    EPLB (hierarchical, global) and ours, on the fresh sample."""
    return _write(path, "placement")


def all_to_all(path: str) -> str | None:
    """all_to_all-*.json (bench_all_to_all.py) -> .png: dispatch and combine GB/s per rank for each implementation
    (and partials dtype), per (top-k, dtype), against the NVLink spec."""
    return _write(path, "all_to_all")


def plot_result(path: str) -> str | None:
    """The PNG of a result JSON of any family (picked by the file name); None, with a note, for other files."""
    if family(path) is None:
        print(f"no plot for {path}: not a result of {', '.join(FAMILIES)}")
        return None
    return _write(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="result JSONs (default: those in bench/results with a family)")
    args = ap.parse_args(argv)
    files = args.files or sorted(f for f in glob.glob(os.path.join(RESULTS, "*.json")) if family(f))
    failed = 0
    for f in files:
        try:
            out = plot_result(f)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"no plot for {f}: {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
            continue
        if out:
            print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
