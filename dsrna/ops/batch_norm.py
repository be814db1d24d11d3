"""Train-mode ``BatchNorm2d(affine=False)`` that keeps its output, not its input, for backward.

Every conv candidate of the super-network ends in such a batch norm, and the weighted sum of the
mixed op keeps each candidate's output for the architecture gradient anyway. PyTorch's batch norm
also keeps its input, a second map of the same size that nothing else needs: over a quarter of a train
step's activation memory. Its gradient can be computed from the output instead (the idea of
in-place activated batch norm, Rota Bulo et al., CVPR 2018): with ``y = (x - mean) * invstd``,

    dL/dx = invstd * (g - mean(g) - y * mean(g * y))        (means over batch and pixels),

which is PyTorch's own batch-norm backward kernel run on ``y`` with mean 0, invstd 1 and weight
``invstd``; the forward is PyTorch's own kernel too (the ``native`` backend; the ``triton`` backend
runs both steps on kernels of its own, :mod:`dsrna.kernels.batch_norm`). Under ``create_graph`` the
same formula runs as differentiable ops, and ``invstd`` is an output of the function, so second
derivatives see its dependence on ``x`` too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsrna import backend

_DIMS = (0, 2, 3)


def batch_norm_train_reference(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                               momentum: float, eps: float) -> torch.Tensor:
    """Pure-PyTorch twin: ``F.batch_norm`` in train mode without affine parameters (updates the
    running statistics in place; the running variance takes the unbiased batch variance)."""
    return F.batch_norm(x, running_mean, running_var, None, None, True, momentum, eps)


def _aten_forward(x, running_mean, running_var, momentum, eps):
    """``(y, invstd)`` from PyTorch's batch-norm kernel (which updates the running statistics)."""
    y, _, invstd = torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
    return y, invstd


def _aten_backward(grad_y, y, invstd):
    """The gradient to ``x`` from PyTorch's backward kernel run on ``y`` as described above."""
    unit = torch.ones_like(invstd)
    return torch.ops.aten.native_batch_norm_backward(
        grad_y, y, invstd, None, None, torch.zeros_like(invstd), unit, True, 0.0, [True, False, False])[0]


class _KeepOutput(torch.autograd.Function):
    """``(y, invstd)`` of a train-mode batch norm run by ``kernels = (forward, backward)`` (forward
    updates the running statistics); saves ``y`` and ``invstd`` only."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, momentum, eps, kernels):
        forward_kernel, ctx.backward_kernel = kernels
        y, invstd = forward_kernel(x, running_mean, running_var, momentum, eps)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, invstd)
        return y, invstd

    @staticmethod
    def backward(ctx, grad_y, grad_invstd):
        y, invstd = ctx.saved_tensors
        n = y.numel() // y.shape[1]
        if grad_y is None:
            grad_x = torch.zeros_like(y)
        elif torch.is_grad_enabled():  # create_graph: the formula as differentiable ops
            grad_x = invstd[:, None, None] * (grad_y - grad_y.mean(_DIMS, keepdim=True)
                                              - y * (grad_y * y).mean(_DIMS, keepdim=True))
        else:
            grad_x = ctx.backward_kernel(grad_y, y, invstd)
        if grad_invstd is not None:  # d invstd / dx = -invstd^2 * y / n
            grad_x = grad_x - (grad_invstd * invstd.square() / n)[:, None, None] * y
        return grad_x, None, None, None, None, None


def batch_norm_train_keep_output(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                                 momentum: float, eps: float, kernels=(_aten_forward, _aten_backward)) -> torch.Tensor:
    """The same values, gradients and running statistics as the reference, keeping ``y`` for backward;
    ``kernels``: the ``(forward, backward)`` pair computing ``(y, invstd)`` and the gradient (by
    default PyTorch's; :mod:`dsrna.kernels.batch_norm` passes its Triton pair). Without autograd, and
    for half-precision inputs (autocast), it is the reference."""
    if not (torch.is_grad_enabled() and x.requires_grad) or x.dtype not in (torch.float32, torch.float64):
        return batch_norm_train_reference(x, running_mean, running_var, momentum, eps)
    if x.numel() <= x.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    return _KeepOutput.apply(x, running_mean, running_var, momentum, eps, kernels)[0]


backend.register("batch_norm_train", "reference", batch_norm_train_reference)
# A formulation on PyTorch's kernels; the triton backend runs it on its own (dsrna.kernels.batch_norm).
backend.register("batch_norm_train", "native", batch_norm_train_keep_output)


def batch_norm_train(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float,
                     eps: float, backend_name: str | None = None) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, training=True, momentum, eps)`` with no affine
    parameters, on the selected backend (the fast ones keep only the output for backward)."""
    if x.dim() != 4 or running_mean.shape != (x.shape[1],) or running_var.shape != (x.shape[1],):
        raise ValueError(f"batch_norm_train: need x [N, C, H, W] and running statistics [C], got x {tuple(x.shape)}, "
                         f"running mean {tuple(running_mean.shape)} and running variance {tuple(running_var.shape)}")
    return backend.dispatch("batch_norm_train", x.device, backend_name)(x, running_mean, running_var, momentum, eps)
