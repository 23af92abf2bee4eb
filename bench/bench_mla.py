"""MLA decode against FlashMLA in the same process (and the fused latent down-projection), on one GPU.

    python bench/bench_mla.py [--quick] [--no-sweep] [--latent] [--budget SECONDS]

Decode (``mk.ops.mla_decode``, the op alone: one token per row over the latent cache, 128 heads, 512 + 64
latent/rope, softmax scale 1/sqrt(192), q std 0.05 and cache std 1 as ../shared/anchors/bench_anchors.py), at B in
{32, 128} x S in {1024, 4096, 8192}, four caches: bf16 contiguous [B, S, 576], bf16 paged (page 64, shuffled
block table), FP8 contiguous / paged (uint8 rows of 656 bytes: e4m3 latent + fp32 scale per token, bf16 rope).
FlashMLA (``flash_mla.flash_mla_with_kvcache``, dense bf16 paged decode) runs on the same bf16 rows when it
imports: it is searched on sys.path, then in $FLASHMLA_PATH and /tmp/anchors_build/src/FlashMLA (where
``PROJ=. bash .anchors/run.sh build`` puts it). A torch absorbed decode (batched GEMMs + fp32 softmax) is the
second baseline. us: triton.testing.do_bench median (L2 flushed); *_graph_us: replayed from a CUDA graph.
GB/s = bytes read (cache rows once, q) + written (out) / t; TFLOP/s = 2 B 128 S (576 + 512) / t; x_flashmla =
t_flashmla / t_ours (> 1: ours faster). Every output is checked against FlashMLA's (bf16) or a float32 reference
of the first rows (FP8: the reference over the dequantised rows).

Summary keys: decode_vs_flashmla_min (min over the shapes of the bf16-cache ratios, contiguous and paged),
decode_fp8_vs_flashmla_B128_S4096 (FlashMLA's bf16 time / ours over the FP8 cache), paged_vs_contig_max;
with MLA_BENCH_GLUON naming fp8mma, fp8mma_vs_flashmla_B128_S4096 / _min_B128 and fp8mma_rel_err_vs_fp32_max (the
e4m3-product kernel, ops/mla_decode_sm90_fp8.py).

With a sweep (default), launch configs and split counts are timed at S=4096 for each B and cache dtype; the
winners run the table and are written as results/mla_<GPU>.json (the format moe_kernels/ops/configs/ uses).
--latent adds the down-projection rows (``mla_latent_proj`` against unfused torch; see bench_latent).
"""
import argparse
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("MOE_KERNELS_VALUE_CHECKS", "0")  # no host syncs inside timed calls

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench_ms, copy_bandwidth_gbps, markdown, save  # noqa: E402

import moe_kernels.ops.mla as ops_mla  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from moe_kernels.reference.mla import default_inv_freq  # noqa: E402
from moe_kernels.reference import mla_decode as RD  # noqa: E402
from moe_kernels.reference.mla_decode import mla_latent_proj as ref_latent_proj  # noqa: E402

H, Q, C, ROPE, HEADS, V = 7168, 1536, 512, 64, 128, 128
N = Q + C + ROPE
EPS = 1e-6
DEV = "cuda"



def gemm_cfg(bm, bn, bk, warps, stages, tma=1, quant_a=0):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=1, QUANT_A=quant_a, USE_TMA=tma,
                num_warps=warps, num_stages=stages)


LATENT_SWEEP = {
    "latent_bf16": [gemm_cfg(128, 128, 64, 8, 4, tma=0), gemm_cfg(128, 128, 64, 8, 4), gemm_cfg(128, 64, 64, 4, 4),
                    gemm_cfg(128, 256, 64, 8, 3), gemm_cfg(64, 128, 64, 4, 4)],
    "latent_fp8": [gemm_cfg(128, 128, 128, 8, 4, tma=0), gemm_cfg(128, 128, 128, 8, 4), gemm_cfg(128, 64, 128, 4, 4),
                   gemm_cfg(64, 128, 128, 4, 4), gemm_cfg(128, 128, 128, 8, 3, quant_a=1)],
}


def dec_cfg(bh, bn, warps, stages, lazy=0, v=1):
    return dict(BLOCK_H=bh, BLOCK_N=bn, LAZY=lazy, V_BLOCKS=v, num_warps=warps, num_stages=stages)


# Shared memory: the q tile BLOCK_H x 576 x 2 B (64 heads: 72 KiB, 128: 144 KiB) + the cache tiles (bf16: BLOCK_N x
# 1152 B; FP8: BLOCK_N x 656 B, plus the bf16 copy the wgmmas read) per stage; Hopper allows 227 KiB per CTA.
# Accumulator: BLOCK_H x 512 / V_BLOCKS fp32 over 32 x num_warps threads. LAZY 1: rescale when a row max grew,
# 2: when it grew by > 8 (log2). V_BLOCKS=2: 128 heads in one head block, each program half the value columns.
DECODE_SWEEP = {  # the shipped config (configs/mla_<GPU>.json or DEFAULTS) is timed too
    "decode": [
        dec_cfg(64, 64, 8, 2),
        dec_cfg(128, 64, 8, 1, v=2),
    ],
    "decode_fp8": [
        dec_cfg(64, 32, 8, 2),
        dec_cfg(64, 64, 8, 2),
        dec_cfg(128, 32, 8, 2, v=2),
    ],
}


# the Gluon sm_90 kernel (mla_decode_sm90, its own fixed tiles): GLUON=1 serial schedule, 2 the PIPE (seesaw)
# schedule, 3 the serial one with lookahead. MLA_BENCH_GLUON: which of them to time ("1,2,3,fp8" default;
# tools/gpu/mla.sh passes those whose GPU test passed) ("fp8": the FP8 cache through it, serial schedule;
# "fp8mma": the FP8 cache's seesaw with e4m3 products, mla_decode_sm90_fp8, its rows' gluon2_* keys: opt-in here
# until its GPU test has passed, as it is in the library)
_GLUON = [v.strip() for v in os.environ.get("MLA_BENCH_GLUON", "1,2,3,fp8").split(",")]
DECODE_SWEEP["decode"][:0] = [dict(dec_cfg(64, 64, 8, 2), GLUON=int(v)) for v in _GLUON if v in ("1", "2", "3")]
if "fp8" in _GLUON:
    DECODE_SWEEP["decode_fp8"].insert(0, dict(dec_cfg(64, 64, 8, 2), GLUON=1))
if "fp8mma" in _GLUON:
    DECODE_SWEEP["decode_fp8"].insert(0, dict(dec_cfg(64, 64, 8, 2), GLUON=2))


def graph_ms(fn):
    """Median time of ``fn`` replayed from a CUDA graph: the GPU time without the host's launch overhead (which
    dominates small shapes in eager mode, ours and the baselines alike). None when capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return bench_ms(g.replay)
    except Exception as e:  # noqa: BLE001
        print(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------------------------
# down-projection


def torch_rope(k, cos, sin):
    """Interleaved RoPE as torch ops (pairs (x0, x1), ... rotated, written [even | odd])."""
    kf = k.float()
    x1, x2 = kf[..., 0::2], kf[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(k.dtype)


def torch_epilogue(y, qn, kn, cos, sin):
    c_q = F.rms_norm(y[:, :Q], (Q,), qn, EPS)
    c_kv = F.rms_norm(y[:, Q : Q + C], (C,), kn, EPS)
    return c_q, torch.cat([c_kv, torch_rope(y[:, Q + C :], cos, sin)], -1)


SCALE_LAYOUTS = {  # how torch._scaled_mm may want the block scales laid out
    "a outer-major, b ws.t()": lambda xs, ws: (xs.t().contiguous().t(), ws.t()),
    "a row-major, b ws.t()": lambda xs, ws: (xs, ws.t()),
    "a outer-major, b contiguous": lambda xs, ws: (xs.t().contiguous().t(), ws.t().contiguous()),
    "a row-major, b contiguous": lambda xs, ws: (xs, ws.t().contiguous()),
}


def scaled_mm_layout(x8, xs, w8, ws):
    """The first scale layout with which torch._scaled_mm computes DeepSeek's block-scaled GEMM, or (None, why)."""
    if not hasattr(torch, "_scaled_mm"):
        return None, "no torch._scaled_mm"
    ref = R.dequantize_fp8(x8[:256], xs[:256]) @ R.dequantize_weight_fp8(w8, ws).t()
    errors = []
    for name, make in SCALE_LAYOUTS.items():
        try:
            sa, sb = make(xs[:256], ws)
            out = torch._scaled_mm(x8[:256], w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            if rel(out, ref) < 2e-2:
                return make, name
            errors.append(f"{name}: wrong result ({rel(out, ref):.2e})")
        except Exception as e:  # noqa: BLE001 - any failure means: not supported here
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    return None, "; ".join(errors)


def bench_latent(T, fp8, sweep, log):
    dev = DEV
    torch.manual_seed(0)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(N, H, device=dev) * H**-0.5).bfloat16()
    qn = (torch.rand(Q, device=dev) + 0.5).bfloat16()
    kn = (torch.rand(C, device=dev) + 0.5).bfloat16()
    cos, sin = R.rope_cos_sin(torch.arange(T, device=dev), default_inv_freq(ROPE).to(dev))
    kind = "latent_fp8" if fp8 else "latent_bf16"
    row = dict(op="down_proj", dtype="fp8" if fp8 else "bf16", T=T)
    if fp8:
        w8, ws = R.quantize_weight_fp8(w)
        wt, w_scale = w8, ws
        w_bytes = N * H + ws.numel() * 4
    else:
        wt, w_scale = w, None
        w_bytes = N * H * 2

    def ours(cfg=None):
        c_q = torch.empty(T, Q, dtype=x.dtype, device=dev)
        kv = torch.empty(T, C + ROPE, dtype=x.dtype, device=dev)
        ops_mla._latent_proj_launch(x, wt, w_scale, qn, kn, cos, sin, Q, C, EPS, True, c_q, kv, cfg=cfg)
        return c_q, kv

    # correctness against the fp32 reference on a slice of rows
    c_q, kv = ours()
    rq, rkv = ref_latent_proj(x[:128].cpu(), wt.cpu(), qn.cpu(), kn.cpu(), cos[:128].cpu(), sin[:128].cpu(), Q, C,
                              w_scale=None if w_scale is None else w_scale.cpu())
    row["rel_err_c_q"] = rel(c_q[:128].cpu(), rq)
    row["rel_err_kv"] = rel(kv[:128].cpu(), rkv)

    best = (bench_ms(ours), "default")
    cfgs = {"default": ops_mla.get_mla_config(kind, T, x.device)}
    if sweep:
        for i, cfg in enumerate(LATENT_SWEEP[kind]):
            try:
                ours(cfg)
                ms = bench_ms(lambda cfg=cfg: ours(cfg))
                log.append(dict(kind=kind, T=T, cfg=cfg, ms=ms))
                cfgs[f"sweep{i}"] = cfg
                if ms < best[0]:
                    best = (ms, f"sweep{i}")
            except Exception as e:  # noqa: BLE001
                log.append(dict(kind=kind, T=T, cfg=cfg, error=f"{type(e).__name__}: {str(e)[:300]}"))
    t_ours, which = best
    row["config"] = which
    row["best_cfg"] = cfgs[which]

    # unfused torch
    if not fp8:
        y = F.linear(x, w)
        row["rel_err_torch_vs_ref"] = rel(torch_epilogue(y[:128], qn, kn, cos[:128], sin[:128])[1].cpu(), rkv)
    torch_bf16 = lambda: torch_epilogue(F.linear(x, w), qn, kn, cos, sin)  # noqa: E731
    t_torch_bf16 = bench_ms(torch_bf16)
    row["torch_bf16_us"] = t_torch_bf16 * 1e3
    t_base, base_fn = t_torch_bf16, torch_bf16
    row["baseline"] = "torch bf16: F.linear + F.rms_norm x2 + RoPE ops"
    if fp8:
        xq, xs = R.quantize_fp8(x)
        make, note = scaled_mm_layout(xq, xs, w8, ws)
        row["scaled_mm"] = note
        if make is not None:
            def torch_fp8():
                xq_, xs_ = R.quantize_fp8(x)  # the quantisation as torch ops (the reference is plain torch)
                sa, sb = make(xs_, ws)
                y_ = torch._scaled_mm(xq_, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                return torch_epilogue(y_, qn, kn, cos, sin)

            sa0, sb0 = make(xs, ws)
            try:
                t_fp8 = bench_ms(torch_fp8)
                row["torch_fp8_us"] = t_fp8 * 1e3
                row["torch_fp8_gemm_only_us"] = bench_ms(
                    lambda: torch._scaled_mm(xq, w8.t(), scale_a=sa0, scale_b=sb0, out_dtype=torch.bfloat16)) * 1e3
                t_base, base_fn = t_fp8, torch_fp8
                row["baseline"] = "torch fp8: torch-op quantisation + _scaled_mm (block scales) + norms + RoPE"
            except Exception as e:  # noqa: BLE001
                row["scaled_mm"] += f"; timing failed: {type(e).__name__}: {str(e)[:120]}"
        try:
            import moe_kernels as mk  # noqa: PLC0415

            offs = torch.tensor([0, T], dtype=torch.int32, device=dev)
            w3, s3 = w8.unsqueeze(0), ws.unsqueeze(0)

            def mk_unfused():
                a, s = mk.ops.quantize_fp8(x)
                return torch_epilogue(mk.ops.grouped_gemm_fp8(a, s, w3, s3, offs), qn, kn, cos, sin)

            row["mk_unfused_fp8_us"] = bench_ms(mk_unfused) * 1e3
            if "torch_fp8_us" not in row:
                t_base, base_fn = row["mk_unfused_fp8_us"] / 1e3, mk_unfused
                row["baseline"] = "unfused fp8: mk.ops.quantize_fp8 + grouped_gemm_fp8 (E=1) + torch norms + RoPE"
        except Exception as e:  # noqa: BLE001
            row["mk_unfused_fp8"] = f"{type(e).__name__}: {str(e)[:160]}"
    row["ours_us"] = t_ours * 1e3
    row["baseline_us"] = t_base * 1e3
    row["speedup"] = t_base / t_ours
    row["speedup_vs_torch_bf16"] = t_torch_bf16 / t_ours
    row["TFLOPS"] = 2 * T * H * N / t_ours / 1e9
    if torch.cuda.is_available():
        g_ours, g_base = graph_ms(lambda: ours(row["best_cfg"])), graph_ms(base_fn)
        if g_ours and g_base:
            row.update(ours_graph_us=g_ours * 1e3, baseline_graph_us=g_base * 1e3, speedup_graph=g_base / g_ours)
    row["GBps"] = (T * H * 2 + w_bytes + T * (Q + C + ROPE) * 2) / t_ours / 1e6
    return row


# ---------------------------------------------------------------------------------------------------------------
# decode

PAGE = 64
SCALE = 1.0 / math.sqrt(192)
ROW_FP8 = ops_mla.fp8_row_bytes(C, ROPE)
CACHES = ("bf16", "bf16_paged", "fp8", "fp8_paged")


def load_flash_mla():
    """flash_mla from sys.path, $FLASHMLA_PATH or the anchors' build dir; (module or None, why not)."""
    for path in (os.environ.get("FLASHMLA_PATH"), "/tmp/anchors_build/src/FlashMLA"):
        if path and os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)
    try:
        import flash_mla  # noqa: PLC0415

        return flash_mla, None
    except Exception as e:  # noqa: BLE001 - absent or broken: its columns stay empty
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def decode_data(B, S, seed=0):
    """The same rows as the four caches, the queries, FlashMLA's views (q [B, 1, 128, 576], pages [.., 64, 1, 576])."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    cache = torch.randn(B, S, C + ROPE, device=DEV, generator=gen).bfloat16()
    q_lat = (torch.randn(B, HEADS, C, device=DEV, generator=gen) * 0.05).bfloat16()
    q_pe = (torch.randn(B, HEADS, ROPE, device=DEV, generator=gen) * 0.05).bfloat16()
    nblk = S // PAGE
    perm = torch.randperm(B * nblk, device=DEV, generator=gen)
    table = perm.view(B, nblk).int().contiguous()
    paged = torch.empty(B * nblk, PAGE, C + ROPE, device=DEV, dtype=torch.bfloat16)
    paged[perm] = cache.view(B * nblk, PAGE, C + ROPE)
    packed = ops_mla.pack_latent_fp8(cache.view(B * S, C + ROPE), C).view(B, S, ROW_FP8)
    packed_paged = torch.empty(B * nblk, PAGE, ROW_FP8, device=DEV, dtype=torch.uint8)
    packed_paged[perm] = packed.view(B * nblk, PAGE, ROW_FP8)
    lens = torch.full((B,), S, dtype=torch.int32, device=DEV)
    q_full = torch.cat([q_lat, q_pe], -1).contiguous()
    kv = {"bf16": (cache, None), "bf16_paged": (paged, table), "fp8": (packed, None),
          "fp8_paged": (packed_paged, table)}
    return dict(B=B, S=S, kv=kv, lens=lens, q_lat=q_lat, q_pe=q_pe, q_full=q_full, table=table,
                q_fm=q_full.view(B, 1, HEADS, C + ROPE), k_fm=paged.view(B * nblk, PAGE, 1, C + ROPE))


def decode_ref(d, cache_kind, rows=(0, 1)):
    """float32 reference of the first rows (FP8: over the dequantised rows)."""
    cache = d["kv"]["bf16"][0][list(rows)]
    if cache_kind.startswith("fp8"):
        cache = d["kv"]["fp8"][0][list(rows)]
    idx = list(rows)
    return RD.mla_decode(d["q_lat"][idx].cpu(), d["q_pe"][idx].cpu(), cache.cpu(), d["lens"][idx].cpu(), SCALE)


def ours_fn(d, cache_kind, cfg=None, splits=0):
    kv, table = d["kv"][cache_kind]
    out = torch.empty(d["B"], HEADS, C, device=DEV, dtype=torch.bfloat16)

    def fn():
        ops_mla._decode_launch(d["q_lat"], d["q_pe"], kv, d["lens"], table, SCALE, splits, out, cfg=cfg)
        return out
    return fn


def cfg_kind(cache_kind):
    return "decode_fp8" if cache_kind.startswith("fp8") else "decode"


def sweep_decode(d, cache_kind, log):
    """Time every sweep config (and split counts around the heuristic's) of one cache kind: (cfg, splits, name)."""
    kind = cfg_kind(cache_kind)
    cands = [(None, 0, "shipped")] + [(c, 0, f"sweep{i}") for i, c in enumerate(DECODE_SWEEP[kind])]
    res = []
    for cfg, splits, name in cands:
        try:
            fn = ours_fn(d, cache_kind, cfg, splits)
            fn()
            ms = bench_ms(fn, rep=40)
            res.append((ms, cfg, splits, name))
            log.append(dict(kind=kind, cache=cache_kind, B=d["B"], S=d["S"], cfg=cfg, name=name, ms=ms))
        except Exception as e:  # noqa: BLE001 - a config that does not compile / fit is recorded, not fatal
            log.append(dict(kind=kind, cache=cache_kind, B=d["B"], S=d["S"], cfg=cfg, name=name,
                            error=f"{type(e).__name__}: {str(e)[:300]}"))
    ms, cfg, splits, name = min(res, key=lambda r: r[0])
    used = cfg or ops_mla.get_mla_config(kind, d["B"], d["q_lat"].device)
    auto = ops_mla.mla_decode_num_splits(d["B"], HEADS, d["S"], used["BLOCK_H"], d["q_lat"].device,
                                         used.get("V_BLOCKS", 1))
    for s in sorted({max(1, auto // 2), auto * 2, auto + 1} - {auto}):
        try:
            t = bench_ms(ours_fn(d, cache_kind, cfg, s), rep=40)
            log.append(dict(kind=kind, cache=cache_kind, B=d["B"], S=d["S"], cfg=cfg, name=name, splits=s, ms=t))
            if t < ms:
                ms, splits = t, s
        except Exception as e:  # noqa: BLE001
            log.append(dict(kind=kind, B=d["B"], splits=s, error=f"{type(e).__name__}: {str(e)[:300]}"))
    return dict(used), splits, name + (f"+splits{splits}" if splits else "")


def bench_decode_shape(B, S, fm, chosen, log, sweep, graphs=True):
    """One (B, S): FlashMLA, torch, and ours over the four caches -> rows (one per cache kind)."""
    torch.cuda.empty_cache()
    d = decode_data(B, S)
    nbytes_q_out = B * HEADS * (C + ROPE) * 2 + B * HEADS * C * 2
    flops = 2.0 * B * HEADS * S * (C + ROPE + C)
    base = dict(B=B, S=S)
    out_fm = None
    if fm is not None:
        try:
            meta = fm.get_mla_metadata()[0]

            def flashmla():
                return fm.flash_mla_with_kvcache(d["q_fm"], d["k_fm"], d["table"], d["lens"], C, meta, None,
                                                 softmax_scale=SCALE, causal=False)[0]
            out_fm = flashmla().reshape(B, HEADS, C).clone()
            base["flashmla_us"] = bench_ms(flashmla) * 1e3
            if graphs:
                g = graph_ms(flashmla)
                base["flashmla_graph_us"] = g and g * 1e3
            base["flashmla_GBps"] = (B * S * (C + ROPE) * 2 + nbytes_q_out) / base["flashmla_us"] / 1e3
            base["flashmla_TFLOPS"] = flops / base["flashmla_us"] / 1e6
        except Exception as e:  # noqa: BLE001
            base["flashmla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        cache = d["kv"]["bf16"][0]

        def torch_absorbed():
            s = torch.bmm(d["q_full"], cache.transpose(1, 2))
            p = torch.softmax(s.float() * SCALE, dim=-1).to(torch.bfloat16)
            return torch.bmm(p, cache[..., :C])
        base["torch_us"] = bench_ms(torch_absorbed) * 1e3
    except Exception as e:  # noqa: BLE001 - e.g. out of memory for the scores at B=128, S=8192
        base["torch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows = []
    for kind in CACHES:
        row = dict(base, op={"bf16": "decode", "bf16_paged": "decode_paged"}.get(kind, f"decode_{kind}"), cache=kind)
        try:
            key = (cfg_kind(kind), B)
            if sweep and key not in chosen:
                chosen[key] = sweep_decode(d, kind, log)
            cfg, splits, name = chosen.get(key, (None, 0, "shipped"))
            fn = ours_fn(d, kind, cfg, splits)
            out = fn().clone()
            ref = decode_ref(d, kind)
            row["rel_err_vs_fp32"] = rel(out[:2].cpu(), ref)
            if out_fm is not None and kind.startswith("bf16"):
                row["rel_err_vs_flashmla"] = rel(out, out_fm)
            if out_fm is not None and kind.startswith("fp8"):
                row["rel_err_vs_flashmla_bf16"] = rel(out, out_fm)  # the FP8 cache's own error included
            t = bench_ms(fn)
            row_bytes = ROW_FP8 if kind.startswith("fp8") else (C + ROPE) * 2
            row.update(config=name, best_cfg=cfg or ops_mla.get_mla_config(cfg_kind(kind), B, d["q_lat"].device),
                       splits=splits or "auto", ours_us=t * 1e3,
                       GBps=(B * S * row_bytes + nbytes_q_out) / t / 1e6, TFLOPS=flops / t / 1e9)
            if graphs:
                g = graph_ms(fn)
                row["ours_graph_us"] = g and g * 1e3
            if "flashmla_us" in row:
                row["x_flashmla"] = row["flashmla_us"] / row["ours_us"]
                if row.get("ours_graph_us") and row.get("flashmla_graph_us"):
                    row["x_flashmla_graph"] = row["flashmla_graph_us"] / row["ours_graph_us"]
            if "torch_us" in row:
                row["speedup"] = row["torch_us"] / row["ours_us"]
            try:  # the Triton kernel with the shipped tiles, for comparison (where Gluon is shipped)
                t_cfg = dict(ops_mla.get_mla_config(cfg_kind(kind), B, d["q_lat"].device), GLUON=0)
                row["triton_us"] = bench_ms(ours_fn(d, kind, t_cfg, 0)) * 1e3
            except Exception as e:  # noqa: BLE001
                row["triton_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for gl_cfg in (c for c in DECODE_SWEEP[cfg_kind(kind)] if c.get("GLUON")):
                tag = f"gluon{gl_cfg['GLUON']}"
                try:  # each Gluon schedule's own numbers, whichever config won
                    gfn = ours_fn(d, kind, gl_cfg, 0)
                    row[f"{tag}_rel_err_vs_fp32"] = rel(gfn()[:2].cpu(), ref)
                    row[f"{tag}_us"] = bench_ms(gfn) * 1e3
                    row["gluon_us"] = min(row.get("gluon_us", math.inf), row[f"{tag}_us"])
                    if "flashmla_us" in row:
                        row["x_flashmla_gluon"] = row["flashmla_us"] / row["gluon_us"]
                except Exception as e:  # noqa: BLE001
                    row[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        rows.append(row)
    del d
    return rows


# ---------------------------------------------------------------------------------------------------------------


def _precompile_job(job):
    """Launch one config once on small inputs that Triton specialises like the timed shapes (sizes divisible by
    16): the compiled kernel lands in Triton's disk cache, where the timed run finds it."""
    kind, cfg = job
    try:
        torch.manual_seed(0)
        if kind.startswith("latent"):
            T = 256
            x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
            w = (torch.randn(N, H, device=DEV) * H**-0.5).bfloat16()
            w_scale = None
            if kind == "latent_fp8":
                w, w_scale = R.quantize_weight_fp8(w)
            qn, kn = torch.ones(Q, device=DEV, dtype=torch.bfloat16), torch.ones(C, device=DEV, dtype=torch.bfloat16)
            cs = torch.ones(T, ROPE // 2, device=DEV)
            c_q = torch.empty(T, Q, dtype=x.dtype, device=DEV)
            kv = torch.empty(T, C + ROPE, dtype=x.dtype, device=DEV)
            ops_mla._latent_proj_launch(x, w, w_scale, qn, kn, cs, cs, Q, C, EPS, True, c_q, kv, cfg=cfg)
        else:  # decode / decode_fp8: contiguous and paged, one split and several
            d = decode_data(16, 1024)
            caches = ("bf16", "bf16_paged") if kind == "decode" else ("fp8", "fp8_paged")
            for c in caches:
                for splits in (1, 2):
                    ours_fn(d, c, cfg, splits)()
        torch.cuda.synchronize()
        return kind, cfg, None
    except Exception as e:  # noqa: BLE001 - the timed run records the error again
        return kind, cfg, f"{type(e).__name__}: {str(e)[:200]}"


def precompile(workers: int, sweep: bool, latent: bool) -> float:
    """Compile every launch config the run will time in parallel processes (Triton compiles on the CPU)."""
    import concurrent.futures as cf  # noqa: PLC0415
    import multiprocessing as mp  # noqa: PLC0415

    t0 = time.time()
    jobs = [("decode", None), ("decode_fp8", None)]
    if sweep:
        jobs += [(k, cfg) for k, cfgs in DECODE_SWEEP.items() for cfg in cfgs]
    if latent:
        jobs += [(k, None) for k in ("latent_bf16", "latent_fp8")]
        if sweep:
            jobs += [(k, cfg) for k, cfgs in LATENT_SWEEP.items() for cfg in cfgs]
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for kind, cfg, err in ex.map(_precompile_job, jobs):
                if err:
                    print(f"precompile {kind} {cfg}: {err}", flush=True)
    except Exception as e:  # noqa: BLE001 - only a head start: the timed run compiles what is missing
        print(f"precompile failed: {type(e).__name__}: {e}", flush=True)
    print(f"precompiled {len(jobs)} configs with {workers} processes in {time.time() - t0:.0f} s", flush=True)
    return time.time() - t0


def config_table(rows):
    """The winners as moe_kernels/ops/configs/mla_<GPU>.json: {kind: {size bucket: config}}."""
    table: dict = {}
    for r in rows:
        if r.get("best_cfg") is None:
            continue
        if r["op"] == "down_proj":
            table.setdefault(f"latent_{r['dtype']}", {})[str(r["T"])] = r["best_cfg"]
        elif r.get("cache") in ("bf16", "fp8") and r["S"] == 4096:
            table.setdefault(cfg_kind(r["cache"]), {})[str(r["B"])] = r["best_cfg"]
    return table


def summarize(rows, copy_bw, fm_err, t0):
    dec = [r for r in rows if r.get("cache") and "ours_us" in r]
    bf = [r for r in dec if r["cache"].startswith("bf16") and "x_flashmla" in r]

    def _ratio(a, b):
        return a / b if a and b else None

    def pick(cache, B, S, key):
        return next((r.get(key) for r in dec if r["cache"] == cache and r["B"] == B and r["S"] == S), None)

    pairs = [(r, next((p for p in dec if p["cache"] == r["cache"] + "_paged" and p["B"] == r["B"]
                       and p["S"] == r["S"]), None)) for r in dec if r["cache"] in ("bf16", "fp8")]
    down = [r for r in rows if r["op"] == "down_proj"]
    return {
        "copy_GBps": copy_bw,
        "flash_mla": "imported" if fm_err is None else f"not available: {fm_err}",
        "decode_vs_flashmla_min": min((r["x_flashmla"] for r in bf), default=None),
        "decode_vs_flashmla_min_graph": min((r["x_flashmla_graph"] for r in bf if r.get("x_flashmla_graph")),
                                            default=None),
        "decode_vs_flashmla_max": max((r["x_flashmla"] for r in bf), default=None),
        "gluon_vs_flashmla_min": min((r["x_flashmla_gluon"] for r in bf if "x_flashmla_gluon" in r), default=None),
        "gluon_fp8_vs_flashmla_B128_S4096": pick("fp8", 128, 4096, "x_flashmla_gluon"),
        # the serial Gluon kernel's time over the lookahead schedule's (> 1: the lookahead is faster), bf16 cache
        "lookahead_vs_serial_min": min((r["gluon1_us"] / r["gluon3_us"] for r in dec
                                        if r.get("gluon1_us") and r.get("gluon3_us")), default=None),
        "lookahead_vs_serial_max": max((r["gluon1_us"] / r["gluon3_us"] for r in dec
                                        if r.get("gluon1_us") and r.get("gluon3_us")), default=None),
        "decode_fp8_vs_flashmla_B128_S4096": pick("fp8", 128, 4096, "x_flashmla"),
        # the e4m3-product seesaw (MLA_BENCH_GLUON with fp8mma): FlashMLA's bf16 time / its time, eager
        "fp8mma_vs_flashmla_B128_S4096": _ratio(pick("fp8", 128, 4096, "flashmla_us"), pick("fp8", 128, 4096,
                                                                                                "gluon2_us")),
        "fp8mma_vs_flashmla_min_B128": min((r["flashmla_us"] / r["gluon2_us"] for r in dec if r["B"] == 128
                                            and r["cache"].startswith("fp8") and r.get("gluon2_us")
                                            and r.get("flashmla_us")), default=None),
        "fp8mma_rel_err_vs_fp32_max": max((r["gluon2_rel_err_vs_fp32"] for r in dec if r["cache"].startswith("fp8")
                                           and "gluon2_rel_err_vs_fp32" in r), default=None),
        "decode_fp8_paged_vs_flashmla_B128_S4096": pick("fp8_paged", 128, 4096, "x_flashmla"),
        "decode_B128_S4096_GBps": pick("bf16", 128, 4096, "GBps"),
        "decode_B128_S4096_frac_copy": (pick("bf16", 128, 4096, "GBps") or 0) / copy_bw,
        "paged_vs_contig_max": max((p["ours_us"] / r["ours_us"] for r, p in pairs if p and "ours_us" in p),
                                   default=None),
        "rel_err_vs_fp32_max_bf16": max((r["rel_err_vs_fp32"] for r in dec if r["cache"].startswith("bf16")),
                                        default=None),
        "rel_err_vs_fp32_max_fp8": max((r["rel_err_vs_fp32"] for r in dec if r["cache"].startswith("fp8")),
                                       default=None),
        "down_proj_min_speedup_bf16": min((r["speedup"] for r in down if r["dtype"] == "bf16"), default=None),
        "down_proj_min_speedup_fp8": min((r["speedup"] for r in down if r["dtype"] == "fp8"), default=None),
        "targets": {"decode_vs_flashmla": 1.0, "paged_vs_contig": 1.05, "decode_fp8_vs_flashmla_B128_S4096": 1.6},
        "decode_kernel": ops_mla.decode_kernel_name(),
        "seconds": time.time() - t0,
    }


def profile_one(name, B=128, S=4096):
    """One implementation's decode at (B, S), three calls (for Nsight Compute: skip the first, profile the next)."""
    d = decode_data(B, S)
    if name == "flashmla":
        fm, err = load_flash_mla()
        if fm is None:
            raise SystemExit(f"flash_mla: {err}")
        meta = fm.get_mla_metadata()[0]
        fn = lambda: fm.flash_mla_with_kvcache(d["q_fm"], d["k_fm"], d["table"], d["lens"], C, meta, None,  # noqa
                                               softmax_scale=SCALE, causal=False)
    else:  # gluon: the serial sm_90 kernel; seesaw: its default; fp8serial / fp8mma: the FP8 cache's two kernels
        cache = "fp8" if name.startswith("fp8") else "bf16"
        gluon = {"gluon": 1, "seesaw": 2, "fp8serial": 1, "fp8mma": 2}.get(name, 0)
        cfg = dict(ops_mla.get_mla_config(cfg_kind(cache), B, d["q_lat"].device), GLUON=gluon)
        fn = ours_fn(d, cache, cfg, 0)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=["gluon", "seesaw", "fp8serial", "fp8mma", "triton", "flashmla"],
                    default=None, help="only run that decode three times at B=128, S=4096 (under ncu; fp8mma needs "
                                       "MOE_KERNELS_MLA_PIPE unset or 1)")
    ap.add_argument("--quick", action="store_true",
                    help="no sweep and no CUDA-graph timings (every decode shape still; T 1024 only with --latent)")
    ap.add_argument("--no-sweep", action="store_true", help="time the shipped configs only")
    ap.add_argument("--no-graph", action="store_true", help="no CUDA-graph timings")
    ap.add_argument("--latent", action="store_true", help="also the down-projection rows")
    ap.add_argument("--budget", type=float, default=0, help="stop starting new shapes after this many seconds")
    ap.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes that compile the kernels first (0: compile on first use)")
    args = ap.parse_args()
    if args.profile:
        return profile_one(args.profile)
    sweep = not (args.no_sweep or args.quick)
    graphs = not (args.no_graph or args.quick)
    t0 = time.time()
    fm, fm_err = load_flash_mla()
    print(f"flash_mla: {'imported from ' + fm.__file__ if fm else 'not available (' + fm_err + ')'}", flush=True)
    print(f"decode kernel: {ops_mla.decode_kernel_name()}", flush=True)
    if args.compile_workers > 0:
        precompile(args.compile_workers, sweep, args.latent)
    copy_bw = copy_bandwidth_gbps()
    print(f"device-to-device copy: {copy_bw:.0f} GB/s (read + write)", flush=True)
    rows, log, chosen = [], [], {}

    def add(new_rows):
        for r in new_rows:
            rows.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "best_cfg"},
                  flush=True)
        save("mla", rows, {"copy_GBps": copy_bw, "partial": True}, extra={"sweep": log})  # survives a timeout

    # S = 4096 first: the sweep picks each B's configs there, which the other S then reuse
    Ss = [4096, 1024, 8192]
    for S in Ss:
        for B in (32, 128):
            if args.budget and time.time() - t0 > args.budget:
                print(f"budget of {args.budget:.0f} s spent: B={B} S={S} and later shapes skipped", flush=True)
                continue
            try:
                add(bench_decode_shape(B, S, fm, chosen, log, sweep, graphs=graphs))
            except Exception:  # noqa: BLE001 - keep the other shapes
                traceback.print_exc()
    if args.latent:
        for fp8 in (False, True):
            for T in ([1024] if args.quick else [1024, 8192]):
                try:
                    add([bench_latent(T, fp8, sweep, log)])
                except Exception:  # noqa: BLE001
                    traceback.print_exc()

    dec = sorted([r for r in rows if r.get("cache")], key=lambda r: (r["cache"], r["B"], r["S"]))
    print(markdown(dec, ["cache", "B", "S", "ours_us", "flashmla_us", "x_flashmla", "ours_graph_us",
                         "flashmla_graph_us", "x_flashmla_graph", "triton_us", "gluon1_us", "gluon2_us", "gluon3_us",
                         "x_flashmla_gluon",
                         "GBps", "TFLOPS", "torch_us", "config", "splits",
                         "rel_err_vs_fp32", "rel_err_vs_flashmla"]))
    down = [r for r in rows if r["op"] == "down_proj"]
    if down:
        print(markdown(down, ["dtype", "T", "ours_us", "baseline_us", "speedup", "TFLOPS", "config", "rel_err_kv"]))
    summary = summarize(rows, copy_bw, fm_err, t0)
    print(json.dumps(summary, indent=1))
    path = save("mla", rows, summary, extra={"sweep": log})
    table = config_table(rows)
    if table:
        name = ops_mla.config_filename(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        with open(os.path.join(RESULTS, name), "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {os.path.join(RESULTS, name)} (copy it to moe_kernels/ops/configs/ to use it)")
    return path


if __name__ == "__main__":
    main()
