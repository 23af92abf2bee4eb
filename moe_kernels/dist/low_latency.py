"""Low-latency expert-parallel dispatch/combine for decoding (the anchor: DeepEP's low-latency mode).

Differences from ``ExpertParallel``'s normal mode:

* fixed receive slots: every rank reserves, for each (local expert, source rank), room for ``max_tokens_per_rank``
  rows, so nothing is sized per call and no count matrix is exchanged: the number of rows a source sent to an
  expert travels with the rows, as the flag of the data (csrc/kernels/p2p_ll.cu);
* no host synchronisation: every launch's grid depends on shapes only and every count is read on the device, so
  a whole decoding step (dispatch, experts, combine) can be captured in a CUDA graph and replayed with new routing;
* rows travel in FP8 (e4m3 with 1x128 scales; ``fp8=False``: bf16) and are delivered in the *masked* layout
  [local experts, R * max_tokens, H] with the valid rows per expert in a device tensor (for
  ``ops.grouped_gemm_fp8_masked``); results travel back in bf16 and the home rank applies the routing weights;
* each token is sent once per (token, expert) pair (not once per rank): more bytes than the normal mode when a
  token's experts share a rank, in exchange for no layout pass and no count exchange;
* calls return handles: ``dispatch`` launches the send and returns; ``recv()`` launches the receive. Two buffers
  alternate, so two micro-batches can be in flight: while this rank computes the first, its peers' rows for the
  second land in its buffer.

Intra-node only (CUDA IPC, like the "p2p" backend, ``allow_shared_device`` included); no replicas.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .._checks import check_int, check_tensor, value_checks_enabled
from .buffer import SymmetricBuffer

__all__ = ["LowLatencyEP", "LLDispatched", "masked_expert_mlp", "enable_low_latency"]

@dataclass(eq=False)
class LLDispatched:
    """What a low-latency dispatch delivers: the masked layout of this rank's local experts.

    x       [L, R * N, H] rows (e4m3 with fp8, else bf16); rows past ``count[e]`` of expert e are unspecified
    scale   fp32 [L, R * N, H / 128] with fp8, else None
    count   int32 [L] on the device: valid rows per local expert (stable order: source rank, then token)
    L = this rank's local experts, R ranks, N = max_tokens_per_rank.
    """

    x: torch.Tensor
    scale: torch.Tensor | None
    count: torch.Tensor
    src: torch.Tensor = None            # int32 [L, R * N, 2]: (home rank, token * k + slot) of every row
    buffer: object = None
    num_tokens: int = 0


class _Pending:
    def __init__(self, finish):
        self._finish, self._result = finish, None

    def recv(self):
        """Launch the receive on the current stream (no host wait) and return the result (same on repeat)."""
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result

    wait = recv


class LowLatencyEP:
    """Low-latency dispatch/combine over the ranks of ``group`` (collective constructor; see the module docstring).

    Args:
        group: process group of the ranks (nccl; or gloo with ``allow_shared_device=True``).
        num_experts: E. placement: a ``Placement`` without replicas (None: the default one).
        max_tokens_per_rank: N, the most tokens one rank dispatches per call (the receive slots' size): a call
            with more raises ValueError before anything is sent.
        hidden_size: H (a multiple of 128 with fp8, of 8 without). top_k: k, the routing's experts per token.
        fp8: rows travel as e4m3 + 1x128 scales (default) or bf16.
        timeout: seconds a kernel waits for a peer (None: as ``ExpertParallel``).
        allow_shared_device: ranks may share one GPU (a correctness mode for tests: no speed meaning).
        num_buffers: buffers used in turn (2: two micro-batches may be in flight).

    Memory per buffer and rank: L_max * R * N * (row + scale + 16 bytes) for dispatch, N * k * H * 2 for combine.
    Every rank makes the same calls in the same order; each ``dispatch`` must be followed (in order) by its
    ``recv()``, ``combine`` and the combine's ``wait()`` on every rank, a rank without experts included.
    """

    def __init__(self, group, num_experts: int, max_tokens_per_rank: int, hidden_size: int, top_k: int, *,
                 placement=None, fp8: bool = True, timeout: float | None = None, allow_shared_device: bool = False,
                 num_buffers: int = 2):
        from .ep import ExpertParallel  # noqa: PLC0415

        check_int("max_tokens_per_rank", max_tokens_per_rank, lo=1)
        check_int("hidden_size", hidden_size, lo=1)
        check_int("top_k", top_k, lo=1, hi=32)
        check_int("num_buffers", num_buffers, lo=1)
        if fp8 and hidden_size % 128:
            raise ValueError(f"fp8 rows need a hidden size that is a multiple of 128, got {hidden_size}")
        if hidden_size % 8:
            raise ValueError(f"the low-latency mode moves 16-byte vectors: hidden size must be a multiple of 8, "
                             f"got {hidden_size}")
        self._ep = ExpertParallel(group, num_experts, placement, backend="p2p", hidden_size=hidden_size,
                                  timeout=timeout, allow_shared_device=allow_shared_device)
        pl = self._ep.placement
        if pl.replicas is not None:
            raise ValueError("the low-latency mode does not take a placement with replicas")
        self.group, self.rank, self.world_size = self._ep.group, self._ep.rank, self._ep.world_size
        self.num_experts, self.placement, self.hidden_size, self.top_k = num_experts, pl, hidden_size, top_k
        self.max_tokens, self.fp8, self.num_buffers = max_tokens_per_rank, fp8, num_buffers
        self.local_experts = pl.experts_of(self.rank)
        self.num_local_experts = len(self.local_experts)
        max_local = max(1, max(pl.num_local(r) for r in range(self.world_size)))
        row_bytes = hidden_size if fp8 else 2 * hidden_size
        scale_bytes = -(-(4 * (hidden_size // 128)) // 16) * 16 if fp8 else 0
        self._layout = [max_local, max_tokens_per_rank, top_k, row_bytes, scale_bytes, hidden_size, num_experts,
                        self.num_local_experts]
        d_bytes, c_bytes = torch.ops.moe_kernels_C.p2p_ll_bytes(self.world_size, self._layout)
        self._bufs = [SymmetricBuffer(self.group, d_bytes, c_bytes, self._ep.timeout) for _ in range(num_buffers)]
        dev = self._bufs[0].device
        self.device = dev
        self._expert_rank = torch.tensor(pl.expert_to_rank, dtype=torch.int32, device=dev)
        self._expert_local = torch.tensor(pl.local_index, dtype=torch.int32, device=dev)
        self._next = 0
        self._closed = False

    # ---- the calls -------------------------------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> _Pending:
        """Send every (token, expert) pair's row to the expert's rank; ``.recv()`` on the result launches the
        receive and gives the ``LLDispatched``.

        x: bf16 [T, H] on this rank's GPU, T <= max_tokens_per_rank; topk_ids: int32/int64 [T, k] expert ids
        (-1: unused slot; distinct per token). Nothing waits on the host; capturable in a CUDA graph.
        """
        self._check_open()
        check_tensor("x", x, dtype=torch.bfloat16, ndim=2, shape=(None, self.hidden_size), device=self.device)
        T = x.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"low-latency dispatch: {T} tokens exceed max_tokens_per_rank={self.max_tokens} (the "
                             f"receive slots' size); nothing was sent")
        check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), shape=(T, self.top_k), device=x.device)
        if value_checks_enabled(topk_ids) and topk_ids.numel():
            lo, hi = torch.stack([topk_ids.min(), topk_ids.max()]).tolist()
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"topk_ids must lie in [-1, {self.num_experts}), got values in [{lo}, {hi}]")
        buf = self._bufs[self._next]
        self._next = (self._next + 1) % self.num_buffers
        buf.check()
        ids = topk_ids.to(torch.int32).contiguous()
        if self.fp8 and T == 0:  # nothing to quantise (the kernels still publish the zero counts)
            rows = torch.empty(0, self.hidden_size, dtype=torch.uint8, device=x.device)
            scales = torch.empty(0, self.hidden_size // 128, dtype=torch.float32, device=x.device)
        elif self.fp8:
            q, s = ops.quantize_fp8(x.contiguous())
            rows, scales = q.view(torch.uint8), s
        else:
            rows, scales = x.contiguous().view(torch.uint8), x.new_empty(0, dtype=torch.float32)
        buf.impl.ll_dispatch_send(rows, scales, ids, self._expert_rank, self._expert_local, self._layout,
                                  buf.timeout_ns)

        def finish():
            L, RN, H = self.num_local_experts, self.world_size * self.max_tokens, self.hidden_size
            out = torch.empty(L, RN, rows.shape[1], dtype=torch.uint8, device=x.device)
            scale = torch.empty(L, RN, H // 128 if self.fp8 else 0, dtype=torch.float32, device=x.device)
            count = torch.zeros(L, dtype=torch.int32, device=x.device)
            src = torch.empty(L, RN, 2, dtype=torch.int32, device=x.device)
            buf.impl.ll_dispatch_recv(out, scale, count, src, self._layout, buf.timeout_ns)
            return LLDispatched(x=out.view(torch.float8_e4m3fn if self.fp8 else torch.bfloat16), count=count,
                                scale=scale if self.fp8 else None, src=src, buffer=buf, num_tokens=T)

        return _Pending(finish)

    def combine(self, y: torch.Tensor, dispatched: LLDispatched, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> _Pending:
        """Send the experts' outputs home; ``.wait()`` on the result launches the receive and gives
        out [T, H] bf16: out[t] = sum_j topk_weights[t, j] * y_(t, j) (fp32 sum, slots with id -1 skipped).

        y: bf16 [L, R * N, H] in ``dispatched``'s masked layout; topk_weights fp32 [T, k] and topk_ids [T, k]: the
        ones of the dispatch (this rank's tokens).
        """
        self._check_open()
        if not isinstance(dispatched, LLDispatched):
            raise TypeError(f"dispatched must be what recv() returned, got {type(dispatched).__name__}")
        L, RN, H = self.num_local_experts, self.world_size * self.max_tokens, self.hidden_size
        check_tensor("y", y, dtype=torch.bfloat16, shape=(L, RN, H), device=self.device)
        T = dispatched.num_tokens
        check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(T, self.top_k), device=self.device)
        check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), shape=(T, self.top_k),
                     device=self.device)
        buf = dispatched.buffer
        buf.check()
        buf.impl.ll_combine_send(y.contiguous(), dispatched.count, dispatched.src, self._layout, buf.timeout_ns)
        ids = topk_ids.to(torch.int32).contiguous()
        weights = topk_weights.contiguous()

        def finish():
            out = torch.empty(T, H, dtype=torch.bfloat16, device=self.device)
            buf.impl.ll_combine_recv(weights, ids, out, self._layout, buf.timeout_ns)
            return out

        return _Pending(finish)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts) -> torch.Tensor:
        """Inference of the routed experts in the low-latency mode: dispatch -> this rank's FP8 experts on the
        masked layout (``ops.grouped_gemm_fp8_masked`` for w13, SwiGLU + 1x128 quantisation, w2) -> combine.
        x [T, H] (sent as bf16), topk_weights fp32 [T, k], topk_ids [T, k]; ``experts``: this rank's
        ``GroupedExperts`` (FP8; ``shard_experts``), or None on a rank holding none. Returns [T, H] in x's dtype.
        No host sync (capturable) once the kernels are compiled; no autograd."""
        d = self.dispatch(x.to(torch.bfloat16), topk_ids).recv()
        y = masked_expert_mlp(experts, d, self.hidden_size)
        return self.combine(y, d, topk_weights.float(), topk_ids).wait().to(x.dtype)

    # ---- housekeeping ------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Wait for the current stream and raise TimeoutError if a kernel reported a missing peer (naming it)."""
        torch.cuda.current_stream(self.device).synchronize()
        for buf in self._bufs:
            buf.check()

    def close(self) -> None:
        """Free the buffers (collective)."""
        torch.cuda.current_stream(self.device).synchronize()
        for buf in self._bufs:
            buf.close()
        self._ep.close()
        self._closed = True

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this LowLatencyEP was closed")

    def __repr__(self) -> str:
        return (f"LowLatencyEP(rank={self.rank}/{self.world_size}, num_experts={self.num_experts}, "
                f"max_tokens_per_rank={self.max_tokens}, fp8={self.fp8})")


def masked_expert_mlp(experts, d: LLDispatched, hidden_size: int) -> torch.Tensor:
    """The SwiGLU MLPs of this rank's FP8 experts over the masked layout of ``d``: bf16 [L, R * N, H] (rows past
    ``d.count[e]`` unspecified). The SwiGLU takes the bf16 output of the w13 GEMM (the fused kernel of the normal
    path takes its fp32 accumulators: the two differ by that rounding)."""
    L, RN = d.x.shape[0], d.x.shape[1]
    if experts is None or L == 0:
        return torch.zeros(L, RN, hidden_size, dtype=torch.bfloat16, device=d.x.device)
    if experts.num_experts != L:
        raise ValueError(f"experts holds {experts.num_experts} experts; this rank has {L} local ones (shard_experts)")
    if d.scale is None or experts.precision != "fp8":
        raise NotImplementedError("the low-latency expert MLP runs FP8 experts on FP8 rows only")
    if getattr(experts, "fp8_master", False):  # trainable FP8 experts: their cached e4m3 copies
        (w13, w13_scale), (w2, w2_scale) = experts.fp8_weights()
    else:
        w13, w13_scale, w2, w2_scale = experts.w13, experts.w13_scale, experts.w2, experts.w2_scale
    I = w2.shape[-1]
    h = ops.grouped_gemm_fp8_masked(d.x, d.scale, w13, w13_scale, d.count)  # [L, RN, 2I] bf16
    a = torch.nn.functional.silu(h[..., :I].float()) * h[..., I:].float()
    q, s = ops.quantize_fp8(a.reshape(L * RN, I))
    return ops.grouped_gemm_fp8_masked(q.view(L, RN, I), s.view(L, RN, I // 128), w2, w2_scale, d.count)


def enable_low_latency(layer, max_tokens_per_rank: int, num_buffers: int = 2) -> None:
    """Collective (every rank of the layer's ep_group): from now on the expert-parallel ``MoELayer`` runs its
    routed experts through the low-latency mode whenever autograd is not needed (inference, decoding); training
    keeps the normal mode. FP8 experts only. Every rank must then stay within ``max_tokens_per_rank`` tokens per
    forward: a rank over it raises ValueError before sending, and its peers time out naming it (the bound is
    not exchanged: that would cost the host sync the mode avoids)."""
    ep = getattr(layer, "_ep", None)
    if ep is None:
        raise ValueError("enable_low_latency needs an MoELayer built with ep_group")
    ep.enable_low_latency(max_tokens_per_rank, layer.top_k, num_buffers=num_buffers)
