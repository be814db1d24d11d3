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


def depthwise_conv2d_transpose_reference(grad_out: torch.Tensor, weight: torch.Tensor, input_hw: tuple[int, int],
                                         stride: int, padding: int, dilation: int) -> torch.Tensor:
    """The transposed map of :func:`depthwise_conv2d_reference` (its gradient to the input), taking
    ``grad_out`` of shape ``[N, C, H_out, W_out]`` back to ``[N, C, *input_hw]``. The CROWN backward
    step pushes linear bounds through depthwise convs with it. Differentiable twice."""
    k = weight.shape[-1]
    extra = [input_hw[i] - ((grad_out.shape[2 + i] - 1) * stride - 2 * padding + dilation * (k - 1) + 1) for i in range(2)]
    return F.conv_transpose2d(grad_out, weight, None, stride, padding, tuple(extra), groups=grad_out.shape[1], dilation=dilation)


backend.register("depthwise_conv2d_transpose", "reference", depthwise_conv2d_transpose_reference)


def depthwise_conv2d_transpose(grad_out, weight, input_hw, stride=1, padding=0, dilation=1, backend_name=None):
    return backend.dispatch("depthwise_conv2d_transpose", grad_out.device, backend_name)(
        grad_out, weight, tuple(input_hw), stride, padding, dilation)
