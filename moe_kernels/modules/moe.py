"""MoELayer: route -> permute -> grouped expert MLPs -> weighted un-permute (+ shared experts)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._checks import check_int
from ..ops.permute import unpermute_add
from ._graphs import DecodeGraphs
from .converters import get_converter
from .experts import PRECISIONS, GroupedExperts
from .router import TopKRouter


class MoELayer(nn.Module):
    """A drop-in Mixture-of-Experts block for tokens of ``hidden_size`` (tuned for 7168; FP8 needs hidden and
    intermediate sizes that are multiples of 128, bf16 / fp32 take any).

    Arguments follow DeepSeek-V3's configuration names; see ``TopKRouter`` for the routing ones and
    ``GroupedExperts`` for ``precision``. ``n_shared_experts`` adds a dense SwiGLU MLP of
    ``n_shared_experts * intermediate_size`` applied to every token. ``ep_group`` shards the experts over a
    torch.distributed group (see ``moe_kernels.dist``); ``placement`` (a ``moe_kernels.dist.Placement``,
    e.g. from ``place_experts``, replicas included) says which rank holds which expert (None: contiguous blocks).
    ``tp_group`` splits every expert's intermediate dimension over a group whose ranks hold the same tokens
    (``moe_kernels.dist.tp``; with ``ep_group``, an EP x TP grid: the EP group of the ranks with the same slice).

    ``trainable=True`` with ``precision="fp8"``: the experts keep bf16 master weights that train, with FP8 forward,
    dgrad and wgrad GEMMs (see ``GroupedExperts``); otherwise FP8 expert weights are frozen e4m3 buffers.

    ``forward(x [..., H]) -> [..., H]`` in x's dtype. Dropless: every (token, k) pair is computed exactly once.

    ``cuda_graphs`` (default True; ``MOE_KERNELS_CUDA_GRAPHS=0`` turns it off everywhere): inference calls of up to
    256 tokens on CUDA (no autograd, value checks off: ``MOE_KERNELS_VALUE_CHECKS=0``) replay a CUDA graph of the
    step, one per token count, made at its second call (see ``modules._graphs``). An eager decode step spends
    most of its time launching kernels from Python; a replay launches them in one call. Not with ``ep_group`` /
    ``tp_group`` or trainable FP8 experts (their steps run host logic a graph would freeze).
    """

    def __init__(
        self,
        hidden_size: int = 7168,
        intermediate_size: int = 2048,
        num_experts: int = 256,
        top_k: int = 2,
        scoring: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        n_shared_experts: int = 0,
        precision: str = "fp8",
        balance: str | None = None,
        ep_group=None,
        tp_group=None,
        placement=None,
        device=None,
        dtype: torch.dtype | None = None,
        trainable: bool = False,
        cuda_graphs: bool = True,
    ):
        super().__init__()
        check_int("n_shared_experts", n_shared_experts, lo=0)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.hidden_size, self.intermediate_size, self.num_experts = hidden_size, intermediate_size, num_experts
        self.top_k, self.precision, self.n_shared_experts = top_k, precision, n_shared_experts
        self.gate = TopKRouter(
            hidden_size, num_experts, top_k, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
            balance=balance, dtype=dtype, device=device,
        )
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size, precision, device=device,
                                      trainable=trainable)
        self.shared_experts = (
            GroupedExperts(1, hidden_size, intermediate_size * n_shared_experts, precision, device=device,
                           trainable=trainable)
            if n_shared_experts
            else None
        )
        self.ep_group = ep_group
        self.tp_group, self._tp = tp_group, None
        if tp_group is not None:  # expert tensor parallelism: this rank's slice of every expert's intermediate dim
            from ..dist.tp import ExpertTensorParallel  # noqa: PLC0415

            self._tp = ExpertTensorParallel(tp_group, intermediate_size, precision)
            self.experts = self._tp.slice_experts(self.experts)
        self._side_streams = {}  # device -> the CUDA stream the shared experts run on (inference)
        self._observe_streams = {}  # device -> the stream of the load monitor's update while capturing
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs = DecodeGraphs()
        self._ep = None
        if placement is not None and ep_group is None:
            raise ValueError("placement needs ep_group: it places experts over an expert-parallel group")
        if ep_group is not None:
            from ..dist.ep import ExpertParallel  # noqa: PLC0415 (dist imports the modules)

            self._ep = ExpertParallel(ep_group, num_experts, placement=placement, hidden_size=hidden_size)
            self.experts = self._ep.shard_experts(self.experts)  # this rank's experts only (None: it holds none)

    def extra_repr(self) -> str:
        return f"precision={self.precision!r}, n_shared_experts={self.n_shared_experts}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have last dimension hidden_size={self.hidden_size}, got shape {list(x.shape)}")
        if not x.is_floating_point() or x.dtype.itemsize == 1:
            raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
        if x.device != self.gate.weight.device:
            raise TypeError(f"x is on {x.device} but the layer's weights are on {self.gate.weight.device}")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        if self._graphable() and self._graphs.applies(x2):
            return self._graphs(self._forward, self, x2).reshape(shape)
        return self._forward(x2).reshape(shape)

    def _graphable(self) -> bool:
        """The module's side of ``DecodeGraphs.applies``: nothing in its step reads host state a replay would
        freeze (collectives of EP / TP, the e4m3 copies a trainable FP8 layer remakes, training-mode sampling)."""
        return (self.cuda_graphs and self._ep is None and self._tp is None and not self.experts.fp8_master
                and not (self.training and self.gate.scoring == "sparsemixer"))

    def _forward(self, x2: torch.Tensor) -> torch.Tensor:
        """The step on x2 [T, H]: [T, H] in x2's dtype."""
        shared = self._start_shared(x2)  # on a second CUDA stream where it can overlap the routed experts
        weights, ids, counts = self.gate(x2, observe=False)
        observing = self._observe_beside(counts)  # the load monitor's update, off the step's critical path
        xr = x2  # the routed path's tokens
        if self._tp is not None:  # expert TP: the routed path's inputs, their gradients summed over tp_group
            xr, weights = self._tp.region_input(x2, weights)
        if self._ep is not None:
            out = self._ep.forward(xr, weights, ids, self.experts)
        else:
            # rows that need a gradient stay bf16 through permute: the FP8 experts then quantise them inside a
            # differentiable op (straight-through); otherwise permute quantises them in its single pass
            grad = torch.is_grad_enabled() and (x2.requires_grad or self.experts.fp8_master)
            p = ops.permute(xr, ids, self.num_experts, fp8=self.precision == "fp8" and not grad)
            y = self.experts(p.x, p.offsets, p.scale)
            if isinstance(shared, tuple) and self._tp is None:  # inference: the shared output added in the gather
                torch.cuda.current_stream(x2.device).wait_stream(shared[1])
                return self._joined(unpermute_add(y, p, weights, shared[0], out_dtype=x2.dtype), observing, counts)
            out = ops.unpermute(y, p, weights)
        if self._tp is not None:  # the slices' partial outputs added (fp32)
            out = self._tp.reduce_output(out)
        if shared is not None:
            if isinstance(shared, tuple):  # joined: the main stream waits for the side stream's work
                torch.cuda.current_stream(x2.device).wait_stream(shared[1])
                shared = shared[0]
            # one add when the dtypes agree (computed in fp32 and rounded once, as the fp32 sum below)
            out = out + shared if out.dtype == shared.dtype else out.float() + shared.float()
        return self._joined(out.to(x2.dtype), observing, counts)

    def _observe_beside(self, counts: torch.Tensor):
        """Fold ``counts`` into the router's load monitor. While a CUDA graph is being captured (the layer's own
        or the caller's), on a stream of its own: in the graph the update becomes a branch beside permute, the
        expert GEMMs and unpermute instead of one more serial kernel (~1.3 us and a launch gap at decode sizes).
        Returns that stream (joined by ``_joined``), or None when the update ran here (eagerly, where an extra
        stream's events would cost more host time than the kernel does)."""
        if not (counts.is_cuda and torch.cuda.is_current_stream_capturing()) or torch.is_grad_enabled():
            self.gate.observe_counts(counts)
            return None
        # setdefault: a layer unpickled from before the dict existed
        side = _forked(self.__dict__.setdefault("_observe_streams", {}), counts.device)
        with torch.cuda.stream(side):
            self.gate.observe_counts(counts)
        return side

    @staticmethod
    def _joined(out: torch.Tensor, observing, counts: torch.Tensor) -> torch.Tensor:
        """``out`` once the current stream waits for the load monitor's stream (a capture must rejoin every stream
        it forked); ``counts`` is alive until here, so its memory is not handed out while that stream reads it."""
        if observing is not None:
            torch.cuda.current_stream(counts.device).wait_stream(observing)
        return out

    def _apply(self, fn, *args, **kwargs):
        if "_graphs" in self.__dict__:  # moved or cast: the graphs read the old tensors (their memory goes too)
            self._graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copies and pickles start without CUDA streams or graphs (made again on use)
        return dict(super().__getstate__(), _side_streams={}, _observe_streams={}, _graphs=DecodeGraphs())

    def _start_shared(self, x2: torch.Tensor):
        """The shared experts' output, or on CUDA without autograd (inference, CUDA-graph capture) a pair (output,
        side stream) still running: the routed experts launched meanwhile share the GPU with it, which at decode
        sizes fills SMs the routed GEMMs leave idle. Memory: x2 (the caller's, alive for the whole call) is read on
        the side stream only between the fork (side waits for main) and the join (main waits for side); the output
        belongs to the side stream, which allocates again only after a later fork, ordered after main's reads."""
        if self.shared_experts is None:
            return None
        if not x2.is_cuda or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.shared_experts(x2, _one_expert_offsets(x2))
        side = _forked(self._side_streams, x2.device)
        with torch.cuda.stream(side):
            # every temporary of the shared experts (their offsets [0, T] too) is allocated on the side stream: a
            # block freed there is handed out again only in side-stream order, never to the main stream's next
            # allocation while the side stream may still read it
            y = self.shared_experts(x2, _one_expert_offsets(x2))
        return y, side

    @classmethod
    def from_hf(cls, module: nn.Module, precision: str | None = None) -> "MoELayer":
        """Build from a HuggingFace MoE block (the families ``moe_kernels.integrations.hf`` lists). The converter
        is looked up in ``modules.converters``, which the integration fills: this module imports no integration."""
        return get_converter(cls, "hf")(module, precision=precision)


def _forked(streams: dict, device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` in ``streams`` (made on first use), forked from the current stream: it waits
    for the work queued there so far."""
    side = streams.get(device)
    if side is None:
        side = streams[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    return side


def _one_expert_offsets(x2: torch.Tensor) -> torch.Tensor:
    """[0, T]: every row to the one shared expert, in one kernel (arange with step T; T = 0 has no step)."""
    T = x2.shape[0]
    if T == 0:
        return torch.zeros(2, dtype=torch.int32, device=x2.device)
    return torch.arange(0, 2 * T, T, dtype=torch.int32, device=x2.device)
