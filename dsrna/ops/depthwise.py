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


def _check_native_args(op: str, x: torch.Tensor, weight: torch.Tensor, hw, stride, padding, dilation) -> None:
    """The native kernels' own argument checks, raised here first: on torch 2.11 an error raised by a C++
    kernel under a Python-registered autograd formula crashes the process (a segfault in
    ``OpOverload.redispatch``, seen on the GPU machine) instead of raising."""
    if x.dim() != 4:
        raise ValueError(f"dsrna::{op}: input must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"dsrna::{op}: weight must be [C, 1, k, k] with C = {x.shape[1]}, got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device or not x.is_floating_point():
        raise ValueError(f"dsrna::{op}: input and weight must be floating point with one dtype and device, "
                         f"got {x.dtype} on {x.device} and {weight.dtype} on {weight.device}")
    if stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(f"dsrna::{op}: need stride >= 1, dilation >= 1, padding >= 0, got {stride}, {dilation}, {padding}")
    k = weight.shape[2]
    if min(_output_size(size, k, stride, padding, dilation) for size in hw) < 1:
        raise ValueError(f"dsrna::{op}: the {k}x{k} kernel (dilation {dilation}, padding {padding}) does not fit a "
                         f"{hw[0]}x{hw[1]} input")


def depthwise_conv2d_native(x, weight, stride, padding, dilation):
    x, weight = _autocast(x, weight)
    _check_native_args("depthwise_conv2d", x, weight, x.shape[2:], stride, padding, dilation)
    return torch.ops.dsrna.depthwise_conv2d(x, weight, stride, padding, dilation)


def depthwise_conv2d_transpose_native(grad_out, weight, input_hw, stride, padding, dilation):
    grad_out, weight = _autocast(grad_out, weight)
    _check_native_args("depthwise_conv2d_transpose", grad_out, weight, input_hw, stride, padding, dilation)
    return torch.ops.dsrna.depthwise_conv2d_transpose(grad_out, weight, list(input_hw), stride, padding, dilation)


def interval_depthwise_conv2d_native(lower, upper, weight, stride, padding, dilation):
    """Both bounds in one pass over ``[lower, upper]``; same contract as
    :func:`dsrna.ops.bound_ops.interval_depthwise_conv2d_reference`."""
    _check_native_args("interval_depthwise_conv2d", lower, weight, lower.shape[2:], stride, padding, dilation)
    return torch.ops.dsrna.interval_depthwise_conv2d(lower, upper, weight, stride, padding, dilation)


def _output_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _register_native_autograd() -> None:
    ops = torch.ops.dsrna

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

    # y = conv(x, W): dx = conv_transpose(dy, W), dW = weight_grad(x, dy).
    def forward_setup(ctx, inputs, output):
        x, weight, stride, padding, dilation = inputs
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(x, weight)

    def forward_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.depthwise_conv2d_transpose(grad, weight, list(x.shape[-2:]), *ctx.geometry)
        if ctx.needs_input_grad[1]:
            grad_w = ops.depthwise_conv2d_weight(x, grad, weight.shape[-1], *ctx.geometry)
        return grad_x, grad_w, None, None, None

    # z = conv_transpose(g, W): dg = conv(dz, W), dW = weight_grad(dz, g).
    def transpose_setup(ctx, inputs, output):
        grad_out, weight, input_hw, stride, padding, dilation = inputs
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(grad_out, weight)

    def transpose_backward(ctx, grad):
        grad_out, weight = ctx.saved_tensors
        d_grad_out = d_weight = None
        if ctx.needs_input_grad[0]:
            d_grad_out = ops.depthwise_conv2d(grad, weight, *ctx.geometry)
        if ctx.needs_input_grad[1]:
            d_weight = ops.depthwise_conv2d_weight(grad, grad_out, weight.shape[-1], *ctx.geometry)
        return d_grad_out, d_weight, None, None, None, None

    # gW = weight_grad(x, g): dx = conv_transpose(g, dgW), dg = conv(x, dgW).
    def weight_setup(ctx, inputs, output):
        x, grad_out, kernel_size, stride, padding, dilation = inputs
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(x, grad_out)

    def weight_backward(ctx, grad):
        x, grad_out = ctx.saved_tensors
        d_x = d_grad_out = None
        if ctx.needs_input_grad[0]:
            d_x = ops.depthwise_conv2d_transpose(grad_out, grad, list(x.shape[-2:]), *ctx.geometry)
        if ctx.needs_input_grad[1]:
            d_grad_out = ops.depthwise_conv2d(x, grad, *ctx.geometry)
        return d_x, d_grad_out, None, None, None, None

    # lower' = c - r, upper' = c + r with c = conv((l+u)/2, W), r = conv((u-l)/2, |W|).
    def interval_setup(ctx, inputs, output):
        lower, upper, weight, stride, padding, dilation = inputs
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(lower, upper, weight)

    def interval_backward(ctx, grad_lower, grad_upper):
        lower, upper, weight = ctx.saved_tensors
        grad_centre = grad_lower + grad_upper
        grad_radius = grad_upper - grad_lower
        d_lower = d_upper = d_weight = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            hw = list(lower.shape[-2:])
            d_centre = ops.depthwise_conv2d_transpose(grad_centre, weight, hw, *ctx.geometry)
            d_radius = ops.depthwise_conv2d_transpose(grad_radius, weight.abs(), hw, *ctx.geometry)
            d_lower = (d_centre - d_radius) / 2
            d_upper = (d_centre + d_radius) / 2
        if ctx.needs_input_grad[2]:
            k = weight.shape[-1]
            centre, radius = (upper + lower) / 2, (upper - lower) / 2
            d_weight = (ops.depthwise_conv2d_weight(centre, grad_centre, k, *ctx.geometry)
                        + weight.sign() * ops.depthwise_conv2d_weight(radius, grad_radius, k, *ctx.geometry))
        return d_lower, d_upper, d_weight, None, None, None

    torch.library.register_autograd("dsrna::depthwise_conv2d", forward_backward, setup_context=forward_setup)
    torch.library.register_autograd("dsrna::depthwise_conv2d_transpose", transpose_backward, setup_context=transpose_setup)
    torch.library.register_autograd("dsrna::depthwise_conv2d_weight", weight_backward, setup_context=weight_setup)
    torch.library.register_autograd("dsrna::interval_depthwise_conv2d", interval_backward, setup_context=interval_setup)


if _native.C is not None:
    _register_native_autograd()
# Registered even without the extension, so that `dsrna info` and an explicit request for the
# native backend say why it cannot run (dsrna.backend.backend_status).
backend.register("depthwise_conv2d", "native", depthwise_conv2d_native)
backend.register("depthwise_conv2d_transpose", "native", depthwise_conv2d_transpose_native)
backend.register("interval_depthwise_conv2d", "native", interval_depthwise_conv2d_native)
