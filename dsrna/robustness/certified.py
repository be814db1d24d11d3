"""R_CB, the certified-lower-bound robustness metric of DSRNA-CB (METHOD.md §2).

``R_CB = mean_i reduce_{t != y_i} gamma_t(x_i)`` with ``gamma_t`` the certified lower bound of the
margin ``f_y - f_t`` over the eps-ball around ``x_i`` (:func:`dsrna.bounds.margin_lower_bound`).
It is differentiable in the architecture parameters (through the softmax weights of every mixed
op and through the relaxation slopes) and in the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dsrna.bounds import margin_lower_bound
from dsrna.bounds.engine import DEFAULT_ERROR_SYMBOLS
from dsrna.robustness import REDUCTIONS, SCALES, check_dither
from dsrna.robustness.jacobian import this_ranks_draw


# Default eps per (data set, norm): the smallest budget of the usual evaluation curves; R_Jac's scale,
# and R_CB's eps where :func:`certified_defaults` has none of its own. There R_CB's interval bounds are
# vacuous at every eps (docs/bounds.md, benchmarks/cb_evidence.py), and on the asinh scale depend on
# eps only through log(eps).
_DEFAULT_EPS = {
    ("mnist-mini", "linf"): 0.003,
    ("mnist", "linf"): 0.003,
    ("fashion-mnist", "linf"): 0.003,
    ("cifar10", "linf"): 0.001,
    ("imagenet", "linf"): 0.0005,
    ("mnist-mini", "l2"): 0.03,
    ("mnist", "l2"): 0.03,
    ("fashion-mnist", "l2"): 0.03,
    ("cifar10", "l2"): 0.02,
    ("imagenet", "l2"): 0.01,
    ("mnist-mini", "l1"): 0.3,
    ("mnist", "l1"): 0.3,
    ("fashion-mnist", "l1"): 0.3,
    ("cifar10", "l1"): 0.3,
    ("imagenet", "l1"): 0.3,
}


# R_CB's own defaults (method, eps) per (data set, norm), where evidence shows its bound finite and
# informative on the search super-network (docs/bounds.md, "R_CB in the search"), with the robust
# images dithered (RobustnessConfig.cb_dither). l_inf: crown-symbolic certifies within 1.11x of what an
# attack reaches at 1e-6 on the C=16, 8-cell super-network at 32x32 (1.13x dithered; 1.04x along 100
# search steps) and within 1.06x on six 28x28 images of MNIST and of Fashion-MNIST (along 100 search
# steps: 1.03x on MNIST, 1.02x on Fashion-MNIST), and runs out of error symbols (vacuous) at 1e-5 on all
# three. l2 on CIFAR-10: 0.8 sqrt(n) times the l_inf budget (n = 3,072), which gives a dense gradient's
# neuron the same deviation (1.38x there). On MNIST the rule does not carry over (2.2e-5 and 1e-5 are
# vacuous, 4e-6 is 1.48x): 2e-6, within 1.3x on six digits and 1.33x along 100 search steps, is
# measured, not derived; on Fashion-MNIST 2e-6 is within 1.13x on six images (1.17x along 100 steps).
# Elsewhere the interval bounds are vacuous at every eps and crown-symbolic does not help: an ImageNet
# input has 150,528 coordinates.
_CB_DEFAULTS = {
    ("cifar10", "linf"): ("crown-symbolic", 1e-6),
    ("cifar10", "l2"): ("crown-symbolic", 4.4e-5),
    **{(dataset, norm): ("crown-symbolic", eps) for dataset in ("mnist", "mnist-mini", "fashion-mnist")
       for norm, eps in (("linf", 1e-6), ("l2", 2e-6))},
}


# A certified margin bound below -VACUOUS_BOUND says nothing about robustness: the logits of an
# initialised or trained network differ by tens, while the interval bounds of a deep super-network reach
# -1e58 (docs/bounds.md). The search warns when an epoch's R_CB shows such a bound.
VACUOUS_BOUND = 1e6


def shows_vacuous_bound(r: float, scale: str) -> bool:
    """Whether a mean R_CB of ``r`` on ``scale`` ("asinh" or "linear") shows that some image's certified
    margin bound is below ``-VACUOUS_BOUND`` (a mean lies below a value only if one of its terms does)."""
    return r < (-math.asinh(VACUOUS_BOUND) if scale == "asinh" else -VACUOUS_BOUND)


def certified_defaults(dataset: str, norm: str = "linf") -> tuple[str, float]:
    """R_CB's bound method and eps when none is given: crown-symbolic at a small eps where it is tight
    (CIFAR-10, MNIST, Fashion-MNIST), else crown-ibp at :func:`default_eps`."""
    return _CB_DEFAULTS.get((dataset, norm)) or ("crown-ibp", default_eps(dataset, norm))


def default_eps(dataset: str, norm: str = "linf") -> float:
    """The data set's evaluation budget: R_Jac's eps when none is given, and R_CB's where
    :func:`certified_defaults` has none of its own (docs/bounds.md, "R_CB in the search")."""
    try:
        return _DEFAULT_EPS[(dataset, norm)]
    except KeyError:
        datasets = sorted({d for d, _ in _DEFAULT_EPS})
        raise ValueError(f"no default eps for data set {dataset!r} and norm {norm!r} "
                         f"(known: {', '.join(datasets)} with linf, l2, l1); pass eps explicitly") from None


def dithered(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + U(-amount, amount)`` per pixel, clipped to the [0, 1] box (images in pixel units). Under
    torch.distributed the ranks draw independently, as one process with the global batch would."""
    if amount == 0:
        return x
    noise = this_ranks_draw(lambda b: torch.rand(b, *x.shape[1:], device=x.device, dtype=x.dtype, generator=generator),
                            x.shape[0], dim=0)
    return (x + (noise * 2 - 1) * amount).clamp(0.0, 1.0)


def certified_bound_metric(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, norm: str = "linf",
                           method: str = "crown-ibp", reduce: str = "min", bn_stats: dict | None = None,
                           scale: str = "linear", dtype: torch.dtype | None = None,
                           max_error_symbols: int = DEFAULT_ERROR_SYMBOLS, dither: float = 0.0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Scalar R_CB over the batch, in ``x``'s dtype.

    ``reduce`` over the targets t != y: "min" (the metric of the paper), "mean", or "softmin"
    (``-logsumexp(-gamma)``, a smooth lower bound of the min). ``scale``: "linear" averages the
    reduced bounds as they are (the paper); "asinh" averages ``asinh`` of them, which equals the
    bound near 0 and its signed logarithm far from it, so a vacuous bound (-1e30 on a deep
    super-network at initialisation) gives a finite R whose gradient is the relative change of the
    bound (see docs/bounds.md, "R_CB in the search"). ``dtype``: the precision of the bound
    computation (None: the model's); float64 keeps vacuous bounds finite where float32 overflows.
    ``max_error_symbols``: the ``crown-symbolic`` budget per example (docs/bounds.md).
    ``dither`` > 0 certifies the balls around :func:`dithered` ``(x, dither)`` (drawn from ``generator``)
    instead of around ``x``: a flat image region ties every max-pool window over it, which no eps
    decides (the search's default, ``RobustnessConfig.cb_dither``, is 1e-3; certificates of ``x`` itself come from
    :func:`dsrna.bounds.margin_lower_bound` or ``dsrna certify``, which never dither).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    check_dither(dither)
    x = dithered(x, dither, generator)
    gamma = margin_lower_bound(net, x, y, eps, norm, method, bn_stats=bn_stats, dtype=dtype,
                               max_error_symbols=max_error_symbols)  # [B, K], column y is 0
    is_label = torch.nn.functional.one_hot(y, gamma.shape[1]).bool()
    if reduce == "min":
        per_example = gamma.masked_fill(is_label, math.inf).min(1).values
    elif reduce == "mean":
        per_example = gamma.masked_fill(is_label, 0.0).sum(1) / (gamma.shape[1] - 1)
    else:
        per_example = -torch.logsumexp(-gamma.masked_fill(is_label, math.inf), dim=1)
    if scale == "asinh":
        per_example = torch.asinh(per_example)
    return per_example.mean().to(x.dtype)
