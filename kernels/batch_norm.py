"""Train-mode ``BatchNorm2d(affine=False)`` that keeps its output (see :mod:`dsrna.ops.batch_norm`),
and the per-channel statistics that :mod:`.pool_bn` shares.

Why not PyTorch's kernels: they reduce each channel of an NCHW tensor in one thread block. On an
H200 the super-network's batch norms at batch 256 (84 stacked calls over 1.5e9 elements per train
step) took 36 ms of a 193 ms step, the statistics pass reading about 0.7 TB/s and the backward about
1.4 TB/s of the memory's 4.8 (benchmarks/results/2026-11-27_nvidia-h200_profile-b256.md). Here every
channel is split over ``(channel, chunk of samples)`` programs, each reading tiles of whole pixel
rows, in two launches each way:

forward
1. ``_moments_kernel``: each program's ``(count, mean, M2)``, from per-thread sums of ``d`` and
   ``d^2`` with ``d = x - shift`` and ``shift`` a value of the channel (its first), so the sums
   lose nothing to cancellation; no atomics, deterministic.
2. ``_normalise_kernel``: combines its channel's partials, updates the running statistics (chunk 0)
   and writes ``y`` and ``invstd``.

backward, from ``y``: ``dL/dx = invstd * (g - mean(g) - y * mean(g * y))``
1. ``channel_sums_kernel``: each program's sums of ``g`` and ``g * y``.
2. ``_grad_kernel``: the formula, elementwise.

The statistics (moments, sums, the running-statistics update) accumulate in float64, as PyTorch's
CPU kernels do; the elementwise parts run in the input's precision. The reduction passes do two or
three float64 operations and one conversion per element loaded: an H100 or H200 runs float64 at half
the float32 rate, so they should stay near the memory's speed there (compiled and counted in the
SASS, not yet timed); on GPUs with slow float64 they will not.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from dsrna import backend
from dsrna.ops.batch_norm import batch_norm_train_keep_output

from ._common import INTERPRETED, accumulator, contiguous

# ---------------------------------------------------------------------------------------------------
# helpers shared with pool_bn


@triton.jit
def _tile(c, n0, hw0, C, HW, N, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and mask of samples ``n0 ...`` x pixels ``hw0 ...`` of channel ``c`` in ``[N, C, HW]``."""
    n = n0 + tl.arange(0, BLOCK_N)
    hw = hw0 + tl.arange(0, BLOCK_HW)
    offsets = ((n.to(tl.int64) * C + c) * HW)[:, None] + hw[None, :]
    return offsets, (n < N)[:, None] & (hw < HW)[None, :]


@triton.jit
def exact(hi, lo):
    """A Python float passed as :func:`float_parts`, in float64."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def shifted_moments(count, shift, sum_d, sum_d2):
    """Float64 ``(count, mean, M2)`` of ``count`` values from the sums of ``d = x - shift`` and ``d^2``
    (tensors of per-thread sums)."""
    s1 = tl.sum(sum_d)
    mean_d = s1 / tl.maximum(count, 1.0)
    return count, shift + mean_d, tl.maximum(tl.sum(sum_d2) - s1 * mean_d, 0.0)


@triton.jit
def combine_moments(part_ptr, c, S, eps, S_BLOCK: tl.constexpr):
    """Float64 ``(mean, M2, count, 1 / sqrt(var + eps))`` of channel ``c`` from its ``S`` partial triples."""
    k = tl.arange(0, S_BLOCK)
    kmask = k < S
    base = (c * S + k) * 3
    counts = tl.load(part_ptr + base, mask=kmask, other=0.0)
    means = tl.load(part_ptr + base + 1, mask=kmask, other=0.0)
    m2s = tl.load(part_ptr + base + 2, mask=kmask, other=0.0)
    n = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / n
    d = means - mean
    m2 = tl.sum(m2s + counts * d * d, axis=0)
    return mean, m2, n, 1.0 / tl.sqrt(m2 / n + eps)


@triton.jit
def combine_sums(part_ptr, c, S, L, S_BLOCK: tl.constexpr):
    """Float64 ``mean(g)`` and ``mean(g * y)`` of channel ``c`` (``L`` values) from its ``S`` partial
    pairs of :func:`channel_sums_kernel`."""
    k = tl.arange(0, S_BLOCK)
    kmask = k < S
    base = (c * S + k) * 2
    return (tl.sum(tl.load(part_ptr + base, mask=kmask, other=0.0), axis=0) / L,
            tl.sum(tl.load(part_ptr + base + 1, mask=kmask, other=0.0), axis=0) / L)


@triton.jit
def update_running_stats(rmean_ptr, rvar_ptr, c, mean, m2, n, momentum_hi, momentum_lo):
    """``BatchNorm2d``'s update; the running variance takes the unbiased batch variance."""
    momentum = exact(momentum_hi, momentum_lo)
    rm = tl.load(rmean_ptr + c).to(tl.float64)
    rv = tl.load(rvar_ptr + c).to(tl.float64)
    unbiased = m2 / tl.maximum(n - 1.0, 1.0)
    tl.store(rmean_ptr + c, ((1.0 - momentum) * rm + momentum * mean).to(rmean_ptr.dtype.element_ty))
    tl.store(rvar_ptr + c, ((1.0 - momentum) * rv + momentum * unbiased).to(rvar_ptr.dtype.element_ty))


@triton.jit
def channel_sums_kernel(g_ptr, y_ptr, part_ptr, C, HW, N, CHUNK_N, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Each ``(channel, chunk)`` program's float64 sums of ``g`` and ``g * y``: the reductions of a
    train-mode batch norm's backward."""
    c = tl.program_id(0)
    s = tl.program_id(1)
    sum_g = tl.zeros([BLOCK_N, BLOCK_HW], tl.float64)
    sum_gy = tl.zeros([BLOCK_N, BLOCK_HW], tl.float64)
    for n0 in range(s * CHUNK_N, (s + 1) * CHUNK_N, BLOCK_N):
        for hw0 in range(0, HW, BLOCK_HW):
            offsets, mask = _tile(c, n0, hw0, C, HW, N, BLOCK_N, BLOCK_HW)
            g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
            sum_g += g
            sum_gy += g * tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    base = (c * tl.num_programs(1) + s) * 2
    tl.store(part_ptr + base, tl.sum(sum_g))
    tl.store(part_ptr + base + 1, tl.sum(sum_gy))


def float_parts(value: float) -> tuple[float, float]:
    """``value`` as two float32 numbers whose sum keeps about 48 bits: Triton passes Python floats as
    float32, which would round eps and momentum for the float64 statistics."""
    hi = struct.unpack("f", struct.pack("f", value))[0]  # a tenth of a microsecond, no tensor
    return hi, value - hi


MAX_CHUNKS = 256
NUM_WARPS = 8  # 8 elements of a 2,048-element tile per thread: the float64 sums fit in 64 registers


def tiles(N: int, C: int, HW: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_HW, CHUNK_N, chunks)`` for ``(channel, chunk)`` programs over ``[N, C, HW]``:
    tiles of ``BLOCK_N`` samples x ``BLOCK_HW`` pixels (whole rows where they fit), ``CHUNK_N``
    samples per program. Tests replace it to run many small tiles under the interpreter."""
    if INTERPRETED:  # every program costs milliseconds of Python: few, large ones
        block_hw = min(triton.next_power_of_2(HW), 1 << 14)
        block_n = min(triton.next_power_of_2(N), max(1, (1 << 14) // block_hw))
        return block_n, block_hw, block_n, triton.cdiv(N, block_n)
    block_hw = min(triton.next_power_of_2(HW), 1024)
    block_n = min(triton.next_power_of_2(N), max(1, 2048 // block_hw))
    tiles_per_channel = triton.cdiv(N, block_n)
    # Up to 4 tiles per program (fewer partials to combine) while that leaves 2,048 programs or more,
    # and never more than MAX_CHUNKS programs per channel: every program reads all of its channel's partials.
    per_program = max(1, min(4, C * tiles_per_channel // 2048), triton.cdiv(tiles_per_channel, MAX_CHUNKS))
    chunk_n = block_n * per_program
    return block_n, block_hw, chunk_n, triton.cdiv(N, chunk_n)


# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _moments_kernel(x_ptr, part_ptr, C, HW, N, CHUNK_N, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    shift = tl.load(x_ptr + c * HW).to(tl.float64)
    sum_d = tl.zeros([BLOCK_N, BLOCK_HW], tl.float64)
    sum_d2 = tl.zeros([BLOCK_N, BLOCK_HW], tl.float64)
    for n0 in range(s * CHUNK_N, (s + 1) * CHUNK_N, BLOCK_N):
        for hw0 in range(0, HW, BLOCK_HW):
            offsets, mask = _tile(c, n0, hw0, C, HW, N, BLOCK_N, BLOCK_HW)
            d = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float64) - shift, 0.0)
            sum_d += d
            sum_d2 += d * d
    count = ((tl.minimum(N, (s + 1) * CHUNK_N) - s * CHUNK_N) * HW).to(tl.float64)
    count, mean, m2 = shifted_moments(count, shift, sum_d, sum_d2)
    base = (c * tl.num_programs(1) + s) * 3
    tl.store(part_ptr + base, count)
    tl.store(part_ptr + base + 1, mean)
    tl.store(part_ptr + base + 2, m2)


@triton.jit
def _normalise_kernel(x_ptr, y_ptr, part_ptr, invstd_ptr, rmean_ptr, rvar_ptr, momentum_hi, momentum_lo, eps_hi, eps_lo,
                      C, HW, N, CHUNK_N, S, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr,
                      S_BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    mean, m2, n, invstd = combine_moments(part_ptr, c, S, exact(eps_hi, eps_lo), S_BLOCK)
    if s == 0:
        update_running_stats(rmean_ptr, rvar_ptr, c, mean, m2, n, momentum_hi, momentum_lo)
        tl.store(invstd_ptr + c, invstd.to(invstd_ptr.dtype.element_ty))
    mean = mean.to(ACC)
    invstd = invstd.to(ACC)
    for n0 in range(s * CHUNK_N, (s + 1) * CHUNK_N, BLOCK_N):
        for hw0 in range(0, HW, BLOCK_HW):
            offsets, mask = _tile(c, n0, hw0, C, HW, N, BLOCK_N, BLOCK_HW)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
            tl.store(y_ptr + offsets, ((x - mean) * invstd).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(g_ptr, y_ptr, part_ptr, invstd_ptr, gx_ptr, C, HW, N, L, CHUNK_N, S, ACC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr, S_BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    mean_g, mean_gy = combine_sums(part_ptr, c, S, L, S_BLOCK)
    mean_g = mean_g.to(ACC)
    mean_gy = mean_gy.to(ACC)
    invstd = tl.load(invstd_ptr + c).to(ACC)
    for n0 in range(s * CHUNK_N, (s + 1) * CHUNK_N, BLOCK_N):
        for hw0 in range(0, HW, BLOCK_HW):
            offsets, mask = _tile(c, n0, hw0, C, HW, N, BLOCK_N, BLOCK_HW)
            g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(ACC)
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(ACC)
            gx = invstd * (g - mean_g - y * mean_gy)
            tl.store(gx_ptr + offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# launchers and torch.library ops


def _launch_forward(x, running_mean, running_var, momentum, eps):
    x = contiguous(x)
    N, C, H, W = x.shape
    acc, acc_torch = accumulator(x)
    block_n, block_hw, chunk_n, chunks = tiles(N, C, H * W)
    shape = dict(BLOCK_N=block_n, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    part = torch.empty(C, chunks, 3, device=x.device, dtype=torch.float64)
    _moments_kernel[(C, chunks)](x, part, C, H * W, N, chunk_n, **shape)
    y = torch.empty_like(x)
    invstd = torch.empty(C, device=x.device, dtype=acc_torch)
    # The kernel indexes the running statistics as contiguous vectors (a strided view is updated through a copy).
    mean, var = contiguous(running_mean), contiguous(running_var)
    _normalise_kernel[(C, chunks)](x, y, part, invstd, mean, var, *float_parts(momentum), *float_parts(eps),
                                   C, H * W, N, chunk_n, chunks, ACC=acc, S_BLOCK=triton.next_power_of_2(chunks),
                                   **shape)
    for running, updated in ((running_mean, mean), (running_var, var)):
        if updated is not running:
            running.copy_(updated)
    return y, invstd


def _launch_backward(grad, y, invstd):
    grad = contiguous(grad)
    N, C, H, W = y.shape
    block_n, block_hw, chunk_n, chunks = tiles(N, C, H * W)
    shape = dict(BLOCK_N=block_n, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    part = torch.empty(C, chunks, 2, device=y.device, dtype=torch.float64)
    channel_sums_kernel[(C, chunks)](grad, y, part, C, H * W, N, chunk_n, **shape)
    gx = torch.empty_like(y)
    _grad_kernel[(C, chunks)](grad, y, part, invstd, gx, C, H * W, N, N * H * W, chunk_n, chunks,
                              ACC=accumulator(y)[0], S_BLOCK=triton.next_power_of_2(chunks), **shape)
    return gx


@torch.library.custom_op("dsrna_triton::batch_norm_train_forward", mutates_args=("running_mean", "running_var"))
def batch_norm_forward_op(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, invstd)`` of a train-mode batch norm without affine parameters (``y`` contiguous);
    updates the running statistics."""
    with backend.device_scope(x.device):
        return _launch_forward(x, running_mean, running_var, momentum, eps)


@batch_norm_forward_op.register_fake
def _(x, running_mean, running_var, momentum, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[1], dtype=accumulator(x)[1])


@torch.library.custom_op("dsrna_triton::batch_norm_train_backward", mutates_args=())
def batch_norm_backward_op(grad: torch.Tensor, y: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """Gradient to the input from the output ``y`` (contiguous) and ``invstd``."""
    with backend.device_scope(y.device):
        return _launch_backward(grad, y, invstd)


@batch_norm_backward_op.register_fake
def _(grad, y, invstd):
    return torch.empty_like(y)


def batch_norm_train_triton(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float,
                            eps: float) -> torch.Tensor:
    """The ``triton`` implementation of :func:`dsrna.ops.batch_norm_train` (same arguments)."""
    return batch_norm_train_keep_output(x, running_mean, running_var, momentum, eps,
                                        kernels=(batch_norm_forward_op, batch_norm_backward_op))


backend.register("batch_norm_train", "triton", batch_norm_train_triton, devices=("cuda", "cpu"))
