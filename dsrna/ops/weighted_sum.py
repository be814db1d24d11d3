"""Weighted sum of same-shaped tensors: ``sum_i w[i] * xs[i]``.

This is the arithmetic of the mixed op and of a DARTS node: the cell hands over every candidate
output of every incoming edge together with its softmax weight, so one call computes a node.

The native implementation is the op ``torch.ops.dsrna.weighted_sum`` of :mod:`dsrna._C`. Its
gradient to ``w`` is a second op, ``batched_dot`` (``<xs[i], g>`` for every i in one pass), and the
backward of each op (registered in C++, csrc/ops.cpp) is written with the two ops and scaling, so
every order of derivative (the Jacobian architecture step needs double backward) stays on them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from dsrna import _native, backend


def weighted_sum_reference(xs: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin, the source of truth. ``w`` is a 1-D tensor with ``len(xs)`` entries."""
    # One unbind, not a select per term: its backward is one stack, where each select's backward
    # would be a zero fill and a copy (two kernels per term on a GPU).
    ws = w.unbind(0)
    out = xs[0] * ws[0]
    for i in range(1, len(xs)):
        out = out + xs[i] * ws[i]
    return out


backend.register("weighted_sum", "reference", weighted_sum_reference)


def check_same_shapes(op: str, tensors: Sequence[torch.Tensor], shape) -> None:
    """Every tensor of ``shape`` and on the first one's device: the public ops check this once, with one
    message for every backend, before any kernel runs (the fast kernels index flat memory and would
    read past a smaller, broadcastable operand)."""
    device = tensors[0].device
    for t in tensors:
        if t.shape != shape or t.device != device:
            raise ValueError(f"{op}: tensors must have the same shape and device, got {tuple(shape)} on "
                             f"{device} and {tuple(t.shape)} on {t.device}")


def weighted_sum(xs: Sequence[torch.Tensor], w: torch.Tensor, backend_name: str | None = None) -> torch.Tensor:
    """``sum_i w[i] * xs[i]`` on the selected backend; differentiable twice in ``xs`` and ``w``."""
    if len(xs) != w.numel():
        raise ValueError(f"weighted_sum: {len(xs)} tensors but {w.numel()} weights")
    check_same_shapes("weighted_sum", xs, xs[0].shape)
    return backend.dispatch("weighted_sum", xs[0].device, backend_name)(list(xs), w)


# --- native ------------------------------------------------------------------------------------------


def weighted_sum_native(xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """``torch.ops.dsrna.weighted_sum``. The kernel takes one dtype; mixed inputs (bf16 conv outputs
    beside fp32 skips under autocast) are promoted first, as the reference's arithmetic does."""
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    xs = [x if x.dtype == dtype else x.to(dtype) for x in xs]
    return torch.ops.dsrna.weighted_sum(xs, w)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_native_fakes() -> None:
    """Shapes for torch.compile and opcheck; the autograd formulas are registered in C++ (csrc/ops.cpp)."""

    @torch.library.register_fake("dsrna::weighted_sum")
    def _(xs, w):
        return torch.empty_like(xs[0], memory_format=torch.contiguous_format)

    @torch.library.register_fake("dsrna::batched_dot")
    def _(xs, g):
        return g.new_empty((len(xs),), dtype=_accumulator_dtype(g.dtype))


if _native.C is not None:
    _register_native_fakes()
# Registered even without the extension, so that `dsrna info` and an explicit request for the
# native backend say why it cannot run (dsrna.backend.backend_status).
backend.register("weighted_sum", "native", weighted_sum_native)
