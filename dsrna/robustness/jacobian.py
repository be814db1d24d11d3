"""DSRNA-Jacobian: robustness as minus the expected first-order change of the logits (METHOD.md §3).

For a perturbation ``d`` with ``||d||_p <= eps``, Taylor and Hoelder give
``|f_k(x + d) - f_k(x)| <= eps * ||J_k(x)||_q`` with ``J_k`` the k-th row of the logits' input
Jacobian and ``q`` the dual exponent of ``p``. The metric maximised by the search is

    R_Jac = -(eps / K) * mean_i S(x_i),    S(x) = sum_k ||J_k(x)||_q    (K classes).

Every estimator of ``S`` is built from vector-Jacobian products taken with ``create_graph=True``,
so R_Jac is differentiable in the weights and the architecture parameters (double backward).
``docs/robustness.md`` gives each estimator's bias and cost.

Batch norm in training mode couples the images of a batch. As for the certified metric, the
statistics of the clean forward pass of the same batch are constants with respect to the input
(so each image's Jacobian is that of its own logits only) and stay in the autograd graph of the
weights and alpha: see :class:`dsrna.space.ops.BatchNorm2d`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna.errors import check_finite
from dsrna.space.ops import BatchNorm2d, capture_batch_stats, frozen_batch_stats

ESTIMATORS = ("random-row", "exact", "top1", "projection")

# Dual exponent q of the perturbation norm: |J_k . d| <= ||J_k||_q ||d||_p with 1/p + 1/q = 1.
DUAL_EXPONENT = {"linf": 1.0, "l2": 2.0, "l1": math.inf}


def jacobian_metric(net: nn.Module, x: torch.Tensor, norm: str = "l2", estimator: str = "random-row", n: int = 1,
                    eps: float = 1.0, bn_stats: dict | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """R_Jac ``= -(eps / K) * mean_i sum_k ||J_k(x_i)||_q``, a scalar; larger means more robust.

    ``norm``: the perturbation norm (``linf``, ``l2`` or ``l1``); ``q`` is its dual. ``estimator``
    and ``n``: see :func:`jacobian_row_norm_sum`. ``bn_stats``: the store that
    :func:`dsrna.space.capture_batch_stats` recorded during the clean forward pass of this batch;
    None with train-mode batch norms runs that clean pass here first. ``generator`` drives the
    random rows and projections. Under ``torch.no_grad()`` only the value is computed.
    """
    check_finite("eps", eps, positive=True)  # a negative one flips R: the search would reward sensitivity
    sums, num_classes = _row_norm_sums(net, x, norm, estimator, n, bn_stats, generator)
    return sums.mean() * (-eps / num_classes)


def jacobian_row_norm_sum(net: nn.Module, x: torch.Tensor, norm: str = "l2", estimator: str = "exact", n: int = 1,
                          bn_stats: dict | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image estimates ``[B]`` of ``S(x_i) = sum_k ||J_k(x_i)||_q`` (q dual to ``norm``).

    Estimators, each from ``r`` vector-Jacobian products per image:

    - ``exact``: all K rows (``r = K``).
    - ``random-row``: ``n <= K`` distinct rows drawn uniformly per image, their mean norm times K
      (``r = n``). Unbiased for every n; ``n = K`` is exact.
    - ``top1``: the row of the predicted class times K (``r = 1``). Biased (the predicted class's
      row is not a typical row); kept because the first author's later public code used it.
    - ``projection``: ``sqrt(K * F)`` with ``F = (K / n) sum_j ||v_j^T J||_2^2`` over ``n``
      directions ``v_j`` uniform on the unit sphere of R^K (Hoffman et al. 2019), an unbiased
      estimate of ``||J||_F^2`` (``r = n``). ``sqrt(K ||J||_F^2) >= S`` by Cauchy-Schwarz (equal
      when all rows have the same norm); only for ``norm="l2"``. The square root biases it low
      by Jensen's inequality, less as n grows.
    """
    return _row_norm_sums(net, x, norm, estimator, n, bn_stats, generator)[0]


def _row_norm_sums(net, x, norm, estimator, n, bn_stats, generator) -> tuple[torch.Tensor, int]:
    if norm not in DUAL_EXPONENT:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(DUAL_EXPONENT)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown Jacobian estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if estimator == "projection" and norm != "l2":
        raise ValueError(f"the projection estimator bounds l2 row norms only (Frobenius norm); got norm {norm!r}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n (rows or projections per image) must be an integer >= 1; got {n!r}")
    q = DUAL_EXPONENT[norm]
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad(), _per_example_batch_norm(net, x, bn_stats):
        x_in = x.detach().requires_grad_(True)
        logits = _logits(net, x_in)
        B, K = logits.shape
        if estimator == "exact":
            rows = torch.arange(K, device=x.device).expand(B, K)
            cotangents = F.one_hot(rows, K).to(logits.dtype).transpose(0, 1)  # [K, B, K]
        elif estimator == "random-row":
            if n > K:
                raise ValueError(f"random-row draws n distinct rows per image: n={n} exceeds the {K} classes")
            scores = this_ranks_draw(lambda b: torch.rand(b, K, device=x.device, generator=generator), B, dim=0)
            rows = scores.argsort(dim=1)[:, :n]  # n distinct rows, uniformly, per image
            cotangents = F.one_hot(rows, K).to(logits.dtype).transpose(0, 1)  # [n, B, K]
        elif estimator == "top1":
            cotangents = F.one_hot(logits.detach().argmax(dim=1), K).to(logits.dtype)[None]  # [1, B, K]
        else:  # projection
            v = this_ranks_draw(lambda b: torch.randn(n, b, K, device=x.device, dtype=logits.dtype,
                                                      generator=generator), B, dim=1)
            cotangents = v / v.norm(dim=2, keepdim=True)
        vjps = _input_vjps(logits, x_in, cotangents, differentiable)  # [r, B, *x.shape[1:]]
        if estimator == "projection":
            frobenius_sq = vjps.flatten(2).pow(2).sum(dim=2).mean(dim=0) * K
            sums = (K * frobenius_sq).sqrt()
        else:
            norms = torch.linalg.vector_norm(vjps.flatten(2), ord=q, dim=2)  # [r, B]
            sums = norms.sum(dim=0) if estimator == "exact" else K * norms.mean(dim=0)
    return (sums if differentiable else sums.detach()), K


def this_ranks_draw(draw, B: int, dim: int) -> torch.Tensor:
    """``draw(B)``, one slice per image along ``dim``. Under torch.distributed every rank draws for
    the whole global batch (the ranks' generators agree: they are seeded alike) and keeps the slices
    of its images, r, r + W, ... as DistributedSampler deals them: the ranks' estimates are then
    independent, and W processes draw what one process with the global batch would."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return draw(B)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return draw(B * world)[(slice(None),) * dim + (slice(rank, None, world),)]


def _input_vjps(logits: torch.Tensor, x_in: torch.Tensor, cotangents: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``[r, B, ...]``: for each of the r cotangents ``[B, K]``, ``v_i^T J(x_i)`` of every image.

    One backward pass per cotangent over one shared forward graph: one forward instead of the r of
    repeating the batch r times. ``is_grads_batched`` (vmap over the backward) was 3x slower than
    repeating the batch on CPU (docs/robustness.md), and vmap cannot see through the custom
    autograd Functions of the fast paths.
    """
    return torch.stack([torch.autograd.grad(logits, x_in, v, retain_graph=True, create_graph=create_graph)[0]
                        for v in cotangents])


def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    # The final network in training mode with its auxiliary head returns (logits, auxiliary logits).
    return out[0] if isinstance(out, tuple) else out


def _uses_batch_stats(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)


@contextlib.contextmanager
def _per_example_batch_norm(net: nn.Module, x: torch.Tensor, bn_stats: dict | None) -> Iterator[None]:
    """Make every image's logits a function of that image alone (see the module docstring)."""
    coupling = [m for m in net.modules() if _uses_batch_stats(m)]
    if not coupling:  # eval mode: running statistics, nothing couples the batch
        yield
        return
    for name, m in net.named_modules():
        if _uses_batch_stats(m) and not (isinstance(m, BatchNorm2d) and m.training):
            raise ValueError(f"jacobian_metric: {type(m).__name__} {name!r} normalises with batch statistics, which couple "
                             "the images' Jacobians; use dsrna.space.ops.BatchNorm2d (statistics can be frozen) or eval mode")
    if bn_stats is None:
        # The clean pass on this very batch; its statistics keep their graph to the weights and alpha.
        with capture_batch_stats() as bn_stats:
            _logits(net, x.detach())
    with frozen_batch_stats(bn_stats):
        yield
