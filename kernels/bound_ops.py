"""Fast bound-propagation primitives (contracts and references in :mod:`dsrna.ops.bound_ops`).

* ``interval_weighted_sum``: both bounds of a mixed op or node as two fused weighted sums (the
  weights are non-negative, so lower maps to lower), with the fused backward of
  :mod:`dsrna.kernels.weighted_sum`.
* ``relu_relaxation``: one elementwise launch writes the lower slope, upper slope and upper
  intercept from ``(l, u)``.
* ``crown_relu_backward``: one pass over ``A`` writes ``A+ * lower_slope + A- * upper_slope`` and
  contracts the bias ``sum A- * upper_intercept`` in the same loop, one program per ``(b, s)`` row.

R_CB is maximised by gradient, so both kernels are differentiable: their backwards are closed-form
expressions in PyTorch ops (which are differentiable again, for the double backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsrna import backend
from dsrna.ops.bound_ops import RELU_MODES

from ._common import accumulator, block_size, contiguous, promoted_dtype
from .weighted_sum import weighted_sum_op

# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _relu_relaxation_kernel(lower_ptr, upper_ptr, lslope_ptr, uslope_ptr, uint_ptr, n, FAST_LIN: tl.constexpr,
                            ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    l = tl.load(lower_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(upper_ptr + offs, mask=mask, other=0.0).to(ACC)
    active = l >= 0
    unstable = (l < 0) & (u > 0)
    chord = u / tl.where(unstable, u - l, 1.0)
    stable_slope = tl.where(active, 1.0, 0.0)
    upper_slope = tl.where(unstable, chord, stable_slope)
    upper_intercept = tl.where(unstable, -l * chord, 0.0)
    if FAST_LIN:
        unstable_slope = chord
    else:
        unstable_slope = tl.where(u > -l, 1.0, 0.0)
    lower_slope = tl.where(unstable, unstable_slope, stable_slope)
    out_ty = lslope_ptr.dtype.element_ty
    tl.store(lslope_ptr + offs, lower_slope.to(out_ty), mask=mask)
    tl.store(uslope_ptr + offs, upper_slope.to(out_ty), mask=mask)
    tl.store(uint_ptr + offs, upper_intercept.to(out_ty), mask=mask)


@triton.jit
def _crown_relu_backward_kernel(A_ptr, lslope_ptr, uslope_ptr, uint_ptr, out_ptr, bias_ptr, S, M,
                                ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row = b * S + s
    b = row // S
    bias = tl.zeros([BLOCK], ACC)
    for start in range(0, M, BLOCK):
        m = start + tl.arange(0, BLOCK)
        mask = m < M
        a = tl.load(A_ptr + row * M + m, mask=mask, other=0.0).to(ACC)
        ls = tl.load(lslope_ptr + b * M + m, mask=mask, other=0.0).to(ACC)
        us = tl.load(uslope_ptr + b * M + m, mask=mask, other=0.0).to(ACC)
        ui = tl.load(uint_ptr + b * M + m, mask=mask, other=0.0).to(ACC)
        negative = tl.minimum(a, 0.0)
        out = tl.maximum(a, 0.0) * ls + negative * us
        tl.store(out_ptr + row * M + m, out.to(out_ptr.dtype.element_ty), mask=mask)
        bias += negative * ui
    tl.store(bias_ptr + row, tl.sum(bias, axis=0).to(bias_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------
# relu_relaxation


@torch.library.custom_op("dsrna_triton::relu_relaxation", mutates_args=())
def relu_relaxation_op(lower: torch.Tensor, upper: torch.Tensor, fast_lin: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lower, upper = contiguous(lower), contiguous(upper)
    dtype = promoted_dtype(lower, upper)
    outs = tuple(torch.empty(lower.shape, device=lower.device, dtype=dtype) for _ in range(3))
    n = lower.numel()
    if n:
        block = block_size(n)
        with backend.device_scope(lower.device):
            _relu_relaxation_kernel[(triton.cdiv(n, block),)](lower, upper, *outs, n, FAST_LIN=fast_lin,
                                                               ACC=accumulator(lower, upper)[0], BLOCK=block)
    return outs


@relu_relaxation_op.register_fake
def _(lower, upper, fast_lin):
    dtype = promoted_dtype(lower, upper)
    return tuple(torch.empty(lower.shape, device=lower.device, dtype=dtype) for _ in range(3))


def _relu_relaxation_setup(ctx, inputs, output):
    lower, upper, fast_lin = inputs
    ctx.fast_lin = fast_lin
    ctx.save_for_backward(lower, upper)


def _relu_relaxation_backward(ctx, grad_lslope, grad_uslope, grad_uint):
    """Only unstable neurons carry gradient: with ``w = u - l`` the chord ``u / w`` has
    ``d/dl = u / w^2``, ``d/du = -l / w^2``, and the intercept ``-l u / w`` has ``d/dl = -u^2 / w^2``,
    ``d/du = l^2 / w^2``; CROWN's adaptive lower slope is piecewise constant."""
    lower, upper = ctx.saved_tensors
    unstable = (lower < 0) & (upper > 0)
    inv_w2 = torch.where(unstable, upper - lower, torch.ones_like(lower)).reciprocal().square()
    grad_chord = grad_uslope + grad_lslope if ctx.fast_lin else grad_uslope
    grad_lower = torch.where(unstable, (grad_chord * upper - grad_uint * upper.square()) * inv_w2, torch.zeros_like(lower))
    grad_upper = torch.where(unstable, (grad_uint * lower.square() - grad_chord * lower) * inv_w2, torch.zeros_like(upper))
    return grad_lower, grad_upper, None


relu_relaxation_op.register_autograd(_relu_relaxation_backward, setup_context=_relu_relaxation_setup)


def relu_relaxation_triton(lower: torch.Tensor, upper: torch.Tensor, mode: str):
    if mode not in RELU_MODES:
        raise ValueError(f"unknown ReLU relaxation {mode!r}; choose one of {', '.join(RELU_MODES)}")
    lower_slope, upper_slope, upper_intercept = relu_relaxation_op(lower, upper, mode == "fast-lin")
    if mode == "adaptive":
        lower_slope = lower_slope.detach()  # piecewise constant, as in the reference
    return lower_slope, upper_slope, upper_intercept


# ---------------------------------------------------------------------------------------------------
# crown_relu_backward


def _rows(A: torch.Tensor, slope: torch.Tensor) -> tuple[int, int, int]:
    B, S = A.shape[:2]
    return B, S, slope[0].numel() if B else 0


@torch.library.custom_op("dsrna_triton::crown_relu_backward", mutates_args=())
def crown_relu_backward_op(A: torch.Tensor, lower_slope: torch.Tensor, upper_slope: torch.Tensor,
                           upper_intercept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A, lower_slope, upper_slope, upper_intercept = map(contiguous, (A, lower_slope, upper_slope, upper_intercept))
    dtype = promoted_dtype(A, lower_slope, upper_slope, upper_intercept)
    B, S, M = _rows(A, lower_slope)
    out = torch.empty(A.shape, device=A.device, dtype=dtype)
    bias = torch.empty(B, S, device=A.device, dtype=dtype)
    if B * S:
        with backend.device_scope(A.device):
            _crown_relu_backward_kernel[(B * S,)](A, lower_slope, upper_slope, upper_intercept, out, bias, S, M,
                                                  ACC=accumulator(A, lower_slope)[0], BLOCK=block_size(M))
    return out, bias


@crown_relu_backward_op.register_fake
def _(A, lower_slope, upper_slope, upper_intercept):
    dtype = promoted_dtype(A, lower_slope, upper_slope, upper_intercept)
    return torch.empty(A.shape, device=A.device, dtype=dtype), A.new_empty(A.shape[:2], dtype=dtype)


def _crown_relu_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _crown_relu_backward_backward(ctx, grad_out, grad_bias):
    """``A_out = A+ ls + A- us`` and ``bias = sum A- ui``. At ``A == 0`` no gradient reaches ``A``,
    as in the reference."""
    A, lower_slope, upper_slope, upper_intercept = ctx.saved_tensors
    ls, us, ui = (t.unsqueeze(1) for t in (lower_slope, upper_slope, upper_intercept))
    gb = grad_bias.reshape(grad_bias.shape + (1,) * (A.dim() - 2))
    positive, negative = A.clamp(min=0), A.clamp(max=0)
    grad_A = torch.where(A > 0, grad_out * ls, 0) + torch.where(A < 0, grad_out * us + gb * ui, 0)
    grad_ls = (grad_out * positive).sum(1)
    grad_us = (grad_out * negative).sum(1)
    grad_ui = (gb * negative).sum(1)
    return grad_A, grad_ls, grad_us, grad_ui


crown_relu_backward_op.register_autograd(_crown_relu_backward_backward, setup_context=_crown_relu_backward_setup)


def crown_relu_backward_triton(A, lower_slope, upper_slope, upper_intercept):
    return crown_relu_backward_op(A, lower_slope, upper_slope, upper_intercept)


# ---------------------------------------------------------------------------------------------------
# interval_weighted_sum


def interval_weighted_sum_triton(lowers: list[torch.Tensor], uppers: list[torch.Tensor], w: torch.Tensor):
    return weighted_sum_op(list(lowers), w), weighted_sum_op(list(uppers), w)


backend.register("interval_weighted_sum", "triton", interval_weighted_sum_triton, devices=("cuda", "cpu"))
backend.register("relu_relaxation", "triton", relu_relaxation_triton, devices=("cuda", "cpu"))
backend.register("crown_relu_backward", "triton", crown_relu_backward_triton, devices=("cuda", "cpu"))
