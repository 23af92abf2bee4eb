"""Symmetric buffers for intra-node expert parallelism over CUDA IPC, and the P2P dispatch/combine on them.

Every rank of the group allocates one buffer of the same size (``cudaMalloc`` in the extension), exports its
CUDA IPC handle, and maps every peer's buffer (handles exchanged with ``all_gather_object``). A buffer holds
    signals   uint64 [4][R][20]: dispatch flag / dispatch ack / combine flag / combine ack, per (rank, block)
    dispatch  records sent to this rank: row bytes + metadata bytes each, at slots fixed by the count matrix
    combine   partial sums coming home, at this rank's send-order positions
The kernels (csrc/kernels/p2p.cu) write straight into the peers' regions and raise flags with release
semantics; receivers wait on them with acquire loads. Every call carries an epoch (1, 2, ...): a flag counts
once it holds the current epoch, and a sender first waits for the previous epoch's acknowledgements, so a
repeated call never reads stale data nor overwrites a region still being read. Waits time out on the device;
the missing rank lands in a host-mapped error word that ``check()`` turns into a TimeoutError naming it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["SymmetricBuffer", "P2PTransport", "dispatch_slots", "combine_slots"]

_ERRORS = {
    1: ("dispatch", "never released its receive region from the previous dispatch"),
    2: ("dispatch", "never delivered its records"),
    3: ("combine", "never released its region from the previous combine"),
    4: ("combine", "never delivered its partial sums"),
    5: ("low-latency dispatch", "never sent its tokens"),
    6: ("low-latency combine", "never sent its expert outputs"),
    7: ("low-latency dispatch", "sent more rows to one expert than max_tokens_per_rank (duplicate expert ids?)"),
}


def dispatch_slots(counts: torch.Tensor, rank: int, send_dest: torch.Tensor, send_splits: list) -> torch.Tensor:
    """Record slot in the destination's dispatch region of each record this rank sends (send order: by
    destination, then token). counts int64 [R, R] (host): records from s to r; send_dest [S] on the device.
    Source s's records for r occupy slots sum_{s'<s} counts[s'][r] ..., so r's region ends up in
    (source rank, token) order: the order the collective backend receives in."""
    dev = send_dest.device
    splits = torch.tensor(send_splits, dtype=torch.int64)
    send_start = (splits.cumsum(0) - splits).to(dev)
    dest_base = (counts.cumsum(0) - counts)[rank].to(dev)  # where this rank's records start in each destination
    return dest_base[send_dest] + torch.arange(send_dest.shape[0], device=dev) - send_start[send_dest]


def combine_slots(counts: torch.Tensor, rank: int, recv_splits: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each record this rank received (source-major order): (home rank, its row in the home's combine
    region), the row being the record's position in the home's send order."""
    R = counts.shape[0]
    splits = torch.tensor(recv_splits, dtype=torch.int64, device=device)
    n = int(sum(recv_splits))
    src = torch.repeat_interleave(torch.arange(R, device=device), splits, output_size=n)
    recv_start = splits.cumsum(0) - splits
    home_base = (counts.cumsum(1) - counts)[:, rank].to(device)  # where source s keeps its records for this rank
    return src, home_base[src] + torch.arange(n, device=device) - recv_start[src]


class SymmetricBuffer:
    """One equal-size CUDA buffer per rank of ``group``, each mapped by every peer (collective constructor).

    Args:
        group: process group of CUDA ranks on one node (nccl: it carries the handle exchange).
        dispatch_bytes / combine_bytes: sizes of the two data regions (rounded up to 16 bytes).
        timeout: seconds a kernel waits for a peer before it gives up and reports the peer.
    Attributes: ``stream`` (the communication stream every launch uses), ``impl`` (the extension's object).
    """

    def __init__(self, group, dispatch_bytes: int, combine_bytes: int, timeout: float):
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        r16 = lambda n: -(-int(n) // 16) * 16  # noqa: E731
        self.impl = torch.classes.moe_kernels_C.P2PBuffer(
            self.rank, self.world_size, r16(dispatch_bytes), r16(combine_bytes), self.device.index
        )
        handles = [None] * self.world_size
        dist.all_gather_object(handles, self.impl.ipc_handle().tolist(), group=group)
        self.impl.open_peers(torch.tensor(handles, dtype=torch.uint8))
        dist.barrier(group=group)  # every buffer is zeroed and mapped everywhere before anyone writes
        self.stream = torch.cuda.Stream(device=self.device)
        self.dispatch_bytes, self.combine_bytes = self.impl.dispatch_bytes(), self.impl.combine_bytes()
        self.timeout_ns = int(timeout * 1e9)
        self.timeout = timeout
        self._epochs = {"dispatch": 0, "combine": 0}
        self._error: str | None = None

    def next_epoch(self, kind: str) -> int:
        self._epochs[kind] += 1
        return self._epochs[kind]

    def check(self, synchronize: bool = False) -> None:
        """Raise TimeoutError if a kernel reported a missing peer (after waiting for the stream if asked)."""
        if synchronize:
            self.stream.synchronize()
        if self._error is None:
            word = int(self.impl.error_word())
            if word:
                code, rank, epoch = word >> 56, (word >> 32) & 0xFFFFFF, word & 0xFFFFFFFF
                stage, what = _ERRORS.get(code, ("transfer", f"failed (code {code})"))
                self._error = (
                    f"P2P {stage} (call {epoch}) on rank {self.rank}: rank {rank} {what} within {self.timeout:g} s; "
                    f"the buffers are unusable now (close() this ExpertParallel and build a new one)"
                )
        if self._error is not None:
            raise TimeoutError(self._error)

    def close(self) -> None:
        """Collective: wait for this rank's kernels, then for every rank's (barrier), then unmap and free."""
        if self.impl is None:
            return
        self.stream.synchronize()
        dist.barrier(group=self.group)
        self.impl.close()
        self.impl = None


class P2PTransport:
    """The "p2p" backend of ``ExpertParallel``: its plans moved by the P2P kernels on a ``SymmetricBuffer``
    that is allocated (collectively) at the first dispatch."""

    def __init__(self, ep):
        self.ep = ep
        self.buf: SymmetricBuffer | None = None

    def _buffer(self, plan, row_bytes: int) -> SymmetricBuffer:
        if self.buf is None:
            ep, k, H = self.ep, plan["k"], plan["H"]
            wire = 4  # room for fp32 partial sums, whatever this call uses
            ncols = 2 * 32 + H // 128  # metadata of the largest k (32) with fp8 scales
            record_bytes = max(row_bytes, H * torch.empty(0, dtype=plan["dtype"]).element_size()) + 4 * ncols
            if ep.buffer_tokens is not None:
                recv_records = send_records = ep.buffer_tokens
            else:  # the worst case of this shape: every token of every rank to one rank
                recv_records = sum(plan["tokens_of_rank"])
                send_records = max(plan["tokens_of_rank"]) * min(k, ep.world_size)
            self.buf = SymmetricBuffer(ep.group, recv_records * record_bytes, send_records * H * wire, ep.timeout)
        return self.buf

    def dispatch(self, plan):
        from .ep import Pending  # noqa: PLC0415

        ep, dev, C = self.ep, plan["device"], plan["counts"]
        rows = plan["rows"].view(torch.uint8)
        meta = plan["meta"].view(torch.uint8)
        rb, mb, k, H = rows.shape[1], meta.shape[1], plan["k"], plan["H"]
        wire = torch.empty(0, dtype=plan["wire_dtype"]).element_size()
        if rb % 16 or (H * wire) % 16:
            raise ValueError(f"the p2p backend moves 16-byte vectors: hidden size {H} x {rows.element_size()} bytes "
                             "must be a multiple of 16 (use backend='nccl')")
        buf = self._buffer(plan, rb)
        buf.check()
        # every rank sees the same matrix: all raise together, before anything is sent
        need_d = int(C.sum(0).max()) * (rb + mb)
        need_c = int(C.sum(1).max()) * H * wire
        if need_d > buf.dispatch_bytes or need_c > buf.combine_bytes:
            raise ValueError(
                f"P2P buffers too small for this dispatch: {need_d} bytes of records into one rank (buffer "
                f"{buf.dispatch_bytes}), {need_c} bytes of partial sums back (buffer {buf.combine_bytes}); build "
                f"the ExpertParallel with buffer_tokens >= {int(max(C.sum(0).max(), C.sum(1).max()))}"
            )
        me = ep.rank
        send_dest = plan["send_dest"]
        send_row = dispatch_slots(C, me, send_dest, plan["send_splits"])
        n, M = int(C[:, me].sum()), plan["M"]
        nsc = H // 128 if plan["fp8"] else 0
        out_rows = torch.empty(M, rb, dtype=torch.uint8, device=dev)
        out_scale = torch.empty(M, nsc, dtype=torch.float32, device=dev)
        out_weight = torch.empty(M, dtype=torch.float32, device=dev)
        out_meta = torch.empty(n, mb, dtype=torch.uint8, device=dev)
        args = [rows, meta, plan["send_token"].int(), send_dest.int(), send_row.int(), out_rows, out_scale,
                out_weight, out_meta]
        event = self._launch(buf, lambda: buf.impl.dispatch(*args, k, buf.next_epoch("dispatch"), buf.timeout_ns),
                             args)

        def finish():
            torch.cuda.current_stream(dev).wait_event(event)
            if event.query():
                buf.check()
            return ep._dispatched(plan, out_rows, out_scale if nsc else None, out_weight,
                                  out_meta.view(torch.int32))

        return Pending(finish)

    def combine(self, partial: torch.Tensor, d):
        from .ep import Pending  # noqa: PLC0415

        ep, buf, dev = self.ep, self.buf, partial.device
        buf.check()
        H = partial.shape[1]
        src, dst_row = combine_slots(d.counts, ep.rank, d.recv_splits, dev)
        out = torch.empty(d.num_tokens, H, dtype=d.out_dtype, device=dev)
        args = [partial.contiguous(), src.int(), dst_row.int(), d.home_slot.int(), out]
        event = self._launch(buf, lambda: buf.impl.combine(*args, buf.next_epoch("combine"), buf.timeout_ns), args)

        def finish():
            torch.cuda.current_stream(dev).wait_event(event)
            if event.query():
                buf.check()
            return out

        return Pending(finish)

    @staticmethod
    def _launch(buf: SymmetricBuffer, launch, tensors) -> torch.cuda.Event:
        """Run ``launch`` on the communication stream after the current stream's work; returns its event."""
        current = torch.cuda.current_stream(buf.device)
        buf.stream.wait_stream(current)
        with torch.cuda.stream(buf.stream):
            launch()
            event = torch.cuda.Event()
            event.record(buf.stream)
        for t in tensors:  # made on the current stream, used on the communication stream
            t.record_stream(buf.stream)
        return event

    def check(self, synchronize: bool = False) -> None:
        if self.buf is not None:
            self.buf.check(synchronize)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()
            self.buf = None
