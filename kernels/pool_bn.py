"""3x3 pooling fused with ``BatchNorm2d(affine=False)`` (see :mod:`dsrna.ops.pool_bn`).

Forward, train mode, two launches over a ``(channel, chunk)`` grid:

1. ``_pool_stats_kernel``: pool each chunk on the fly and write its (count, mean, M2) partials
   (float64 shifted sums as in :mod:`.batch_norm`: no atomics, deterministic).
2. ``_pool_bn_apply_kernel``: combine the partials of its channel, update the running statistics
   (one program per channel), pool again and write the normalised output and, for max pooling,
   the int8 offset of the maximum inside its window.

Eval mode is the second launch alone, with the running statistics.

Backward needs ``y`` (which is ``x_hat`` because the BN has no affine part), the per-channel
``rstd`` and the int8 offsets: one launch for the per-channel sums of ``g`` and ``g * y`` (train
mode only; :func:`.batch_norm.channel_sums_kernel`), then one gather launch over input positions:
every input pixel collects from the (at most 3x3) windows containing it, so there are no atomics and
the result is deterministic.

Double backward (``create_graph=True``, e.g. the DSRNA-Jacobian step) differentiates a reference
recomputation from the saved input instead, so higher derivatives are exactly PyTorch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsrna import backend
from dsrna.ops.pool_bn import POOL_KINDS, pool3x3

from . import batch_norm
from ._common import INTERPRETED, accumulator, block_size, contiguous
from .batch_norm import (channel_sums_kernel, combine_moments, combine_sums, exact, float_parts, shifted_moments,
                         update_running_stats)

# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _pool_window(x_ptr, plane, oh, ow, H, W, mask, KIND_MAX: tl.constexpr, STRIDE: tl.constexpr,
                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Pooled values at output positions ``(oh, ow)`` of the planes starting at ``plane``, and for
    max pooling the window offset ``3 * dh + dw`` of the first maximum (PyTorch's tie rule)."""
    best = tl.full([BLOCK], float("-inf"), ACC) if KIND_MAX else tl.zeros([BLOCK], ACC)
    arg = tl.full([BLOCK], -1, tl.int32)
    count = tl.zeros([BLOCK], tl.int32)
    for dh in tl.static_range(3):
        ih = oh * STRIDE - 1 + dh
        for dw in tl.static_range(3):
            iw = ow * STRIDE - 1 + dw
            valid = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + plane + ih * W + iw, mask=valid, other=0.0).to(ACC)
            if KIND_MAX:
                take = valid & ((v > best) | (arg < 0) | (v != v))
                best = tl.where(take, v, best)
                arg = tl.where(take, dh * 3 + dw, arg)
            else:
                best += v
                count += valid.to(tl.int32)
    if not KIND_MAX:
        best = best / tl.maximum(count, 1).to(ACC)
    return best, arg


@triton.jit
def _output_coords(j, c, C, Ho, Wo):
    """Flat index ``j`` over ``(n, oh, ow)`` of channel ``c`` -> ``(n * C + c, oh, ow)``."""
    hw = Ho * Wo
    n = j // hw
    r = j - n * hw
    oh = r // Wo
    return (n * C + c).to(tl.int64), oh, r - oh * Wo


@triton.jit
def _pool_stats_kernel(x_ptr, part_ptr, C, H, W, Ho, Wo, L, CHUNK, KIND_MAX: tl.constexpr, STRIDE: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    shift = tl.load(x_ptr + c * H * W).to(tl.float64)  # a value of the channel (see .batch_norm)
    sum_d = tl.zeros([BLOCK], tl.float64)
    sum_d2 = tl.zeros([BLOCK], tl.float64)
    for t in range(0, CHUNK, BLOCK):
        j = s * CHUNK + t + tl.arange(0, BLOCK)
        mask = j < L
        row, oh, ow = _output_coords(j, c, C, Ho, Wo)
        p, _ = _pool_window(x_ptr, row * H * W, oh, ow, H, W, mask, KIND_MAX, STRIDE, ACC, BLOCK)
        d = tl.where(mask, p.to(tl.float64) - shift, 0.0)
        sum_d += d
        sum_d2 += d * d
    count = (tl.minimum(L, (s + 1) * CHUNK) - s * CHUNK).to(tl.float64)
    count, mean, m2 = shifted_moments(count, shift, sum_d, sum_d2)
    base = (c * S + s) * 3
    tl.store(part_ptr + base, count)
    tl.store(part_ptr + base + 1, mean)
    tl.store(part_ptr + base + 2, m2)


@triton.jit
def _pool_bn_apply_kernel(x_ptr, y_ptr, arg_ptr, part_ptr, stats_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum_hi,
                          momentum_lo, eps_hi, eps_lo, C, H, W, Ho, Wo, L, CHUNK, S, KIND_MAX: tl.constexpr,
                          STRIDE: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                          S_BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    eps = exact(eps_hi, eps_lo)
    if TRAINING:
        mean, m2, n, rstd = combine_moments(part_ptr, c, S, eps, S_BLOCK)
        if s == 0:
            update_running_stats(rmean_ptr, rvar_ptr, c, mean, m2, n, momentum_hi, momentum_lo)
            if c == 0:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    else:
        mean = tl.load(rmean_ptr + c).to(tl.float64)
        rstd = 1.0 / tl.sqrt(tl.load(rvar_ptr + c).to(tl.float64) + eps)
    mean = mean.to(ACC)
    rstd = rstd.to(ACC)
    if s == 0:
        tl.store(stats_ptr + 2 * c, mean)
        tl.store(stats_ptr + 2 * c + 1, rstd)
    for t in range(0, CHUNK, BLOCK):
        j = s * CHUNK + t + tl.arange(0, BLOCK)
        mask = j < L
        row, oh, ow = _output_coords(j, c, C, Ho, Wo)
        p, arg = _pool_window(x_ptr, row * H * W, oh, ow, H, W, mask, KIND_MAX, STRIDE, ACC, BLOCK)
        out = row * Ho * Wo + oh * Wo + ow
        tl.store(y_ptr + out, ((p - mean) * rstd).to(y_ptr.dtype.element_ty), mask=mask)
        if KIND_MAX:
            tl.store(arg_ptr + out, arg.to(tl.int8), mask=mask)


@triton.jit
def _pool_bn_grad_kernel(g_ptr, y_ptr, arg_ptr, part_ptr, stats_ptr, gx_ptr, C, H, W, Ho, Wo, L_in, L_out, CHUNK, S,
                         KIND_MAX: tl.constexpr, STRIDE: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr, S_BLOCK: tl.constexpr, WINDOWS: tl.constexpr):
    """Every input pixel gathers ``rstd * (g - mean(g) - y * mean(g * y))`` from the windows that
    contain it: divided by the window's size (avg) or where it was the window's maximum (max).
    ``WINDOWS``: windows per axis that can contain a pixel (3 at stride 1, 2 at stride 2)."""
    c = tl.program_id(0)
    s = tl.program_id(1)
    rstd = tl.load(stats_ptr + 2 * c + 1).to(ACC)
    if TRAINING:
        mean_g, mean_gy = combine_sums(part_ptr, c, S, L_out, S_BLOCK)
        mean_g = mean_g.to(ACC)
        mean_gy = mean_gy.to(ACC)
    for t in range(0, CHUNK, BLOCK):
        j = s * CHUNK + t + tl.arange(0, BLOCK)
        mask = j < L_in
        row, ih, iw = _output_coords(j, c, C, H, W)
        acc = tl.zeros([BLOCK], ACC)
        for th in tl.static_range(WINDOWS):
            oh = (ih + 1) // STRIDE - th
            dh = ih - oh * STRIDE + 1
            valid_h = (oh >= 0) & (oh < Ho) & (dh <= 2)
            for tw in tl.static_range(WINDOWS):
                ow = (iw + 1) // STRIDE - tw
                dw = iw - ow * STRIDE + 1
                valid = mask & valid_h & (ow >= 0) & (ow < Wo) & (dw <= 2)
                out = row * Ho * Wo + oh * Wo + ow
                g = tl.load(g_ptr + out, mask=valid, other=0.0).to(ACC)
                if TRAINING:
                    g = g - mean_g - tl.load(y_ptr + out, mask=valid, other=0.0).to(ACC) * mean_gy
                if KIND_MAX:
                    hit = tl.load(arg_ptr + out, mask=valid, other=-1).to(tl.int32) == dh * 3 + dw
                    acc += tl.where(valid & hit, g, 0.0)
                else:
                    rows = tl.minimum(oh * STRIDE + 1, H - 1) - tl.maximum(oh * STRIDE - 1, 0) + 1
                    cols = tl.minimum(ow * STRIDE + 1, W - 1) - tl.maximum(ow * STRIDE - 1, 0) + 1
                    acc += tl.where(valid, g / tl.maximum(rows * cols, 1).to(ACC), 0.0)
        tl.store(gx_ptr + row * H * W + ih * W + iw, (acc * rstd).to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# launchers


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # kernel 3, padding 1


def _grid(length: int) -> tuple[int, int, int]:
    """(block, chunk, chunks) for a per-channel loop over ``length`` elements."""
    block = block_size(length)
    # On a GPU each program loops over a few blocks so the partials stay few; interpreted, one block.
    chunk = block if INTERPRETED else 4 * block
    return block, chunk, triton.cdiv(length, chunk)


def _launch_forward(x, running_mean, running_var, num_batches_tracked, kind, stride, training, momentum, eps):
    x = contiguous(x)
    N, C, H, W = x.shape
    Ho, Wo = _out_size(H, stride), _out_size(W, stride)
    acc, acc_torch = accumulator(x)
    y = torch.empty(N, C, Ho, Wo, device=x.device, dtype=x.dtype)
    arg = torch.empty(y.shape if kind == "max" else (0,), device=x.device, dtype=torch.int8)
    stats = torch.empty(C, 2, device=x.device, dtype=acc_torch)  # (mean, rstd) per channel
    L = N * Ho * Wo
    block, chunk, chunks = _grid(L)
    common = dict(KIND_MAX=kind == "max", STRIDE=stride, ACC=acc, BLOCK=block)
    part = torch.empty(C, chunks, 3, device=x.device, dtype=torch.float64) if training else stats
    if training:
        _pool_stats_kernel[(C, chunks)](x, part, C, H, W, Ho, Wo, L, chunk, **common)
    _pool_bn_apply_kernel[(C, chunks)](
        x, y, arg if kind == "max" else y, part, stats, running_mean, running_var, num_batches_tracked,
        *float_parts(momentum), *float_parts(eps), C, H, W, Ho, Wo, L, chunk, chunks, TRAINING=training,
        S_BLOCK=triton.next_power_of_2(chunks), **common)
    return y, stats, arg


def _launch_backward(grad, x, y, stats, arg, kind, stride, training):
    grad = contiguous(grad)
    N, C, H, W = x.shape
    Ho, Wo = y.shape[2:]
    L_out, L_in = N * Ho * Wo, N * H * W
    part, chunks_out = stats, 1
    if training:
        block_n, block_hw, chunk_n, chunks_out = batch_norm.tiles(N, C, Ho * Wo)
        part = torch.empty(C, chunks_out, 2, device=x.device, dtype=torch.float64)
        channel_sums_kernel[(C, chunks_out)](grad, y, part, C, Ho * Wo, N, chunk_n, BLOCK_N=block_n, BLOCK_HW=block_hw,
                                             num_warps=batch_norm.NUM_WARPS)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    block, chunk, chunks = _grid(L_in)
    _pool_bn_grad_kernel[(C, chunks)](
        grad, y, arg if kind == "max" else y, part, stats, gx, C, H, W, Ho, Wo, L_in, L_out, chunk, chunks_out,
        KIND_MAX=kind == "max", STRIDE=stride, TRAINING=training, ACC=accumulator(x)[0], BLOCK=block,
        S_BLOCK=triton.next_power_of_2(chunks_out), WINDOWS=3 if stride == 1 else 2)
    return gx


# ---------------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("dsrna_triton::pool_bn_forward",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def pool_bn_forward_op(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                       num_batches_tracked: torch.Tensor, kind: str, stride: int, training: bool, momentum: float,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, stats, arg)``: the output, per-channel ``(mean, rstd)`` used, and the int8 window
    offsets of the maxima (empty for avg pooling). Train mode updates the running statistics."""
    with backend.device_scope(x.device):
        return _launch_forward(x, running_mean, running_var, num_batches_tracked, kind, stride, training, momentum,
                               eps)


@pool_bn_forward_op.register_fake
def _(x, running_mean, running_var, num_batches_tracked, kind, stride, training, momentum, eps):
    N, C, H, W = x.shape
    y = x.new_empty(N, C, _out_size(H, stride), _out_size(W, stride))
    arg = x.new_empty(y.shape if kind == "max" else (0,), dtype=torch.int8)
    return y, x.new_empty(C, 2, dtype=accumulator(x)[1]), arg


@torch.library.custom_op("dsrna_triton::pool_bn_backward", mutates_args=())
def pool_bn_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, stats: torch.Tensor, arg: torch.Tensor,
                        kind: str, stride: int, training: bool) -> torch.Tensor:
    """Gradient to ``x`` (``x`` gives only the shape and dtype: the pooling is not recomputed)."""
    with backend.device_scope(x.device):
        return _launch_backward(grad, x, y, stats, arg, kind, stride, training)


@pool_bn_backward_op.register_fake
def _(grad, x, y, stats, arg, kind, stride, training):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _normalised_reference(x, stats, kind, stride, training, eps):
    """``y`` recomputed with differentiable PyTorch ops (batch statistics in train mode, the saved
    running ones in eval mode), without touching any running statistics."""
    pooled = pool3x3(x, kind, stride)
    if training:
        return F.batch_norm(pooled, None, None, None, None, True, 0.0, eps)
    mean, rstd = stats[:, 0].to(x.dtype), stats[:, 1].to(x.dtype)
    return (pooled - mean[:, None, None]) * rstd[:, None, None]


class _PoolBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, num_batches_tracked, kind, stride, training, momentum, eps):
        y, stats, arg = pool_bn_forward_op(x, running_mean, running_var, num_batches_tracked, kind, stride, training,
                                           momentum, eps)
        ctx.save_for_backward(x, y, stats, arg)
        ctx.config = (kind, stride, training, eps)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, stats, arg = ctx.saved_tensors
        kind, stride, training, eps = ctx.config
        if not ctx.needs_input_grad[0]:
            gx = None
        elif torch.is_grad_enabled():
            # create_graph: the fused backward has no derivative of its own, so differentiate a
            # reference recomputation (same values) to keep higher derivatives exact.
            with torch.enable_grad():
                y_ref = _normalised_reference(x, stats, kind, stride, training, eps)
            (gx,) = torch.autograd.grad(y_ref, x, grad, create_graph=True)
        else:
            gx = pool_bn_backward_op(grad, x, y, stats, arg, kind, stride, training)
        return gx, None, None, None, None, None, None, None, None


def pool_bn_triton(x, kind, stride, running_mean, running_var, num_batches_tracked, training, momentum, eps):
    """The ``triton`` implementation of :func:`dsrna.ops.pool_bn` (same arguments as the reference)."""
    if kind not in POOL_KINDS:
        raise ValueError(f"unknown pool kind {kind!r}; choose one of {', '.join(POOL_KINDS)}")
    return _PoolBN.apply(x, running_mean, running_var, num_batches_tracked, kind, stride, training, momentum, eps)


backend.register("pool_bn", "triton", pool_bn_triton, devices=("cuda", "cpu"))
