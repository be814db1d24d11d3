"""Node-level weighted accumulation ``sum_i w[i] * xs[i]`` as one Triton kernel, and its backward.

A DARTS node sums every candidate of every incoming edge (up to 35 tensors); the reference does it
with ~70 elementwise launches forward and ~100 backward. Here the forward is one launch and the
backward one launch plus a tiny reduction: it writes ``grad xs[i] = w[i] * g`` and the partial dot
products ``<xs[i], g>`` in the same pass over ``g``, without any saved weighted products.

The inputs travel to the kernel as a tuple of pointers (one specialisation per arity), so no
pointer table is copied to the device and the launches stay CUDA-graph capturable.

Four ``torch.library`` ops, closed under differentiation, so every order of derivative stays on
the fused kernels (the DSRNA-Jacobian step differentiates through the backward):

=========================================  =====================================================
op                                         its backward uses
=========================================  =====================================================
``weighted_sum(xs, w) -> y``               ``weighted_sum_backward``
``weighted_sum_backward(xs, w, g)``        ``weighted_sum_backward`` (or ``scaled_copies`` /
  ``-> ([w_i g], [<x_i, g>])``               ``batched_dot``) and ``weighted_sum``
``scaled_copies(g, w) -> [w_i g]``         ``weighted_sum`` and ``batched_dot``
``batched_dot(xs, g) -> [<x_i, g>]``       ``scaled_copies`` and ``weighted_sum``
=========================================  =====================================================
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsrna import backend
from ._common import accumulator, block_size, contiguous, promoted_dtype

# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _load_input(ptr, row_stride, offs, inner, mask, ROWS: tl.constexpr):
    """Elements ``offs`` (flat, contiguous numbering) of an input whose rows (first dimension) may lie
    ``row_stride`` apart: a channel slice of a stacked tensor is read in place, not copied first."""
    if ROWS:
        rows = offs // inner
        return tl.load(ptr + rows * row_stride + (offs - rows * inner), mask=mask, other=0.0)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _weighted_sum_kernel(xs, row_strides, w_ptr, out_ptr, n, inner, N: tl.constexpr, ROWS: tl.constexpr,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in tl.static_range(N):
        x = _load_input(xs[i], row_strides[i], offs, inner, mask, ROWS)
        acc += x.to(ACC) * tl.load(w_ptr + i).to(ACC)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_sum_grad_kernel(xs, row_strides, w_ptr, g_ptr, gxs, partial_ptr, n, inner, N: tl.constexpr,
                              ROWS: tl.constexpr, SCALE: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                              BLOCK: tl.constexpr):
    """``SCALE``: write ``gxs[i] = w[i] * g``; ``DOT``: write this block's ``<xs[i], g>`` to
    ``partial[program, i]`` (summed over programs afterwards, so the result is deterministic)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    for i in tl.static_range(N):
        if SCALE:
            scaled = g * tl.load(w_ptr + i).to(ACC)
            tl.store(gxs[i] + offs, scaled.to(gxs[i].dtype.element_ty), mask=mask)
        if DOT:
            x = _load_input(xs[i], row_strides[i], offs, inner, mask, ROWS).to(ACC)
            tl.store(partial_ptr + pid * N + i, tl.sum(x * g, axis=0))


# ---------------------------------------------------------------------------------------------------
# launchers


def _prepare(xs) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...], int, bool]:
    """``(inputs, row strides, row length, whether any row stride differs from the row length)``.

    An input whose rows are each contiguous (a channel slice ``t[:, a:b]`` of an NCHW tensor, as the
    batched cell hands over) is read in place; anything else is copied to contiguous first. Mixed
    dtypes are fine: the kernels convert every load to the accumulator dtype.
    """
    inner = xs[0].numel() // xs[0].shape[0] if xs[0].dim() and xs[0].shape[0] else xs[0].numel()
    inputs, strides = [], []
    for x in xs:
        if not x.is_contiguous() and not (x.dim() > 1 and x.shape[0] > 0 and x[0].is_contiguous()):
            x = x.contiguous()
        inputs.append(x)
        strides.append(x.stride(0) if x.dim() and not x.is_contiguous() else inner)
    return tuple(inputs), tuple(strides), inner, any(stride != inner for stride in strides)


def _launch_weighted_sum(xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    dtype = promoted_dtype(*xs)
    xs, strides, inner, rows = _prepare(xs)
    w = contiguous(w)
    out = torch.empty_like(xs[0], dtype=dtype, memory_format=torch.contiguous_format)
    n = out.numel()
    if n:
        block = block_size(n)
        with backend.device_scope(out.device):
            _weighted_sum_kernel[(triton.cdiv(n, block),)](xs, strides, w, out, n, inner, N=len(xs), ROWS=rows,
                                                          ACC=accumulator(*xs, w)[0], BLOCK=block)
    return out


def _launch_grad(xs, w, g, scale: bool, dot: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The shared backward launch; ``xs`` (read when ``dot``) and ``w`` (read when ``scale``) may be
    ``None`` when unused. Returns the scaled copies of ``g`` and the dot products (ACC dtype)."""
    g = contiguous(g)
    count = len(xs) if xs is not None else w.numel()
    n = g.numel()
    block = block_size(n)
    programs = triton.cdiv(n, block)
    strides, inner, rows = (0,) * count, 1, False  # unread without DOT
    if dot:
        xs, strides, inner, rows = _prepare(xs)
    acc, acc_torch = accumulator(g, *(xs if dot else ()), *((w,) if scale else ()))
    gxs = tuple(torch.empty_like(g, memory_format=torch.contiguous_format) for _ in range(count)) if scale else ()
    partial = torch.empty(programs, count, device=g.device, dtype=acc_torch) if dot else None
    if n:
        w_arg = contiguous(w) if scale else g  # an unread placeholder keeps the signature fixed
        with backend.device_scope(g.device):
            _weighted_sum_grad_kernel[(programs,)](
                xs if dot else gxs, strides, w_arg, g, gxs if scale else xs, partial if dot else g, n, inner,
                N=count, ROWS=rows, SCALE=scale, DOT=dot, ACC=acc, BLOCK=block)
    dots = None
    if dot:
        dots = partial.sum(0) if n else torch.zeros(count, device=g.device, dtype=acc_torch)
    return list(gxs), dots


# ---------------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("dsrna_triton::weighted_sum", mutates_args=())
def weighted_sum_op(xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return _launch_weighted_sum(xs, w)


@weighted_sum_op.register_fake
def _(xs, w):
    return torch.empty_like(xs[0], dtype=promoted_dtype(*xs), memory_format=torch.contiguous_format)


@torch.library.custom_op("dsrna_triton::weighted_sum_backward", mutates_args=())
def weighted_sum_backward_op(xs: list[torch.Tensor], w: torch.Tensor, grad: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([w[i] * grad], [<xs[i], grad>])`` in one pass; the dots come back in ``w``'s dtype."""
    gxs, dots = _launch_grad(xs, w, grad, scale=True, dot=True)
    return gxs, dots.to(w.dtype)


@weighted_sum_backward_op.register_fake
def _(xs, w, grad):
    return [torch.empty_like(grad, memory_format=torch.contiguous_format) for _ in xs], torch.empty_like(w)


@torch.library.custom_op("dsrna_triton::scaled_copies", mutates_args=())
def scaled_copies_op(g: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """``[w[i] * g for i]`` in one launch."""
    return _launch_grad(None, w, g, scale=True, dot=False)[0]


@scaled_copies_op.register_fake
def _(g, w):
    return [torch.empty_like(g, memory_format=torch.contiguous_format) for _ in range(w.shape[0])]


@torch.library.custom_op("dsrna_triton::batched_dot", mutates_args=())
def batched_dot_op(xs: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """``[<xs[i], g> for i]`` in one pass over ``g``, in float32 (float64 for float64 inputs)."""
    return _launch_grad(xs, None, g, scale=False, dot=True)[1]


@batched_dot_op.register_fake
def _(xs, g):
    dtype = accumulator(g, *xs)[1]
    return g.new_empty(len(xs), dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# autograd: every backward is built from the four ops above


def _fill_undefined(grads, like: torch.Tensor) -> list[torch.Tensor] | None:
    """The incoming gradients of a list output with the undefined ones as zeros (None if all are).
    Usually all or none are defined; zeros keep the rare mixed case on the same fused launches."""
    if all(t is None for t in grads):
        return None
    return [t if t is not None else torch.zeros_like(like) for t in grads]


def _save_materialize_off(ctx, *tensors):
    ctx.save_for_backward(*tensors)
    ctx.set_materialize_grads(False)


def _weighted_sum_setup(ctx, inputs, output):
    xs, w = inputs
    _save_materialize_off(ctx, w, *xs)


def _weighted_sum_backward(ctx, g):
    w, *xs = ctx.saved_tensors
    need_xs, need_w = ctx.needs_input_grad
    if g is None or not (any(need_xs) or need_w):
        return [None] * len(xs), None
    if not need_w:
        return scaled_copies_op(g, w), None
    if not any(need_xs):
        return [None] * len(xs), batched_dot_op(xs, g).to(w.dtype)
    return weighted_sum_backward_op(xs, w, g)


def _weighted_sum_backward_setup(ctx, inputs, output):
    xs, w, g = inputs
    _save_materialize_off(ctx, w, g, *xs)


def _weighted_sum_backward_backward(ctx, grad_gxs, grad_dots):
    """Outputs ``a_i = w_i g`` and ``b_i = <x_i, g>`` with incoming gradients ``A_i`` and ``B``:
    ``dx_i = B_i g``, ``dw_i = <A_i, g>``, ``dg = sum_i w_i A_i + sum_i B_i x_i``."""
    w, g, *xs = ctx.saved_tensors
    As = _fill_undefined(grad_gxs, g)
    grad_xs, grad_w = [None] * len(xs), None
    if grad_dots is not None and As is not None:
        grad_xs, grad_w = weighted_sum_backward_op(As, grad_dots, g)  # both in one pass
        grad_w = grad_w.to(w.dtype)
    elif grad_dots is not None:
        grad_xs = scaled_copies_op(g, grad_dots)
    elif As is not None:
        grad_w = batched_dot_op(As, g).to(w.dtype)
    terms, weights = [], []
    if As is not None:
        terms += As
        weights.append(w)
    if grad_dots is not None:
        terms += xs
        weights.append(grad_dots.to(w.dtype))
    grad_g = weighted_sum_op(terms, torch.cat(weights)) if terms else None
    return grad_xs, grad_w, grad_g


def _scaled_copies_setup(ctx, inputs, output):
    g, w = inputs
    _save_materialize_off(ctx, g, w)


def _scaled_copies_backward(ctx, grad_copies):
    """Outputs ``c_i = w_i g`` with gradients ``C_i``: ``dg = sum_i w_i C_i``, ``dw_i = <C_i, g>``."""
    g, w = ctx.saved_tensors
    Cs = _fill_undefined(grad_copies, g)
    if Cs is None:
        return None, None
    return weighted_sum_op(Cs, w), batched_dot_op(Cs, g).to(w.dtype)


def _batched_dot_setup(ctx, inputs, output):
    xs, g = inputs
    _save_materialize_off(ctx, g, *xs)


def _batched_dot_backward(ctx, grad_dots):
    """Outputs ``d_i = <x_i, g>`` with gradient ``D``: ``dx_i = D_i g``, ``dg = sum_i D_i x_i``."""
    g, *xs = ctx.saved_tensors
    if grad_dots is None:
        return [None] * len(xs), None
    return scaled_copies_op(g, grad_dots), weighted_sum_op(xs, grad_dots)


weighted_sum_op.register_autograd(_weighted_sum_backward, setup_context=_weighted_sum_setup)
weighted_sum_backward_op.register_autograd(_weighted_sum_backward_backward, setup_context=_weighted_sum_backward_setup)
scaled_copies_op.register_autograd(_scaled_copies_backward, setup_context=_scaled_copies_setup)
batched_dot_op.register_autograd(_batched_dot_backward, setup_context=_batched_dot_setup)


# ---------------------------------------------------------------------------------------------------
# backend registration


def weighted_sum_triton(xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """The ``triton`` implementation of :func:`dsrna.ops.weighted_sum`."""
    return weighted_sum_op(list(xs), w)


backend.register("weighted_sum", "triton", weighted_sum_triton, devices=("cuda", "cpu"))
