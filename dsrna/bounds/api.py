"""The public bound functions: logit intervals, margin lower bounds, certified radii."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from dsrna import backend as _backend
from dsrna.bounds.engine import DEFAULT_ERROR_SYMBOLS, DEFAULT_SPEC_CHUNK, Propagation
from dsrna.bounds.graph import BoundGraph, lower
from dsrna.bounds.perturbation import Ball


DEFAULT_MAX_EPS, DEFAULT_TOL = 1.0, 1e-4  # certified_radius's bracket and precision


def _model_backend(model: nn.Module):
    """The model's own ``backend=`` choice governs the dispatched bound ops too."""
    name = getattr(model, "backend", "auto")
    return contextlib.nullcontext() if name == "auto" else _backend.use_backend(name)


def margin_spec(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, K, K]``: row t is ``e_y - e_t`` (all zeros for t = y)."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


class BoundModel:
    """A model lowered once into its bound graph, for many bound computations on one batch.

    ``bn_stats``: a ``capture_batch_stats()`` store for train-mode batch norms (None: a clean pass
    over the first call's batch fixes them, for every method, which ties the object to that batch).
    In eval mode the graph is valid for any batch. Re-create it after the weights or the
    architecture change.

    ``dtype``: compute the bounds in this precision (e.g. ``torch.float64`` for a float32 model, whose
    bounds on a deep network can overflow float32); inputs are cast to it and bounds come back in
    it. None: the model's own precision.

    ``max_spec_chunk`` (``crown``) and ``max_error_symbols`` (``crown-symbolic``) trade memory for
    time and tightness: see :class:`dsrna.bounds.Propagation`. ``crown-symbolic`` bounds a search
    network on its edge-by-edge graph (``lower(stacked=False)``), whose largest node is one
    candidate's: on the stacked graph of the fast backends the forms of a state's stacked convs
    took twice the memory (docs/bounds.md).
    """

    def __init__(self, model: nn.Module, bn_stats: dict | None = None, relu_mode: str = "adaptive",
                 max_spec_chunk: int = DEFAULT_SPEC_CHUNK, dtype: torch.dtype | None = None,
                 max_error_symbols: int = DEFAULT_ERROR_SYMBOLS):
        self.model, self.bn_stats, self.relu_mode = model, bn_stats, relu_mode
        self.max_spec_chunk, self.dtype, self.max_error_symbols = max_spec_chunk, dtype, max_error_symbols
        self._graphs: dict[bool, BoundGraph] = {}
        self._statistics_batch: torch.Tensor | None = None

    @property
    def graph(self) -> BoundGraph:
        """The bound graph of every method but crown-symbolic."""
        return self._graph(stacked=True)

    def _graph(self, stacked: bool) -> BoundGraph:
        """The model's bound graph, lowered once per kind (:func:`dsrna.bounds.lower`)."""
        if stacked not in self._graphs:
            with _model_backend(self.model):
                self._graphs[stacked] = lower(self.model, self.bn_stats, self.relu_mode, self.dtype, stacked)
        return self._graphs[stacked]

    def propagation(self, x, eps, norm="linf", method="crown-ibp", clip=(0.0, 1.0),
                    keep_all_bounds: bool = False) -> Propagation:
        """The bound pass itself (:class:`dsrna.bounds.Propagation`); ``keep_all_bounds`` keeps every
        node's interval in its ``bounds`` for inspection (by default only those a later step reads)."""
        if self.dtype is not None:
            x = x.to(self.dtype)
        with _model_backend(self.model):
            graph = self._graph(stacked=method != "crown-symbolic")
            if graph.needs_clean_pass:  # the first batch fixes the statistics of every graph of this object
                if self._statistics_batch is None:
                    self._statistics_batch = x
                graph.forward(self._statistics_batch)
            return Propagation(graph, Ball(x, eps, norm, clip), method, self.max_spec_chunk, self.max_error_symbols,
                               keep_all_bounds)

    def lower_bound(self, x, spec, eps, norm="linf", method="crown-ibp", clip=(0.0, 1.0)) -> torch.Tensor:
        """Lower bounds ``[B, S]`` of ``spec @ logits`` over the input set; ``spec`` ``[B, S, K]``."""
        prop = self.propagation(x, eps, norm, method, clip)
        with _model_backend(self.model):
            return prop.lower_bound(spec.to(prop.ball.x.dtype))

    def logit_bounds(self, x, eps, norm="linf", method="crown-ibp", clip=(0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
        prop = self.propagation(x, eps, norm, method, clip)
        K = self._num_classes(prop)
        eye = torch.eye(K, dtype=prop.ball.x.dtype, device=x.device).expand(x.shape[0], K, K)
        with _model_backend(self.model):
            both = prop.lower_bound(torch.cat([eye, -eye], dim=1))
        lower, upper = both[:, :K], -both[:, K:]
        # Two passes, each exact up to rounding where the set is a point (eps 0): they may cross by it.
        return torch.minimum(lower, upper), torch.maximum(lower, upper)

    def margin_lower_bound(self, x, y, eps, norm="linf", method="crown-ibp", clip=(0.0, 1.0)) -> torch.Tensor:
        prop = self.propagation(x, eps, norm, method, clip)
        with _model_backend(self.model):
            return prop.lower_bound(margin_spec(y, self._num_classes(prop), prop.ball.x.dtype))

    def _num_classes(self, prop: Propagation) -> int:
        output = prop.bounds[prop.graph.output][0]
        if output.dim() != 2:
            raise ValueError(f"the model's output must be [batch, classes], got shape {tuple(output.shape)}")
        return output.shape[1]


def logit_bounds(model: nn.Module, x: torch.Tensor, eps, norm: str = "linf", method: str = "crown-ibp",
                 clip: tuple[float, float] | None = (0.0, 1.0), bn_stats: dict | None = None,
                 relu_mode: str = "adaptive", max_spec_chunk: int = DEFAULT_SPEC_CHUNK, dtype: torch.dtype | None = None,
                 max_error_symbols: int = DEFAULT_ERROR_SYMBOLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified ``(lower, upper)`` ``[B, K]`` of the logits over the ``norm`` ball of radius ``eps``
    around ``x`` (inputs in [0, 1]; ``clip`` intersects the ball with that box, None to drop it).
    ``method``: "ibp", "crown-ibp", "crown-symbolic" or "crown" (:mod:`dsrna.bounds.engine`). ``bn_stats``: train-mode batch-norm statistics
    captured on the clean batch (None: computed here from ``x``). ``dtype`` and ``max_error_symbols``:
    as :func:`margin_lower_bound`'s."""
    return BoundModel(model, bn_stats, relu_mode, max_spec_chunk, dtype,
                      max_error_symbols).logit_bounds(x, eps, norm, method, clip)


def margin_lower_bound(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, norm: str = "linf",
                       method: str = "crown-ibp", clip: tuple[float, float] | None = (0.0, 1.0),
                       bn_stats: dict | None = None, relu_mode: str = "adaptive",
                       max_spec_chunk: int = DEFAULT_SPEC_CHUNK, dtype: torch.dtype | None = None,
                       max_error_symbols: int = DEFAULT_ERROR_SYMBOLS) -> torch.Tensor:
    """Certified lower bounds ``[B, K]`` of ``f_y(x') - f_t(x')`` over the ball, for every class t
    (column y holds 0). The margin is the specification itself, which is tighter than subtracting
    logit bounds. Differentiable in the weights and the architecture parameters. ``dtype``: the
    precision of the computation and of the result (None: the model's). ``max_error_symbols``: the
    ``crown-symbolic`` budget (:class:`dsrna.bounds.Propagation`)."""
    return BoundModel(model, bn_stats, relu_mode, max_spec_chunk, dtype,
                      max_error_symbols).margin_lower_bound(x, y, eps, norm, method, clip)


@torch.no_grad()
def certified_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "linf", method: str = "crown",
                     max_eps: float = DEFAULT_MAX_EPS, tol: float = DEFAULT_TOL, clip: tuple[float, float] | None = (0.0, 1.0),
                     bn_stats: dict | None = None, candidates: int = 1, relu_mode: str = "adaptive",
                     max_spec_chunk: int = DEFAULT_SPEC_CHUNK, max_error_symbols: int = DEFAULT_ERROR_SYMBOLS) -> torch.Tensor:
    """The largest eps in ``[0, max_eps]`` (to within ``tol``) at which every margin bound of each
    image is positive, ``[B]``; 0 for misclassified images.

    Bisection batched over the images; ``candidates > 1`` tests that many evenly spaced eps per
    pass (the batch is repeated), shrinking the bracket ``candidates + 1``-fold per pass. The
    returned radius is always a certified eps, and the bracket's upper end an uncertified one.
    ``max_error_symbols``: the ``crown-symbolic`` budget. Radii are in ``x``'s precision.
    """
    if not (math.isfinite(max_eps) and max_eps > 0 and math.isfinite(tol) and tol > 0) or candidates < 1:
        raise ValueError(f"need finite max_eps > 0 and tol > 0, candidates >= 1; got {max_eps}, {tol}, {candidates}")
    if tol >= max_eps:  # no bisection pass: every radius below max_eps would come out as 0
        raise ValueError(f"tol ({tol:g}) must be below max_eps ({max_eps:g})")
    bound_model = BoundModel(model, bn_stats, relu_mode, max_spec_chunk, max_error_symbols=max_error_symbols)
    with _model_backend(model):
        clean = bound_model.graph.forward(x)  # also fixes train-mode batch-norm statistics to this batch
    correct = clean.argmax(1) == y
    B = x.shape[0]

    def certified(eps: torch.Tensor, n: int) -> torch.Tensor:
        margins = bound_model.margin_lower_bound(x.repeat(n, *([1] * (x.dim() - 1))), y.repeat(n), eps, norm, method, clip)
        margins = margins.masked_fill(margin_spec(y.repeat(n), margins.shape[1], x.dtype).abs().sum(-1) == 0, math.inf)
        return (margins.min(1).values > 0).view(n, B)

    lo = x.new_zeros(B)
    # The cap in x's precision, rounded up: float32(1.3) < 1.3 left every radius below an eps of 1.3.
    cap = torch.tensor(float(max_eps), dtype=x.dtype, device=x.device)
    cap = torch.where(cap.double() < max_eps, torch.nextafter(cap, cap.new_tensor(math.inf)), cap)
    hi = cap.expand(B).clone()
    lo = torch.where(certified(hi, 1)[0], hi, lo)
    passes = max(0, math.ceil(math.log(max_eps / tol) / math.log(candidates + 1)))
    steps = torch.arange(1, candidates + 1, dtype=x.dtype, device=x.device).unsqueeze(1) / (candidates + 1)
    for _ in range(passes):
        points = lo + (hi - lo) * steps  # [n, B], ascending
        ok = certified(points.flatten(), candidates)
        lo = torch.maximum(lo, torch.where(ok, points, torch.zeros_like(points)).max(0).values)
        above = (~ok) & (points > lo)
        hi = torch.minimum(hi, torch.where(above, points, torch.full_like(points, math.inf)).min(0).values)
    return torch.where(correct, lo, torch.zeros_like(lo))
