"""Expert parallelism: experts sharded over a process group, tokens dispatched to them and combined back.

Data flow of one ``dispatch`` / ``combine`` (R ranks, rank s holding T_s tokens, k experts per token):

1. Layout (local): which ranks each token goes to (``dispatch_layout``) -- a token crosses to a rank ONCE,
   however many of its k experts live there -- and the (token, k) pairs per expert.
2. Exchange (one small all_gather of R + E + 6 ints per rank): every rank learns the whole count matrix: tokens
   from every source to every destination and pairs from every source to every expert. From it each source
   computes, with prefix sums, the exact row every one of its (token, expert) pairs will occupy in the
   destination's expert-grouped buffer; every rank checks that all agree on hidden size, dtype, fp8, k and the
   combine dtype, and (P2P) that nothing overflows the buffers -- before any row is sent.
3. Transport: each (token, destination) record = the row (bf16/fp16/fp32, or e4m3 with fp8) + metadata
   (k destination positions, -1 where that expert lives elsewhere; k weights; the 1x128 scales with fp8).
   Backend "nccl": one ``all_to_all_single`` of the packed records (bytes: bit-exact on any backend, gloo
   included). Backend "p2p": a kernel writes the records into the peers' symmetric buffers (see buffer.py).
4. Expand (receiver): each record's row is copied to its positions: rows grouped by local expert, stable by
   (source rank, token order) -- ready for the grouped GEMM with ``offsets``.
``combine`` reverses it: per received token, the weighted sum of its local experts' outputs (fp32), sent once
back to the home rank, where the partial sums of the ranks are added (fp32, in the token's k order) and cast to
x's dtype.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .. import ops
from .._checks import check_choice, check_int, check_tensor, value_checks_enabled
from .layout import dispatch_layout
from .placement import Placement, copy_placement, default_placement, replica_index
from .tp import all_reduce_sum, derived_experts

__all__ = ["ExpertParallel", "Dispatched", "Pending", "BACKENDS"]

BACKENDS = ("auto", "nccl", "p2p")
_VERSION = 1
_KEY = "moe_kernels/ep"  # store keys (the group's store is already prefixed per group)
_DTYPE_CODE = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
_HEADER = ("hidden size", "dtype", "fp8", "top_k", "combine dtype")  # what all ranks agree on, per dispatch
_T_COL = len(_HEADER)  # then T, then tokens per destination rank [R], then pairs per expert [E]
_CONFIG = ("version", "world size", "num_experts", "placement", "hidden_size", "backend")
# then: construction ticket, host, CUDA device, P2P ops available, allow_shared_device (checked like _CONFIG)
_CONFIG_COLS = tuple(enumerate(_CONFIG)) + ((10, "allow_shared_device"),)


class Pending:
    """An operation in flight (``async_op=True``). ``wait()`` returns its result: the ``Dispatched`` of a
    dispatch, the [T, H] tensor of a combine. On CUDA, wait() orders the current stream after the transfer and
    returns without blocking the host (except where a backend needs sizes); calling it twice returns the same."""

    _UNSET = object()

    def __init__(self, finish: Callable[[], object]):
        self._finish = finish
        self._result = Pending._UNSET

    def wait(self):
        if self._result is Pending._UNSET:
            self._result = self._finish()
            self._finish = None
        return self._result


@dataclass(eq=False)
class Dispatched:
    """What ``dispatch`` delivers to this rank, and what ``combine`` needs to send results home.

    x                  [M, H] rows grouped by local expert (stable: source rank, then token order), in the
                       dispatched dtype, or e4m3 with ``fp8=True``
    scale              fp32 [M, H/128] dequantisation scales with fp8, else None
    offsets            int32 [E_local + 1]: local expert e owns rows offsets[e]:offsets[e+1]
    weights            fp32 [M] routing weight of each row (combine applies them; offered for fused kernels)
    tokens_per_expert  host list [E_local]: rows per local expert
    num_recv_tokens    distinct (source rank, token) records received (each crossed once)
    """

    x: torch.Tensor
    scale: torch.Tensor | None
    offsets: torch.Tensor
    weights: torch.Tensor
    tokens_per_expert: list
    num_recv_tokens: int
    # --- for combine ---------------------------------------------------------------------------------------
    recv_pos: torch.Tensor = field(repr=False)      # int64 [N_recv, k]: row in x of each (record, slot), -1 none
    recv_weight: torch.Tensor = field(repr=False)   # fp32 [N_recv, k]
    recv_splits: list = field(repr=False)           # records received from each source rank
    send_splits: list = field(repr=False)           # records sent to each destination rank
    home_slot: torch.Tensor = field(repr=False)     # int64 [T, k]: send-order record of (t, j) if j is t's first
    #                                                 expert on that rank, else -1
    counts: torch.Tensor = field(repr=False)        # int64 [R, R] records from rank s to rank r (host)
    send_token: torch.Tensor = field(repr=False)    # int64 [S]: the token of each record sent (backward)
    num_tokens: int = field(repr=False)
    out_dtype: torch.dtype = field(repr=False)
    wire_dtype: torch.dtype = field(repr=False)    # dtype of the partial sums on the way back


class ExpertParallel:
    """Experts sharded over the ranks of ``group`` by a ``Placement``; tokens dispatched to them and combined.

    Args:
        group: a torch.distributed process group (None: the default group). Every member constructs the
            object (collectively: a small all_gather checks that all agree on the configuration).
        num_experts: E, the routed experts of the layer.
        placement: a ``Placement`` over the group's world size; None: ``default_placement`` (contiguous blocks
            when E >= G, one expert per rank when E <= G).
        backend: "nccl" (torch.distributed all_to_all_single: any process-group backend, gloo included),
            "p2p" (CUDA IPC buffers and the extension's kernels: CUDA ranks of one node with peer access), or
            "auto" (p2p when possible, else nccl -- with a warning saying why).
        hidden_size: optional, checked across ranks at construction (always checked per dispatch).
        timeout: seconds a rank (and a P2P kernel) waits for its peers before raising TimeoutError naming the
            ranks that never arrived. None: $MOE_KERNELS_EP_TIMEOUT, else 30 s -- peers legitimately drift apart
            by a first call's kernel compilation, so keep it well above that.
        combine_dtype: dtype of the partial sums on their way home: None = fp32 (the EP layer then equals the
            single-GPU layer: every sum stays fp32 until the final cast), or bf16/fp16 for half the combine bytes
            at one extra rounding per (token, rank) partial (~2e-3 relative in bf16).
        buffer_tokens: P2P only: records one rank may receive per dispatch; None sizes the buffers at the
            first dispatch for its worst case (every token of every rank to one rank).
        allow_shared_device: a correctness mode for tests, with no speed meaning: the P2P backend may run when
            ranks share one GPU and the group is not nccl (e.g. gloo, which then also carries the count
            exchange and the handle exchange). Every rank's buffer is still its own cudaMalloc mapped by its
            peers through CUDA IPC, so the kernels, the protocol and the index math are the ones of distinct
            GPUs; the ranks' kernels time-share the GPU, so nothing measured this way says anything about
            speed. Off by default (ranks sharing a GPU then take the "nccl" backend). Every rank must pass the
            same value (checked at construction).

    Calls must be made in the same order on every rank (they are collective). ``forward`` is differentiable
    (bf16 / fp32 rows): when x, the weights or the local experts' parameters require gradients, its backward runs
    the exchange in reverse (see ``_ExpertParallelFn``), so every rank must run the backward too. ``dispatch`` and
    ``combine`` called on their own carry no autograd history.
    """

    def __init__(
        self,
        group,
        num_experts: int,
        placement: Placement | None = None,
        backend: str = "auto",
        *,
        hidden_size: int | None = None,
        timeout: float | None = None,
        combine_dtype: torch.dtype | None = None,
        buffer_tokens: int | None = None,
        allow_shared_device: bool = False,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallel needs torch.distributed: call torch.distributed.init_process_group")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the expert-parallel group")
        self.world_size = dist.get_world_size(self.group)
        check_int("num_experts", num_experts, lo=1)
        check_choice("backend", backend, BACKENDS)
        if hidden_size is not None:
            check_int("hidden_size", hidden_size, lo=1)
        if timeout is None:
            timeout = float(os.environ.get("MOE_KERNELS_EP_TIMEOUT", "30"))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if combine_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"combine_dtype must be None, float32, bfloat16 or float16, got {combine_dtype}")
        if buffer_tokens is not None:
            check_int("buffer_tokens", buffer_tokens, lo=1)
        if not isinstance(allow_shared_device, bool):
            raise TypeError(f"allow_shared_device must be a bool, got {type(allow_shared_device).__name__}")
        self.allow_shared_device = allow_shared_device
        if placement is None:
            placement = default_placement(num_experts, self.world_size)
        elif not isinstance(placement, Placement):
            raise TypeError(f"placement must be a moe_kernels.dist.Placement, got {type(placement).__name__}")
        if placement.num_ranks != self.world_size:
            raise ValueError(
                f"placement is for world size {placement.num_ranks} but the group has world size {self.world_size}"
            )
        if placement.num_experts != num_experts:
            raise ValueError(f"placement places {placement.num_experts} experts but num_experts={num_experts}")
        self.num_experts, self.placement, self.hidden_size = num_experts, placement, hidden_size
        self.timeout, self.combine_dtype, self.buffer_tokens = float(timeout), combine_dtype, buffer_tokens
        # replicas: every copy of an expert is moved as an expert of its own ("slot"); without replicas slot = expert
        self._slots, slot_expert, self._first_slot = copy_placement(placement)
        self._replicated = placement.replicas is not None
        self._slot_expert = torch.tensor(slot_expert, dtype=torch.int64)
        self._first_slot_t = torch.tensor(self._first_slot, dtype=torch.int64)
        self.num_slots = self._slots.num_experts
        self.local_slots = self._slots.experts_of(self.rank)
        self.local_experts = tuple(slot_expert[s] for s in self.local_slots)  # the expert of each local slot
        self.num_local_experts = len(self.local_experts)
        self._e2r_cpu = torch.tensor(self._slots.expert_to_rank, dtype=torch.int64)
        S = self.num_slots
        self._rank_major = torch.argsort(self._e2r_cpu * S + torch.arange(S), stable=True)
        self._device_tables: dict = {}
        self._p2p = None
        self._ll = None  # LowLatencyEP once enable_low_latency() ran
        self._closed = False
        self._expert_precision = None  # what shard_experts saw (ranks without experts still need it)
        self._experts_trainable = False
        self._grad_specs: list = []
        # experts with several copies (replicas): their gradients are summed over the copies in the backward
        self._replicated_experts = tuple(e for e in range(num_experts) if len(placement.copies(e)) > 1)

        # ---- configuration agreement (collective) ----------------------------------------------------------
        self._store = _group_store(self.group)
        ticket = self._store.add(f"{_KEY}/ctor/{self.rank}", 1) if self._store is not None else 0
        self._guard = _Guard(self._store, self.rank, self.world_size, self.timeout, self.group)
        host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
        shared_ok = allow_shared_device and torch.cuda.is_available()
        cuda_dev = torch.cuda.current_device() if (self._group_backend() == "nccl" or shared_ok) else -1
        cfg = [_VERSION, self.world_size, num_experts, placement.fingerprint(), hidden_size or -1,
               BACKENDS.index(backend), ticket, host, cuda_dev, int(_p2p_ops_available()), int(allow_shared_device)]
        table = self._guard.all_gather(torch.tensor(cfg, dtype=torch.int64), self._config_device(),
                                       "construction", ctor_ticket=ticket)
        self._check_config(table)
        self._guard.prefix = f"{_KEY}/{int(table[0, 6])}"
        self.backend = self._pick_backend(backend, table)

    # ---- public API ----------------------------------------------------------------------------------------

    def shard_experts(self, experts):
        """A ``GroupedExperts`` holding this rank's experts only (their weights copied from ``experts``, which
        holds all E), or None on a rank that holds no expert."""
        from ..modules.experts import GroupedExperts  # noqa: PLC0415 (modules import dist lazily)

        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"experts must be a GroupedExperts, got {type(experts).__name__}")
        if experts.num_experts != self.num_experts:
            raise ValueError(f"experts holds {experts.num_experts} experts, expected num_experts={self.num_experts}")
        self._expert_precision = experts.precision
        # whether the experts train: every rank must agree on taking the differentiable path (its backward is
        # collective), including a rank that holds none of them
        self._experts_trainable = any(p.requires_grad for p in experts.parameters())
        # what the replica gradient sum exchanges, known on every rank (a rank holding no expert joins it too)
        self._grad_specs = [(tuple(p.shape[1:]), p.dtype) for p in experts.parameters() if p.requires_grad]
        if not self.num_local_experts:
            return None
        idx = torch.tensor(self.local_experts, dtype=torch.long, device=experts.w13.device)
        return derived_experts(experts, self.num_local_experts, {
            name: None if getattr(experts, name) is None else getattr(experts, name).detach().index_select(0, idx)
            for name in ("w13", "w2", "w13_scale", "w2_scale")})

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 async_op: bool = False, fp8: bool = False):
        """Send every token to the ranks holding its experts (once per rank) and group what arrives by expert.

        Args:
            x: [T, H] bf16/fp16/fp32 tokens of this rank (T may be 0 and may differ between ranks).
            topk_ids: int32 (or int64) [T, k] expert ids in [0, E); -1 marks an unused slot.
            topk_weights: fp32 [T, k] combine weights.
            async_op: return a ``Pending`` whose ``wait()`` gives the ``Dispatched`` (the transfer overlaps
                whatever is issued before wait()).
            fp8: send rows as e4m3 with one fp32 scale per 1x128 group (H a multiple of 128); the result's
                ``x``/``scale`` feed the FP8 grouped GEMM directly.
        Returns:
            ``Dispatched`` (or ``Pending``).
        """
        self._check_open()
        T, k = self._check_dispatch_args(x, topk_ids, topk_weights, fp8)
        if self._replicated:  # each pair to the copy its share picks, as the expert id of that copy
            ids = topk_ids.long()
            first = self._first_slot_t.to(ids.device)
            topk_ids = torch.where(ids >= 0, first[ids.clamp(min=0)] + replica_index(self.placement, ids), -1)
        plan = self._plan(x, topk_ids, topk_weights, fp8)
        if self.backend == "p2p":
            pending = self._p2p_backend().dispatch(plan)
        else:
            pending = self._collective_dispatch(plan)
        return pending if async_op else pending.wait()

    def combine(self, y: torch.Tensor, dispatched: Dispatched, async_op: bool = False):
        """Send the experts' outputs home and sum them there.

        Args:
            y: [M, H] expert outputs, rows in ``dispatched.x``'s order (any float dtype).
            dispatched: what ``dispatch`` returned for these rows.
            async_op: return a ``Pending`` whose ``wait()`` gives the result.
        Returns:
            [T, H] in the dispatched x's dtype: out[t] = sum_j topk_weights[t, j] * y_(t, j), summed in fp32.
        """
        self._check_open()
        if not isinstance(dispatched, Dispatched):
            raise TypeError(f"dispatched must be what dispatch() returned, got {type(dispatched).__name__}")
        H = dispatched.x.shape[1]
        check_tensor("y", y, dtype=(torch.float32, torch.bfloat16, torch.float16), ndim=2,
                     shape=(dispatched.x.shape[0], H), device=dispatched.x.device)
        partial = self._partial_sums(y, dispatched)
        if self.backend == "p2p":
            pending = self._p2p_backend().combine(partial, dispatched)
        else:
            pending = self._collective_combine(partial, dispatched)
        return pending if async_op else pending.wait()

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts,
                fp8: bool | None = None) -> torch.Tensor:
        """The expert-parallel part of an MoE layer: dispatch -> experts(rows, offsets) -> combine.

        Two micro-batches (the halves of T) are pipelined: dispatch(1) is in flight while experts(0) compute,
        combine(0) while experts(1) compute. ``experts`` is this rank's ``GroupedExperts`` (E_local experts, see
        ``shard_experts``), a GroupedExperts of all E experts (only the local ones receive rows), or None on
        a rank holding none (its rows then come back as zeros). Rows travel in FP8 when the experts are FP8
        (``fp8`` overrides). x [T, H], topk_weights fp32 [T, k], topk_ids int32 [T, k]; returns [T, H] in x's dtype.
        """
        if fp8 is None:  # a rank holding no expert follows the precision shard_experts saw; rows that need a
            # gradient travel unquantised (FP8 experts quantise them in a differentiable op)
            fp8 = (experts.precision if experts is not None else self._expert_precision) == "fp8" and not (
                torch.is_grad_enabled() and x.requires_grad)
        params = [p for p in experts.parameters() if p.requires_grad] if experts is not None else []
        trainable = bool(params) if experts is not None else self._experts_trainable
        if torch.is_grad_enabled() and (x.requires_grad or topk_weights.requires_grad or trainable):
            # a rank with nothing of its own to differentiate still joins the backward's exchanges: an empty
            # anchor that requires grad makes its output part of the graph
            anchor = () if (x.requires_grad or topk_weights.requires_grad or params) else \
                (torch.empty(0, device=x.device, requires_grad=True),)
            return _ExpertParallelFn.apply(self, experts, fp8, x, topk_weights, topk_ids, *params, *anchor)
        if self._ll is not None:  # inference with the low-latency mode enabled
            return self._ll.forward(x, topk_weights, topk_ids, experts)
        return self._pipelined(x, topk_weights, topk_ids, experts, fp8)[0]

    def enable_low_latency(self, max_tokens_per_rank: int, top_k: int, num_buffers: int = 2) -> None:
        """Collective: build a ``LowLatencyEP`` on this group (same placement, timeout, allow_shared_device) that
        ``forward`` uses from now on when no gradient is needed (see ``low_latency.enable_low_latency``). Needs
        hidden_size at construction, FP8 experts (seen by ``shard_experts``) and no replicas."""
        from .low_latency import LowLatencyEP  # noqa: PLC0415

        if self.hidden_size is None:
            raise ValueError("enable_low_latency needs the ExpertParallel built with hidden_size")
        if self._expert_precision != "fp8":
            raise ValueError(f"the low-latency mode runs FP8 experts, got {self._expert_precision!r} (shard_experts "
                             f"records the precision)")
        if self._ll is not None:
            self._ll.close()
        self._ll = LowLatencyEP(self.group, self.num_experts, max_tokens_per_rank, self.hidden_size, top_k,
                                placement=self.placement, fp8=True, timeout=self.timeout,
                                allow_shared_device=self.allow_shared_device, num_buffers=num_buffers)

    def _pipelined(self, x, topk_weights, topk_ids, experts, fp8):
        """The forward: (out, [(chunk, Dispatched, expert outputs)] for the backward)."""
        T = x.shape[0]
        half = (T + 1) // 2
        chunks = [(0, half), (half, T)]
        pend = [self.dispatch(x[a:b], topk_ids[a:b], topk_weights[a:b], async_op=True, fp8=fp8) for a, b in chunks]
        outs, saved = [], []
        for chunk, p in zip(chunks, pend):
            d = p.wait()
            y = self._run_experts(experts, d)
            outs.append(self.combine(y, d, async_op=True))
            saved.append((chunk, d, y))
        return torch.cat([o.wait() for o in outs]), saved

    __call__ = forward

    def close(self) -> None:
        """Free the P2P buffers (collective: every rank calls it). The object is unusable afterwards."""
        if self._p2p is not None:
            self._p2p.close()
            self._p2p = None
        if self._ll is not None:
            self._ll.close()
            self._ll = None
        self._closed = True

    def check(self) -> None:
        """Wait for this rank's transfers and raise if a P2P kernel timed out (naming the missing rank)."""
        if self._p2p is not None:
            self._p2p.check(synchronize=True)

    def __repr__(self) -> str:
        return (f"ExpertParallel(rank={self.rank}/{self.world_size}, num_experts={self.num_experts}, "
                f"local_experts={self.num_local_experts}, backend={self.backend!r})")

    # ---- checks --------------------------------------------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this ExpertParallel was closed")

    def _check_dispatch_args(self, x, topk_ids, topk_weights, fp8):
        check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
        T, H = x.shape
        check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), ndim=2, device=x.device)
        if topk_ids.shape[0] != T:
            raise ValueError(f"topk_ids must have shape [{T}, k] to match x, got {list(topk_ids.shape)}")
        k = topk_ids.shape[1]
        if not 1 <= k <= 32:
            raise ValueError(f"topk_ids must have between 1 and 32 columns, got {k}")
        check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(T, k), device=x.device)
        if self.hidden_size is not None and H != self.hidden_size:
            raise ValueError(f"x must have hidden size {self.hidden_size}, got shape {list(x.shape)}")
        if fp8 and H % 128:
            raise ValueError(f"fp8 dispatch needs a hidden size that is a multiple of 128, got {H}")
        if x.device.type == "cpu" and self._group_backend() == "nccl":
            raise TypeError("x is on the CPU but the group's backend is nccl: move x to this rank's GPU")
        if self.backend == "p2p" and not x.is_cuda:
            raise TypeError(f"the p2p backend needs CUDA tensors, got x on {x.device}")
        if value_checks_enabled(topk_ids) and topk_ids.numel():
            lo, hi = torch.stack([topk_ids.min(), topk_ids.max()]).tolist()
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"topk_ids must lie in [-1, {self.num_experts}), got values in [{lo}, {hi}]")
        return T, k

    def _check_config(self, table: torch.Tensor) -> None:
        for i, name in _CONFIG_COLS:
            col = table[:, i].tolist()
            ref_rank = 0
            if name == "hidden_size":  # -1: this rank did not say
                known = [r for r, v in enumerate(col) if v != -1]
                if not known:
                    continue
                ref_rank = known[0]
                bad = [r for r in known if col[r] != col[ref_rank]]
            else:
                bad = [r for r, v in enumerate(col) if v != col[0]]
            if bad:
                show = lambda v: BACKENDS[v] if name == "backend" else v  # noqa: E731
                who = ", ".join(f"rank {r} has {show(col[r])}" for r in bad[:8])
                raise ValueError(
                    f"ExpertParallel: ranks disagree on {name}: {who}, but rank {ref_rank} has {show(col[ref_rank])}"
                )

    # ---- backend choice ------------------------------------------------------------------------------------

    def _config_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self._group_backend() == "nccl" \
            else torch.device("cpu")

    def _group_backend(self) -> str:
        b = str(dist.get_backend(self.group)).lower()
        return "nccl" if ("nccl" in b and "gloo" not in b) else b

    def _pick_backend(self, requested: str, table: torch.Tensor) -> str:
        if requested == "nccl":
            return "nccl"
        reason = None
        hosts, devs, have_ops = table[:, 7].tolist(), table[:, 8].tolist(), table[:, 9].tolist()
        shared = self.allow_shared_device
        if self._group_backend() != "nccl" and not shared:
            reason = (f"the group's backend is {dist.get_backend(self.group)!r}; P2P needs CUDA ranks on an nccl "
                      f"group (or allow_shared_device=True, a correctness mode for tests)")
        elif shared and min(devs) < 0:
            reason = f"allow_shared_device=True, but some ranks see no CUDA device (devices {devs})"
        elif not all(have_ops):
            from .._ext import extension_error  # noqa: PLC0415

            reason = f"the extension's P2P ops are not available ({extension_error() or 'built without p2p.cu'})"
        elif len(set(hosts)) > 1:
            reason = f"the group spans {len(set(hosts))} nodes; P2P (CUDA IPC) works within one node"
        elif min(devs) < 0 or (len(set(devs)) != len(devs) and not shared):
            reason = (f"ranks do not use distinct CUDA devices of one node (devices {devs}); ranks sharing a GPU "
                      f"need allow_shared_device=True (a correctness mode for tests)")
        else:
            mine = devs[self.rank]
            ok = all(d == mine or torch.cuda.can_device_access_peer(mine, d) for d in devs)
            flags = self._guard.all_gather(torch.tensor([int(ok)], dtype=torch.int64), self._config_device(),
                                           "construction (peer access)")
            if not all(flags[:, 0].tolist()):
                lacking = [r for r, f in enumerate(flags[:, 0].tolist()) if not f]
                reason = f"some GPUs have no peer access to each other (ranks {lacking})"
        if reason is None:
            return "p2p"
        if requested == "p2p":
            raise RuntimeError(f"backend='p2p' is not possible: {reason}")
        if torch.cuda.is_available():  # on a machine without GPUs there is no fast path to miss
            warnings.warn(f"moe_kernels.dist.ExpertParallel uses the nccl backend (torch.distributed all_to_all): "
                          f"{reason}", stacklevel=3)
        return "nccl"

    def _p2p_backend(self):
        if self._p2p is None:
            from .buffer import P2PTransport  # noqa: PLC0415

            self._p2p = P2PTransport(self)
        return self._p2p

    # ---- the plan: layout, exchange, positions -------------------------------------------------------------

    def _tables(self, device: torch.device):
        t = self._device_tables.get(device)
        if t is None:
            e2r, _ = self._slots.tensors(device)
            t = self._device_tables[device] = (e2r, torch.ones(32, 32, dtype=torch.bool, device=device).tril(-1))
        return t

    def _plan(self, x, topk_ids, topk_weights, fp8) -> dict:
        dev = x.device
        T, H = x.shape
        k = topk_ids.shape[1]
        R, E, me = self.world_size, self.num_slots, self.rank  # E: expert copies (= experts without replicas)
        e2r, earlier = self._tables(dev)
        ids = topk_ids.long()
        valid = ids >= 0
        idc = ids.clamp(min=0)
        dest = torch.where(valid, e2r.long()[idc], -1)  # [T, k] rank of each pair
        tokens_per_rank, in_rank, tokens_per_expert = dispatch_layout(topk_ids, e2r, R)
        # quantise before the exchange: nothing slow (a first-call compile) between the sync point and the transfer
        rows, scale = (ops.quantize_fp8(x.contiguous()) if fp8 else (x.contiguous(), None))

        # every rank learns every rank's counts (and its header: all must agree before rows move)
        wire = self.combine_dtype or torch.float32
        header = torch.tensor([H, _DTYPE_CODE[x.dtype], int(fp8), k, _DTYPE_CODE[wire], T], dtype=torch.int64)
        mine = torch.cat([header.to(dev), tokens_per_rank.long(), tokens_per_expert.long()])
        # a CPU group (gloo with allow_shared_device) gathers host tensors: the host needs the table anyway
        table = self._guard.all_gather(mine, dev if self._group_backend() == "nccl" else "cpu", "dispatch")
        self._check_header(table)
        C = table[:, _T_COL + 1:_T_COL + 1 + R]  # [R, R] records from source s to destination r
        N = table[:, _T_COL + 1 + R:]            # [R, E] (token, expert) pairs from source s to expert e
        Ntot = N.sum(0)
        per_rank = torch.zeros(R, dtype=torch.int64).index_add_(0, self._e2r_cpu, Ntot)  # rows each rank receives
        rank_start = per_rank.cumsum(0) - per_rank
        order = self._rank_major
        cs = Ntot[order].cumsum(0) - Ntot[order]
        base = torch.empty_like(Ntot)
        base[order] = cs - rank_start[self._e2r_cpu[order]]  # first row of expert e in its rank's buffer
        first_row = base + (N.cumsum(0) - N)[me]              # ... of this rank's pairs for expert e
        send_splits, recv_splits = C[me].tolist(), C[:, me].tolist()
        S = sum(send_splits)

        # position of every (t, j) pair in its destination's expert-grouped rows: stable by token
        flat = torch.where(valid, idc, E).reshape(-1)
        porder = torch.argsort(flat, stable=True)
        cnt = torch.zeros(E + 1, dtype=torch.int64, device=dev).index_add_(0, flat, torch.ones_like(flat))
        starts = cnt.cumsum(0) - cnt
        within = torch.empty_like(flat)
        within[porder] = torch.arange(T * k, device=dev) - starts[flat[porder]]
        pos = (first_row.to(dev)[idc.reshape(-1)] + within).view(T, k)

        # records in send order: by destination rank, then token
        nz = torch.nonzero_static(in_rank.t(), size=S)
        send_dest, send_token = nz[:, 0], nz[:, 1]
        here = dest.index_select(0, send_token) == send_dest[:, None]  # [S, k] slot j's expert is at that rank
        meta_pos = torch.where(here, pos.index_select(0, send_token), -1).to(torch.int32)
        meta_w = torch.where(here, topk_weights.index_select(0, send_token), 0.0)

        # the way back: record of (t, j) when j is t's first expert on its rank
        send_start = tokens_per_rank.long().cumsum(0) - tokens_per_rank.long()
        rec_of = in_rank.long().cumsum(0) - 1 + send_start[None, :]  # [T, R]
        dup = ((dest[:, :, None] == dest[:, None, :]) & earlier[:k, :k]).any(2)
        home_slot = torch.where(valid & ~dup, rec_of.gather(1, dest.clamp(min=0)), -1)

        cols = [meta_pos, meta_w.view(torch.int32)]
        if fp8:
            cols.append(scale.index_select(0, send_token).view(torch.int32))
        ncols = 2 * k + (H // 128 if fp8 else 0)
        pad = -ncols % 4  # records of 16-byte multiples (the P2P kernel copies int4s)
        if pad:
            cols.append(torch.zeros(S, pad, dtype=torch.int32, device=dev))
        meta = torch.cat(cols, 1)

        local_counts = Ntot[list(self.local_slots)].tolist() if self.local_slots else []
        return dict(
            T=T, H=H, k=k, fp8=fp8, dtype=x.dtype, rows=rows, meta=meta, send_token=send_token,
            send_dest=send_dest, send_splits=send_splits, recv_splits=recv_splits, counts=C, home_slot=home_slot,
            M=int(per_rank[me]), local_counts=local_counts, device=dev, tokens_of_rank=table[:, _T_COL].tolist(),
            wire_dtype=wire,
        )

    def _check_header(self, table: torch.Tensor) -> None:
        for i, name in enumerate(_HEADER):
            col = table[:, i].tolist()
            bad = [r for r, v in enumerate(col) if v != col[0]]
            if bad:
                show = (lambda v: str(_CODE_DTYPE.get(v, v)).replace("torch.", "")) if "dtype" in name else str
                who = ", ".join(f"rank {r} sends {name} {show(col[r])}" for r in bad[:8])
                raise ValueError(f"ExpertParallel.dispatch: ranks disagree: {who}, but rank 0 sends {show(col[0])}")

    def _expand(self, plan, rows_u8, meta_i32):
        """Received records -> rows grouped by local expert (each record's row copied to its k positions)."""
        M, k, H, dev = plan["M"], plan["k"], plan["H"], plan["device"]
        n = meta_i32.shape[0]
        rpos = meta_i32[:, :k].long()
        rw = meta_i32[:, k:2 * k].contiguous().view(torch.float32)
        at = torch.where(rpos >= 0, rpos, M).reshape(-1)  # unused slots land on a dummy row M
        rec = torch.arange(n, device=dev).repeat_interleave(k)
        src = torch.empty(M + 1, dtype=torch.int64, device=dev).scatter_(0, at, rec)[:M]
        weights = torch.empty(M + 1, dtype=torch.float32, device=dev).scatter_(0, at, rw.reshape(-1))[:M]
        x = rows_u8.index_select(0, src)
        scale = None
        if plan["fp8"]:
            scale = meta_i32[:, 2 * k:2 * k + H // 128].contiguous().view(torch.float32).index_select(0, src)
        return self._dispatched(plan, x, scale, weights, meta_i32)

    def _dispatched(self, plan, rows_u8, scale, weights, meta_i32) -> Dispatched:
        """The ``Dispatched`` of expanded rows (uint8 [M, row bytes]) and the received records' metadata."""
        k = plan["k"]
        offsets = torch.tensor([0] + plan["local_counts"], dtype=torch.int64).cumsum(0).to(torch.int32)
        return Dispatched(
            x=rows_u8.view(torch.float8_e4m3fn if plan["fp8"] else plan["dtype"]), scale=scale,
            offsets=offsets.to(plan["device"]), weights=weights, tokens_per_expert=plan["local_counts"],
            num_recv_tokens=meta_i32.shape[0], recv_pos=meta_i32[:, :k].long(),
            recv_weight=meta_i32[:, k:2 * k].contiguous().view(torch.float32), recv_splits=plan["recv_splits"],
            send_splits=plan["send_splits"], home_slot=plan["home_slot"], counts=plan["counts"],
            send_token=plan["send_token"], num_tokens=plan["T"],
            out_dtype=plan["dtype"], wire_dtype=plan["wire_dtype"],
        )

    def _partial_sums(self, y: torch.Tensor, d: Dispatched) -> torch.Tensor:
        """Per received record: sum_j weight_j * y[pos_j] over its local experts, fp32, in slot order."""
        n, k = d.recv_pos.shape
        M, H = y.shape
        ypad, at = _padded_rows(y, d)
        acc = torch.zeros(n, H, dtype=torch.float32, device=y.device)
        for j in range(k):
            acc += ypad.index_select(0, at[:, j]) * d.recv_weight[:, j:j + 1]
        return acc.to(d.wire_dtype)

    @staticmethod
    def _home_sum(parts: torch.Tensor, d: Dispatched) -> torch.Tensor:
        """Home side: out[t] = sum over t's ranks (in slot order) of their partial sums, fp32 -> x's dtype."""
        S, H = parts.shape
        T, k = d.home_slot.shape
        ppad = torch.cat([parts.float(), parts.new_zeros(1, H, dtype=torch.float32)])
        at = torch.where(d.home_slot >= 0, d.home_slot, S)
        acc = torch.zeros(T, H, dtype=torch.float32, device=parts.device)
        for j in range(k):
            acc += ppad.index_select(0, at[:, j])
        return acc.to(d.out_dtype)

    def _run_experts(self, experts, d: Dispatched) -> torch.Tensor:
        out_dtype = torch.bfloat16 if d.x.dtype == torch.float8_e4m3fn else d.x.dtype
        if experts is None or d.x.shape[0] == 0:
            return torch.zeros(d.x.shape[0], d.x.shape[1], dtype=out_dtype, device=d.x.device)
        if experts.num_experts == self.num_local_experts:
            offsets = d.offsets
        elif experts.num_experts == self.num_experts:  # all E experts held here: only the local ones get rows
            counts = [0] * self.num_experts
            for e, c in zip(self.local_experts, d.tokens_per_expert):
                counts[e] = c
            offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(d.x.device)
        else:
            raise ValueError(f"experts holds {experts.num_experts} experts; this rank needs its "
                             f"{self.num_local_experts} local ones (shard_experts) or all {self.num_experts}")
        return experts(d.x, offsets, d.scale)

    # ---- backward exchanges: torch.distributed collectives, whichever backend ran the forward ---------------

    def _sum_replica_grads(self, experts, params: list, grads: list, device) -> list:
        """Every copy of a replicated expert gets the sum of all its copies' gradients (each copy saw its share of
        the tokens), so that the copies stay identical after an optimiser step. One all-reduce (fp32) per trainable
        weight over [experts with copies, ...]; collective: every rank calls it, in the same order, holding copies
        or not. Without replicas, or without trainable experts, nothing happens."""
        rep = self._replicated_experts
        if not rep or not self._grad_specs:
            return grads
        where = {e: i for i, e in enumerate(rep)}
        full = experts is not None and experts.num_experts == self.num_experts != self.num_local_experts
        pairs = [(e if full else j, where[e]) for j, e in enumerate(self.local_experts) if e in where]
        local_idx = torch.tensor([j for j, _ in pairs], dtype=torch.long, device=device)
        rep_idx = torch.tensor([i for _, i in pairs], dtype=torch.long, device=device)
        out = list(grads)
        for i, (shape, _) in enumerate(self._grad_specs):
            buf = torch.zeros(len(rep), *shape, dtype=torch.float32, device=device)
            if pairs and grads[i] is not None:
                buf.index_add_(0, rep_idx, grads[i].index_select(0, local_idx).float())
            total = all_reduce_sum(buf, self.group)
            if pairs:
                g = grads[i].clone() if grads[i] is not None else torch.zeros_like(params[i])
                g[local_idx] = total.index_select(0, rep_idx).to(g.dtype)
                out[i] = g
        return out

    def _backward_exchange(self, send: torch.Tensor, d: Dispatched, to_experts: bool, what: str) -> torch.Tensor:
        """fp32 rows, one per record: home -> expert ranks in dispatch order (to_experts), or back home."""
        send_splits, recv_splits = (d.send_splits, d.recv_splits) if to_experts else (d.recv_splits, d.send_splits)
        dev = send.device
        if send.is_cuda and self._group_backend() != "nccl":  # CUDA rows on a CPU group (allow_shared_device)
            send = send.cpu()
        recv = send.new_empty(sum(recv_splits), send.shape[1])
        work = dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group,
                                      async_op=True)
        self._guard.wait(work, what, cuda=recv.is_cuda)
        return recv.to(dev)

    # ---- backend "nccl": torch.distributed collectives -----------------------------------------------------

    def _collective_dispatch(self, plan) -> Pending:
        rows_u8 = plan["rows"].view(torch.uint8)
        meta_u8 = plan["meta"].view(torch.uint8)
        rb, mb = rows_u8.shape[1], meta_u8.shape[1]
        S, n = sum(plan["send_splits"]), sum(plan["recv_splits"])
        send = torch.empty(S, rb + mb, dtype=torch.uint8, device=plan["device"])
        send[:, :rb] = rows_u8.index_select(0, plan["send_token"])
        send[:, rb:] = meta_u8
        recv = torch.empty(n, rb + mb, dtype=torch.uint8, device=plan["device"])
        work = dist.all_to_all_single(recv, send, plan["recv_splits"], plan["send_splits"], group=self.group,
                                      async_op=True)

        def finish():
            self._guard.wait(work, "dispatch", cuda=recv.is_cuda)
            del plan["rows"], plan["meta"]  # the send side is done with them
            return self._expand(plan, recv[:, :rb], recv[:, rb:].contiguous().view(torch.int32))

        return Pending(finish)

    def _collective_combine(self, partial: torch.Tensor, d: Dispatched) -> Pending:
        H = partial.shape[1]
        send = partial.contiguous().view(torch.uint8)
        recv = torch.empty(sum(d.send_splits), send.shape[1], dtype=torch.uint8, device=partial.device)
        work = dist.all_to_all_single(recv, send, d.send_splits, d.recv_splits, group=self.group, async_op=True)

        def finish():
            self._guard.wait(work, "combine", cuda=recv.is_cuda)
            return self._home_sum(recv.view(d.wire_dtype).view(-1, H), d)

        return Pending(finish)


class _ExpertParallelFn(torch.autograd.Function):
    """``ExpertParallel.forward`` with a backward: the exchange of the forward run in reverse.

    Per micro-batch, with S records sent (home side) and n received (expert side), each record a (token,
    destination rank) pair carrying the token's slots whose expert lives there:
      1. the output gradient of each record's token goes to the expert rank (dispatch order);
      2. there the combine's partial sums are differentiated: the row of slot j gets weight_j * g_record, the
         weight of slot j gets <g_record, y_j>;
      3. the local experts are run again under autograd (their rows detached), giving the rows' gradient and,
         into the returned parameter gradients, the local experts' weight gradients;
      4. each record's rows' gradients are summed (the row was copied to its slots), sent home with the slots'
         weight gradients, and added to their token (index_add over the records of each token).
    Two all_to_all_single per micro-batch, fp32, through torch.distributed on any backend. FP8 rows (e4m3) have
    no gradient: a backward that needs x's or the experts' gradients raises.
    """

    @staticmethod
    def forward(ctx, ep, experts, fp8, x, topk_weights, topk_ids, *params):
        out, saved = ep._pipelined(x, topk_weights, topk_ids, experts, fp8)
        ctx.ep, ctx.experts, ctx.fp8, ctx.saved_chunks = ep, experts, fp8, saved
        ctx.shapes = (x.shape, x.dtype, topk_weights.shape[1], topk_weights.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ep, experts, saved = ctx.ep, ctx.experts, ctx.saved_chunks
        (T, H), x_dtype, k, w_dtype = ctx.shapes
        need_x, need_w = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        params = [p for p in experts.parameters() if p.requires_grad] if experts is not None else []
        if ctx.fp8 and (need_x or params):
            raise RuntimeError("ExpertParallel: the FP8 dispatch (e4m3 rows) has no backward: train with bf16 "
                               "experts (precision='bf16'), or run inference under torch.no_grad()")
        dev = grad_out.device
        gx = torch.zeros(T, H, dtype=torch.float32, device=dev)
        gw = torch.zeros(T, k, dtype=torch.float32, device=dev)
        gparams = [None] * len(params)
        for (a, b), d, y in saved:
            n, M = d.recv_pos.shape[0], y.shape[0]
            g_rec = ep._backward_exchange(grad_out[a:b].float().index_select(0, d.send_token), d, True,
                                          "backward: gradients to the experts")
            ypad, at = _padded_rows(y, d)
            grad_y = torch.zeros(M + 1, H, dtype=torch.float32, device=dev)
            gw_rec = torch.zeros(n, k, dtype=torch.float32, device=dev)
            for j in range(k):
                grad_y.index_add_(0, at[:, j], g_rec * d.recv_weight[:, j:j + 1])
                gw_rec[:, j] = (g_rec * ypad.index_select(0, at[:, j])).sum(-1)
            grad_rows = torch.zeros(M + 1, H, dtype=torch.float32, device=dev)
            if M and experts is not None and (need_x or params) and not ctx.fp8:
                rows = d.x.detach().requires_grad_(need_x)
                with torch.enable_grad():
                    yy = ep._run_experts(experts, dataclasses.replace(d, x=rows))
                    leaves = ([rows] if need_x else []) + params
                    grads = torch.autograd.grad(yy, leaves, grad_y[:M].to(yy.dtype), allow_unused=True)
                if need_x:
                    grad_rows[:M] = grads[0].float()
                for i, g in enumerate(grads[1:] if need_x else grads):
                    if g is not None:
                        gparams[i] = g if gparams[i] is None else gparams[i] + g
            g_back = torch.zeros(n, H, dtype=torch.float32, device=dev)
            for j in range(k):  # a record's row went to each of its slots here: their gradients add up
                g_back += grad_rows.index_select(0, at[:, j])
            home = ep._backward_exchange(torch.cat([g_back, gw_rec], 1), d, False, "backward: gradients home")
            gx[a:b].index_add_(0, d.send_token, home[:, :H])
            gw[a:b].index_add_(0, d.send_token, home[:, H:])
        gparams = ep._sum_replica_grads(experts, params, gparams, dev)
        return (None, None, None, gx.to(x_dtype) if need_x else None, gw.to(w_dtype) if need_w else None, None,
                *gparams, *([None] * (len(ctx.needs_input_grad) - 6 - len(gparams))))


# ---- helpers -------------------------------------------------------------------------------------------------

def _padded_rows(y: torch.Tensor, d: Dispatched):
    """(y in fp32 with a zero row M appended, the row of each (received record, slot) [n, k]: M where the slot's
    expert lives on another rank), for gathering per record and slot."""
    M, H = y.shape
    return (torch.cat([y.float(), y.new_zeros(1, H, dtype=torch.float32)]),
            torch.where(d.recv_pos >= 0, d.recv_pos, M))


def _group_store(group):
    """The process group's store (prefixed per group), or None where torch does not expose it."""
    try:
        from torch.distributed.distributed_c10d import _world  # noqa: PLC0415

        return _world.pg_map[group][1]
    except Exception:  # noqa: BLE001 (private API: name no rank rather than fail)
        return None


def _p2p_ops_available() -> bool:
    from .._ext import has_extension  # noqa: PLC0415

    if not (has_extension() and torch.cuda.is_available()):
        return False
    try:
        torch.classes.moe_kernels_C.P2PBuffer  # noqa: B018
        return True
    except (RuntimeError, AttributeError):
        return False


class _Guard:
    """Bounded waits at the synchronising points, with the ranks that never arrived named on timeout.

    Nothing is written on the happy path. A rank whose wait times out posts its sync-point number to the
    group's store and gives its peers one more timeout to do the same (every rank that reached the point times
    out too); the ranks that posted nothing are the ones that never arrived. At construction each rank counts
    its constructions in the store instead, so the missing ones are read directly.
    """

    def __init__(self, store, rank: int, world: int, timeout: float, group):
        self.store, self.rank, self.world, self.timeout, self.group = store, rank, world, timeout, group
        self.prefix = f"{_KEY}/init"
        self.seq = 0

    def all_gather(self, vec: torch.Tensor, device, what: str, ctor_ticket: int | None = None) -> torch.Tensor:
        """[n] int64 of every rank -> host [world, n] (bounded wait)."""
        vec = vec.to(device)
        out = [torch.empty_like(vec) for _ in range(self.world)]
        work = dist.all_gather(out, vec, group=self.group, async_op=True)
        self.wait(work, what, cuda=vec.is_cuda, block_host=True, ctor_ticket=ctor_ticket)
        return torch.stack(out).cpu()

    def wait(self, work, what: str, cuda: bool, block_host: bool = False, ctor_ticket: int | None = None) -> None:
        """Wait for ``work``; CPU (gloo) work and CUDA work whose result the host needs wait at most timeout.
        Other CUDA work only orders the current stream (a hang then surfaces at the next host-side wait)."""
        self.seq += 1
        if cuda and not block_host:
            work.wait()
            return
        ok = True
        try:
            if cuda:  # poll: NCCL's wait(timeout) semantics vary between torch versions
                start = time.monotonic()
                while not work.is_completed():
                    waited = time.monotonic() - start
                    if waited > self.timeout:
                        ok = False
                        break
                    time.sleep(0 if waited < 2e-3 else 1e-4)  # spin briefly (latency), then yield the core
                if ok:
                    work.wait()
            else:
                ok = work.wait(datetime.timedelta(seconds=self.timeout)) is not False
        except RuntimeError as e:
            if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
                raise
            ok = False
        if not ok:
            missing = self._missing(ctor_ticket)
            who = self._describe(missing)
            raise TimeoutError(f"expert-parallel {what} on rank {self.rank}: {who} within {self.timeout:g} s "
                               f"(ExpertParallel(timeout=...) or MOE_KERNELS_EP_TIMEOUT sets the limit)")

    def _describe(self, missing) -> str:
        if missing is None:
            return "the peers did not answer (the process group exposes no store to tell which rank is missing)"
        if not missing:
            return "every rank reached this point but the collective did not complete"
        names = []
        for r in missing[:16]:
            g = _global_rank(self.group, r)
            names.append(f"rank {r}" + (f" (global rank {g})" if g != r else ""))
        more = f" and {len(missing) - 16} more" if len(missing) > 16 else ""
        return f"{', '.join(names)}{more} never arrived"

    def _missing(self, ctor_ticket):
        if self.store is None:
            return None
        try:
            if ctor_ticket is not None:
                return [r for r in range(self.world)
                        if self.store.add(f"{_KEY}/ctor/{r}", 0) < ctor_ticket]
            self.store.set(f"{self.prefix}/seq/{self.rank}", str(self.seq))
            deadline = time.monotonic() + self.timeout
            while True:
                missing = [r for r in range(self.world) if r != self.rank and self._posted(r) < self.seq]
                if not missing or time.monotonic() > deadline:
                    return missing
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 (the store itself may be gone with the missing rank)
            return None

    def _posted(self, r: int) -> int:
        key = f"{self.prefix}/seq/{r}"
        return int(self.store.get(key)) if self.store.check([key]) else -1


def _global_rank(group, r: int) -> int:
    try:
        return dist.get_global_rank(group, r)
    except Exception:  # noqa: BLE001
        return r
