"""Grouped GEMM on one H100: ours (Triton; FP8 with 1x128 / 128x128 block scales, and bf16) against torch's grouped
GEMMs in the same run, and the fused expert MLP against the torch-native composition.

    PYTHONPATH=. python bench/bench_grouped_gemm.py [--quick] [--sass] [--out DIR] [--deepgemm auto|off]

Baselines: ``torch._scaled_grouped_mm`` (FP8, rowwise scales: one per row of A, one per column of W; CUTLASS),
``torch._grouped_mm`` (bf16), and a per-expert loop of ``torch._scaled_mm``. TFLOP/s = 2 * M * N * K / t with the
median time of ``triton.testing.do_bench`` (warm-up first, L2 flushed between runs, validation syncs off).
DeepGEMM's published block-scaled FP8 numbers at (8 groups x 4096 rows): 1288 TFLOP/s gate_up, 1093 down (H800).

DeepGEMM in the same run (``--deepgemm auto``, the default: whatever ``import deep_gemm`` finds on PYTHONPATH,
either its mid-2025 pure-Python JIT, commit 8dfa329, or the 2.x C++ module; tools/gpu/gemm.sh sets it up) gets the
same quantised data as ours (1x128 activation scales, 128x128 weight scales, both dequantisation multipliers):
- contiguous layout: each group's rows padded to DeepGEMM's M alignment (128), padding rows marked -1 in
  ``m_indices``; TFLOP/s counts only the real rows' FLOPs, so the padding is DeepGEMM's cost;
- masked layout: [G, m_max, K] with m_max the largest group rounded up to the alignment, ``masked_m`` the sizes,
  ``expected_m`` the mean group size; same FLOP count.
Layout preparation (padding copies, TMA-aligned transposed activation scales) happens once, outside the timing.
Summary: ``min_vs_scaled_grouped_mm_best`` (min over the shapes of the better torch mode's time / ours),
``min_vs_deepgemm`` (min over the uniform shapes of the better DeepGEMM layout's time / ours; null when DeepGEMM
did not run), both from CUDA-graph replays (``eager_`` keys: eager calls), and ``tflops_8x4096``.
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


class DeepGemm:
    """DeepGEMM's grouped FP8 GEMMs behind one interface, for either API:
    ``2025``: commit 8dfa329 (pure-Python JIT: m_grouped_gemm_fp8_fp8_bf16_nt_contiguous / _masked);
    ``2.x``: the C++ module (m_grouped_fp8_gemm_nt_contiguous / _masked, fp32 scales kept: disable_ue8m0_cast)."""

    def __init__(self, dg, api):
        self.dg, self.api = dg, api
        self.version = getattr(dg, "__version__", None) or os.environ.get("DG_ANCHOR_COMMIT", "?")

    @classmethod
    def load(cls, mode):
        """(DeepGemm or None, status line)."""
        if mode == "off":
            return None, "off (--deepgemm off)"
        try:
            import deep_gemm as dg
        except BaseException as e:  # noqa: BLE001 - a broken build raises anything, even SystemExit
            return None, f"not run: import deep_gemm failed ({type(e).__name__}: {str(e)[:200]})"
        if hasattr(dg, "m_grouped_fp8_gemm_nt_contiguous"):
            api = "2.x"
        elif hasattr(dg, "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"):
            api = "2025"
        else:
            return None, f"not run: {dg.__file__} has no grouped FP8 GEMM this bench knows"
        me = cls(dg, api)
        return me, f"ran: api {api}, version {me.version}, {os.path.dirname(dg.__file__)}"

    def alignment(self):
        if self.api == "2025":
            return int(self.dg.get_m_alignment_for_contiguous_layout())
        return int(self.dg.get_mk_alignment_for_contiguous_layout())

    def tma_scales(self, s):
        if self.api == "2025":
            return self.dg.get_col_major_tma_aligned_tensor(s)
        return self.dg.get_mn_major_tma_aligned_tensor(s)

    def contiguous(self, a, a_s, w, ws, out, m_indices):
        if self.api == "2025":
            return self.dg.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, a_s), (w, ws), out, m_indices)
        return self.dg.m_grouped_fp8_gemm_nt_contiguous((a, a_s), (w, ws), out, m_indices, disable_ue8m0_cast=True)

    def masked(self, a, a_s, w, ws, out, masked_m, expected_m):
        if self.api == "2025":
            return self.dg.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, a_s), (w, ws), out, masked_m, expected_m)
        return self.dg.m_grouped_fp8_gemm_nt_masked((a, a_s), (w, ws), out, masked_m, expected_m,
                                                     disable_ue8m0_cast=True)


def deepgemm_inputs(dgm, sizes, a, a_s, N):
    """DeepGEMM's two layouts of the same quantised rows: a dict with the contiguous layout (rows padded per group
    to the alignment, m_indices -1 on padding) and the masked layout ([G, m_max, K]); ``rows`` maps each real row
    to its place in the contiguous output, ``mrows`` to its place in the flattened masked output."""
    dev = a.device
    M, K = a.shape
    E = len(sizes)
    al = dgm.alignment()
    sz = torch.tensor(sizes, device=dev, dtype=torch.int64)
    psz = (sz + al - 1) // al * al
    start = torch.zeros(E, dtype=torch.int64, device=dev)
    pstart = torch.zeros(E, dtype=torch.int64, device=dev)
    start[1:] = torch.cumsum(sz, 0)[:-1]
    pstart[1:] = torch.cumsum(psz, 0)[:-1]
    gid = torch.repeat_interleave(torch.arange(E, device=dev), sz)
    pos = torch.arange(M, device=dev) - start[gid]
    rows = pstart[gid] + pos
    m_pad = int(psz.sum())
    a8 = a.view(torch.uint8)
    ac = torch.zeros(m_pad, K, dtype=torch.uint8, device=dev)
    ac[rows] = a8
    sc = torch.ones(m_pad, a_s.shape[1], dtype=torch.float32, device=dev)
    sc[rows] = a_s
    m_indices = torch.full((m_pad,), -1, dtype=torch.int32, device=dev)
    m_indices[rows] = gid.to(torch.int32)
    m_max = max(al, -(-max(sizes) // al) * al)
    mrows = gid * m_max + pos
    am = torch.zeros(E * m_max, K, dtype=torch.uint8, device=dev)
    am[mrows] = a8
    sm = torch.ones(E * m_max, a_s.shape[1], dtype=torch.float32, device=dev)
    sm[mrows] = a_s
    return dict(a=ac.view(FP8), a_s=dgm.tma_scales(sc), m_indices=m_indices, out=torch.empty(m_pad, N, dtype=torch.bfloat16, device=dev),
                rows=rows, m_pad=m_pad, am=am.view(E, m_max, K).view(FP8),
                am_s=dgm.tma_scales(sm.view(E, m_max, -1)), masked_m=sz.to(torch.int32),
                expected_m=max(1, round(M / E)), mout=torch.empty(E, m_max, N, dtype=torch.bfloat16, device=dev),
                mrows=mrows, m_max=m_max)


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


def run_gemm(proj, case, m, dgm=None):
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
    dg_err = {}
    if dgm is not None:
        try:
            d = deepgemm_inputs(dgm, sizes, a, a_s, N)
            fns["dg_contig"] = lambda: dgm.contiguous(d["a"], d["a_s"], wq, ws, d["out"], d["m_indices"])  # noqa
            fns["dg_masked"] = lambda: dgm.masked(d["am"], d["am_s"], wq, ws, d["mout"], d["masked_m"],  # noqa
                                                  d["expected_m"])
            for key, o, r in (("dg_contig", d["out"], d["rows"]), ("dg_masked", d["mout"].view(-1, N), d["mrows"])):
                try:
                    o.fill_(float("nan"))
                    fns[key]()
                    torch.cuda.synchronize()
                    got = o[r[lo:hi]].float()
                    dg_err[key] = float((got - ref).norm() / ref.norm())
                    dg_err[key + "_vs_ours"] = float((o[r].float() - out.float()).norm() / out.float().norm())
                except Exception as e:  # one layout failing leaves the other
                    print(f"    DeepGEMM {key} failed: {type(e).__name__}: {str(e)[:300]}")
                    fns.pop(key)
        except Exception as e:
            print(f"    DeepGEMM inputs failed: {type(e).__name__}: {str(e)[:300]}")
            fns.pop("dg_contig", None)
            fns.pop("dg_masked", None)
    t = {k: timed(f) for k, f in fns.items()}
    cfg = gg.get_config("fp8", N, K, M // E, torch.device("cuda"))
    r = dict(case=name, proj=proj, G=E, M=M, N=N, K=K, rel_err=err, note=note.strip(), ms=t,
             config="{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages} tma{USE_TMA}".format(**cfg)
             + (" pair" if cfg.get("PAIR_N") else ""), uniform=case != "zipf")
    if dg_err:
        r.update({f"deepgemm_{'contiguous' if k.startswith('dg_contig') else 'masked'}_rel_err"
                  + ("_vs_ours" if k.endswith("_vs_ours") else ""): v for k, v in dg_err.items()})
    if "dg_contig" in t:
        r["deepgemm_contiguous_rows_padded"] = d["m_pad"]
        r["deepgemm_masked_m_max"] = d["m_max"]
    for mode, i in (("", 0), ("graph_", 1)):
        tf = {k: flops / v[i] / 1e9 for k, v in t.items()}
        best_scaled = float(np.nanmax([tf["scaled"], tf["scaled_fast"]]))
        r.update({f"{mode}ours_tflops": tf["ours"], f"{mode}scaled_grouped_mm_tflops": tf["scaled"],
                  f"{mode}scaled_grouped_mm_fast_tflops": tf["scaled_fast"],
                  f"{mode}loop_scaled_mm_tflops": tf["loop"],
                  f"{mode}ours_bf16_tflops": tf["ours_bf16"], f"{mode}grouped_mm_bf16_tflops": tf["grouped_bf16"],
                  f"{mode}vs_scaled_grouped_mm": tf["ours"] / best_scaled, f"{mode}vs_loop": tf["ours"] / tf["loop"],
                  f"{mode}fp8_vs_grouped_mm_bf16": tf["ours"] / tf["grouped_bf16"],
                  f"{mode}bf16_vs_grouped_mm_bf16": tf["ours_bf16"] / tf["grouped_bf16"],
                  f"{mode}scaled_grouped_mm_best_tflops": best_scaled})
        for key, col in (("dg_contig", "contiguous"), ("dg_masked", "masked")):
            if key in tf:
                r[f"{mode}deepgemm_{col}_tflops"] = tf[key]
                r[f"{mode}vs_deepgemm_{col}"] = tf["ours"] / tf[key]
        dg_tf = [tf[k] for k in ("dg_contig", "dg_masked") if k in tf and not np.isnan(tf[k])]
        if dg_tf:
            r[f"{mode}vs_deepgemm_best"] = tf["ours"] / max(dg_tf)
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
DG_COLS = ["deepgemm_contiguous_tflops", "deepgemm_masked_tflops", "vs_deepgemm_best"]
GEMM_COLS = GEMM_COLS[:-3] + DG_COLS + GEMM_COLS[-3:]
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
    ap.add_argument("--deepgemm", choices=("auto", "off"), default="auto",
                    help="time DeepGEMM (import deep_gemm from PYTHONPATH) in the same run; auto: if it imports")
    ap.add_argument("--no-mlp", action="store_true", help="skip the expert-MLP rows")
    args = ap.parse_args()
    cases = [(8, 4096)] if args.quick else CASES
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    dgm, dg_status = DeepGemm.load(args.deepgemm)
    print(f"DeepGEMM: {dg_status}", flush=True)
    sass = sass_check() if args.sass else {}
    rows = []
    for proj in PROJ:
        for case, m in cases:
            rows.append(run_gemm(proj, case, m, dgm))
            print(markdown([rows[-1]], GEMM_COLS, FORMATS).splitlines()[-1], flush=True)
            print(markdown([rows[-1]], GRAPH_COLS, FORMATS).splitlines()[-1], flush=True)
            torch.cuda.empty_cache()
    mlp_rows = []
    for case, m in ([] if args.no_mlp else cases):
        mlp_rows.append(run_mlp(case, m))
        print(markdown([mlp_rows[-1]], MLP_COLS, MLP_FORMATS).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    table = "### Grouped GEMM, eager calls (TFLOP/s)\n\n" + markdown(rows, GEMM_COLS, FORMATS) + \
        "\n\n### Grouped GEMM, CUDA-graph replays (TFLOP/s)\n\n" + markdown(rows, GRAPH_COLS, FORMATS) + \
        "\n\n### Expert MLP (TFLOP/s)\n\n" + markdown(mlp_rows, MLP_COLS, MLP_FORMATS) + "\n"
    print(table)
    def lo(key, rs=rows):
        vals = [r[key] for r in rs if key in r and not np.isnan(r[key])]
        return float(min(vals)) if vals else None

    uniform = [r for r in rows if r["uniform"]]
    dg_ran = any("graph_vs_deepgemm_best" in r or "vs_deepgemm_best" in r for r in rows)
    at = {r["proj"]: r for r in rows if r["G"] == 8 and r["M"] == 8 * 4096}
    tflops_8x4096 = {p: {k: r.get(f"graph_{k}_tflops") for k in ("ours", "scaled_grouped_mm_best",
                                                                  "deepgemm_contiguous", "deepgemm_masked")}
                     | {"published_deepgemm_h800": DEEPGEMM[p]} for p, r in at.items()}
    eager_tflops_8x4096 = {p: {k: r.get(f"{k}_tflops") for k in ("ours", "scaled_grouped_mm_best",
                                                                 "deepgemm_contiguous", "deepgemm_masked")}
                           for p, r in at.items()}

    summary = {
        "shapes": len(rows),
        "quick": bool(args.quick),
        "min_vs_scaled_grouped_mm_best": lo("graph_vs_scaled_grouped_mm"),
        "eager_min_vs_scaled_grouped_mm_best": lo("vs_scaled_grouped_mm"),
        "min_vs_deepgemm": lo("graph_vs_deepgemm_best", uniform) if dg_ran else None,
        "min_vs_deepgemm_contiguous": lo("graph_vs_deepgemm_contiguous", uniform) if dg_ran else None,
        "min_vs_deepgemm_masked": lo("graph_vs_deepgemm_masked", uniform) if dg_ran else None,
        "min_vs_deepgemm_all_shapes": lo("graph_vs_deepgemm_best") if dg_ran else None,
        "eager_min_vs_deepgemm": lo("vs_deepgemm_best", uniform) if dg_ran else None,
        "tflops_8x4096": tflops_8x4096,
        "eager_tflops_8x4096": eager_tflops_8x4096,
        "deepgemm": dg_status,
        "deepgemm_max_rel_err": max([v for r in rows for k, v in r.items() if k.startswith("deepgemm_")
                                     and "rel_err" in k and not k.endswith("vs_ours")], default=None),
        "max_ours_fp8_tflops": float(np.nanmax([r["ours_tflops"] for r in rows])),
        "min_vs_scaled_grouped_mm": lo("vs_scaled_grouped_mm"),
        "min_fp8_vs_grouped_mm_bf16": lo("fp8_vs_grouped_mm_bf16"),
        "min_bf16_vs_grouped_mm_bf16": lo("bf16_vs_grouped_mm_bf16"),
        "vs_deepgemm": {r["proj"]: r["vs_deepgemm"] for r in rows if "vs_deepgemm" in r},
        "min_mlp_speedup": lo("mlp_speedup", mlp_rows) if mlp_rows else None,
        "graph_min_vs_scaled_grouped_mm": lo("graph_vs_scaled_grouped_mm"),
        "graph_min_fp8_vs_grouped_mm_bf16": lo("graph_fp8_vs_grouped_mm_bf16"),
        "graph_min_bf16_vs_grouped_mm_bf16": lo("graph_bf16_vs_grouped_mm_bf16"),
        "graph_vs_deepgemm": {r["proj"]: r["graph_vs_deepgemm"] for r in rows if "graph_vs_deepgemm" in r},
        "graph_min_mlp_speedup": lo("graph_mlp_speedup", mlp_rows) if mlp_rows else None,
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
