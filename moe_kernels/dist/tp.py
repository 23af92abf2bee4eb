"""Expert tensor parallelism: every expert's intermediate dimension split over the ranks of a group.

With a TP group of P ranks, rank p holds, of every expert, the rows p*I/P:(p+1)*I/P of W1 and of W3 (the two halves
of ``w13``) and the same columns of W2. The SwiGLU is elementwise over the intermediate dimension, so rank p
computes exactly its slice of h = silu(x W1^T) * (x W3^T) and the partial output h_p W2_p^T; the sum of the P
partial outputs is the expert's output. The ranks of a TP group hold the same tokens (their activations are
replicated, as in Megatron-style tensor parallelism); routing and the weighted sum of the k experts (linear) run
on every rank, and one all-reduce (fp32) of the layer's routed output [T, H] adds the slices.

Gradients: the routed path's inputs (tokens and routing weights) enter through ``region_input`` (identity forward,
all-reduce of the gradient backward: each rank's gradient is the part of its slice); the output leaves through
``reduce_output`` (all-reduce forward, identity backward). Each rank's expert gradients are those of its slice.

With an EP group as well (an EP x TP grid), each EP group is made of the ranks holding the same slice: dispatch and
combine run within it, and the TP all-reduce adds the slices afterwards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._checks import check_int

__all__ = ["ExpertTensorParallel", "load_full_experts", "derived_experts", "all_reduce_sum"]


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """The sum over ``group`` of ``t`` (a new tensor on t's device). CUDA tensors on a group whose backend is not
    nccl (gloo) go through host memory."""
    backend = str(dist.get_backend(group)).lower()
    stage = t.is_cuda and not ("nccl" in backend and "gloo" not in backend)
    buf = t.detach().cpu() if stage else t.detach().clone()
    dist.all_reduce(buf, group=group)
    return buf.to(t.device) if stage else buf


def derived_experts(experts, num_experts: int, tensors: dict):
    """A ``GroupedExperts`` like ``experts`` (precision, flags and sizes copied) holding ``tensors`` (name ->
    tensor or None for w13, w2, w13_scale, w2_scale): parameters of the source stay parameters (same
    requires_grad), buffers stay buffers. Its intermediate size is read from the new w2 [E, H, I]."""
    from ..modules.experts import GroupedExperts  # noqa: PLC0415 (modules import dist lazily)

    local = GroupedExperts.__new__(GroupedExperts)
    torch.nn.Module.__init__(local)
    # the module's own attributes, whatever they are; dict-valued ones are caches of the source's weights (e.g.
    # FP8 copies): the new module starts with empty ones
    bookkeeping = set(vars(local))
    for key, value in vars(experts).items():
        if key not in bookkeeping:
            local.__dict__[key] = type(value)() if isinstance(value, dict) else value
    local.num_experts = num_experts
    local.intermediate_size = tensors["w2"].shape[-1]
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        src, t = getattr(experts, name), tensors.get(name)
        if t is None:
            setattr(local, name, None)
        elif isinstance(src, torch.nn.Parameter):
            setattr(local, name, torch.nn.Parameter(t.detach().contiguous(), src.requires_grad))
        else:
            local.register_buffer(name, t.contiguous())
    return local


class _RegionInput(torch.autograd.Function):
    """(x, weights) unchanged; backward: their gradients summed over the TP group."""

    @staticmethod
    def forward(ctx, group, x, weights):
        ctx.group = group
        return x.view_as(x), weights.view_as(weights)

    @staticmethod
    def backward(ctx, gx, gw):
        return None, all_reduce_sum(gx.float(), ctx.group).to(gx.dtype), all_reduce_sum(gw, ctx.group)


class _ReduceOutput(torch.autograd.Function):
    """The sum over the TP group (fp32); backward: the gradient unchanged (every rank holds all of it)."""

    @staticmethod
    def forward(ctx, group, y):
        return all_reduce_sum(y.float(), group)

    @staticmethod
    def backward(ctx, g):
        return None, g


class ExpertTensorParallel:
    """Every expert's intermediate dimension split over the ranks of ``group`` (see the module docstring).

    Args:
        group: a torch.distributed process group (any backend; gloo moves CUDA tensors through host memory).
            Its ranks must hold the same tokens.
        intermediate_size: I, the experts' intermediate size: a multiple of the group's size P, and with FP8
            experts I / P a multiple of 128 (the 128x128 weight-scale blocks are not split).
        precision: the experts' precision ("fp8", "bf16", "fp32").
    """

    def __init__(self, group, intermediate_size: int, precision: str):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("tp_group needs torch.distributed: call torch.distributed.init_process_group")
        check_int("intermediate_size", intermediate_size, lo=1)
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("tp_group: this process is not a member of the tensor-parallel group")
        if intermediate_size % self.size:
            raise ValueError(f"tp_group of {self.size} ranks: intermediate_size {intermediate_size} must be a "
                             f"multiple of the group's size")
        self.slice = intermediate_size // self.size
        if precision == "fp8" and self.slice % 128:
            raise ValueError(f"tp_group of {self.size} ranks with FP8 experts: each rank's slice of the "
                             f"intermediate size ({intermediate_size} / {self.size} = {self.slice}) must be a "
                             f"multiple of 128 (one weight scale per 128x128 block)")
        self.intermediate_size = intermediate_size

    def slice_experts(self, experts):
        """This rank's slice of a ``GroupedExperts`` holding the full intermediate dimension (copied)."""
        from ..modules.experts import GroupedExperts  # noqa: PLC0415

        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"experts must be a GroupedExperts, got {type(experts).__name__}")
        if experts.intermediate_size != self.intermediate_size:
            raise ValueError(f"experts have intermediate size {experts.intermediate_size}, expected "
                             f"{self.intermediate_size} (the full one: this rank takes its slice)")
        I, n, p = self.intermediate_size, self.slice, self.rank
        rows = torch.cat([torch.arange(p * n, (p + 1) * n), I + torch.arange(p * n, (p + 1) * n)])
        w13 = experts.w13.detach().index_select(1, rows.to(experts.w13.device))
        w2 = experts.w2.detach()[:, :, p * n:(p + 1) * n]
        tensors = {"w13": w13, "w2": w2, "w13_scale": None, "w2_scale": None}
        if experts.w13_scale is not None:  # 128x128 blocks: the slice is whole blocks of rows (w13) / columns (w2)
            nb, Ib = n // 128, I // 128
            blocks = torch.cat([torch.arange(p * nb, (p + 1) * nb), Ib + torch.arange(p * nb, (p + 1) * nb)])
            tensors["w13_scale"] = experts.w13_scale.index_select(1, blocks.to(experts.w13_scale.device))
            tensors["w2_scale"] = experts.w2_scale[:, :, p * nb:(p + 1) * nb]
        return derived_experts(experts, experts.num_experts, tensors)

    def region_input(self, x: torch.Tensor, weights: torch.Tensor):
        """(x, routing weights) as the routed path's inputs: identity, gradients summed over the group."""
        return _RegionInput.apply(self.group, x, weights)

    def reduce_output(self, y: torch.Tensor) -> torch.Tensor:
        """The routed output's sum over the group, fp32 [T, H] (every rank gets it)."""
        return _ReduceOutput.apply(self.group, y)

    def __repr__(self) -> str:
        return f"ExpertTensorParallel(rank={self.rank}/{self.size}, slice={self.slice} of {self.intermediate_size})"


def load_full_experts(layer, experts) -> None:
    """Give an ``MoELayer`` built with ``tp_group`` and/or ``ep_group`` this rank's part of ``experts`` (a
    ``GroupedExperts`` of all E experts at the full intermediate size, e.g. a single-process layer's): its TP
    slice, then its EP shard. Every rank of both groups calls it (the same ``experts`` everywhere)."""
    if layer._tp is not None:
        experts = layer._tp.slice_experts(experts)
    layer.experts = layer._ep.shard_experts(experts) if layer._ep is not None else experts
