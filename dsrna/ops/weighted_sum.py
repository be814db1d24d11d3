"""Weighted sum of same-shaped tensors: ``sum_i w[i] * xs[i]``.

This is the arithmetic of the mixed op and of a DARTS node: the cell hands over every candidate
output of every incoming edge together with its softmax weight, so one call computes a node.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dsrna import backend


def weighted_sum_reference(xs: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin, the source of truth. ``w`` is a 1-D tensor with ``len(xs)`` entries."""
    out = xs[0] * w[0]
    for i in range(1, len(xs)):
        out = out + xs[i] * w[i]
    return out


backend.register("weighted_sum", "reference", weighted_sum_reference)


def weighted_sum(xs: Sequence[torch.Tensor], w: torch.Tensor, backend_name: str | None = None) -> torch.Tensor:
    """``sum_i w[i] * xs[i]`` on the selected backend; differentiable twice in ``xs`` and ``w``."""
    if len(xs) != w.numel():
        raise ValueError(f"weighted_sum: {len(xs)} tensors but {w.numel()} weights")
    return backend.dispatch("weighted_sum", xs[0].device, backend_name)(list(xs), w)
