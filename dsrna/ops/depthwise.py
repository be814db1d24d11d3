"""Depthwise convolution (``groups == channels``) of the DARTS family: kernel 3 and 5, dilation 1
and 2, stride 1 and 2. cuDNN has no fast path for its double backward, which dominates the
DSRNA-Jacobian architecture step; the native backend supplies one.

The native implementation is three ops of :mod:`dsrna._C` closed under differentiation:
``depthwise_conv2d`` (forward), ``depthwise_conv2d_transpose`` (its gradient to the input, and the
transposed map the CROWN backward step pushes bounds through) and ``depthwise_conv2d_weight`` (its
gradient to the weight). All three are bilinear, so the backward of each is two of the three: every
order of derivative runs on the same kernels. ``interval_depthwise_conv2d`` (interval bound
propagation through the conv) is a fourth op whose backward uses the first three.

``depthwise_conv2d_stack`` runs several depthwise convs (kernel sizes, paddings and dilations may
differ; one stride, one output size) of one input and stacks their outputs along the channels; it is
closed under differentiation with ``depthwise_conv2d_stack_transpose`` (the sum of their transposed
convs) and ``depthwise_conv2d_stack_weight`` in the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dsrna import _native, backend
from dsrna.ops.bound_ops import interval_depthwise_conv2d_reference


KERNEL_SIZES = (3, 5)  # the DARTS family's, which the native kernels cover on every device (CUDA: only these)


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


# --- several depthwise convs of one input, channel-stacked ------------------------------------------


def depthwise_conv2d_stack_reference(x: torch.Tensor, weights: Sequence[torch.Tensor], stride: int,
                                     paddings: Sequence[int], dilations: Sequence[int]) -> torch.Tensor:
    """Pure-PyTorch twin of the stacked convs: ``weights[t]`` is ``[M, C, k_t, k_t]``, M convs of kernel
    ``k_t`` (padding ``paddings[t]``, dilation ``dilations[t]``) of the C channels of ``x``; output
    ``[N, T*M*C, Ho, Wo]`` with conv ``(t, m)`` in channels ``(t*M + m)*C`` onwards."""
    M = weights[0].shape[0]
    copies = x if M == 1 else x.repeat(1, M, 1, 1)
    return torch.cat([F.conv2d(copies, w.reshape(-1, 1, *w.shape[2:]), None, stride, p, d, groups=copies.shape[1])
                      for w, p, d in zip(weights, paddings, dilations)], dim=1)


backend.register("depthwise_conv2d_stack", "reference", depthwise_conv2d_stack_reference)


def depthwise_conv2d_stack(x, weights, stride, paddings, dilations, backend_name=None):
    """The depthwise convs of one input in one op (the first stage of every conv candidate of the
    edges leaving a state, :mod:`dsrna.space.batched_cell`): the native kernel reads each input
    plane once for all of them, and its backward sums their transposed convs in one pass."""
    if not (len(weights) == len(paddings) == len(dilations) >= 1):
        raise ValueError(f"depthwise_conv2d_stack: need one padding and one dilation per weight, got {len(weights)} "
                         f"weights, paddings {list(paddings)}, dilations {list(dilations)}")
    return backend.dispatch("depthwise_conv2d_stack", x.device, backend_name)(
        x, list(weights), stride, list(paddings), list(dilations))


def depthwise_conv2d_stack_transpose_reference(grad_out: torch.Tensor, weights: Sequence[torch.Tensor],
                                               input_hw: tuple[int, int], stride: int, paddings: Sequence[int],
                                               dilations: Sequence[int]) -> torch.Tensor:
    """Pure-PyTorch twin of the transposed map of :func:`depthwise_conv2d_stack_reference` (its
    gradient to the input): ``[N, T*M*C, Ho, Wo]`` back to ``[N, C, *input_hw]``, every conv's
    transposed conv summed. The CROWN backward step of the bound engine uses it."""
    M, C = weights[0].shape[:2]
    total = 0
    for t, (w, p, d) in enumerate(zip(weights, paddings, dilations)):
        block = grad_out[:, t * M * C:(t + 1) * M * C]
        back = depthwise_conv2d_transpose_reference(block, w.reshape(M * C, 1, *w.shape[2:]), input_hw, stride, p, d)
        total = total + back.view(back.shape[0], M, C, *back.shape[2:]).sum(1)
    return total


backend.register("depthwise_conv2d_stack_transpose", "reference", depthwise_conv2d_stack_transpose_reference)


def depthwise_conv2d_stack_transpose(grad_out, weights, input_hw, stride, paddings, dilations, backend_name=None):
    """The adjoint of :func:`depthwise_conv2d_stack`, on the selected backend."""
    return backend.dispatch("depthwise_conv2d_stack_transpose", grad_out.device, backend_name)(
        grad_out, list(weights), tuple(input_hw), stride, list(paddings), list(dilations))


# --- native ------------------------------------------------------------------------------------------


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast like ``F.conv2d`` does under autocast (the kernels take one dtype)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def _not_on_cuda_kernels(t: torch.Tensor, weights) -> bool:
    """A depthwise conv of a size the CUDA kernels lack, on a GPU (a user's own module): it runs on
    the reference path. The CPU kernels take any size."""
    return t.is_cuda and any(w.shape[-1] not in KERNEL_SIZES for w in weights)


def depthwise_conv2d_native(x, weight, stride, padding, dilation):
    if _not_on_cuda_kernels(x, [weight]):
        return depthwise_conv2d_reference(x, weight, stride, padding, dilation)
    x, weight = _autocast(x, weight)
    return torch.ops.dsrna.depthwise_conv2d(x, weight, stride, padding, dilation)


def depthwise_conv2d_transpose_native(grad_out, weight, input_hw, stride, padding, dilation):
    if _not_on_cuda_kernels(grad_out, [weight]):
        return depthwise_conv2d_transpose_reference(grad_out, weight, input_hw, stride, padding, dilation)
    grad_out, weight = _autocast(grad_out, weight)
    return torch.ops.dsrna.depthwise_conv2d_transpose(grad_out, weight, list(input_hw), stride, padding, dilation)


def interval_depthwise_conv2d_native(lower, upper, weight, stride, padding, dilation):
    """Both bounds in one pass over ``[lower, upper]``; same contract as
    :func:`dsrna.ops.bound_ops.interval_depthwise_conv2d_reference`."""
    if _not_on_cuda_kernels(lower, [weight]):
        return interval_depthwise_conv2d_reference(lower, upper, weight, stride, padding, dilation)
    return torch.ops.dsrna.interval_depthwise_conv2d(lower, upper, weight, stride, padding, dilation)


def depthwise_conv2d_stack_native(x, weights, stride, paddings, dilations):
    if _not_on_cuda_kernels(x, weights):
        return depthwise_conv2d_stack_reference(x, weights, stride, paddings, dilations)
    x, *weights = _autocast(x, *weights)
    return torch.ops.dsrna.depthwise_conv2d_stack(x, weights, stride, paddings, dilations)


def depthwise_conv2d_stack_transpose_native(grad_out, weights, input_hw, stride, paddings, dilations):
    if _not_on_cuda_kernels(grad_out, weights):
        return depthwise_conv2d_stack_transpose_reference(grad_out, weights, input_hw, stride, paddings, dilations)
    grad_out, *weights = _autocast(grad_out, *weights)
    return torch.ops.dsrna.depthwise_conv2d_stack_transpose(grad_out, weights, list(input_hw), stride, paddings, dilations)


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

    @torch.library.register_fake("dsrna::depthwise_conv2d_stack")
    def _(x, weights, stride, paddings, dilations):
        n, c, h, w = x.shape
        k, p, d = weights[0].shape[-1], paddings[0], dilations[0]
        blocks = len(weights) * weights[0].shape[0]
        return x.new_empty((n, blocks * c, _output_size(h, k, stride, p, d), _output_size(w, k, stride, p, d)))

    @torch.library.register_fake("dsrna::depthwise_conv2d_stack_transpose")
    def _(grad_out, weights, input_hw, stride, paddings, dilations):
        return grad_out.new_empty((grad_out.shape[0], weights[0].shape[1], input_hw[0], input_hw[1]))

    @torch.library.register_fake("dsrna::depthwise_conv2d_stack_weight")
    def _(x, grad_out, kernel_sizes, stride, paddings, dilations):
        c = x.shape[1]
        m = grad_out.shape[1] // (len(kernel_sizes) * c)
        return [x.new_empty((m, c, k, k)) for k in kernel_sizes]


if _native.C is not None:
    _register_native_fakes()
# Registered even without the extension, so that `dsrna info` and an explicit request for the
# native backend say why it cannot run (dsrna.backend.backend_status).
backend.register("depthwise_conv2d", "native", depthwise_conv2d_native)
backend.register("depthwise_conv2d_transpose", "native", depthwise_conv2d_transpose_native)
backend.register("interval_depthwise_conv2d", "native", interval_depthwise_conv2d_native)
backend.register("depthwise_conv2d_stack", "native", depthwise_conv2d_stack_native)
backend.register("depthwise_conv2d_stack_transpose", "native", depthwise_conv2d_stack_transpose_native)
