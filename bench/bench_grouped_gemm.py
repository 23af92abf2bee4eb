"""Grouped GEMM on one H100: ours (Triton; FP8 with 1x128 / 128x128 block scales, and bf16) against torch's grouped
GEMMs in the same run, and the fused expert MLP against the torch-native composition.

    PYTHONPATH=. python bench/bench_grouped_gemm.py [--quick] [--sass] [--out DIR]

Baselines: ``torch._scaled_grouped_mm`` (FP8, rowwise scales: one per row of A, one per column of W; CUTLASS),
``torch._grouped_mm`` (bf16), and a per-expert loop of ``torch._scaled_mm``. TFLOP/s = 2 * M * N * K / t with the
median time of ``triton.testing.do_bench`` (warm-up first, L2 flushed between runs, validation syncs off).
DeepGEMM's published block-scaled FP8 numbers at (8 groups x 4096 rows): 1288 TFLOP/s gate_up, 1093 down (H800).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, markdown, save  # noqa: E402  (sets MOE_KERNELS_VALUE_CHECKS=0)


def _import_ours():
    """moe_kernels.ops.grouped_gemm and the reference; without running package __init__s that may be mid-edit."""
    try:
        from moe_kernels import reference
        from moe_kernels.ops import grouped_gemm

        return grouped_gemm, reference
    except Exception as e:  # pragma: no cover - another module of the package does not import right now
        import importlib
        import types

        print(f"note: importing moe_kernels failed ({type(e).__name__}: {e}); loading the grouped GEMM alone")
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe_kernels")
        for name, path in (("moe_kernels", root), ("moe_kernels.ops", os.path.join(root, "ops"))):
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
        return importlib.import_module("moe_kernels.ops.grouped_gemm"), importlib.import_module("moe_kernels.reference")


gg, R = _import_ours()
FP8 = torch.float8_e4m3fn
DEEPGEMM = {"gate_up": 1288.0, "down": 1093.0}  # published TFLOP/s at (8, 4096)
PROJ = {"gate_up": (4096, 7168), "down": (7168, 2048)}  # (N, K) of DeepSeek-V3's w13 and w2
CASES = [(8, 512), (32, 256), (32, 1024), (8, 4096), ("zipf", 8192)]


def group_sizes(case, m):
    if case == "zipf":  # skewed: 32 experts, 8192 rows, p_i ~ 1 / i^1.1
        p = 1.0 / np.arange(1, 33) ** 1.1
        return [int(c) for c in np.random.default_rng(0).multinomial(m, p / p.sum())]
    return [m] * case


def align16(sizes):
    """Round group sizes to multiples of 16, same total (for kernels that need aligned groups)."""
    out = [s // 16 * 16 for s in sizes]
    out[int(np.argmax(sizes))] += sum(sizes) - sum(out)
    return out


def offsets_of(sizes):
    off = torch.zeros(len(sizes) + 1, dtype=torch.int32, device="cuda")
    off[1:] = torch.cumsum(torch.tensor(sizes, device="cuda"), 0)
    return off


def rowwise_fp8(x):
    """e4m3 with one scale per row (what torch._scaled_grouped_mm takes)."""
    s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
    return (x.float() / s).clamp(-448, 448).to(FP8), s.squeeze(-1)


def graph_ms(fn, budget_ms=100.0):
    """Median GPU time of ``fn`` replayed from a CUDA graph: no CPU launch overhead; L2 flushed before each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for i in range(200):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if i >= 10 and sum(times) > budget_ms:
            break
    del graph
    return float(np.median(times))


def timed(fn):
    """(eager ms as called from Python, CUDA-graph ms); NaN where this torch build or shape refuses the call."""
    out = []
    for how in (bench_ms, graph_ms):
        try:
            fn()
            out.append(how(fn))
        except Exception as e:
            print(f"    failed ({how.__name__}): {type(e).__name__}: {str(e)[:160]}")
            out.append(float("nan"))
    return out


def run_gemm(proj, case, m):
    N, K = PROJ[proj]
    sizes = group_sizes(case, m)
    E, M = len(sizes), sum(sizes)
    off = offsets_of(sizes)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device="cuda") * K**-0.5).bfloat16()
    a, a_s = R.quantize_fp8(x)
    wq, ws = R.quantize_weight_fp8(w)
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    ar, ar_s = rowwise_fp8(x)
    wr, wr_s = rowwise_fp8(w.view(E * N, K))
    wr, wr_s = wr.view(E, N, K), wr_s.view(E, N)

    ours = lambda: gg.grouped_gemm_fp8(a, a_s, wq, ws, off, out=out)  # noqa: E731
    ours_bf16 = lambda: gg.grouped_gemm_bf16(x, w, off)  # noqa: E731

    # torch's grouped kernels: try the real group sizes; fall back to 16-aligned sizes if they are refused
    note, t_sizes, t_off = "", sizes, off
    try:
        torch._scaled_grouped_mm(ar, wr.transpose(-2, -1), ar_s, wr_s, offs=off[1:], out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
    except Exception as e:
        t_sizes = align16(sizes)
        t_off = offsets_of(t_sizes)
        note = f"torch baselines on 16-aligned groups ({type(e).__name__})"
    ends = t_off[1:].contiguous()
    scaled = {fast: (lambda f=fast: torch._scaled_grouped_mm(ar, wr.transpose(-2, -1), ar_s, wr_s, offs=ends,
                                                             out_dtype=torch.bfloat16, use_fast_accum=f))
              for fast in (False, True)}
    grouped_bf16 = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=ends, out_dtype=torch.bfloat16)  # noqa
    loop_sizes = t_sizes if all(s % 16 == 0 for s in t_sizes) else align16(t_sizes)  # cuBLAS rowwise: 16-row
    if loop_sizes != t_sizes:
        note += " loop on 16-aligned groups"
    bounds = offsets_of(loop_sizes).tolist()

    def loop():
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                torch._scaled_mm(ar[lo:hi], wr[e].t(), ar_s[lo:hi, None], wr_s[e][None, :], out_dtype=torch.bfloat16)

    # correctness in the same run: the first non-empty expert against the dequantised fp32 reference
    ours()
    e0 = next(i for i, s in enumerate(sizes) if s)
    lo, hi = int(off[e0]), int(off[e0 + 1])
    ref = R.grouped_gemm_fp8(a[lo:hi], a_s[lo:hi], wq[e0:e0 + 1], ws[e0:e0 + 1],
                             torch.tensor([0, hi - lo], dtype=torch.int32, device="cuda"), out_dtype=torch.float32)
    err = float((out[lo:hi].float() - ref).norm() / ref.norm())

    flops = 2.0 * M * N * K
    name = f"{proj} {'zipf32' if case == 'zipf' else f'G={case}'} m={m if case != 'zipf' else 'skewed'}"
    print(f"  {name}: M={M}", flush=True)
    fns = dict(ours=ours, scaled=scaled[False], scaled_fast=scaled[True], loop=loop, ours_bf16=ours_bf16,
               grouped_bf16=grouped_bf16)
    t = {k: timed(f) for k, f in fns.items()}
    cfg = gg.get_config("fp8", N, K, M // E, torch.device("cuda"))
    r = dict(case=name, proj=proj, G=E, M=M, N=N, K=K, rel_err=err, note=note.strip(), ms=t,
             config="{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages} tma{USE_TMA}".format(**cfg)
             + (" pair" if cfg.get("PAIR_N") else ""))
    for mode, i in (("", 0), ("graph_", 1)):
        tf = {k: flops / v[i] / 1e9 for k, v in t.items()}
        best_scaled = float(np.nanmax([tf["scaled"], tf["scaled_fast"]]))
        r.update({f"{mode}ours_tflops": tf["ours"], f"{mode}scaled_grouped_mm_tflops": tf["scaled"],
                  f"{mode}scaled_grouped_mm_fast_tflops": tf["scaled_fast"],
                  f"{mode}loop_scaled_mm_tflops": tf["loop"],
                  f"{mode}ours_bf16_tflops": tf["ours_bf16"], f"{mode}grouped_mm_bf16_tflops": tf["grouped_bf16"],
                  f"{mode}vs_scaled_grouped_mm": tf["ours"] / best_scaled, f"{mode}vs_loop": tf["ours"] / tf["loop"],
                  f"{mode}fp8_vs_grouped_mm_bf16": tf["ours"] / tf["grouped_bf16"],
                  f"{mode}bf16_vs_grouped_mm_bf16": tf["ours_bf16"] / tf["grouped_bf16"]})
    if case == 8 and m == 4096:
        r["vs_deepgemm"] = r["ours_tflops"] / DEEPGEMM[proj]
        r["graph_vs_deepgemm"] = r["graph_ours_tflops"] / DEEPGEMM[proj]
    return r


def run_mlp(case, m, H=7168, I=2048):
    sizes = group_sizes(case, m)
    E, M = len(sizes), sum(sizes)
    off = offsets_of(sizes)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16()
    a, a_s = R.quantize_fp8(x)
    (q13, s13), (q2, s2) = R.quantize_weight_fp8(w13), R.quantize_weight_fp8(w2)
    ours = lambda: gg.expert_mlp(a, a_s, off, q13, s13, q2, s2)  # noqa: E731
    r13, r13s = rowwise_fp8(w13.view(-1, H))
    r2, r2s = rowwise_fp8(w2.view(-1, I))
    r13, r13s, r2, r2s = r13.view(E, 2 * I, H), r13s.view(E, 2 * I), r2.view(E, H, I), r2s.view(E, H)
    ar, ar_s = rowwise_fp8(x)
    ends = off[1:].contiguous()
    note = ""
    try:
        torch._scaled_grouped_mm(ar, r13.transpose(-2, -1), ar_s, r13s, offs=ends, out_dtype=torch.bfloat16)
    except Exception as e:
        ends = offsets_of(align16(sizes))[1:].contiguous()
        note = f"composition on 16-aligned groups ({type(e).__name__})"

    def composition():
        h = torch._scaled_grouped_mm(ar, r13.transpose(-2, -1), ar_s, r13s, offs=ends, out_dtype=torch.bfloat16)
        g, u = h.chunk(2, dim=-1)
        hq, hs = rowwise_fp8(F.silu(g) * u)
        return torch._scaled_grouped_mm(hq, r2.transpose(-2, -1), hs, r2s, offs=ends, out_dtype=torch.bfloat16)

    # correctness: the whole output against the reference MLP on the first non-empty expert
    e0 = next(i for i, s in enumerate(sizes) if s)
    lo, hi = int(off[e0]), int(off[e0 + 1])
    y = ours()
    ref = R.expert_mlp(a[lo:hi], torch.tensor([0, hi - lo], dtype=torch.int32, device="cuda"), q13[e0:e0 + 1],
                       q2[e0:e0 + 1], a_s[lo:hi], s13[e0:e0 + 1], s2[e0:e0 + 1], out_dtype=torch.float32)
    err = float((y[lo:hi].float() - ref).norm() / ref.norm())
    flops = 2.0 * M * 3 * H * I
    (t_ours, g_ours), (t_comp, g_comp) = timed(ours), timed(composition)
    name = f"{'zipf32' if case == 'zipf' else f'G={case}'} m={m if case != 'zipf' else 'skewed'}"
    return dict(case=name, G=E, M=M, rel_err=err, note=note, mlp_ours_tflops=flops / t_ours / 1e9,
                mlp_composition_tflops=flops / t_comp / 1e9, mlp_speedup=t_comp / t_ours,
                graph_mlp_ours_tflops=flops / g_ours / 1e9, graph_mlp_composition_tflops=flops / g_comp / 1e9,
                graph_mlp_speedup=g_comp / g_ours, ms=dict(ours=[t_ours, g_ours], composition=[t_comp, g_comp]))


def sass_check():
    """Compile the FP8 and bf16 kernels with their default configs and count Hopper matrix instructions in SASS."""
    found = {}
    M, K, N, E = 256, 1024, 256, 2
    off = torch.tensor([0, 100, M], dtype=torch.int32, device="cuda")
    for kind in ("fp8", "bf16"):
        for tma in (0, 1):
            cfg = dict(gg.get_config(kind, N, K, M // E, torch.device("cuda")), USE_TMA=tma)
            x = torch.randn(M, K, device="cuda")
            w = torch.randn(E, N, K, device="cuda")
            out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
            if kind == "fp8":
                (a, a_s), (wq, ws) = R.quantize_fp8(x), R.quantize_weight_fp8(w)
            else:
                a, a_s, wq, ws = x.bfloat16(), None, w.bfloat16(), None
            kern = gg._launch(a, a_s, wq, ws, out, offsets=off, cfg=cfg)
            sass = ""
            try:
                sass = kern.asm["sass"]
            except Exception:
                tool = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin",
                                    "cuobjdump")
                tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
                if tool:
                    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                        f.write(kern.asm["cubin"])
                    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
            counts = {op: len(re.findall(op, sass)) for op in ("QGMMA", "HGMMA", "HMMA", "UTMALDG", "LDGSTS")}
            counts["registers"] = getattr(kern, "n_regs", None)
            counts["spills"] = getattr(kern, "n_spills", None)
            counts["config"] = cfg
            found[f"{kind} tma={tma}"] = counts
            print(f"  SASS {kind} tma={tma}: {counts}")
    return found


GEMM_COLS = ["case", "ours_tflops", "scaled_grouped_mm_tflops", "scaled_grouped_mm_fast_tflops",
             "loop_scaled_mm_tflops", "vs_scaled_grouped_mm", "grouped_mm_bf16_tflops", "fp8_vs_grouped_mm_bf16",
             "ours_bf16_tflops", "bf16_vs_grouped_mm_bf16", "vs_deepgemm", "rel_err", "config"]
GRAPH_COLS = ["case"] + ["graph_" + c for c in GEMM_COLS[1:-3]] + ["graph_vs_deepgemm"]
FORMATS = {c: ".0f" for c in GEMM_COLS + GRAPH_COLS if c.endswith("tflops")}
FORMATS.update({c: ".2f" for c in GEMM_COLS + GRAPH_COLS if "_vs_" in c or c.startswith("vs_")}, rel_err=".1e")
MLP_COLS = ["case", "M", "mlp_ours_tflops", "mlp_composition_tflops", "mlp_speedup", "graph_mlp_ours_tflops",
            "graph_mlp_composition_tflops", "graph_mlp_speedup", "rel_err"]
MLP_FORMATS = {c: ".0f" for c in MLP_COLS if c.endswith("tflops")}
MLP_FORMATS.update({c: ".2f" for c in MLP_COLS if c.endswith("speedup")}, rel_err=".1e")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only (8, 4096)")
    ap.add_argument("--sass", action="store_true", help="also count QGMMA/HGMMA in the compiled kernels' SASS")
    ap.add_argument("--out", default=None, help="also copy the JSON and markdown there")
    args = ap.parse_args()
    cases = [(8, 4096)] if args.quick else CASES
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    sass = sass_check() if args.sass else {}
    rows = []
    for proj in PROJ:
        for case, m in cases:
            rows.append(run_gemm(proj, case, m))
            print(markdown([rows[-1]], GEMM_COLS, FORMATS).splitlines()[-1], flush=True)
            print(markdown([rows[-1]], GRAPH_COLS, FORMATS).splitlines()[-1], flush=True)
            torch.cuda.empty_cache()
    mlp_rows = []
    for case, m in cases:
        mlp_rows.append(run_mlp(case, m))
        print(markdown([mlp_rows[-1]], MLP_COLS, MLP_FORMATS).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    table = "### Grouped GEMM, eager calls (TFLOP/s)\n\n" + markdown(rows, GEMM_COLS, FORMATS) + \
        "\n\n### Grouped GEMM, CUDA-graph replays (TFLOP/s)\n\n" + markdown(rows, GRAPH_COLS, FORMATS) + \
        "\n\n### Expert MLP (TFLOP/s)\n\n" + markdown(mlp_rows, MLP_COLS, MLP_FORMATS) + "\n"
    print(table)
    def lo(key, rs=rows):
        return float(np.nanmin([r[key] for r in rs]))

    summary = {
        "max_ours_fp8_tflops": float(np.nanmax([r["ours_tflops"] for r in rows])),
        "min_vs_scaled_grouped_mm": lo("vs_scaled_grouped_mm"),
        "min_fp8_vs_grouped_mm_bf16": lo("fp8_vs_grouped_mm_bf16"),
        "min_bf16_vs_grouped_mm_bf16": lo("bf16_vs_grouped_mm_bf16"),
        "vs_deepgemm": {r["proj"]: r["vs_deepgemm"] for r in rows if "vs_deepgemm" in r},
        "min_mlp_speedup": lo("mlp_speedup", mlp_rows),
        "graph_min_vs_scaled_grouped_mm": lo("graph_vs_scaled_grouped_mm"),
        "graph_min_fp8_vs_grouped_mm_bf16": lo("graph_fp8_vs_grouped_mm_bf16"),
        "graph_min_bf16_vs_grouped_mm_bf16": lo("graph_bf16_vs_grouped_mm_bf16"),
        "graph_vs_deepgemm": {r["proj"]: r["graph_vs_deepgemm"] for r in rows if "graph_vs_deepgemm" in r},
        "graph_min_mlp_speedup": lo("graph_mlp_speedup", mlp_rows),
        "qgmma_present": any(v.get("QGMMA", 0) > 0 for k, v in sass.items() if k.startswith("fp8")) if sass else None,
    }
    print(summary)
    path = save("grouped_gemm", rows, summary, {"mlp_rows": mlp_rows, "sass": sass})
    md = path[:-5] + ".md"
    with open(md, "w") as f:
        f.write(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for p in (path, md):
            shutil.copy(p, args.out)


if __name__ == "__main__":
    main()
