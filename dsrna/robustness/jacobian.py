"""DSRNA-Jacobian: robustness as minus the expected first-order change of the logits (METHOD.md §3).

For a perturbation ``d`` with ``||d||_p <= eps``, Taylor and Hoelder give
``|f_k(x + d) - f_k(x)| <= eps * ||J_k(x)||_q`` with ``J_k`` the k-th row of the logits' input
Jacobian and ``q`` the dual exponent of ``p``. The metric maximised by the search is

    R_Jac = -(eps / K) * mean_i sum_k ||J_k(x_i)||_q          (K classes)

Every estimator of ``S(x) = sum_k ||J_k(x)||_q`` below is built from vector-Jacobian products taken
with ``create_graph=True``, so R_Jac is differentiable in the weights and the architecture
parameters (double backward). See ``docs/robustness.md`` for the estimators' bias and variance.

Batch norm in training mode couples the images of a batch. As for the certified metric, the
statistics of the clean forward pass of the same batch are constants with respect to the input
(each image's Jacobian is that of its own logits only) and stay in the autograd graph of the
weights and alpha: see :class:`dsrna.space.ops.BatchNorm2d`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn

from dsrna.space.ops import BatchNorm2d, capture_batch_stats, frozen_batch_stats

ESTIMATORS = ("random-row", "exact", "top1", "projection")

# Dual exponent of the perturbation norm: ||J_k . d|| <= ||J_k||_q ||d||_p with 1/p + 1/q = 1.
DUAL_EXPONENT = {"linf": 1.0, "l2": 2.0, "l1": math.inf}


def jacobian_metric(net: nn.Module, x: torch.Tensor, norm: str = "l2", estimator: str = "random-row", n: int = 1,
                    eps: float = 1.0, bn_stats: dict | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """R_Jac ``= -(eps / K) * mean_i sum_k ||J_k(x_i)||_q``, a scalar; larger means more robust.

    ``norm`` is the perturbation norm (``linf``, ``l2``, ``l1``), ``q`` its dual. ``estimator``:
    ``exact`` (all K rows), ``random-row`` (``n`` distinct uniformly drawn rows per image, scaled by
    K: unbiased), ``top1`` (the predicted class's row scaled by K: biased), ``projection``
    (``n`` random projections of J, ``l2`` only: the Cauchy-Schwarz bound ``sqrt(K ||J||_F^2)``).
    ``bn_stats``: the store of :func:`dsrna.space.capture_batch_stats` from the clean forward pass
    of this batch; None with train-mode batch norms runs that clean pass here first. Under
    ``torch.no_grad()`` the value is computed without keeping the double-backward graph.
    """
    sums = jacobian_row_norm_sum(net, x, norm, estimator, n, bn_stats, generator)
    return -(eps / _num_classes_seen) * sums.mean() if False else sums.mean().mul(-eps / sums.num_classes)  # type: ignore[attr-defined]
