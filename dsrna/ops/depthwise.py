"""Depthwise convolution (``groups == channels``) of the DARTS family: kernel 3 and 5, dilation 1
and 2, stride 1 and 2. cuDNN has no fast path for its double backward, which dominates the
DSRNA-Jacobian architecture step; the native backend supplies one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsrna import backend


def depthwise_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Pure-PyTorch twin. ``weight``: ``[C, 1, k, k]``."""
    return F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])


backend.register("depthwise_conv2d", "reference", depthwise_conv2d_reference)


def depthwise_conv2d(x, weight, stride=1, padding=0, dilation=1, backend_name=None):
    return backend.dispatch("depthwise_conv2d", x.device, backend_name)(x, weight, stride, padding, dilation)
