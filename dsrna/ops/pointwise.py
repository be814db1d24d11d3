"""1x1 convolution (optionally strided and grouped): the channel mixing of the DARTS conv candidates,
the cells' preprocessing and FactorizedReduce.

The fast backends compute it as a matrix product, ``y[b, g] = W[g] @ x[b, g]`` over the flattened
pixels, instead of a convolution. The two are the same arithmetic, but their double backward is not:
PyTorch differentiates a convolution's backward with further convolutions, and the weight-gradient
term becomes a convolution whose "kernel" is the whole feature map, which cuDNN runs at a small
fraction of its speed (40% of the DSRNA-Jacobian step on an H100, benchmarks/results/
2026-11-26_nvidia-h100_profile.md); a matrix product's derivatives are matrix products. On this
2-core CPU the Jacobian-shaped double backward of a grouped 1x1 conv is about 2x faster too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsrna import backend


def pointwise_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """Pure-PyTorch twin: ``F.conv2d`` with a ``[C_out, C_in / groups, 1, 1]`` weight, no padding."""
    return F.conv2d(x, weight, None, stride, 0, 1, groups)


def pointwise_conv2d_matmul(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """The same map as one batched matrix product (every derivative order is matrix products too)."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    n, c, h, w = x.shape
    out = weight.shape[0]
    y = torch.matmul(weight.reshape(groups, out // groups, c // groups), x.reshape(n, groups, c // groups, h * w))
    return y.reshape(n, out, h, w)


backend.register("pointwise_conv2d", "reference", pointwise_conv2d_reference)
# A formulation, not a kernel: both fast backends use it (it needs neither Triton nor dsrna._C, but
# the reference path stays the plain convolution).
backend.register("pointwise_conv2d", "native", pointwise_conv2d_matmul)
backend.register("pointwise_conv2d", "triton", pointwise_conv2d_matmul)


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, groups: int = 1,
                     backend_name: str | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, stride=stride, groups=groups)`` for a 1x1 ``weight`` without bias, on the
    selected backend."""
    if weight.dim() != 4 or weight.shape[2:] != (1, 1) or x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"pointwise_conv2d: need x [N, C, H, W] and a [C_out, C / groups, 1, 1] weight with "
                         f"groups={groups}, got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    return backend.dispatch("pointwise_conv2d", x.device, backend_name)(x, weight, stride, groups)
