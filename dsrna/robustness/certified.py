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
from dsrna.robustness import REDUCTIONS, SCALES


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
# informative on the search super-network (docs/bounds.md, "R_CB in the search"): crown-symbolic
# certifies within 1.11x of what an attack reaches at l_inf 1e-6 on the C=16, 8-cell super-network at
# 32x32 (1.04x along 100 search steps), and runs out of error symbols (vacuous) at 1e-5. The l2 budget
# gives each neuron the same deviation (||g||_1 ~ 0.8 sqrt(n) ||g||_2 for a dense gradient g,
# n = 3,072: 44x; measured 1.38x the attack's drop there). Elsewhere the interval bounds are vacuous at every eps and
# crown-symbolic does not help: MNIST's flat background ties max-pool windows beyond any affordable
# error-symbol budget, and an ImageNet input has 150,528 coordinates.
_CB_DEFAULTS = {
    ("cifar10", "linf"): ("crown-symbolic", 1e-6),
    ("cifar10", "l2"): ("crown-symbolic", 4.4e-5),
}


def certified_defaults(dataset: str, norm: str = "linf") -> tuple[str, float]:
    """R_CB's bound method and eps when none is given: crown-symbolic at a small eps where it is tight
    (CIFAR-10), else crown-ibp at :func:`default_eps`."""
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


def certified_bound_metric(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, norm: str = "linf",
                           method: str = "crown-ibp", reduce: str = "min", bn_stats: dict | None = None,
                           scale: str = "linear", dtype: torch.dtype | None = None,
                           max_error_symbols: int = DEFAULT_ERROR_SYMBOLS) -> torch.Tensor:
    """Scalar R_CB over the batch, in ``x``'s dtype.

    ``reduce`` over the targets t != y: "min" (the metric of the paper), "mean", or "softmin"
    (``-logsumexp(-gamma)``, a smooth lower bound of the min). ``scale``: "linear" averages the
    reduced bounds as they are (the paper); "asinh" averages ``asinh`` of them, which equals the
    bound near 0 and its signed logarithm far from it, so a vacuous bound (-1e30 on a deep
    super-network at initialisation) gives a finite R whose gradient is the relative change of the
    bound (see docs/bounds.md, "R_CB in the search"). ``dtype``: the precision of the bound
    computation (None: the model's); float64 keeps vacuous bounds finite where float32 overflows.
    ``max_error_symbols``: the ``crown-symbolic`` budget per example (docs/bounds.md).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
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
