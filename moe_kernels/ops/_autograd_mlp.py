"""Autograd of the grouped GEMM and expert-MLP custom ops: their setup_context / backward functions and the
``register_autograd`` calls, apart from the kernel launchers in ``grouped_gemm``. Imported by ``moe_kernels.ops``
(so registration happens whenever the ops are importable).

The backward compositions (``_expert_mlp_backward_kernels``, ``_expert_mlp_fp8_backward``) call the launchers
through the ``grouped_gemm`` module (``gg._gemm``, ``gg.grouped_wgrad``), not through names bound here, so that
a test that patches one of them sees every call.

Where a backward launches kernels, it does so through a custom op of its own (``moe_kernels::expert_mlp_backward``,
``expert_mlp_fp8_backward``, ``grouped_gemm_bf16_backward``) with a fake implementation: AOTAutograd
(``torch.compile`` of a training step) traces the backward on fake tensors, which a raw kernel launch cannot take.
A gradient that is not wanted comes out of these ops as an empty tensor (an op returns tensors, not None) and is
turned into None here.
"""
from __future__ import annotations

import torch

from .. import reference
from . import grouped_gemm as gg
from ._common import use_triton


def _swiglu_backward_(h13, da, in_place=True):
    """(A, dH): da [M, I] (the product's gradient) is overwritten with A = silu(gate) * up, and dH [M, 2I] (the
    gradient of silu(gate) * up for h13 = [gate | up]) overwrites h13 (``in_place``) or comes new. One pass, no
    fp32 temporaries (the kernel computes in fp32 registers). Both contiguous, of one float dtype. Off the kernel
    path: the same in torch ops (fp32)."""
    dh = h13 if in_place else torch.empty_like(h13)
    if not use_triton(h13):
        gate, up = h13.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        d = da.float()
        dh.copy_(torch.cat([d * up * sig * (1.0 + gate * (1.0 - sig)), d * gate * sig], dim=1))
        da.copy_(gate * sig * up)
        return da, dh
    gg._swiglu_launch(h13, da, dh)
    return da, dh


def _expert_mlp_backward_kernels(x, offsets, w13, w2, topk_weight, grad_out, need, h13=None):
    """(dx, dw13, dw2, dtopk_weight) of ``expert_mlp`` on bf16/fp16/fp32 operands with the package's kernels:
    h13 again (grouped GEMM), dA = dY W2 through W2's transposed view (no copy), SwiGLU's derivative and the
    down projection's input A in one in-place pass over h13 and dA, dX = dH W13, the weight gradients through
    ``grouped_wgrad``. Every activation-sized temporary is in x's dtype: h13 [M, 2I] and dA [M, I] at the peak.
    ``h13``: the forward's (saved, left as it is; dH then comes in a buffer of its own), else computed again."""
    E = w13.shape[0]
    dt = x.dtype
    saved = h13 is not None
    if not saved:
        h13 = gg._gemm(x, offsets, w13, out_dtype=dt)
    dtw = None
    if topk_weight is not None:
        if need[3]:  # d(out)/d(tw) = the unweighted MLP output: A W2^T again
            a = reference.swiglu(h13).to(dt)
            dtw = (grad_out.float() * gg._gemm(a, offsets, w2)).sum(-1).to(topk_weight.dtype)
            del a
        gy = (grad_out.float() * topk_weight.float()[:, None]).to(dt)
    else:
        gy = grad_out.to(dt).contiguous()
    dx = dw13 = dw2 = None
    if not (need[0] or need[1]):
        if need[2]:
            dw2 = gg.grouped_wgrad(gy, reference.swiglu(h13).to(dt), offsets, E, out_dtype=w2.dtype)
        return dx, dw13, dw2, dtw
    a, dh = _swiglu_backward_(h13, gg._gemm(gy, offsets, w2.transpose(1, 2), out_dtype=dt),  # dA = dY @ W2[e]
                              in_place=not saved)
    del h13
    if need[2]:
        dw2 = gg.grouped_wgrad(gy, a, offsets, E, out_dtype=w2.dtype)
    del a
    if need[0]:
        dx = gg._gemm(dh, offsets, w13.transpose(1, 2), out_dtype=dt)  # dX = dH @ W13[e]
    if need[1]:
        dw13 = gg.grouped_wgrad(dh, x, offsets, E, out_dtype=w13.dtype)
    return dx, dw13, dw2, dtw


def _expert_mlp_fp8_backward(x, offsets, w13, w13_scale, w2, w2_scale, grad_out, need, w_dtype=None, w13_t=None,
                             w2_t=None, h13=None, fp8_wgrad=True):
    """(dx, dw13, dw2) of the FP8 expert MLP (DeepSeek-V3's recipe: every GEMM in FP8), its quantisations taken
    as identities (straight-through). h13 again from the quantised x (bf16, [M, 2I]); dA = dY W2 and dX = dH W13
    as FP8 GEMMs on transposed views of the e4m3 weights (their 128x128 blocks transpose with their scales), dY and
    dH quantised 1x128 along their reduction axis as the forward's activations are; SwiGLU's derivative and A in
    one in-place pass; dW2 = dY^T A and dW13 = dH^T X by ``gg.grouped_wgrad(fp8=True)``, which quantises the
    transposed operands along the rows. ``need``: (dx, dw13, dw2) wanted; the weight gradients come in
    ``w_dtype`` (the master weights'). ``w13_t`` / ``w2_t``: optional contiguous transposed copies (e4m3
    [E, H, 2I] with scales [E, H/128, 2I/128]; [E, I, H] with [E, I/128, H/128]), made once per optimiser step:
    with them dA and dX are plain K-major FP8 GEMMs (the Hopper wgmma kernel) instead of strided views.
    ``h13``: the forward's (bf16, saved; left as it is), else computed again. ``fp8_wgrad=False``: dW2 and dW13
    from the bf16 operands as they are (``grouped_wgrad(fp8=False)``: no quantisation, fp32 accumulation)."""
    E = w13.shape[0]
    bf = torch.bfloat16
    saved = h13 is not None
    if not saved:
        h13 = gg._gemm(x, offsets, w13, w13_scale, out_dtype=bf)
    gy = grad_out.to(bf).contiguous()
    w2_t = w2_t or (w2.transpose(1, 2), w2_scale.transpose(1, 2))
    w13_t = w13_t or (w13.transpose(1, 2), w13_scale.transpose(1, 2))
    da = gg._gemm(gy, offsets, w2_t[0], w2_t[1], out_dtype=bf)
    a, dh = _swiglu_backward_(h13, da, in_place=not saved)
    del h13
    dx = dw13 = dw2 = None
    if need[2]:
        dw2 = gg.grouped_wgrad(gy, a, offsets, E, out_dtype=w_dtype, fp8=fp8_wgrad)
    del a, da
    if need[0]:
        dx = gg._gemm(dh, offsets, w13_t[0], w13_t[1], out_dtype=x.dtype)
    if need[1]:
        dw13 = gg.grouped_wgrad(dh, x, offsets, E, out_dtype=w_dtype, fp8=fp8_wgrad)
    return dx, dw13, dw2


def _none_if_empty(t, wanted):
    return t if wanted else None


@torch.library.custom_op("moe_kernels::expert_mlp_backward", mutates_args=())
def _expert_mlp_backward_op(x: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            topk_weight: torch.Tensor | None, grad_out: torch.Tensor, h13: torch.Tensor | None,
                            need_x: bool, need_w13: bool, need_w2: bool,
                            need_tw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_expert_mlp_backward_kernels`` as an op: (dx, dw13, dw2, dtopk_weight), empty where not wanted."""
    out = _expert_mlp_backward_kernels(x, offsets, w13, w2, topk_weight, grad_out,
                                       [need_x, need_w13, need_w2, need_tw], h13=h13)
    return tuple(t if t is not None else x.new_empty(0) for t in out)


@_expert_mlp_backward_op.register_fake
def _(x, offsets, w13, w2, topk_weight, grad_out, h13, need_x, need_w13, need_w2, need_tw):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0), w13.new_empty(w13.shape) if need_w13 else x.new_empty(0),
            w2.new_empty(w2.shape) if need_w2 else x.new_empty(0),
            topk_weight.new_empty(x.shape[0]) if need_tw and topk_weight is not None else x.new_empty(0))


@torch.library.custom_op("moe_kernels::expert_mlp_fp8_backward", mutates_args=())
def _expert_mlp_fp8_backward_op(x: torch.Tensor, offsets: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor,
                                w2_q: torch.Tensor, w2_scale: torch.Tensor, grad_out: torch.Tensor,
                                w13_tq: torch.Tensor | None, w13_ts: torch.Tensor | None, w2_tq: torch.Tensor | None,
                                w2_ts: torch.Tensor | None, h13: torch.Tensor | None, need_x: bool, need_w13: bool,
                                need_w2: bool, w_dtype: torch.dtype,
                                fp8_wgrad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_expert_mlp_fp8_backward`` as an op: (dx, dw13, dw2), the weight gradients in ``w_dtype``, empty where
    not wanted."""
    out = _expert_mlp_fp8_backward(
        x, offsets, w13_q, w13_scale, w2_q, w2_scale, grad_out, [need_x, need_w13, need_w2], w_dtype=w_dtype,
        w13_t=(w13_tq, w13_ts) if w13_tq is not None else None, w2_t=(w2_tq, w2_ts) if w2_tq is not None else None,
        h13=h13, fp8_wgrad=fp8_wgrad)
    return tuple(t if t is not None else x.new_empty(0) for t in out)


@_expert_mlp_fp8_backward_op.register_fake
def _(x, offsets, w13_q, w13_scale, w2_q, w2_scale, grad_out, w13_tq, w13_ts, w2_tq, w2_ts, h13, need_x, need_w13,
      need_w2, w_dtype, fp8_wgrad):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            x.new_empty(w13_q.shape, dtype=w_dtype) if need_w13 else x.new_empty(0),
            x.new_empty(w2_q.shape, dtype=w_dtype) if need_w2 else x.new_empty(0))


@torch.library.custom_op("moe_kernels::grouped_gemm_bf16_backward", mutates_args=())
def _grouped_gemm_bf16_backward_op(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, grad_out: torch.Tensor,
                                   need_a: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA, dW) of ``grouped_gemm_bf16``: dA = dOut @ W[e] (the kernel on W's transposed view), dW =
    ``grouped_wgrad``; empty where not wanted."""
    g = grad_out.to(a.dtype).contiguous()
    da = gg._gemm(g, offsets, w.transpose(1, 2), out_dtype=a.dtype) if need_a else a.new_empty(0)
    dw = gg.grouped_wgrad(g, a, offsets, w.shape[0], out_dtype=w.dtype) if need_w else a.new_empty(0)
    return da, dw


@_grouped_gemm_bf16_backward_op.register_fake
def _(a, w, offsets, grad_out, need_a, need_w):
    return a.new_empty(a.shape) if need_a else a.new_empty(0), w.new_empty(w.shape) if need_w else a.new_empty(0)


def _grad_by_reference(ctx, fn, tensors, positions, grad_out):
    """Gradients of fn(*tensors) for the inputs at ``positions`` of the op that need one (None for the others):
    the reference run again as differentiable torch ops, in fp32 (CPU tensors without the interpreter)."""
    need = [t is not None and ctx.needs_input_grad[i] for t, i in zip(tensors, positions)]
    leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(tensors, need)]
    with torch.enable_grad():
        out = fn(*leaves)
        wanted = [t for t, n in zip(leaves, need) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.float()) if wanted else ())
    return tuple(next(grads) if n else None for n in need)


def _grouped_gemm_bf16_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # a, w, offsets


def _grouped_gemm_bf16_backward(ctx, grad_out):
    """dA = dOut @ W[e] (the kernel on W's transposed view), dW = ``grouped_wgrad``; the reference off-kernel."""
    a, w, offsets = ctx.saved_tensors
    if not use_triton(a):
        return (*_grad_by_reference(ctx, lambda a, w: reference.grouped_gemm(a, w, offsets, out_dtype=torch.float32),
                                    (a, w), (0, 1), grad_out), None)
    need = ctx.needs_input_grad[:2]
    da, dw = _grouped_gemm_bf16_backward_op(a, w, offsets, grad_out, *need)
    return _none_if_empty(da, need[0]), _none_if_empty(dw, need[1]), None


gg._grouped_gemm_bf16_op.register_autograd(_grouped_gemm_bf16_backward, setup_context=_grouped_gemm_bf16_setup)


def _expert_mlp_setup(ctx, inputs, output):
    x, x_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight = inputs
    ctx.fp8 = w13_scale is not None
    ctx.save_for_backward(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight)


def _expert_mlp_backward(ctx, grad_out):
    """Gradients for x, w13, w2 and topk_weight (bf16 / fp32 path): the package's kernels where the forward ran
    them (``_expert_mlp_backward_kernels``), else the reference MLP run again as torch ops in fp32. The FP8 path
    gives topk_weight's only: e4m3 inputs have none."""
    x, x_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight = ctx.saved_tensors
    if ctx.fp8:
        if any(ctx.needs_input_grad[i] for i in (0, 3, 5)):
            raise RuntimeError("expert_mlp has no backward on the FP8 path (e4m3 activations and weights): train "
                               "FP8 experts with MoELayer(precision='fp8', trainable=True) (ops.expert_mlp_fp8_train"
                               "), or with precision='bf16', or run inference under torch.no_grad()")
        gtw = None
        if ctx.needs_input_grad[7]:
            y = reference.expert_mlp(x, offsets, w13, w2, x_scale, w13_scale, w2_scale, out_dtype=torch.float32)
            gtw = (grad_out.float() * y).sum(-1).to(topk_weight.dtype)
        return None, None, None, None, None, None, None, gtw

    need = [ctx.needs_input_grad[i] for i in (0, 3, 5, 7)]
    if use_triton(x):
        need[3] = need[3] and topk_weight is not None
        out = _expert_mlp_backward_op(x, offsets, w13, w2, topk_weight, grad_out, None, *need)
        gx, g13, g2, gtw = (_none_if_empty(t, n) for t, n in zip(out, need))
        return gx, None, None, g13, None, g2, None, gtw

    def mlp(x, w13, w2, tw):
        y = reference.expert_mlp(x, offsets, w13, w2, out_dtype=torch.float32)
        return y if tw is None else y * tw.float()[:, None]

    gx, g13, g2, gtw = _grad_by_reference(ctx, mlp, (x, w13, w2, topk_weight), (0, 3, 5, 7), grad_out)
    return gx, None, None, g13, None, g2, None, gtw


gg._expert_mlp_op.register_autograd(_expert_mlp_backward, setup_context=_expert_mlp_setup)


def _expert_mlp_train_setup(ctx, inputs, output):
    x, offsets, w13, w2 = inputs
    ctx.set_materialize_grads(False)  # h13's gradient stays None, not a zero-filled [M, 2I]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, offsets, w13, w2, output[1])  # h13: the backward does not compute it again


def _expert_mlp_train_backward(ctx, grad_out, _grad_h13):
    if grad_out is None:
        return None, None, None, None
    x, offsets, w13, w2, h13 = ctx.saved_tensors
    need = [ctx.needs_input_grad[i] for i in (0, 2, 3)]
    out = _expert_mlp_backward_op(x, offsets, w13, w2, None, grad_out, h13, *need, False)
    gx, g13, g2 = (_none_if_empty(t, n) for t, n in zip(out, need))
    return gx, None, g13, g2


gg._expert_mlp_train_op.register_autograd(_expert_mlp_train_backward, setup_context=_expert_mlp_train_setup)


def _expert_mlp_fp8_ste_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_mlp_fp8_ste_backward(ctx, grad_out):
    x, offsets, w13, w13_scale, w2, w2_scale = ctx.saved_tensors
    dx, _, _ = _expert_mlp_fp8_backward_op(x, offsets, w13, w13_scale, w2, w2_scale, grad_out, None, None, None, None,
                                           None, True, False, False, torch.bfloat16, True)
    return dx, None, None, None, None, None


gg._expert_mlp_fp8_ste_op.register_autograd(_expert_mlp_fp8_ste_backward, setup_context=_expert_mlp_fp8_ste_setup)


def _expert_mlp_fp8_train_setup(ctx, inputs, output):
    x, offsets, w13, w13_q, w13_scale, w2, w2_q, w2_scale, w13_tq, w13_ts, w2_tq, w2_ts, *fp8_wgrad = inputs
    ctx.w_dtype = w13.dtype
    ctx.fp8_wgrad = bool(fp8_wgrad[0]) if fp8_wgrad else True
    ctx.set_materialize_grads(False)  # h13's gradient stays None, not a zero-filled [M, 2I]
    ctx.mark_non_differentiable(output[1])
    # the rows (bf16, for dW13's own quantisation along rows), h13 (bf16) and the e4m3 weights
    ctx.save_for_backward(x, offsets, w13_q, w13_scale, w2_q, w2_scale, w13_tq, w13_ts, w2_tq, w2_ts, output[1])


def _expert_mlp_fp8_train_backward(ctx, grad_out, _grad_h13):
    if grad_out is None:
        return (None,) * 13
    x, offsets, w13_q, w13_scale, w2_q, w2_scale, w13_tq, w13_ts, w2_tq, w2_ts, h13 = ctx.saved_tensors
    need = [ctx.needs_input_grad[i] for i in (0, 2, 5)]
    out = _expert_mlp_fp8_backward_op(x, offsets, w13_q, w13_scale, w2_q, w2_scale, grad_out, w13_tq, w13_ts, w2_tq,
                                      w2_ts, h13, *need, ctx.w_dtype, ctx.fp8_wgrad)
    dx, dw13, dw2 = (_none_if_empty(t, n) for t, n in zip(out, need))
    return dx, None, dw13, None, None, dw2, None, None, None, None, None, None, None


gg._expert_mlp_fp8_train_op.register_autograd(_expert_mlp_fp8_train_backward,
                                           setup_context=_expert_mlp_fp8_train_setup)
