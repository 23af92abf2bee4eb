"""Expert-parallel dispatch/combine benchmark (run under torchrun, one process per GPU).

    torchrun --nproc-per-node 2 bench/bench_all_to_all.py             # T=4096/rank, H=7168, E=256, k in {2, 8}
    torchrun --nproc-per-node 2 bench/bench_all_to_all.py --no-layer  # transfers only (no 5.6 GB of experts)
    torchrun --nproc-per-node 2 bench/bench_all_to_all.py --smoke     # tiny sizes; runs on CPUs over gloo

Implementations, same inputs, same run:
  ours-p2p   ExpertParallel(backend="p2p"): CUDA IPC buffers, the extension's kernels (when available)
  ours-nccl  ExpertParallel(backend="nccl"): the baseline path -- layout exchange (all_gather of the counts),
             records packed once per (token, rank), one all_to_all_single, expansion by local expert
  naive      the usual torch composition: permute one row per (token, expert), all_to_all_single of the counts,
             then of the rows (and scales); combine = all_to_all back + unpermute. Rows cross once per expert.
Dispatch in bf16 and fp8 (e4m3 rows + 1x128 scales). Combine partial sums in fp32 (default) and bf16.
Times: median over ranks of the per-rank mean of `--iters` calls after `--warmup` (CUDA events around the loop,
all ranks in lock step; host syncs inside the ops -- e.g. the count exchange -- are part of the time).
"bytes" = bytes this rank sends to OTHER ranks (what crosses links), "GB/s" = bytes / time, per rank.
Overlap: the EP MoE layer (two pipelined micro-batches) against compute alone (expert MLPs over the same rows)
and communication alone (the same transfers, no compute): ratio = layer / max(compute, comm), 1.0 = perfect.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["MOE_KERNELS_VALUE_CHECKS"] = "0"

import moe_kernels as mk  # noqa: E402
from _common import markdown, write_json  # noqa: E402
from moe_kernels.dist.ep import ExpertParallel  # noqa: E402


def timed_ms(fn, warmup: int, iters: int, device) -> float:
    """Mean ms per call of fn on this rank, every rank running the same number of calls; median over ranks."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
    else:
        import time

        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / iters
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, ms)
    return statistics.median(every)


def inputs(T, H, E, k, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, generator=g, device=device).bfloat16()
    scores = torch.rand(T, E, generator=g, device=device)
    w, ids = scores.topk(k, dim=1)  # uniform routing, k distinct experts per token
    return x, ids.to(torch.int32), (w / w.sum(1, keepdim=True)).float()


# ---- the naive baseline ----------------------------------------------------------------------------------------
class Naive:
    """permute (one row per (token, expert)) -> all_to_all counts -> all_to_all rows; back: all_to_all + unpermute."""

    def __init__(self, E, world, rank):
        self.E, self.world, self.rank, self.per = E, world, rank, E // world

    def dispatch(self, x, ids, fp8):
        p = mk.ops.permute(x, ids, self.E, fp8=fp8)
        counts = (p.offsets[1:] - p.offsets[:-1]).view(self.world, self.per).sum(1)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        send, recv = counts.tolist(), recv_counts.tolist()
        rows = torch.empty(sum(recv), x.shape[1], dtype=p.x.dtype, device=x.device)
        dist.all_to_all_single(rows.view(torch.uint8), p.x.view(torch.uint8), recv, send)
        scale = None
        if fp8:
            scale = torch.empty(sum(recv), p.scale.shape[1], dtype=torch.float32, device=x.device)
            dist.all_to_all_single(scale, p.scale, recv, send)
        return p, rows, scale, send, recv

    def combine(self, y, state, weights):
        p, _, _, send, recv = state
        back = torch.empty(sum(send), y.shape[1], dtype=y.dtype, device=y.device)
        dist.all_to_all_single(back, y, send, recv)
        return mk.ops.unpermute(back, p, weights)

    def bytes_cross(self, ids, H, fp8):
        ranks = ids.long() // self.per
        n = int((ranks != self.rank).sum())
        return n * (H + (H // 128) * 4 if fp8 else 2 * H), n * 2 * H


def our_bytes(d, H, fp8, k, wire_bytes, rank):
    C = d.counts
    sent = int(C[rank].sum() - C[rank, rank])           # records to other ranks
    back = int(C[:, rank].sum() - C[rank, rank])        # partial sums to other ranks
    ncols = 2 * k + (H // 128 if fp8 else 0)
    meta = (ncols + (-ncols % 4)) * 4
    return sent * ((H if fp8 else 2 * H) + meta), back * H * wire_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-layer", action="store_true", help="skip the overlap measurement (no expert weights)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, CPU/gloo allowed")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.intermediate, args.experts = 64, 256, 128, 16
        args.warmup, args.iters = 1, 2
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    T, H, E = args.tokens, args.hidden, args.experts
    log = print if rank == 0 else (lambda *a, **k: None)

    eps = {"ours-nccl": ExpertParallel(None, E, backend="nccl", hidden_size=H)}
    try:
        eps["ours-p2p"] = ExpertParallel(None, E, backend="p2p", hidden_size=H)
    except RuntimeError as e:
        log(f"p2p backend not measured: {e}")
    naive = Naive(E, world, rank)
    rows, layer_rows = [], []
    for k in args.topk:
        x, ids, w = inputs(T, H, E, k, device, seed=rank * 100 + k)
        for fp8 in (False, True):
            dtype = "fp8" if fp8 else "bf16"
            for name, ep in eps.items():
                for wire in (torch.float32, torch.bfloat16):
                    ep.combine_dtype = wire
                    d = ep.dispatch(x, ids, w, fp8=fp8)
                    y = torch.zeros(d.x.shape, dtype=torch.bfloat16, device=device)
                    t_disp = timed_ms(lambda: ep.dispatch(x, ids, w, fp8=fp8), args.warmup, args.iters, device)
                    t_comb = timed_ms(lambda: ep.combine(y, d), args.warmup, args.iters, device)
                    b_disp, b_comb = our_bytes(d, H, fp8, k, wire.itemsize, rank)
                    rows.append(dict(impl=name, k=k, dtype=dtype, partials=str(wire).replace("torch.", ""),
                                     dispatch_ms=t_disp, combine_ms=t_comb, dispatch_MB=b_disp / 1e6,
                                     combine_MB=b_comb / 1e6, dispatch_GBps=b_disp / t_disp / 1e6,
                                     combine_GBps=b_comb / t_comb / 1e6))
                    log(markdown(rows[-1:], list(rows[-1])))
                ep.combine_dtype = None
            state = naive.dispatch(x, ids, fp8)
            y = torch.zeros(state[1].shape, dtype=torch.bfloat16, device=device)
            t_disp = timed_ms(lambda: naive.dispatch(x, ids, fp8), args.warmup, args.iters, device)
            t_comb = timed_ms(lambda: naive.combine(y, state, w), args.warmup, args.iters, device)
            b_disp, b_comb = naive.bytes_cross(ids, H, fp8)
            rows.append(dict(impl="naive", k=k, dtype=dtype, partials="bf16 rows", dispatch_ms=t_disp,
                             combine_ms=t_comb, dispatch_MB=b_disp / 1e6, combine_MB=b_comb / 1e6,
                             dispatch_GBps=b_disp / t_disp / 1e6, combine_GBps=b_comb / t_comb / 1e6))
            log(markdown(rows[-1:], list(rows[-1])))

    if not args.no_layer:
        for precision in ("fp8", "bf16"):
            experts = mk.GroupedExperts(E // world, H, args.intermediate, precision, device=device)
            for name, ep in eps.items():
                for k in args.topk:
                    x, ids, w = inputs(T, H, E, k, device, seed=rank * 100 + k)
                    fp8 = precision == "fp8"
                    half = (T + 1) // 2
                    ds = [ep.dispatch(x[a:b], ids[a:b], w[a:b], fp8=fp8) for a, b in ((0, half), (half, T))]
                    t_layer = timed_ms(lambda: ep.forward(x, w, ids, experts), args.warmup, args.iters, device)
                    t_comp = timed_ms(lambda: [experts(d.x, d.offsets, d.scale) for d in ds], args.warmup,
                                      args.iters, device)
                    t_comm = timed_ms(lambda: ep.forward(x, w, ids, None, fp8=fp8), args.warmup, args.iters, device)
                    layer_rows.append(dict(impl=name, precision=precision, k=k, layer_ms=t_layer, compute_ms=t_comp,
                                           comm_ms=t_comm, ratio=t_layer / max(t_comp, t_comm),
                                           hidden=max(0.0, (t_comp + t_comm - t_layer) / min(t_comp, t_comm))))
                    log(markdown(layer_rows[-1:], list(layer_rows[-1])))
            del experts

    cols = ["impl", "k", "dtype", "partials", "dispatch_ms", "combine_ms", "dispatch_MB", "combine_MB",
            "dispatch_GBps", "combine_GBps"]
    log("\n## dispatch / combine per rank (" + f"T={T}/rank, H={H}, E={E}, {world} ranks, {device.type})\n")
    log(markdown(rows, cols, {c: ".3f" for c in cols if c.endswith("_ms")}))
    if layer_rows:
        log("\n## overlap: two-micro-batch EP layer vs compute alone and communication alone\n")
        log(markdown(layer_rows, list(layer_rows[0]), {"ratio": ".2f", "hidden": ".2f"}))
        log("ratio = layer / max(compute, comm) (1.0: the shorter one fully hidden); hidden = fraction of the "
            "shorter one hidden")
    if rank == 0:
        write_json("all_to_all", {
            "config": dict(tokens_per_rank=T, hidden=H, intermediate=args.intermediate, experts=E, topk=args.topk,
                           world_size=world, backend_group=dist.get_backend(), smoke=args.smoke,
                           p2p="ours-p2p" in eps),
            "rows": rows, "overlap": layer_rows,
        }, results_dir=args.out)
    for ep in eps.values():
        ep.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
