"""One small CUDA call of every Triton op and of the extension's kernels, for compute-sanitizer (tests/sanitize.sh).

Shapes are small and odd on purpose (37 tokens, 7 experts, an empty expert, N not a multiple of the tile) so that
every masked edge of a kernel is exercised. Each call is compared with the reference (a kernel that runs clean
under the sanitizer but writes the wrong rows is a failure too), then the device is synchronised so that an
asynchronous fault is charged to the op that caused it.

  python tests/_sanitize_ops.py                 # every op
  python tests/_sanitize_ops.py --ops route,permute
  python tests/_sanitize_ops.py --list
  python tests/_sanitize_ops.py --p2p RANK,WORLD,PORT   # one rank of the P2P dispatch/combine (sanitize.sh)

Exit status: 0 when every op ran and matched, 1 when one failed, 0 with a message (nothing run) when CUDA is absent.
"""
from __future__ import annotations

import argparse
import sys
import time


def _ops(device="cuda"):
    import torch

    import moe_kernels as mk
    from moe_kernels import reference as ref
    from moe_kernels.reference import mla as ref_mla
    from moe_kernels.reference import mla_decode as ref_dec

    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(dev)

    def close(out, want, tol, what):
        out, want = out.double().cpu(), want.double().cpu()
        err = float((out - want).norm() / want.norm().clamp(min=1e-30))
        if not torch.isfinite(out).all() or err > tol:
            raise AssertionError(f"{what}: relative error {err:.2e} > {tol:.0e} (or non-finite)")

    T, H, E, k = 37, 256, 7, 3
    x = randn(T, H)
    w_router = randn(E, H, scale=H**-0.5)

    def ids_with_empty_expert(tokens=T):
        ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(tokens)])  # expert E-1 gets nothing
        return ids.to(torch.int32).to(dev)

    def route():
        wts, ids, counts = mk.ops.route(x, w_router, k)
        rw, rids, rcounts = ref.route(x.cpu(), w_router.cpu(), k)
        assert torch.equal(counts.cpu(), torch.bincount(ids.cpu().long().flatten(), minlength=E).int())
        close(wts, rw, 1e-2, "route weights")

    def route_grouped():
        E2 = 16
        w2 = randn(E2, H, scale=H**-0.5)
        bias = randn(E2, dtype=torch.float32, scale=0.1)
        wts, ids, counts = mk.ops.route(x, w2, 4, scoring="sigmoid", n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, bias=bias)
        assert int(ids.min()) >= 0 and int(ids.max()) < E2 and int(counts.sum()) == T * 4

    def permute_bf16():
        ids = ids_with_empty_expert()
        p = mk.ops.permute(x, ids, E)
        r = ref.permute(x.cpu(), ids.cpu(), E)
        assert torch.equal(p.offsets.cpu(), r.offsets) and torch.equal(p.token_index.cpu(), r.token_index)
        assert torch.equal(p.x.cpu(), r.x)

    def permute_fp8():
        ids = ids_with_empty_expert()
        p = mk.ops.permute(x, ids, E, fp8=True)
        r = ref.permute(x.cpu(), ids.cpu(), E, fp8=True)
        close(p.scale, r.scale, 1e-6, "permute fp8 scales")
        # e4m3 values may differ by 1 ulp from the CPU reference's rounding (tests/test_ops_permute.py bounds it)
        close(ref.dequantize_fp8(p.x.cpu(), p.scale.cpu()), ref.dequantize_fp8(r.x, r.scale), 1e-2, "permute fp8")

    def permute_fp8_wide():
        """H = 2176: fp8 rows take 2048 columns per program, so the second program's block is mostly masked."""
        x3 = randn(9, 2176)
        ids = ids_with_empty_expert(9)
        p = mk.ops.permute(x3, ids, E, fp8=True)
        r = ref.permute(x3.cpu(), ids.cpu(), E, fp8=True)
        close(p.scale, r.scale, 1e-6, "permute fp8 wide scales")
        close(ref.dequantize_fp8(p.x.cpu(), p.scale.cpu()), ref.dequantize_fp8(r.x, r.scale), 1e-2, "permute fp8 wide")

    def permute_blocks():
        """More pairs than the single-program index path takes: block ranks, the scan, then the scatter."""
        import importlib

        permute_mod = importlib.import_module("moe_kernels.ops.permute")  # the module (ops.permute is the op)
        T2 = permute_mod.SINGLE_PROGRAM_PAIRS // k + 61
        x2 = randn(T2, H)
        ids = ids_with_empty_expert(T2)
        for fp8 in (False, True):
            p = mk.ops.permute(x2, ids, E, fp8=fp8)
            r = ref.permute(x2.cpu(), ids.cpu(), E, fp8=fp8)
            assert torch.equal(p.offsets.cpu(), r.offsets) and torch.equal(p.token_index.cpu(), r.token_index)
            assert torch.equal(p.slot.cpu(), r.slot.to(p.slot.dtype))
            if fp8:
                close(ref.dequantize_fp8(p.x.cpu(), p.scale.cpu()), ref.dequantize_fp8(r.x, r.scale), 1e-2,
                      "permute blocks fp8")
            else:
                assert torch.equal(p.x.cpu(), r.x)

    def unpermute():
        ids = ids_with_empty_expert()
        p = mk.ops.permute(x, ids, E)
        wts = torch.rand(T, k, generator=g).to(dev)
        y = randn(T * k, H)
        out = mk.ops.unpermute(y, p, wts)
        close(out, ref.unpermute(y.cpu(), ref.permute(x.cpu(), ids.cpu(), E), wts.cpu()), 1e-2, "unpermute")

    def quantize_fp8():
        q, s = mk.ops.quantize_fp8(x)
        rq, rs = ref.quantize_fp8(x.cpu())
        close(s, rs, 1e-6, "quantize_fp8 scales")
        close(ref.dequantize_fp8(q.cpu(), s.cpu()), ref.dequantize_fp8(rq, rs), 1e-2, "quantize_fp8")

    def quantize_weight_fp8():
        q, s = mk.ops.quantize_weight_fp8(randn(E, 200, H))  # N = 200: a ragged last block
        assert s.shape == (E, 2, H // 128) and torch.isfinite(s).all()

    N = 200  # not a multiple of the 128-wide tiles

    def gemm_operands():
        counts = torch.tensor([5, 0, 11, 9, 1, 0, 11])  # empty experts, sums to T
        offsets = torch.zeros(E + 1, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
        a, a_s = mk.ops.quantize_fp8(x)
        w, w_s = mk.ops.quantize_weight_fp8(randn(E, N, H, scale=H**-0.5))
        return a, a_s, w, w_s, offsets.to(dev)

    def grouped_gemm_fp8():
        a, a_s, w, w_s, off = gemm_operands()
        out = mk.ops.grouped_gemm_fp8(a, a_s, w, w_s, off)
        want = ref.grouped_gemm_fp8(a.cpu(), a_s.cpu(), w.cpu(), w_s.cpu(), off.cpu())
        close(out, want, 1e-2, "grouped_gemm_fp8")
        buf = torch.empty(T, 2 * N, dtype=torch.bfloat16, device=dev)[:, :N]  # out= a strided view
        mk.ops.grouped_gemm_fp8(a, a_s, w, w_s, off, out=buf)
        close(buf, want, 1e-2, "grouped_gemm_fp8 out=")

    def grouped_gemm_fp8_pair():
        """PAIR_N programs (two column tiles each); N=200 leaves the second tile partly past N."""
        from moe_kernels.ops import grouped_gemm as gg

        a, a_s, w, w_s, off = gemm_operands()
        out = torch.full((T, N), float("nan"), dtype=torch.bfloat16, device=dev)
        cfg = dict(gg.get_config("fp8", N, H, T // E, dev), BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3,
                   PAIR_N=1)
        gg._launch(a, a_s, w, w_s, out, offsets=off, cfg=cfg)
        close(out, ref.grouped_gemm_fp8(a.cpu(), a_s.cpu(), w.cpu(), w_s.cpu(), off.cpu()), 1e-2, "PAIR_N")

    def grouped_gemm_bf16():
        _, _, _, _, off = gemm_operands()
        w = randn(E, N, H, scale=H**-0.5)
        out = mk.ops.grouped_gemm_bf16(x, w, off)
        close(out, ref.grouped_gemm(x.cpu(), w.cpu(), off.cpu()), 1e-2, "grouped_gemm_bf16")

    def grouped_gemm_fp8_masked():
        max_m = 9
        a, a_s = mk.ops.quantize_fp8(randn(E * max_m, H))
        w, w_s = mk.ops.quantize_weight_fp8(randn(E, N, H, scale=H**-0.5))
        masked_m = torch.tensor([0, 9, 3, 1, 9, 0, 5], dtype=torch.int32, device=dev)
        out = mk.ops.grouped_gemm_fp8_masked(a.view(E, max_m, H), a_s.view(E, max_m, -1), w, w_s, masked_m)
        for e, m in enumerate(masked_m.tolist()):
            if m:
                one = torch.tensor([0, m], dtype=torch.int32)
                want = ref.grouped_gemm_fp8(a.view(E, max_m, H)[e, :m].cpu(), a_s.view(E, max_m, -1)[e, :m].cpu(),
                                            w[e:e + 1].cpu(), w_s[e:e + 1].cpu(), one)
                close(out[e, :m], want, 1e-2, f"grouped_gemm_fp8_masked expert {e}")

    def expert_mlp_fp8():
        layer = mk.GroupedExperts(E, H, 256, precision="fp8", device=dev)
        _, _, _, _, off = gemm_operands()
        a, a_s = mk.ops.quantize_fp8(x)
        out = mk.ops.expert_mlp(a, a_s, off, layer.w13, layer.w13_scale, layer.w2, layer.w2_scale)
        want = ref.expert_mlp(a.cpu(), off.cpu(), layer.w13.cpu(), layer.w2.cpu(), a_s.cpu(), layer.w13_scale.cpu(),
                              layer.w2_scale.cpu(), out_dtype=torch.float32)
        close(out, want, 5e-2, "expert_mlp fp8")

    def expert_mlp_bf16():
        layer = mk.GroupedExperts(E, H, 192, precision="bf16", device=dev)
        _, _, _, _, off = gemm_operands()
        rw = torch.rand(T, generator=g).to(dev)
        out = mk.ops.expert_mlp(x, None, off, layer.w13.data, None, layer.w2.data, None, topk_weight=rw)
        want = ref.expert_mlp(x.cpu(), off.cpu(), layer.w13.data.cpu(), layer.w2.data.cpu(), out_dtype=torch.float32)
        close(out, want * rw.cpu()[:, None], 3e-2, "expert_mlp bf16")

    Q, C, R = 128, 512, 64

    def latent_operands(fp8):
        w = randn(Q + C + R, H, scale=H**-0.5)
        w_s = None
        if fp8:
            w, w_s = mk.ops.quantize_weight_fp8(w)
        qn, kn = randn(Q) + 1, randn(C) + 1
        cos, sin = ref_mla.rope_cos_sin(torch.arange(T), ref_mla.default_inv_freq(R))
        return w, w_s, qn, kn, cos.to(dev), sin.to(dev)

    def mla_latent_proj(fp8=False):
        w, w_s, qn, kn, cos, sin = latent_operands(fp8)
        c_q, kv = mk.ops.mla_latent_proj(x, w, qn, kn, cos, sin, Q, C, w_scale=w_s)
        rq, rkv = ref_dec.mla_latent_proj(x.cpu(), w.cpu(), qn.cpu(), kn.cpu(), cos.cpu(), sin.cpu(), Q, C,
                                          w_scale=None if w_s is None else w_s.cpu())
        close(c_q, rq, 3e-2, "mla_latent_proj c_q")
        close(kv, rkv, 3e-2, "mla_latent_proj kv")

    def mla_decode(paged=False):
        B, h, S = 3, 16, 70
        q_lat, q_rope = randn(B, h, C, scale=0.1), randn(B, h, R, scale=0.1)
        lens = torch.tensor([70, 0, 33], dtype=torch.int32, device=dev)  # a full row, an empty row, a ragged row
        cache = randn(B, S, C + R)
        table = None
        if paged:
            page = 16
            blocks = -(-S // page)
            flat = cache.new_zeros(B * blocks * page, C + R)
            perm = torch.randperm(B * blocks, generator=g)
            table = perm.view(B, blocks).to(torch.int32).to(dev)
            for b in range(B):
                for j in range(blocks):
                    rows = cache[b, j * page: (j + 1) * page]
                    flat.view(B * blocks, page, C + R)[int(table[b, j]), : rows.shape[0]] = rows
            kv = flat.view(B * blocks, page, C + R)
        else:
            kv = cache
        out = mk.ops.mla_decode(q_lat, q_rope, kv, lens, 0.07, block_table=table, num_splits=4)
        want = ref_dec.mla_decode(q_lat.cpu(), q_rope.cpu(), cache.cpu(), lens.cpu(), 0.07)
        close(out, want, 2e-2, "mla_decode" + (" paged" if paged else ""))

    def mla_decode_variants():
        """The LAZY and V_BLOCKS decode variants (the configs the benchmark sweeps), with splits and ragged rows."""
        from moe_kernels.ops import mla as mla_ops

        B, h, S = 3, 32, 70
        q_lat, q_rope = randn(B, h, C, scale=0.1), randn(B, h, R, scale=0.1)
        lens = torch.tensor([70, 0, 33], dtype=torch.int32, device=dev)
        cache = randn(B, S, C + R)
        want = ref_dec.mla_decode(q_lat.cpu(), q_rope.cpu(), cache.cpu(), lens.cpu(), 0.07)
        for cfg in (dict(BLOCK_H=32, BLOCK_N=16, LAZY=2, V_BLOCKS=1, num_warps=4, num_stages=2),
                    dict(BLOCK_H=32, BLOCK_N=16, LAZY=0, V_BLOCKS=2, num_warps=4, num_stages=2)):
            out = torch.full((B, h, C), float("nan"), dtype=torch.bfloat16, device=dev)
            mla_ops._decode_launch(q_lat, q_rope, cache, lens, None, 0.07, 3, out, cfg=cfg)
            close(out, want, 2e-2, f"mla_decode {cfg}")

    def dispatch_layout():
        from moe_kernels._ext import extension_error, has_extension

        if not has_extension():
            raise RuntimeError(f"the extension moe_kernels._C is not available: {extension_error()}")
        ids = ids_with_empty_expert().long()
        ids[::5, 0] = -1  # "no expert" entries are skipped
        e2r = torch.tensor([0, 1, 2, 3, 0, 1, 2], dtype=torch.int32, device=dev)
        got = torch.ops.moe_kernels_C.dispatch_layout(ids, e2r, 4)
        want = ref.dispatch_layout(ids.cpu(), e2r.cpu(), 4)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b), "dispatch_layout differs from the reference"
        got32 = torch.ops.moe_kernels_C.dispatch_layout(ids.int(), e2r, 4)
        assert all(torch.equal(a, b) for a, b in zip(got32, got))

    return {
        "route": route, "route_grouped": route_grouped, "permute": permute_bf16, "permute_fp8": permute_fp8,
        "permute_fp8_wide": permute_fp8_wide,
        "unpermute": unpermute, "quantize_fp8": quantize_fp8, "quantize_weight_fp8": quantize_weight_fp8,
        "grouped_gemm_fp8": grouped_gemm_fp8, "grouped_gemm_bf16": grouped_gemm_bf16,
        "grouped_gemm_fp8_masked": grouped_gemm_fp8_masked, "expert_mlp_fp8": expert_mlp_fp8,
        "expert_mlp_bf16": expert_mlp_bf16, "mla_latent_proj": mla_latent_proj,
        "mla_latent_proj_fp8": lambda: mla_latent_proj(fp8=True), "mla_decode": mla_decode,
        "mla_decode_paged": lambda: mla_decode(paged=True), "dispatch_layout": dispatch_layout,
        "permute_blocks": permute_blocks, "grouped_gemm_fp8_pair": grouped_gemm_fp8_pair,
        "mla_decode_variants": mla_decode_variants,
    }


NAMES = ["route", "route_grouped", "permute", "permute_fp8", "unpermute", "quantize_fp8", "quantize_weight_fp8",
         "grouped_gemm_fp8", "grouped_gemm_bf16", "grouped_gemm_fp8_masked", "expert_mlp_fp8", "expert_mlp_bf16",
         "mla_latent_proj", "mla_latent_proj_fp8", "mla_decode", "mla_decode_paged", "dispatch_layout",
         "permute_blocks", "grouped_gemm_fp8_pair", "mla_decode_variants", "permute_fp8_wide"]


def p2p_rank(rank: int, world: int, port: int, timeout: float) -> int:
    """One rank of the P2P dispatch/combine under the sanitizer: ``world`` processes on GPU 0 (gloo on
    127.0.0.1:port, ``allow_shared_device``), bf16 and fp8 rows, k = 1 and 2, E < G and E > G, a rank without
    tokens, three calls per buffer; then the low-latency kernels (two micro-batches in flight); every result
    compared as in tests/test_ep_shared_device.py."""
    import os

    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _dist_worker as W

    if not torch.cuda.is_available():
        print("_sanitize_ops: CUDA is not available; nothing to sanitize (run on a GPU machine)")
        return 0
    torch.cuda.set_device(0)
    W.GPU_TIMEOUT = timeout  # instrumented kernels are slow, and the ranks time-share the GPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    failed, cases = 0, 2
    try:
        for E, k in ((max(1, world // 2), 1), (2 * world, 2)):
            t0 = time.perf_counter()
            W._problems.clear()
            ep = W._p2p(E, buffer_tokens=32 * world)  # later calls carry more tokens than the first
            for fp8 in (False, True):
                for it in range(3):
                    def make(s, it=it, E=E, k=k, fp8=fp8):
                        T = 0 if (it == 1 and s == 0) else 5 + 3 * s + 4 * it
                        x, ids, wt = W.tokens(s, T, E, k, torch.bfloat16, seed=it + 10 * k + 7 * fp8)
                        return x, ids, (torch.ones_like(wt) if k == 1 else wt)

                    W._check_round_trip(ep, rank, world, make, fp8, f"E={E} k={k} fp8={fp8} call {it}")
            ep.check()
            torch.cuda.synchronize()
            ep.close()
            failed += _p2p_report(W, f"p2p_E{E}_k{k}", rank, t0)
        if W._p2p_ll_available():
            for E, k, fp8 in ((2 * world, 2, True), (max(1, world // 2), 1, False)):  # the low-latency kernels
                t0 = time.perf_counter()
                W._problems.clear()
                W.ll_round_trip_case(rank, world, E, k, fp8)
                torch.cuda.synchronize()
                failed += _p2p_report(W, f"ll_E{E}_k{k}_{'fp8' if fp8 else 'bf16'}", rank, t0)
                cases += 1
    finally:
        dist.destroy_process_group()
    print(f"_sanitize_ops: rank {rank}/{world}: {cases - failed}/{cases} p2p cases ok")
    return 1 if failed else 0


def _p2p_report(W, name: str, rank: int, t0: float) -> int:
    """Print one P2P case's line; 1 if it failed."""
    if W._problems:
        print(f"  FAIL {name} (rank {rank}): {'; '.join(W._problems)}", flush=True)
        return 1
    print(f"  ok   {name} (rank {rank}, {time.perf_counter() - t0:.2f} s)", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="all", help="comma-separated names (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run through the interpreter
    p.add_argument("--p2p", metavar="RANK,WORLD,PORT",
                   help="instead of the ops: one rank of the P2P dispatch/combine (tests/sanitize.sh starts WORLD)")
    p.add_argument("--p2p-timeout", type=float, default=120.0, help="seconds a P2P kernel waits for a peer")
    a = p.parse_args(argv)
    if a.p2p:
        rank, world, port = (int(v) for v in a.p2p.split(","))
        return p2p_rank(rank, world, port, a.p2p_timeout)
    if a.list:
        print("\n".join(NAMES))
        return 0
    names = NAMES if a.ops == "all" else [n.strip() for n in a.ops.split(",") if n.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        print(f"unknown op(s): {', '.join(unknown)}; --list shows the names", file=sys.stderr)
        return 2
    if a.device == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("_sanitize_ops: CUDA is not available; nothing to sanitize (run on a GPU machine)")
        return 0
    ops = _ops(a.device)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            ops[name]()
            if a.device == "cuda":
                torch.cuda.synchronize()
            print(f"  ok   {name} ({time.perf_counter() - t0:.2f} s)", flush=True)
        except Exception as e:  # report every op, then fail
            failed.append(name)
            print(f"  FAIL {name}: {type(e).__name__}: {e}", flush=True)
    print(f"_sanitize_ops: {len(names) - len(failed)}/{len(names)} ops ok" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
