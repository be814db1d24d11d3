"""The candidate operations of the DARTS space and the small modules they are built from.

Each op is a plain ``nn.Module`` with its parts as named attributes so that the bound engine
(:mod:`dsrna.bounds`) and the fast paths can walk them. ``OPS[name](C, stride, affine)`` builds one;
in the super-network ``affine=False`` and pools carry a ``BatchNorm2d(affine=False)``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna.ops import depthwise_conv2d, pointwise_conv2d
from dsrna.ops.pool_bn import pool_bn

# --- batch norm whose train-mode statistics can be frozen --------------------------------------------

_bn_mode = threading.local()


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that can record the batch statistics of one forward pass and reuse them.

    In search mode BN normalises with batch statistics, which couples the images of a batch. The
    robustness metrics need each image's logits as a function of that image alone, so (METHOD.md §2,
    [choice]) they use the statistics of the clean forward pass of the same batch as constants with
    respect to the input while keeping them in the autograd graph of the weights and architecture:
    run the clean batch under :func:`capture_batch_stats`, then the perturbed or differentiated pass
    under :func:`frozen_batch_stats`.
    """

    lowers_as_base = True  # nn.BatchNorm2d's function (dsrna.bounds lowers it as that)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = getattr(_bn_mode, "value", None)
        if mode is None or not self.training:
            return self._plain_forward(x)
        kind, store = mode
        if kind == "capture":
            store[self] = batch_statistics(x)
            return super().forward(x)
        if self not in store:
            raise RuntimeError("frozen_batch_stats: this BatchNorm2d ran no clean pass under capture_batch_stats")
        mean, var = store[self]
        return batch_norm_affine(self, mean, var, x)


    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``nn.BatchNorm2d.forward``, with its Python checks done once where they cannot fail.

        The super-network runs about a thousand batch norms per step and the step is bound by host
        overhead; this makes the same ``torch.batch_norm`` call (and the same ``num_batches_tracked``
        update) as ``nn.BatchNorm2d`` for a plain 4-D tensor with running statistics and a momentum,
        and defers to it for anything else (its errors, the cumulative average, tensor subclasses).
        """
        momentum = self.momentum
        running_mean, running_var = self.running_mean, self.running_var
        if (type(x) is not torch.Tensor or x.dim() != 4 or momentum is None or running_mean is None
                or running_var is None or not self.track_running_stats):
            return super().forward(x)
        if self.training:
            if self.num_batches_tracked is None or x.shape[0] * x.shape[2] * x.shape[3] == 1:
                return super().forward(x)
            self.num_batches_tracked.add_(1)
        return torch.batch_norm(x, self.weight, self.bias, running_mean, running_var, self.training, momentum,
                                self.eps, torch.backends.cudnn.enabled)


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` as :func:`capture_batch_stats` records them: in
    float32 at least, since the robustness passes that replay them run in float32 or float64 (under
    bf16 autocast the variances of a bf16 pass differ by percents)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def bn_scale_shift(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(x) = scale * x + shift`` for the given statistics."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
        return scale, bn.bias - mean * scale
    return scale, -mean * scale


def batch_norm_affine(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    scale, shift = bn_scale_shift(bn, mean, var)
    return x * scale[None, :, None, None] + shift[None, :, None, None]


@contextlib.contextmanager
def capture_batch_stats() -> Iterator[dict]:
    """Record ``{bn_module: (mean, var)}`` of every train-mode :class:`BatchNorm2d` run inside."""
    store: dict = {}
    previous = getattr(_bn_mode, "value", None)
    _bn_mode.value = ("capture", store)
    try:
        yield store
    finally:
        _bn_mode.value = previous


@contextlib.contextmanager
def frozen_batch_stats(store: dict) -> Iterator[None]:
    """Inside, train-mode :class:`BatchNorm2d` layers normalise with the captured statistics."""
    previous = getattr(_bn_mode, "value", None)
    _bn_mode.value = ("replay", store)
    try:
        yield
    finally:
        _bn_mode.value = previous


# --- building blocks -------------------------------------------------------------------------------


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``: models take inputs in [0, 1], so budgets are in pixel units."""

    def __init__(self, mean, std):
        super().__init__()
        # the default dtype, as the parameters beside them (float64 models built under set_default_dtype)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.get_default_dtype()).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.get_default_dtype()).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise conv (``groups == channels``) routed through the backend dispatch, so the native
    and Triton depthwise kernels plug in; the reference implementation is ``F.conv2d``."""

    lowers_as_base = True  # nn.Conv2d's function (dsrna.bounds lowers it as that)

    def __init__(self, C, kernel_size, stride, padding, dilation=1):
        super().__init__(C, C, kernel_size, stride, padding, dilation=dilation, groups=C, bias=False)
        geometry = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation)
        uneven = [f"{name}={value}" for name, value in geometry.items() if len(set(value)) > 1]
        if uneven:  # the kernels take one value per setting for both axes
            raise ValueError(f"DepthwiseConv2d takes the same value for both axes, got {', '.join(uneven)}")

    def forward(self, x):
        return depthwise_conv2d(x, self.weight, self.stride[0], self.padding[0], self.dilation[0])


def global_hooks_set() -> bool:
    """Whether global module forward hooks are registered (``register_module_forward_hook``...): they
    run on every module call, which code computing from modules' tensors without calling them skips."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def runs_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks: its own (``torch.nn.utils.prune``'s too, which
    rebuilds the weight in a pre-hook) or global ones. Such a module must be called, not bypassed."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or global_hooks_set()


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a bias-free, unpadded 1x1 conv, through the backend's 1x1 conv (a matrix product
    on the fast backends, :mod:`dsrna.ops.pointwise`); a conv that :func:`runs_hooks` runs as the
    module, so that its hooks see the call and the weight it uses is current."""
    if runs_hooks(conv) or conv.bias is not None or conv.padding != (0, 0) or conv.kernel_size != (1, 1):
        return conv(x)
    return pointwise_conv2d(x, conv.weight, conv.stride[0], conv.groups)


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )
        self.pointwise = kernel_size == 1 and padding == 0

    def forward(self, x):
        if self.pointwise:  # the cells' preprocessing: through the backend's 1x1 conv (dsrna.ops.pointwise)
            return self.op[2](conv1x1(self.op[1], F.relu(x)))
        return self.op(x)


class _ReLUFirst(nn.Module):
    """An op whose ``self.op`` is an ``nn.Sequential`` that starts with a ReLU: a mixed op computes that
    ReLU once for all such candidates of an edge and hands it to :meth:`after_relu`."""

    def forward(self, x):
        return self.op(x)

    def after_relu(self, relu_x):
        """The op applied to an input that already went through its leading ReLU."""
        # Not ``self.op[1:](relu_x)``: slicing an ``nn.Sequential`` builds a new module per call.
        x = relu_x
        for m in itertools.islice(self.op._modules.values(), 1, None):
            x = m(x)
        return x


class DilConv(_ReLUFirst):
    """ReLU, depthwise (dilated) kxk conv, pointwise 1x1 conv, BN."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, stride, padding, dilation),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )


class SepConv(_ReLUFirst):
    """Two stacked DilConv-shaped stages without dilation; only the first is strided."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, stride, padding),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, 1, padding),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    """The ``none`` op: a zero tensor of the (strided) output shape. Mixed ops skip it entirely."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Stride-2 skip: ReLU, two 1x1 stride-2 convs on x and on x shifted by one pixel, concat, BN.

    The shifted path zero-pads one row and column at the bottom right so that both halves have
    ``ceil(H / 2)`` rows for odd sizes too (for even sizes it equals DARTS' ``x[:, :, 1:, 1:]``).
    """

    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even output channel count, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = BatchNorm2d(C_out, affine=affine)

    @staticmethod
    def shift(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]

    def forward(self, x):
        return self.after_relu(self.relu(x))

    def after_relu(self, relu_x):
        """The op applied to an input that already went through its leading ReLU."""
        return self.bn(torch.cat([conv1x1(self.conv_1, relu_x), conv1x1(self.conv_2, self.shift(relu_x))], dim=1))


class PoolBN(nn.Module):
    """3x3 max or average pool (padding 1; average without padded zeros), then BN if given.

    With BN in plain train or eval mode the pair runs as one fused op through the backend dispatch
    (:func:`dsrna.ops.pool_bn`); while batch statistics are captured or replayed
    (:func:`capture_batch_stats`, :func:`frozen_batch_stats`), or when either module :func:`runs_hooks`,
    the modules run themselves.
    """

    def __init__(self, kind, C, stride, bn=True):
        super().__init__()
        self.kind = kind
        self.stride = stride
        if kind == "max":
            self.pool = nn.MaxPool2d(3, stride=stride, padding=1)
        elif kind == "avg":
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        else:
            raise ValueError(f"unknown pool kind {kind!r}")
        self.bn = BatchNorm2d(C, affine=False) if bn else None

    def forward(self, x):
        if self.bn is None:
            return self.pool(x)
        if self._fusable():
            return pool_bn(x, self.kind, self.stride, self.bn)
        return self.bn(self.pool(x))

    def _fusable(self) -> bool:
        bn = self.bn
        plain_mode = not bn.training or getattr(_bn_mode, "value", None) is None
        return (plain_mode and bn.track_running_stats and bn.momentum is not None and not bn.affine
                and not (runs_hooks(self.pool) or runs_hooks(bn)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def make_op(name: str, C: int, stride: int, affine: bool, pool_bn: bool) -> nn.Module:
    """Build candidate ``name``; ``pool_bn`` adds the super-network's BN after the pools."""
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return PoolBN("max", C, stride, bn=pool_bn)
    if name == "avg_pool_3x3":
        return PoolBN("avg", C, stride, bn=pool_bn)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)
    if name == "sep_conv_3x3":
        return SepConv(C, C, 3, stride, 1, affine=affine)
    if name == "sep_conv_5x5":
        return SepConv(C, C, 5, stride, 2, affine=affine)
    if name == "dil_conv_3x3":
        return DilConv(C, C, 3, stride, 2, 2, affine=affine)
    if name == "dil_conv_5x5":
        return DilConv(C, C, 5, stride, 4, 2, affine=affine)
    raise ValueError(f"unknown op {name!r}")


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole examples with probability ``drop_prob``, rescaling the rest (final network only)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask
