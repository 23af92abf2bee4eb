"""Config sweep behind ``moe-kernels tune``: time launch configs on this GPU and rewrite the tuned-config files.

For every kernel kind and DeepSeek-V3 shape (``SHAPES``) and every rows-per-expert bucket (``BUCKETS``) it times
each candidate config (``candidates``) with ``triton.testing.do_bench`` (median, L2 flushed between runs), checks
its output against a pointer-load config that the tests cover, and writes the fastest into
``{out_dir}/grouped_gemm_{kind}_N{N}_K{K}_{GPU}.json`` (``moe_kernels/ops/configs`` by default), the
files ``moe_kernels.ops.grouped_gemm_configs.get_config`` looks up at run time. Nothing here runs at import.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch

__all__ = ["tune", "candidates", "settle", "SHAPES", "BUCKETS"]

# kind -> [(N, K)]: N is the columns a kernel writes (the intermediate size I for the SwiGLU kernels)
SHAPES = {
    "fp8": [(4096, 7168), (7168, 2048)],  # w13 as one plain GEMM (gate_up), w2 (down)
    "fp8_swiglu": [(2048, 7168)],  # fused w13 + SwiGLU + requant: I = 2048, H = 7168
    "bf16": [(4096, 7168), (7168, 2048)],
    "bf16_swiglu": [(2048, 7168)],
}
BUCKETS = (64, 256, 1024, 4096)  # rows per expert
# buckets up to this many rows an expert also time the decode kernel (weights on the MMA's M side): at 32-64 rows
# an expert it streamed Mixtral-like weights faster than the tiled kernel in `probe_decode.py` (H100, 2026-12-07)
DECODE_BUCKET_MAX = 64
# a challenger replaces a bucket's incumbent only when faster by more than this: run-to-run noise of one config is
# ~1% (H100, 2026-12-07: the decode kernel "won" the SwiGLU 64-row bucket by 1.0%, and ran the whole
# Mixtral-like layer at 64 rows an expert 1.39x slower than the incumbent)
CHALLENGE_MARGIN = 0.02
SMEM_LIMIT = 220 * 1024  # Hopper: 227 KB per block, less a little for barriers and the epilogue


def candidates(kind: str, quick: bool = False, untried: bool = False) -> list[dict]:
    """Launch configs worth timing on Hopper.

    ``untried``: also the Gluon kernel's variants that have not run on a GPU yet (WS: a loader warp; PERSISTENT:
    one program per SM walking the tiles, the next tile's loads under this one's epilogue). ``tune`` times them
    only when asked (``challenge="untried"``): run their GPU tests first, since a variant that hangs or faults
    would stop the sweep.

    Pruned by compiling for sm_90 offline: no register spills (the FP8 SwiGLU kernel holds two accumulators plus
    two fresh products per K step, so it needs 8+ warps), shared memory within SMEM_LIMIT.
    """
    fp8, swiglu = kind.startswith("fp8"), kind.endswith("swiglu")
    bk = 128 if fp8 else 64
    stages = (3, 4) if quick or swiglu else (3, 4, 5)
    if swiglu:  # (BLOCK_M, BLOCK_N, num_warps)
        shapes = [(64, 128, 8)] + ([(128, 128, 16), (64, 128, 16)] if fp8 else [(64, 128, 4)])
    elif fp8:  # 16 warps: four warpgroups, so one's promotion FMAs overlap another's QGMMAs
        # (256x128 at 16 warps ran at 330-350 TFLOP/s on the H200 at 1024+ rows per expert: left out)
        shapes = [(64, 128, 4), (64, 128, 8), (128, 128, 8), (128, 128, 16)] + ([] if quick else [(64, 256, 8)])
    else:
        shapes = [(64, 128, 4), (128, 128, 8), (128, 256, 8)] + ([] if quick else [(64, 256, 4)])
    # PAIR_N: the plain GEMM's program computes two 128-column tiles, as the SwiGLU kernel does (TMA only)
    pairs = [] if swiglu or not fp8 else [(128, 128, 16), (64, 128, 8)]
    out, wg = [], []
    if fp8:  # the Gluon kernel for sm_90 (grouped_gemm_wgmma): 64/128-row tiles, one warp per 16 rows
        for bm, ns in itertools.product((64, 128), (3, 4) if quick or swiglu else (3, 4, 5)):
            wg.append(dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=bm // 16, num_stages=ns,
                           USE_TMA=1, WGMMA=1))
        if untried:  # compiled for sm_90 on Triton 3.6 and 3.8 (CI), not run on a GPU when written (2026-12-05)
            wg += [dict(c, **v) for c in wg for v in (dict(WS=1), dict(PERSISTENT=1), dict(PERSISTENT=1, WS=1))
                   if not (v.get("PERSISTENT") and swiglu and c["num_stages"] > 4)]  # 5 stages + gate tile: smem
    for pair, (bm, bn, nw), ns, tma in [(0, *c) for c in itertools.product(shapes, stages, (0, 1))] + \
            [(1, *c) for c in itertools.product(pairs, (3, 4), (1,))]:
        smem = ns * (bm + bn * (2 if swiglu or pair else 1)) * bk * (1 if fp8 else 2)
        if smem <= SMEM_LIMIT:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns, USE_TMA=tma)
            out.append(dict(cfg, PAIR_N=1) if pair else cfg)
    return out + wg


def settle(best, incumbent, margin: float = CHALLENGE_MARGIN):
    """A bucket's pick from its fastest timing ``best`` and its incumbent's (each (ms, cfg, ...) or None): the
    incumbent unless ``best`` is faster by more than ``margin``; a challenger within it is a tie."""
    if incumbent is None or best is None or best is incumbent:
        return best
    return best if best[0] * (1 + margin) <= incumbent[0] else incumbent


def _experts_for(rows: int) -> int:
    return max(8, min(64, 8192 // rows))  # enough rows in total to fill the GPU, weights within memory


def _problem(kind, N, K, rows, E, device):
    """Equal-sized groups of random data; FP8 weights with unit block scales (timing only)."""
    from .reference.quant import quantize_fp8

    fp8, swiglu = kind.startswith("fp8"), kind.endswith("swiglu")
    M = rows * E
    w_rows = 2 * N if swiglu else N
    p = dict(offsets=torch.arange(0, M + 1, rows, dtype=torch.int32, device=device), swiglu=swiglu,
             out_scale=None, flops=2.0 * M * w_rows * K)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(E, w_rows, K, device=device, dtype=torch.bfloat16) / math.sqrt(K)
    if not fp8:
        p.update(a=x, a_scale=None, w=w, w_scale=None, out=torch.empty(M, N, dtype=torch.bfloat16, device=device))
        return p
    a, a_scale = quantize_fp8(x)
    w_scale = torch.ones(E, -(-w_rows // 128), K // 128, device=device)
    p.update(a=a, a_scale=a_scale, w=w.to(torch.float8_e4m3fn), w_scale=w_scale)
    if swiglu:
        p.update(out=torch.empty(M, N, dtype=torch.float8_e4m3fn, device=device),
                 out_scale=torch.empty(M, N // 128, device=device))
    else:
        p.update(out=torch.empty(M, N, dtype=torch.bfloat16, device=device))
    return p


def _dequant(p):
    out = p["out"].float()
    return out if p["out_scale"] is None else out * p["out_scale"].repeat_interleave(128, dim=1)


def tune(families=("grouped_gemm",), out_dir=None, quick=False, kinds=None, verbose=True, log_path=None,
         challenge=None) -> list:
    """Sweep, then write one JSON per (kind, N, K) for this GPU; returns the paths written.

    ``kinds``: a subset of SHAPES' keys; ``log_path``: also write every timing (config, ms, TFLOP/s) as JSON.
    ``challenge="wgmma"``: time only the WGMMA candidates against each bucket's current config from this GPU's
    table (the incumbent, timed in the same run), a short re-tune after a kernel change. ``challenge="untried"``:
    the same, with the WS and PERSISTENT variants among the WGMMA candidates (see ``candidates``).
    """
    import triton.testing

    from .ops.grouped_gemm import _launch
    from .ops.grouped_gemm_configs import CONFIG_DIR, DECODE_DEFAULT, config_filename, device_name, load_table

    if "grouped_gemm" not in families:
        return []
    if not torch.cuda.is_available():
        raise RuntimeError("moe-kernels tune needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = device_name(device.index)
    out_dir = Path(out_dir) if out_dir is not None else CONFIG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    buckets = (64, 1024, 4096) if quick else BUCKETS
    written, timings = [], []
    for kind in kinds or SHAPES:
        cands = candidates(kind, quick, untried=challenge == "untried")
        fp8_kind = kind.startswith("fp8")
        ref_cfg = next(c for c in cands if not c.get("WGMMA"))  # a Triton config the tests cover
        contenders = [c for c in cands if c.get("WGMMA")] if challenge else cands
        for N, K in SHAPES[kind]:
            table = {}
            incumbents = load_table(str(out_dir / config_filename(kind, N, K, gpu))) or {}
            for rows in buckets:
                E = _experts_for(rows)
                p = _problem(kind, N, K, rows, E, device)

                def run(cfg):
                    return _launch(p["a"], p["a_scale"], p["w"], p["w_scale"], p["out"], offsets=p["offsets"],
                                   out_scale=p["out_scale"], swiglu=p["swiglu"], cfg=cfg)

                # the challenge: the incumbent config of this bucket against the WGMMA candidates
                incumbent_cfg = incumbents.get(rows) if challenge else None
                bucket_cands = ([incumbent_cfg] if incumbent_cfg else []) + contenders
                if fp8_kind and rows <= DECODE_BUCKET_MAX:  # the weight-streaming decode kernel competes here
                    bucket_cands += [dict(DECODE_DEFAULT, num_stages=ns) for ns in (3, 4)]
                run(dict(ref_cfg, USE_TMA=0))  # a pointer-load config the tests cover: the expected output
                expect = _dequant(p)
                best = incumbent = None
                for cfg in bucket_cands:
                    try:
                        p["out"].zero_()
                        run(cfg)
                        torch.cuda.synchronize()
                        err = float((_dequant(p) - expect).norm() / expect.norm().clamp(min=1e-30))
                        if not err < 2e-2:
                            raise RuntimeError(f"output differs from the pointer-load config by {err:.2e}")
                        ms = triton.testing.do_bench(lambda: run(cfg), warmup=5 if quick else 10,
                                                     rep=20 if quick else 30, return_mode="median")
                    except Exception as e:  # out of resources, compile failure, wrong output: skip the config
                        if verbose:
                            print(f"  skip {kind} N={N} K={K} rows={rows} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    tflops = p["flops"] / ms * 1e-9
                    timings.append(dict(kind=kind, N=N, K=K, rows=rows, E=E, cfg=cfg, ms=ms, tflops=tflops))
                    if best is None or ms < best[0]:
                        best = (ms, cfg, tflops)
                    if cfg is incumbent_cfg:
                        incumbent = (ms, cfg, tflops)
                best = settle(best, incumbent)
                if best is not None:
                    table[str(rows)] = best[1]
                    if verbose:
                        print(f"{kind} N={N} K={K} rows/expert={rows} E={E}: {best[2]:.0f} TFLOP/s {best[1]}",
                              flush=True)
                del p, expect
                torch.cuda.empty_cache()
            if table:
                path = out_dir / config_filename(kind, N, K, gpu)
                path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
                load_table.cache_clear()
                written.append(path)
            if log_path is not None:
                Path(log_path).write_text(json.dumps(dict(device=gpu, timings=timings), indent=1) + "\n")
    return written


if __name__ == "__main__":  # python -m moe_kernels.tune [--quick] [--out DIR] [--kinds fp8,bf16] [--log FILE]
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer configs and buckets")
    ap.add_argument("--out", default=None, help="directory for the JSON files (default: the package's)")
    ap.add_argument("--kinds", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--log", default=None, help="write every timing there as JSON")
    ap.add_argument("--challenge", choices=["wgmma", "untried"], default=None,
                    help="time only the WGMMA configs (untried: with the variants not yet run on a GPU) against "
                         "this GPU's current table entries")
    args = ap.parse_args()
    t0 = time.time()
    kinds = args.kinds.split(",") if args.kinds else None
    for path in tune(out_dir=args.out, quick=args.quick, kinds=kinds, log_path=args.log, challenge=args.challenge):
        print(f"wrote {path}")
    print(f"tuning took {time.time() - t0:.0f}s")
