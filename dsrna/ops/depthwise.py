"""Depthwise convolution (``groups == channels``) of the DARTS family: kernel 3 and 5, dilation 1
and 2, stride 1 and 2. cuDNN has no fast path for its double backward, which dominates the
DSRNA-Jacobian architecture step; the native backend supplies one.

The native implementation is three ops of :mod:`dsrna._C` closed under differentiation:
``depthwise_conv2d`` (forward), ``depthwise_conv2d_transpose`` (its gradient to the input, and the
transposed map the CROWN backward step pushes bounds through) and ``depthwise_conv2d_weight`` (its
gradient to the weight). All three are bilinear, so the backward of each is two of the three: every
order of derivative runs on the same kernels. ``interval_depthwise_conv2d`` (interval bound
propagation through the conv) is a fourth op whose backward uses the first three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsrna import _native, backend


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


# --- native ------------------------------------------------------------------------------------------


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast like ``F.conv2d`` does under autocast (the kernels take one dtype)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def depthwise_conv2d_native(x, weight, stride, padding, dilation):
    x, weight = _autocast(x, weight)
    return torch.ops.dsrna.depthwise_conv2d(x, weight, stride, padding, dilation)


def depthwise_conv2d_transpose_native(grad_out, weight, input_hw, stride, padding, dilation):
    grad_out, weight = _autocast(grad_out, weight)
    return torch.ops.dsrna.depthwise_conv2d_transpose(grad_out, weight, list(input_hw), stride, padding, dilation)


def interval_depthwise_conv2d_native(lower, upper, weight, stride, padding, dilation):
    """Both bounds in one pass over ``[lower, upper]``; same contract as
    :func:`dsrna.ops.bound_ops.interval_depthwise_conv2d_reference`."""
    return torch.ops.dsrna.interval_depthwise_conv2d(lower, upper, weight, stride, padding, dilation)


def _output_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _register_native_fakes() -> None:
    """Shapes for torch.compile and opcheck; the autograd formulas are registered in C++ (csrc/ops.cpp)."""

    @torch.library.register_fake("dsrna::depthwise_conv2d")
    def _(x, weight, stride, padding, dilation):
        k = weight.shape[-1]
        n, c, h, w = x.shape
        return x.new_empty((n, c, _output_size(h, k, stride, padding, dilation), _output_size(w, k, stride, padding, dilation)))

    @torch.library.register_fake("dsrna::depthwise_conv2d_transpose")
    def _(grad_out, weight, input_hw, stride, padding, dilation):
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], input_hw[0], input_hw[1]))

    @torch.library.register_fake("dsrna::depthwise_conv2d_weight")
    def _(x, grad_out, kernel_size, stride, padding, dilation):
        return x.new_empty((x.shape[1], 1, kernel_size, kernel_size))

    @torch.library.register_fake("dsrna::interval_depthwise_conv2d")
    def _(lower, upper, weight, stride, padding, dilation):
        k = weight.shape[-1]
        n, c, h, w = lower.shape
        shape = (n, c, _output_size(h, k, stride, padding, dilation), _output_size(w, k, stride, padding, dilation))
        return lower.new_empty(shape), lower.new_empty(shape)


if _native.C is not None:
    _register_native_fakes()
# Registered even without the extension, so that `dsrna info` and an explicit request for the
# native backend say why it cannot run (dsrna.backend.backend_status).
backend.register("depthwise_conv2d", "native", depthwise_conv2d_native)
backend.register("depthwise_conv2d_transpose", "native", depthwise_conv2d_transpose_native)
backend.register("interval_depthwise_conv2d", "native", interval_depthwise_conv2d_native)
