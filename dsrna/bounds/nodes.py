"""The primitive operations of the bound graph, one class per op.

Each class holds together what the op means and how bounds cross it (the locality of
auto_LiRPA's operator classes, without its ONNX tracing):

- ``forward(*xs)``: the op on concrete tensors (the clean pass; batch-norm statistics come from it);
- ``interval(*bounds)``: interval bound propagation (IBP), ``bounds[i] = (lower_i, upper_i)``;
- ``symbolic(syms, bounds, errors)``: one step of the forward symbolic pass (:class:`Symbolic`, the
  ``crown-symbolic`` method's intermediate bounds); linear ops share one rule built on ``linear``,
  the op without its constant term;
- ``backward(A, bounds)``: one CROWN step in lower-bound form. ``A`` is ``[B, S, *out_shape]``
  (batch, specifications, the op's output shape) and stands for ``sum A * y``; the step returns one
  ``A_i`` per input (``None`` where nothing flows; ``(A_part, start)`` for a coefficient that is zero
  outside channels ``start:start + A_part.shape[2]``) and a bias ``[B, S]`` (or ``None``) such that
  ``sum A * op(x) >= sum_i sum A_i * x_i + bias`` for all ``x_i`` in ``bounds[i]``.

Linear ops ignore ``bounds`` except for their input shapes. Ops with ``needs_input_bounds`` relax a
nonlinearity with the input interval, which full CROWN tightens first. A new op is one new class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from dsrna.ops.bound_ops import crown_relu_backward, interval_depthwise_conv2d, interval_weighted_sum, relu_relaxation
from dsrna.ops.depthwise import (KERNEL_SIZES, depthwise_conv2d, depthwise_conv2d_stack,
                                 depthwise_conv2d_stack_transpose, depthwise_conv2d_transpose,
                                 depthwise_conv2d_transpose_reference)
from dsrna.ops.pointwise import pointwise_conv2d
from dsrna.ops.weighted_sum import weighted_sum
from dsrna.space.ops import FactorizedReduce

Bound = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Symbolic:
    """A node's values over the input set as an affine form of symbols:
    ``value = centre + sum_k coef[:, k] * d_k + radius * e``. The first ``n`` symbols are the input's
    (``d`` in the unit ball of the set's norm, :meth:`dsrna.bounds.Ball.symbols`); the others are
    error symbols in ``[-1, 1]``, one per ReLU or max-pool window the bounds left undecided (shared by
    every node downstream, so their correlations survive); ``e`` in ``[-1, 1]`` per neuron is the
    overflow once the error symbols reach their budget.

    Linear ops map the form exactly. So while few neurons are undecided (small eps) the bounds it
    gives are nearly exact, where intervals grow by ``|W|`` at every layer.
    """

    coef: torch.Tensor  # [B, symbols, *shape]
    centre: torch.Tensor  # [B, *shape]
    radius: torch.Tensor | None  # [B, *shape]; None for zero


class ErrorSymbols:
    """The error symbols of one symbolic pass, numbered after the input's ``count`` symbols: :meth:`add`
    gives undecided neurons fresh ones, the widest first, while ``budget`` lasts; ``unassigned``
    counts the undecided neurons past it (per example, the most of the batch)."""

    def __init__(self, count: int, budget: int):
        self.count, self.left, self.unassigned = count, budget, 0

    def add(self, coef: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``coef`` (``[B, k, *shape]``, ``k <= count``) with a new symbol of coefficient ``half`` for each
        neuron where ``half`` (``[B, *shape]``, >= 0) is nonzero; and the half-widths left over past the
        budget (None if none)."""
        B = half.shape[0]
        flat = half.flatten(1)
        wanted = int((flat > 0).sum(1).max())
        kept = min(wanted, self.left)
        self.unassigned += wanted - kept
        if kept == 0:
            return coef, (half if wanted else None)
        top, order = flat.topk(kept, dim=1)
        rows = flat.new_zeros(B, kept, flat.shape[1]).scatter_(2, order.unsqueeze(2), top.unsqueeze(2))
        skipped = self.count - coef.shape[1]  # symbols created elsewhere, which coef does not depend on
        parts = [coef, coef.new_zeros(B, skipped, *coef.shape[2:])] if skipped else [coef]
        self.count, self.left = self.count + kept, self.left - kept
        coef = torch.cat([*parts, rows.reshape(B, kept, *half.shape[1:])], dim=1)
        return coef, (flat.scatter(1, order, 0.0).reshape(half.shape) if kept < wanted else None)


def _add_radius(radius: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    return extra if radius is None else radius if extra is None else radius + extra


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _flat_batch(A: torch.Tensor) -> torch.Tensor:
    """``[B, S, *shape]`` -> ``[B * S, *shape]``, for applying a transposed map."""
    return A.reshape(A.shape[0] * A.shape[1], *A.shape[2:])


def _unflat_batch(A: torch.Tensor, B: int, S: int) -> torch.Tensor:
    return A.reshape(B, S, *A.shape[1:])


def _contract(A: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum over shape of A * values`` -> ``[B, S]``; ``values`` broadcasts like one example."""
    return (A * values).flatten(2).sum(-1)


class BoundOp:
    needs_input_bounds = False

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interval(self, *bounds: Bound) -> Bound:
        raise NotImplementedError

    def backward(self, A: torch.Tensor, bounds: Sequence[Bound]) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        raise NotImplementedError

    def linear(self, *xs: torch.Tensor) -> torch.Tensor:
        """The op without its constant term (for linear ops: a bias or a batch-norm shift)."""
        return self.forward(*xs)

    def undecided(self, bound: Bound) -> torch.Tensor:
        """(Ops with ``needs_input_bounds``.) The input neurons whose bounds the relaxation reads,
        given the input's ``bound``: full CROWN tightens those."""
        raise NotImplementedError

    def symbolic(self, syms: Sequence[Symbolic], bounds: Sequence[Bound], errors: ErrorSymbols) -> Symbolic:
        """``syms`` (of equal symbol counts) through the op; a relaxation adds its error symbols to
        ``errors``. The rule of every linear op: centre through the op, each symbol's coefficient through its
        linear part, the independent radius through ``|op|`` (the interval of ``[-r, r]``)."""
        B, n = syms[0].coef.shape[:2]
        coef = self.linear(*(s.coef.flatten(0, 1) for s in syms))
        radius = None
        if any(s.radius is not None for s in syms):
            lower, upper = self.interval(*((-r, r) for r in (torch.zeros_like(s.centre) if s.radius is None else s.radius
                                                             for s in syms)))
            radius = (upper - lower) / 2
        return Symbolic(coef.reshape(B, n, *coef.shape[1:]), self.forward(*(s.centre for s in syms)), radius)

    def __repr__(self) -> str:
        return type(self).__name__


class ChannelAffine(BoundOp):
    """``y = scale[c] * x + shift[c]`` over channel dim 1: input normalisation and batch norm.

    Batch norm whose statistics are not given (train mode without a captured store) passes
    ``scale=None``: the first :meth:`forward`, the clean pass, computes them from its input
    exactly as :func:`dsrna.space.ops.capture_batch_stats` would, kept in the autograd graph.
    """

    def __init__(self, scale: torch.Tensor | None, shift: torch.Tensor | None, bn=None):
        self.scale, self.shift, self.bn = scale, shift, bn

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale is None:
            raise RuntimeError("batch-norm statistics unknown: run the clean forward pass first")
        view = (-1,) + (1,) * (x.dim() - 2)
        return self.scale.reshape(view), self.shift.reshape(view)

    def forward(self, x):
        if self.scale is None:
            from dsrna.space.ops import bn_scale_shift

            self.scale, self.shift = bn_scale_shift(self.bn, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))
        scale, shift = self._params(x)
        return x * scale + shift

    def linear(self, x):
        return x * self._params(x)[0]

    def interval(self, b):
        # The exact image of [lower, upper] under the affine map, four elementwise passes: the
        # positive part of scale maps lower to lower, the negative part maps upper to lower.
        lower, upper = b
        scale, shift = self._params(lower)
        positive, negative = scale.clamp(min=0), scale.clamp(max=0)
        return (torch.addcmul(shift, lower, positive).addcmul_(upper, negative),
                torch.addcmul(shift, upper, positive).addcmul_(lower, negative))

    def backward(self, A, bounds):
        scale, _ = self._params(bounds[0][0])
        # The bias sum A * shift, as per-channel sums of A times shift: no second A-sized product.
        per_channel = A.flatten(3).sum(-1) if A.dim() > 3 else A
        return [A * scale], per_channel @ self.shift.reshape(-1)


class Conv2d(BoundOp):
    """Any ``nn.Conv2d`` (zero padding); depthwise convs of the DARTS kernel sizes go through the
    dispatched fast ops, and 1x1 convs through :func:`dsrna.ops.pointwise_conv2d` (a matrix product
    on the fast backends; grouped 1x1 convs over stacked channels are slow as convolutions, and
    their transposes slower)."""

    def __init__(self, weight, bias, stride, padding, dilation, groups):
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        square = all(len(set(p)) == 1 for p in (stride, padding, dilation))
        self.depthwise = (square and groups == weight.shape[0] and weight.shape[1] == 1 and bias is None
                          and weight.shape[2] == weight.shape[3] and weight.shape[2] in KERNEL_SIZES)
        self.pointwise = square and weight.shape[2:] == (1, 1) and padding == (0, 0) and bias is None

    def _conv(self, x, weight, bias):
        if self.pointwise:
            return pointwise_conv2d(x, weight, self.stride[0], self.groups)
        if self.depthwise:  # no bias
            return depthwise_conv2d(x, weight, self.stride[0], self.padding[0], self.dilation[0])
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        return self._conv(x, self.weight, self.bias)

    def linear(self, x):
        return self._conv(x, self.weight, None)

    def interval(self, b):
        lower, upper = b
        if self.depthwise:
            return interval_depthwise_conv2d(lower, upper, self.weight, self.stride[0], self.padding[0], self.dilation[0])
        # Centre (u + l) / 2 through W, radius (u - l) / 2 through |W|, the halves folded into the weights.
        centre = self._conv(upper + lower, self.weight / 2, self.bias)
        radius = self._conv(upper - lower, self.weight.abs() / 2, None)
        return centre - radius, centre + radius

    def backward(self, A, bounds):
        B, S = A.shape[:2]
        in_hw = bounds[0][0].shape[2:]
        flat = _flat_batch(A)
        if self.depthwise:
            out = depthwise_conv2d_transpose(flat, self.weight, tuple(in_hw), self.stride[0], self.padding[0], self.dilation[0])
        elif self.pointwise and self.stride == (1, 1):  # the transposed 1x1 conv: W^T per group
            n, c_out, h, w = flat.shape
            g = self.groups
            weight_t = self.weight.reshape(g, c_out // g, -1).transpose(1, 2)
            out = torch.matmul(weight_t, flat.reshape(n, g, c_out // g, h * w)).reshape(n, -1, h, w)
        else:
            k = self.weight.shape[2:]
            extra = tuple(in_hw[i] - ((flat.shape[2 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                                      + self.dilation[i] * (k[i] - 1) + 1) for i in range(2))
            out = F.conv_transpose2d(flat, self.weight, None, self.stride, self.padding, extra, self.groups, self.dilation)
        bias = None if self.bias is None else (A.sum(dim=(3, 4)) * self.bias).sum(-1)
        return [_unflat_batch(out, B, S)], bias


class DepthwiseStack(BoundOp):
    """Several depthwise convs of one input, channel-stacked (:func:`dsrna.ops.depthwise_conv2d_stack`):
    the first stage of every conv candidate of the edges leaving a state, as the batched cell runs it."""

    def __init__(self, weights: list[torch.Tensor], stride: int, paddings: list[int], dilations: list[int]):
        self.weights, self.stride, self.paddings, self.dilations = weights, stride, paddings, dilations

    def forward(self, x):
        return depthwise_conv2d_stack(x, self.weights, self.stride, self.paddings, self.dilations)

    def interval(self, b):
        lower, upper = b
        centre = depthwise_conv2d_stack(upper + lower, [w / 2 for w in self.weights], self.stride, self.paddings, self.dilations)
        radius = depthwise_conv2d_stack(upper - lower, [w.abs() / 2 for w in self.weights], self.stride, self.paddings,
                                        self.dilations)
        return centre - radius, centre + radius

    def backward(self, A, bounds):
        B, S = A.shape[:2]
        out = depthwise_conv2d_stack_transpose(_flat_batch(A), self.weights, tuple(bounds[0][0].shape[2:]), self.stride,
                                               self.paddings, self.dilations)
        return [_unflat_batch(out, B, S)], None


class Linear(BoundOp):
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def linear(self, x):
        return F.linear(x, self.weight)

    def interval(self, b):
        lower, upper = b
        centre = F.linear((upper + lower) / 2, self.weight, self.bias)
        radius = F.linear((upper - lower) / 2, self.weight.abs())
        return centre - radius, centre + radius

    def backward(self, A, bounds):
        bias = None if self.bias is None else _contract(A, self.bias)  # also on [..., features] maps
        return [A @ self.weight], bias


class ReLU(BoundOp):
    needs_input_bounds = True

    def __init__(self, mode: str = "adaptive"):
        self.mode = mode

    def forward(self, x):
        return F.relu(x)

    def interval(self, b):
        return F.relu(b[0]), F.relu(b[1])

    def undecided(self, bound):
        return (bound[0] < 0) & (bound[1] > 0)

    def backward(self, A, bounds):
        lower, upper = bounds[0]
        lower_slope, upper_slope, upper_intercept = relu_relaxation(lower, upper, self.mode)
        A_out, bias = crown_relu_backward(A, lower_slope, upper_slope, upper_intercept)
        return [A_out], bias

    def symbolic(self, syms, bounds, errors):
        # Between the chord and the parallel line through the origin: relu(z) = slope * z + half +- half
        # with half = intercept / 2 (exact for stable neurons: slope 1 or 0, intercept 0).
        (sym,), (lower, upper) = syms, bounds[0]
        _, slope, intercept = relu_relaxation(lower, upper, self.mode)
        half = intercept / 2
        coef, leftover = errors.add(sym.coef * slope.unsqueeze(1), half)
        radius = None if sym.radius is None else sym.radius * slope
        return Symbolic(coef, torch.addcmul(half, slope, sym.centre), _add_radius(radius, leftover))


class MaxPool2d(BoundOp):
    """Max pool with implicit ``-inf`` padding (3x3 stride 1/2 padding 1; PC-DARTS' 2x2 ceil_mode).

    Relaxation per window, with ``j*`` its element of largest lower bound: where ``l_{j*}`` reaches
    every other element's upper bound the window is *decided* and the max is ``x_{j*}`` exactly;
    elsewhere ``x_{j*} <= max_j x_j <= max_j u_j`` (a linear lower and a constant upper bound). The
    choice of ``j*`` and of the decided windows is piecewise constant.
    """

    needs_input_bounds = True

    def __init__(self, kernel_size, stride, padding, ceil_mode):
        self.kernel_size, self.stride, self.padding, self.ceil_mode = kernel_size, stride, padding, ceil_mode

    def _pool(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode)

    def forward(self, x):
        return self._pool(x)

    def interval(self, b):
        return self._pool(b[0]), self._pool(b[1])

    def _geometry(self, lower):
        """Kernel, stride, padding, output size, and the ``F.pad`` widths that make every window lie
        inside the padded input (negative where floor mode drops trailing inputs)."""
        H, W = lower.shape[2:]
        k = _pair(self.kernel_size)
        s = _pair(self.stride or self.kernel_size)
        p = _pair(self.padding)
        Ho, Wo = self._pool(lower[:1, :1]).shape[2:]
        pads = (p[1], (Wo - 1) * s[1] + k[1] - W - p[1], p[0], (Ho - 1) * s[0] + k[0] - H - p[0])
        return k, s, p, (Ho, Wo), pads

    def _windows(self, lower, upper):
        """``(index, gap)``, each ``[B, C, Ho, Wo]``: the flat input index (into ``H * W``) of each
        window's ``j*``, and ``D = max(0, max_{j != j*} u_j - l_{j*})``, zero where the window is
        decided; ``x_{j*} <= max_j x_j <= x_{j*} + D`` always."""
        B, C, H, W = lower.shape
        k, s, p, (Ho, Wo), pads = self._geometry(lower)

        def windows(t):  # [B * C, k * k, Ho * Wo]
            return F.unfold(F.pad(t.detach().reshape(B * C, 1, H, W), pads, value=-math.inf), k, stride=s)

        lower_w, upper_w = windows(lower), windows(upper)
        # j* among the real inputs only: a lower bound that overflowed to -inf (float32 on a deep
        # network) would otherwise tie with the padding, whose index lies outside the image.
        padding = F.unfold(F.pad(lower.new_zeros(1, 1, H, W), pads, value=-math.inf), k, stride=s) == -math.inf
        slot = lower_w.clamp(min=torch.finfo(lower_w.dtype).min).masked_fill(padding, -math.inf).argmax(1, keepdim=True)
        others = upper_w.scatter(1, slot, -math.inf).amax(1, keepdim=True)
        gap = (others - lower_w.gather(1, slot)).clamp(min=0).reshape(B, C, Ho, Wo)
        slot = slot.reshape(B, C, Ho, Wo)
        rows = torch.arange(Ho, device=lower.device).view(Ho, 1) * s[0] - p[0] + torch.div(slot, k[1], rounding_mode="floor")
        cols = torch.arange(Wo, device=lower.device) * s[1] - p[1] + slot % k[1]
        return rows * W + cols, gap

    def undecided(self, bound):
        # Every input of an undecided window: the relaxation reads l_{j*} and every u_j there.
        lower, upper = bound
        B, C, H, W = lower.shape
        k, s, _, _, pads = self._geometry(lower)
        _, gap = self._windows(lower, upper)
        windows = (gap > 0).to(lower.dtype).reshape(B * C, 1, -1).expand(-1, k[0] * k[1], -1)
        padded = (H + pads[2] + pads[3], W + pads[0] + pads[1])
        covered = F.fold(windows, padded, k, stride=s)  # the adjoint of the unfold in _windows
        return F.pad(covered, tuple(-w for w in pads)).reshape(B, C, H, W) > 0

    def backward(self, A, bounds):
        lower, upper = bounds[0]
        B, S, C, Ho, Wo = A.shape
        H, W = lower.shape[2:]
        index, gap = self._windows(lower, upper)
        decided = (gap == 0).unsqueeze(1)
        linear = torch.where(decided, A, A.clamp(min=0))  # the lower line; in decided windows the upper too
        A_in = A.new_zeros(B, S, C, H * W).scatter_add(3, index.flatten(2).unsqueeze(1).expand(B, S, C, Ho * Wo),
                                                       linear.flatten(3))
        constant = torch.where(decided, 0.0, A.clamp(max=0))
        return [A_in.reshape(B, S, C, H, W)], _contract(constant, self._pool(upper).unsqueeze(1))

    def symbolic(self, syms, bounds, errors):
        # max_j x_j = x_{j*} + D/2 +- D/2: exact in decided windows (D = 0).
        (sym,), (lower, upper) = syms, bounds[0]
        index, gap = self._windows(lower, upper)
        B, n = sym.coef.shape[:2]
        flat_index = index.flatten(2)

        def pick(t):
            return t.flatten(2).gather(2, flat_index).reshape(index.shape)

        half = gap / 2
        coef = sym.coef.flatten(3).gather(3, flat_index.unsqueeze(1).expand(B, n, *flat_index.shape[1:]))
        coef = coef.reshape(B, n, *index.shape[1:])
        coef, leftover = errors.add(coef, half)
        radius = None if sym.radius is None else pick(sym.radius)
        return Symbolic(coef, pick(sym.centre) + half, _add_radius(radius, leftover))


class AvgPool2d(BoundOp):
    """Average pool; with ``count_include_pad=False`` each output divides by its own window count."""

    def __init__(self, kernel_size, stride, padding, count_include_pad):
        self.kernel_size, self.stride, self.padding, self.count_include_pad = kernel_size, stride, padding, count_include_pad

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, count_include_pad=self.count_include_pad)

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, A, bounds):
        B, S, C = A.shape[:3]
        lower = bounds[0][0]
        k = self.kernel_size
        ones = lower.new_ones(C, 1, k, k)
        if self.count_include_pad:
            scaled = A / (k * k)
        else:
            count = F.conv2d(lower.new_ones(1, 1, *lower.shape[2:]), ones[:1], None, self.stride, self.padding)
            scaled = A / count
        # the fast ops take the DARTS kernel sizes (CUDA: only those), as Conv2d's rule above
        transpose = depthwise_conv2d_transpose if k in KERNEL_SIZES else depthwise_conv2d_transpose_reference
        out = transpose(_flat_batch(scaled), ones, tuple(lower.shape[2:]), self.stride, self.padding, 1)
        return [_unflat_batch(out, B, S)], None


class Shift(BoundOp):
    """``y[i, j] = x[i + 1, j + 1]`` with zeros past the edge: FactorizedReduce's second path."""

    def forward(self, x):
        return FactorizedReduce.shift(x)

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, A, bounds):
        H, W = A.shape[-2:]
        return [F.pad(A, (1, 0, 1, 0))[..., :H, :W]], None


class Concat(BoundOp):
    """Concatenation along channels (dim 1 of the activations, dim 2 of ``A``)."""

    def forward(self, *xs):
        return torch.cat(xs, dim=1)

    def interval(self, *bounds):
        return torch.cat([b[0] for b in bounds], dim=1), torch.cat([b[1] for b in bounds], dim=1)

    def backward(self, A, bounds):
        return list(torch.split(A, [b[0].shape[1] for b in bounds], dim=2)), None


class ChannelSlice(BoundOp):
    """``x[:, start:end]`` (PC-DARTS' active and bypass channels)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def forward(self, x):
        return x[:, self.start:self.end]

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, A, bounds):
        # The coefficient of the slice alone, with its offset: the engine adds it in place.
        return [(A, self.start)], None


class ChannelShuffle(BoundOp):
    """PC-DARTS' channel shuffle: a permutation of channels, undone by the shuffle with C/g groups."""

    def __init__(self, groups: int):
        self.groups = groups

    @staticmethod
    def _shuffle(x, groups):
        from dsrna.space.ops import channel_shuffle

        return channel_shuffle(x, groups)

    def forward(self, x):
        return self._shuffle(x, self.groups)

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, A, bounds):
        B, S, C = A.shape[:3]
        return [_unflat_batch(self._shuffle(_flat_batch(A), C // self.groups), B, S)], None


class WeightedSum(BoundOp):
    """``sum_i w[i] * x_i`` with ``w >= 0``: the mixed op (softmax(alpha)), a PC-DARTS node
    (softmax(beta)) or a plain node sum (``w = 1``). The weights stay in the autograd graph.
    Nonnegativity holds by construction and is not checked, to keep the search free of host syncs."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def forward(self, *xs):
        return weighted_sum(xs, self.weights)

    def interval(self, *bounds):
        return interval_weighted_sum([b[0] for b in bounds], [b[1] for b in bounds], self.weights)

    def backward(self, A, bounds):
        return [A * self.weights[i] for i in range(len(bounds))], None


class GlobalAvgPool(BoundOp):
    """Mean over the spatial dims, keeping them as 1x1 (``AdaptiveAvgPool2d(1)``)."""

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, A, bounds):
        H, W = bounds[0][0].shape[2:]
        return [(A / (H * W)).expand(*A.shape[:3], H, W)], None


class Flatten(BoundOp):
    """Flatten every dim after the batch."""

    def forward(self, x):
        return x.flatten(1)

    def interval(self, b):
        return b[0].flatten(1), b[1].flatten(1)

    def backward(self, A, bounds):
        return [A.reshape(*A.shape[:2], *bounds[0][0].shape[1:])], None
