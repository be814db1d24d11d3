"""The hot primitives of bound propagation, with their pure-PyTorch references.

The bound engine (:mod:`dsrna.bounds`) calls these through :func:`dsrna.backend.dispatch`, so the
Triton and native fast versions plug in underneath. The references are the source of truth and
must stay differentiable (R_CB is maximised through them) in the weights, the architecture
weights ``w`` and the bounds themselves.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dsrna import _native, backend
from dsrna.ops.weighted_sum import check_same_shapes, weighted_sum_native

RELU_MODES = ("adaptive", "fast-lin")


def interval_weighted_sum_reference(lowers: Sequence[torch.Tensor], uppers: Sequence[torch.Tensor],
                                    w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval of ``sum_i w[i] * x_i`` for ``lowers[i] <= x_i <= uppers[i]``; needs ``w >= 0``
    (softmax weights), so lower maps to lower and upper to upper."""
    lower = lowers[0] * w[0]
    upper = uppers[0] * w[0]
    for i in range(1, len(lowers)):
        lower = lower + lowers[i] * w[i]
        upper = upper + uppers[i] * w[i]
    return lower, upper


def relu_relaxation_reference(lower: torch.Tensor, upper: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear relaxation of ReLU on ``[lower, upper]``, elementwise:
    ``lower_slope * z <= relu(z) <= upper_slope * z + upper_intercept``.

    Exact for stable neurons (``l >= 0``: identity; ``u <= 0``: zero). For unstable ones the upper
    line is the chord ``u (z - l) / (u - l)``; the lower slope is 1 if ``u > -l`` else 0 (CROWN's
    adaptive choice, piecewise constant hence detached) or ``u / (u - l)`` (Fast-Lin).
    """
    if mode not in RELU_MODES:
        raise ValueError(f"unknown ReLU relaxation {mode!r}; choose one of {', '.join(RELU_MODES)}")
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    # A safe denominator keeps the gradient finite where the chord is not used.
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    chord = upper / width
    upper_slope = torch.where(unstable, chord, active.to(lower.dtype))
    upper_intercept = torch.where(unstable, -lower * chord, torch.zeros_like(lower))
    if mode == "adaptive":
        unstable_slope = (upper > -lower).to(lower.dtype)
    else:
        unstable_slope = chord
    lower_slope = torch.where(unstable, unstable_slope, active.to(lower.dtype))
    return lower_slope, upper_slope, upper_intercept


def crown_relu_backward_reference(A: torch.Tensor, lower_slope: torch.Tensor, upper_slope: torch.Tensor,
                                  upper_intercept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One lower-bound CROWN step through ReLU: ``A`` is ``[B, S, *shape]``, the relaxation
    ``[B, *shape]``. Positive coefficients take the lower line, negative ones the upper line.
    Returns ``A_out`` (same shape as ``A``) and the bias ``[B, S]``. At ``A == 0`` no gradient
    reaches ``A`` (``clamp``'s subgradient there differs between torch versions and devices)."""
    positive, negative = torch.where(A > 0, A, 0.0), torch.where(A < 0, A, 0.0)
    A_out = positive * lower_slope.unsqueeze(1) + negative * upper_slope.unsqueeze(1)
    bias = (negative * upper_intercept.unsqueeze(1)).flatten(2).sum(-1)
    return A_out, bias


def interval_depthwise_conv2d_reference(lower: torch.Tensor, upper: torch.Tensor, weight: torch.Tensor, stride: int,
                                        padding: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval of a depthwise conv (``weight`` ``[C, 1, k, k]``, no bias): the centre goes
    through ``W``, the radius through ``|W|``."""
    groups = lower.shape[1]
    centre = F.conv2d((upper + lower) / 2, weight, None, stride, padding, dilation, groups)
    radius = F.conv2d((upper - lower) / 2, weight.abs(), None, stride, padding, dilation, groups)
    return centre - radius, centre + radius


def interval_weighted_sum_native(lowers: Sequence[torch.Tensor], uppers: Sequence[torch.Tensor],
                                 w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two native weighted sums, one per bound (``w >= 0``, so lower maps to lower): one pass over
    each bound's terms instead of two elementwise ops per term."""
    return weighted_sum_native(list(lowers), w), weighted_sum_native(list(uppers), w)


def crown_relu_backward_native(A: torch.Tensor, lower_slope: torch.Tensor, upper_slope: torch.Tensor,
                               upper_intercept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.dsrna.crown_relu_backward``: one pass over ``A`` on the CPU (the GPU has Triton's)."""
    return torch.ops.dsrna.crown_relu_backward(A, lower_slope, upper_slope, upper_intercept)


if _native.C is not None:
    @torch.library.register_fake("dsrna::crown_relu_backward")
    def _(A, lower_slope, upper_slope, upper_intercept):
        return torch.empty_like(A, memory_format=torch.contiguous_format), A.new_empty(A.shape[:2])


backend.register("interval_weighted_sum", "reference", interval_weighted_sum_reference)
backend.register("interval_weighted_sum", "native", interval_weighted_sum_native)
backend.register("relu_relaxation", "reference", relu_relaxation_reference)
backend.register("crown_relu_backward", "reference", crown_relu_backward_reference)
backend.register("crown_relu_backward", "native", crown_relu_backward_native, devices=("cpu",))
backend.register("interval_depthwise_conv2d", "reference", interval_depthwise_conv2d_reference)


def interval_weighted_sum(lowers, uppers, w, backend_name=None):
    if not len(lowers) == len(uppers) == w.numel():
        raise ValueError(f"interval_weighted_sum: {len(lowers)} lower and {len(uppers)} upper bounds but {w.numel()} weights")
    check_same_shapes("interval_weighted_sum", [*lowers, *uppers], lowers[0].shape)
    return backend.dispatch("interval_weighted_sum", lowers[0].device, backend_name)(list(lowers), list(uppers), w)


def relu_relaxation(lower, upper, mode="adaptive", backend_name=None):
    check_same_shapes("relu_relaxation", [lower, upper], lower.shape)
    return backend.dispatch("relu_relaxation", lower.device, backend_name)(lower, upper, mode)


def crown_relu_backward(A, lower_slope, upper_slope, upper_intercept, backend_name=None):
    """``A`` is ``[B, S, *shape]``; the relaxation ``[B, *shape]`` (see the reference)."""
    check_same_shapes("crown_relu_backward (the relaxation, [B, *shape] of A [B, S, *shape])",
                      [lower_slope, upper_slope, upper_intercept], (A.shape[0], *A.shape[2:]))
    return backend.dispatch("crown_relu_backward", A.device, backend_name)(A, lower_slope, upper_slope, upper_intercept)


def interval_depthwise_conv2d(lower, upper, weight, stride=1, padding=0, dilation=1, backend_name=None):
    return backend.dispatch("interval_depthwise_conv2d", lower.device, backend_name)(lower, upper, weight, stride, padding, dilation)
