"""GroupedExperts: the SwiGLU MLPs of all experts, over rows already grouped by expert."""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import ops
from ..ops.grouped_gemm import quantize_master_fp8
from .._checks import FP8_DTYPE, check_choice, check_int, check_tensor
from ._keep_dtype import apply_keeping_dtype

PRECISIONS = ("fp8", "bf16", "fp32")


def weight_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs: y = (silu(x W1^T) * (x W3^T)) W2^T per expert.

    Weights: ``w13`` [E, 2I, H] (W1 rows, then W3 rows) and ``w2`` [E, H, I]. With ``precision="fp8"`` they are
    e4m3 buffers with one fp32 scale per 128x128 block (``w13_scale`` [E, 2I/128, H/128], ``w2_scale``
    [E, H/128, I/128]: DeepSeek-V3's ``weight_scale_inv``), activations are quantised per 1x128 group, and the
    SwiGLU output is re-quantised inside the fused kernel. ``"bf16"`` / ``"fp32"`` keep unquantised weights.

    ``forward(x, offsets, x_scale=None) -> y [M, H]`` where rows offsets[e]:offsets[e+1] of x belong to expert e;
    y is bf16 with FP8 weights, else in the weights' dtype (x is cast to it).

    Gradients (bf16 / fp32 weights, which are parameters): forward and backward run the grouped GEMM kernels
    (``ops.expert_mlp_train`` when a gradient is wanted: h13 kept from the forward, dA and dX on the weights as
    stored, SwiGLU's derivative in one pass, the weight gradients through ``ops.grouped_wgrad``); on CPU tensors
    without the interpreter the reference. FP8 weights (``trainable=False``) are buffers (no gradient); bf16/fp32
    rows that require a gradient get the straight-through one (``ops.expert_mlp_fp8_ste``: the quantisations
    taken as identities, dA and dX as FP8 GEMMs on the transposed e4m3 weights). e4m3 rows have none.

    ``trainable=True`` with ``precision="fp8"`` trains the expert weights the DeepSeek-V3 way: ``w13`` / ``w2`` are
    master weights, parameters in ``master_dtype`` (bf16 or fp32); each forward in training reads their e4m3 copies
    (128x128 scales), quantised once per optimiser step (cached until a parameter's version counter moves, i.e.
    until it is updated in place), and the forward and dgrad GEMMs run in FP8 (``ops.expert_mlp_fp8_train``). The
    weight gradients (``fp8_wgrad``): from the bf16 operands by default (the Gluon wgmma kernel on Hopper: the whole
    step 1.61x the torch composition on an H100 at 8192 tokens, against 1.54x with FP8 weight gradients through the
    Gluon K-grouped kernel, 2026-12-07), or in FP8 as DeepSeek-V3 does with ``experts.fp8_wgrad = True`` /
    ``MOE_KERNELS_FP8_WGRAD=1``.
    The name says what it changes: the FP8 compute is the same either way; what the flag adds is weights that
    train (and the memory of a master copy). ``w13_scale`` / ``w2_scale`` are then None; ``fp8_weights()`` gives the
    current e4m3 copies. With ``trainable=False`` (the default) FP8 weights are frozen e4m3 buffers, as loaded.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        precision: str = "fp8",
        device=None,
        trainable: bool = False,
        master_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        check_int("num_experts", num_experts, lo=1)
        check_int("hidden_size", hidden_size, lo=1)
        check_int("intermediate_size", intermediate_size, lo=1)
        check_choice("precision", precision, PRECISIONS)
        if precision == "fp8":  # bf16 / fp32 experts take any sizes
            for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
                if size % 128:
                    raise ValueError(f"precision='fp8' needs {name} to be a multiple of 128 (one scale per "
                                     f"128x128 weight block and 1x128 activation group), got {size}; "
                                     f"precision='bf16' or 'fp32' takes any size")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.precision = precision
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable must be a bool, got {type(trainable).__name__}")
        if master_dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"master_dtype must be torch.bfloat16 or torch.float32, got {master_dtype}")
        # bf16 / fp32 weights are parameters anyway; the flag changes the FP8 path only
        self.trainable = trainable or precision != "fp8"
        self._fp8_cache: dict[str, tuple] = {}  # name (+ "_t": transposed) -> ((version, data_ptr), e4m3, scales)
        # trainable FP8: keep transposed e4m3 copies too (K-major tiles for the backward's dA / dX GEMMs; as much
        # memory again as the e4m3 copies); False: the backward reads transposed views (slower kernels)
        self.fp8_transposed_copies = True
        # trainable FP8: the backward's weight gradients from e4m3 operands (DeepSeek-V3's recipe; True) or from the
        # bf16 ones it holds (False, the default: faster today, see the docstring; fp32 accumulation either way).
        # MOE_KERNELS_FP8_WGRAD=1 sets True at construction (bench/bench_training.py --precisions fp8,fp8_bf16wgrad
        # times both)
        self.fp8_wgrad = os.environ.get("MOE_KERNELS_FP8_WGRAD", "0") == "1"
        E, H, I = num_experts, hidden_size, intermediate_size
        if precision == "fp8" and trainable:
            self.w13 = nn.Parameter(torch.randn(E, 2 * I, H, dtype=master_dtype, device=device) * H**-0.5)
            self.w2 = nn.Parameter(torch.randn(E, H, I, dtype=master_dtype, device=device) * I**-0.5)
            self.w13_scale = self.w2_scale = None
        elif precision == "fp8":
            self.register_buffer("w13", torch.empty(E, 2 * I, H, dtype=FP8_DTYPE, device=device))
            self.register_buffer("w2", torch.empty(E, H, I, dtype=FP8_DTYPE, device=device))
            self.register_buffer("w13_scale", torch.empty(E, 2 * I // 128, H // 128, device=device))
            self.register_buffer("w2_scale", torch.empty(E, H // 128, I // 128, device=device))
            self._random_fp8_init()
        else:
            dt = weight_dtype(precision)
            self.w13 = nn.Parameter(torch.randn(E, 2 * I, H, dtype=dt, device=device) * H**-0.5)
            self.w2 = nn.Parameter(torch.randn(E, H, I, dtype=dt, device=device) * I**-0.5)
            self.w13_scale = self.w2_scale = None

    def _apply(self, fn, recurse=True):
        """Module casts (``.to(dtype)``, ``.half()``, ``.float()``, ``.bfloat16()``) leave FP8 weights e4m3 and
        their scales fp32; device moves apply to them as to everything else. Parameters (bf16 / fp32 weights) cast."""
        e4m3 = ("w13", "w2", "w13_scale", "w2_scale") if getattr(self, "w13", None) is not None and \
            self.w13.dtype == FP8_DTYPE else ()
        return apply_keeping_dtype(self, fn, recurse, e4m3, super()._apply)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, precision={self.precision!r}"
            + (", trainable=True" if self.precision == "fp8" and self.trainable else "")
        )

    @property
    def fp8_master(self) -> bool:
        """FP8 compute on trainable master weights."""
        return self.precision == "fp8" and self.trainable

    @torch.no_grad()
    def fp8_weights(self, force: bool = False) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                        tuple[torch.Tensor, torch.Tensor]]:
        """((w13 e4m3, w13 scales), (w2 e4m3, w2 scales)) of the master weights: made again (in place, one pass
        over each master by ``quantize_master_fp8``, the transposed copies of ``fp8_weights_t`` with them) when a
        master has changed since the last call (its version counter moves with every in-place update: optimiser
        steps, ``load_weights``, ``copy_``) or ``force``; else the cached copies."""
        out = []
        for name in ("w13", "w2"):
            w = getattr(self, name)
            key = (w._version, w.data_ptr(), w.device)
            hit = self._fp8_cache.get(name)
            if hit is None or hit[0][:3] != key or force:
                E, N, K = w.shape
                q, s = self._fp8_buffers(name, (E, N, K))
                qt = st = None
                if self.fp8_transposed_copies:
                    qt, st = self._fp8_buffers(name + "_t", (E, K, N))
                quantize_master_fp8(w.detach(), q, s, qt, st)
                self._fp8_serial = getattr(self, "_fp8_serial", 0) + 1  # tells stale transposes apart
                hit = self._fp8_cache[name] = (key + (self._fp8_serial,), q, s)
                if qt is not None:
                    self._fp8_cache[name + "_t"] = (hit[0], qt, st)
            out.append((hit[1], hit[2]))
        return out[0], out[1]

    def _fp8_buffers(self, name: str, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (e4m3, scales) buffers of ``name`` when they fit ``shape`` [E, N, K], else new ones."""
        hit = self._fp8_cache.get(name)
        dev = self.w13.device
        if hit is not None and tuple(hit[1].shape) == shape and hit[1].device == dev:
            return hit[1], hit[2]
        E, N, K = shape
        return (torch.empty(shape, dtype=FP8_DTYPE, device=dev),
                torch.empty(E, -(-N // 128), -(-K // 128), dtype=torch.float32, device=dev))

    @torch.no_grad()
    def fp8_weights_t(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The contiguous transposes of ``fp8_weights()``: ((e4m3 [E, H, 2I], scales [E, H/128, 2I/128]),
        (e4m3 [E, I, H], scales [E, I/128, H/128])): each 128x128 block transposed with its scale, i.e. the same
        quantisation of W^T. Made again when the masters change, like the copies they transpose."""
        pairs = self.fp8_weights()
        out = []
        for name, (q, s) in zip(("w13", "w2"), pairs):
            key = self._fp8_cache[name][0]
            hit = self._fp8_cache.get(name + "_t")
            if hit is None or hit[0] != key:
                if hit is not None and hit[1].shape == q.transpose(1, 2).shape:
                    hit[1].copy_(q.transpose(1, 2))
                    hit[2].copy_(s.transpose(1, 2))
                    hit = (key, hit[1], hit[2])
                else:
                    hit = (key, q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous())
                self._fp8_cache[name + "_t"] = hit
            out.append((hit[1], hit[2]))
        return out[0], out[1]

    @torch.no_grad()
    def _random_fp8_init(self, chunk: int = 8) -> None:
        """Random weights quantised a few experts at a time (256 full-size experts are 11 GB in fp32)."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        dev = self.w13.device
        for lo in range(0, E, chunk):
            hi = min(E, lo + chunk)
            q, s = ops.quantize_weight_fp8(torch.randn(hi - lo, 2 * I, H, device=dev) * H**-0.5)
            self.w13[lo:hi], self.w13_scale[lo:hi] = q, s
            q, s = ops.quantize_weight_fp8(torch.randn(hi - lo, H, I, device=dev) * I**-0.5)
            self.w2[lo:hi], self.w2_scale[lo:hi] = q, s

    @torch.no_grad()
    def load_weights(self, w13, w2, w13_scale=None, w2_scale=None) -> None:
        """Copy full-precision weights (quantised here when precision is fp8), or FP8 weights with their scales."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        check_tensor("w13", w13, shape=(E, 2 * I, H))
        check_tensor("w2", w2, shape=(E, H, I))
        if self.fp8_master and w13_scale is not None:  # an FP8 checkpoint: its dequantised values are the masters
            from ..reference import dequantize_weight_fp8  # noqa: PLC0415

            check_tensor("w13_scale", w13_scale, dtype=torch.float32)
            check_tensor("w2_scale", w2_scale, dtype=torch.float32)
            dev = self.w13.device
            for lo in range(0, E, 8):
                self.w13[lo : lo + 8].copy_(dequantize_weight_fp8(w13[lo : lo + 8].to(dev), w13_scale[lo : lo + 8].to(dev)))
                self.w2[lo : lo + 8].copy_(dequantize_weight_fp8(w2[lo : lo + 8].to(dev), w2_scale[lo : lo + 8].to(dev)))
            return
        if self.precision != "fp8" or self.fp8_master:
            if w13_scale is not None or w2_scale is not None:
                raise ValueError(f"FP8 checkpoint weights need precision='fp8', got precision={self.precision!r}")
            for name, t in (("w13", w13), ("w2", w2)):  # e4m3 values without their scales: silently wrong
                if t.dtype == FP8_DTYPE:
                    raise TypeError(f"{name} is float8_e4m3fn but this layer has precision={self.precision!r}: "
                                    f"FP8 checkpoint weights need precision='fp8' and their scales")
            self.w13.copy_(w13)
            self.w2.copy_(w2)
            return
        if (w13.dtype == FP8_DTYPE) != (w13_scale is not None) or (w2.dtype == FP8_DTYPE) != (w2_scale is not None):
            raise ValueError("FP8 weights need their scales (weight_scale_inv) and full-precision weights none")
        if w13_scale is None:
            dev = self.w13.device
            for lo in range(0, E, 8):  # a few experts at a time: bounded fp32 temporaries
                q, s = ops.quantize_weight_fp8(w13[lo : lo + 8].to(dev))
                self.w13[lo : lo + 8], self.w13_scale[lo : lo + 8] = q, s
                q, s = ops.quantize_weight_fp8(w2[lo : lo + 8].to(dev))
                self.w2[lo : lo + 8], self.w2_scale[lo : lo + 8] = q, s
            return
        check_tensor("w13_scale", w13_scale, shape=tuple(self.w13_scale.shape))
        check_tensor("w2_scale", w2_scale, shape=tuple(self.w2_scale.shape))
        self.w13.copy_(w13)
        self.w2.copy_(w2)
        self.w13_scale.copy_(w13_scale)
        self.w2_scale.copy_(w2_scale)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, ndim=2, shape=(None, self.hidden_size), device=self.w13.device)
        check_tensor("offsets", offsets, dtype=torch.int32, shape=(self.num_experts + 1,), device=x.device)
        if self.fp8_master:
            w13_fp8, w2_fp8 = self.fp8_weights()
            if torch.is_grad_enabled() and x.dtype != FP8_DTYPE:
                t13, t2 = self.fp8_weights_t() if self.fp8_transposed_copies else (None, None)
                return ops.expert_mlp_fp8_train(x, offsets, self.w13, self.w2, w13_fp8, w2_fp8, t13, t2,
                                                fp8_wgrad=self.fp8_wgrad)
            if x.dtype != FP8_DTYPE:
                x, x_scale = ops.quantize_fp8(x)
            return ops.expert_mlp(x, x_scale, offsets, w13_fp8[0], w13_fp8[1], w2_fp8[0], w2_fp8[1])
        if self.precision == "fp8" and x.dtype != FP8_DTYPE:
            if torch.is_grad_enabled() and x.requires_grad:  # straight-through gradient for the rows
                return ops.expert_mlp_fp8_ste(x, offsets, self.w13, self.w13_scale, self.w2, self.w2_scale)
            x, x_scale = ops.quantize_fp8(x)
        elif self.precision != "fp8":
            if x.dtype != self.w13.dtype:
                x = x.to(self.w13.dtype)  # bf16 / fp32 experts compute in their weights' dtype
            if torch.is_grad_enabled() and (x.requires_grad or self.w13.requires_grad or self.w2.requires_grad):
                return ops.expert_mlp_train(x, offsets, self.w13, self.w2)  # h13 kept for the backward
        return ops.expert_mlp(x, x_scale, offsets, self.w13, self.w13_scale, self.w2, self.w2_scale)
