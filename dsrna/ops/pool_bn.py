"""3x3 max or average pooling (padding 1, average without padded zeros) fused with the super-network's
``BatchNorm2d(affine=False)``: batch statistics, normalisation and the running-statistics update in
train mode, running statistics in eval mode, exactly as the two modules in sequence.

The fused versions save no pooled tensor and no int64 argmax (only the output, the per-channel
statistics and, for max pooling, a one-byte window offset) and recompute the pooling in backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna import backend

POOL_KINDS = ("max", "avg")


def pool3x3(x: torch.Tensor, kind: str, stride: int) -> torch.Tensor:
    """The super-network's 3x3 pooling, padding 1; average pooling ignores the padded zeros."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride, 1)
    return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)


def pool_bn_reference(x: torch.Tensor, kind: str, stride: int, running_mean: torch.Tensor, running_var: torch.Tensor,
                      num_batches_tracked: torch.Tensor, training: bool, momentum: float, eps: float) -> torch.Tensor:
    """Pure-PyTorch twin: ``BatchNorm2d(affine=False)(pool(x))`` with the module's bookkeeping
    (``num_batches_tracked`` counts train-mode calls; the running variance is unbiased)."""
    if training:
        num_batches_tracked.add_(1)
    return F.batch_norm(pool3x3(x, kind, stride), running_mean, running_var, None, None, training, momentum, eps)


backend.register("pool_bn", "reference", pool_bn_reference)


def pool_bn(x: torch.Tensor, kind: str, stride: int, bn: nn.BatchNorm2d, backend_name: str | None = None) -> torch.Tensor:
    """``bn(pool(x))`` for a ``BatchNorm2d(affine=False)`` with running statistics and a momentum,
    in train or eval mode as ``bn`` is, on the selected backend. Differentiable twice."""
    if kind not in POOL_KINDS:
        raise ValueError(f"unknown pool kind {kind!r}; choose one of {', '.join(POOL_KINDS)}")
    if stride not in (1, 2):
        raise ValueError(f"pool_bn: stride must be 1 or 2, got {stride}")
    if bn.affine or not bn.track_running_stats or bn.momentum is None:
        raise ValueError("pool_bn needs BatchNorm2d(affine=False) with running statistics and a float momentum")
    return backend.dispatch("pool_bn", x.device, backend_name)(
        x, kind, stride, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.training, float(bn.momentum), float(bn.eps))
