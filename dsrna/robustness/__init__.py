"""The two differentiable robustness metrics that the architecture step maximises (METHOD.md §2-4).

``certified_bound_metric`` (R_CB, :mod:`dsrna.robustness.certified`) comes from the bound engine
:mod:`dsrna.bounds`; ``jacobian_metric`` (R_Jac, :mod:`dsrna.robustness.jacobian`) from input-Jacobian
row norms. :class:`RobustnessConfig` holds the search's ``--robustness`` options and
:func:`robustness_term` computes the R of the architecture loss ``L_val - gamma * R`` on a batch
(:func:`robustness_terms`, its terms one by one).
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import torch
import torch.nn as nn

from dsrna.errors import check_finite
from dsrna.bounds.engine import DEFAULT_ERROR_SYMBOLS, METHODS
from dsrna.bounds.perturbation import warn_if_whole_box
from dsrna.robustness.jacobian import DUAL_EXPONENT, ESTIMATORS, jacobian_metric, jacobian_row_norm_sum

KINDS = ("none", "cb", "jacobian", "combined")
NORMS = tuple(DUAL_EXPONENT)
REDUCTIONS = ("min", "mean", "softmin")
SCALES = ("linear", "asinh")
BOUND_DTYPES = {"float32": torch.float32, "float64": torch.float64}
SYMBOLIC_ROBUST_BATCH = 2  # R_CB's examples per step by default under crown-symbolic (n + E image passes each)


def _certified():
    # Imported on use: it imports this module's choices (REDUCTIONS, SCALES).
    return importlib.import_module("dsrna.robustness.certified")


def __getattr__(name: str):
    if name in ("certified_bound_metric", "certified_defaults", "default_eps"):
        return getattr(_certified(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_dither(amount: float) -> None:
    """Refuse an R_CB dither outside [0, 1) pixel units (NaN included)."""
    if not (isinstance(amount, (int, float)) and 0 <= amount < 1):
        raise ValueError(f"R_CB's dither must be a number in [0, 1) (pixel units); got {amount!r}")


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"robustness {field} must be one of {', '.join(choices)}; got {value!r}")


@dataclasses.dataclass
class RobustnessConfig:
    """What R is and how it is computed (METHOD.md §4).

    ``kind``: ``none`` (plain DARTS), ``cb`` (DSRNA-CB), ``jacobian`` (DSRNA-Jacobian) or
    ``combined`` (R_CB + R_Jac). ``gamma`` weighs R in the architecture loss ``L_val - gamma * R``.
    ``eps`` is the perturbation budget in pixel units (images in [0, 1]) under ``norm``; None takes the data
    set's: ``certified_defaults(dataset, norm)`` for R_CB, ``default_eps(dataset, norm)`` for R_Jac.
    ``method`` (None: ``certified_defaults``), ``reduce``, ``cb_scale`` and ``bound_dtype`` configure
    R_CB (bound method; reduction of the per-class margin bounds; "asinh" or "linear" averaging, see
    :func:`certified_bound_metric`; the precision of the bound pass), ``error_symbols`` is the
    ``crown-symbolic`` method's budget per example (docs/bounds.md), ``cb_dither`` the noise R_CB adds to
    its images before bounding them (:func:`dsrna.robustness.certified.dithered`: the default, a quarter of
    an 8-bit grey level, breaks the exact ties of flat image regions, where no max-pool window is ever
    decided, and every dithered image rounds back to the same 8-bit image), ``estimator`` and ``n`` configure R_Jac. ``robust_batch``: R is
    computed on the first ``robust_batch`` examples of the validation batch (None: all of it, or
    ``SYMBOLIC_ROBUST_BATCH`` when R_CB runs crown-symbolic, which costs ``n + E`` image passes per
    example); the caller slices the batch, this module sees only the slice. ``warmup_epochs``: epochs searched
    with R off. ``inner_gamma``: weight of R in the weight step (0: the bilevel problem as published).
    """

    kind: str = "none"
    gamma: float = 0.01
    eps: float | None = None
    norm: str = "linf"
    method: str | None = None
    reduce: str = "min"
    cb_scale: str = "asinh"
    bound_dtype: str = "float64"
    error_symbols: int = DEFAULT_ERROR_SYMBOLS
    cb_dither: float = 1e-3
    estimator: str = "random-row"
    n: int = 1
    robust_batch: int | None = None
    warmup_epochs: int = 0
    inner_gamma: float = 0.0
    dataset: str = "mnist-mini"

    def __post_init__(self):
        _check_choice("kind", self.kind, KINDS)
        _check_choice("norm", self.norm, NORMS)
        if self.method is not None:
            _check_choice("method", self.method, METHODS)
        _check_choice("reduce", self.reduce, REDUCTIONS)
        _check_choice("cb_scale", self.cb_scale, SCALES)
        _check_choice("bound_dtype", self.bound_dtype, tuple(BOUND_DTYPES))
        _check_choice("estimator", self.estimator, ESTIMATORS)
        for name in ("gamma", "inner_gamma"):
            check_finite(f"robustness {name}", getattr(self, name))
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"robustness eps must be a finite number > 0 (or None for the data set default); got {self.eps!r}")
        if self.eps is not None:
            warn_if_whole_box(self.eps, self.norm, "robustness eps")
        if not (isinstance(self.error_symbols, int) and self.error_symbols >= 0):
            raise ValueError(f"robustness error_symbols must be an integer >= 0; got {self.error_symbols!r}")
        check_dither(self.cb_dither)
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"robustness n (Jacobian rows or projections per example) must be an integer >= 1; got {self.n!r}")
        if self.robust_batch is not None and not (isinstance(self.robust_batch, int) and self.robust_batch >= 1):
            raise ValueError(f"robust_batch must be an integer >= 1 or None (the whole validation batch); got {self.robust_batch!r}")
        if not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be an integer >= 0; got {self.warmup_epochs!r}")
        unused = [f.name for f in dataclasses.fields(self)
                  if f.name not in self.fields_in_use(self.kind) and getattr(self, f.name) != f.default]
        if unused:
            users = [kind for kind in KINDS if set(unused) <= self.fields_in_use(kind)]
            one = len(unused) == 1
            raise ValueError(f"robustness {', '.join(unused)} {'has' if one else 'have'} no effect with kind "
                             f"{self.kind!r}: drop {'it' if one else 'them'} or choose kind {' or '.join(users)}")
        if self.method is not None:  # else the method follows the data set: SearchConfig checks once it is known
            self.check_error_symbols()
        if self.uses_jacobian and self.estimator == "projection" and self.norm != "l2":
            raise ValueError(f"the projection estimator bounds l2 Jacobian row norms only; use norm l2 or another estimator (norm is {self.norm!r})")

    @staticmethod
    def fields_in_use(kind: str) -> set[str]:
        """The settings a kind of R reads (the others would be silently ignored)."""
        fields = {"kind", "dataset"}
        if kind != "none":
            fields |= {"gamma", "eps", "norm", "robust_batch", "warmup_epochs", "inner_gamma"}
        if kind in ("cb", "combined"):
            fields |= {"method", "reduce", "cb_scale", "bound_dtype", "error_symbols", "cb_dither"}
        if kind in ("jacobian", "combined"):
            fields |= {"estimator", "n"}
        return fields

    def check_error_symbols(self) -> None:
        """Refuse an error-symbol budget that R_CB's bound method never reads (only crown-symbolic does)."""
        if self.uses_certified and self.error_symbols != DEFAULT_ERROR_SYMBOLS:
            method = self.resolved_method()
            if method != "crown-symbolic":
                default = "" if self.method is not None else f", the default on {self.dataset}"
                raise ValueError(f"robustness error_symbols has no effect with method {method!r}{default}: drop it "
                                 "or choose method crown-symbolic")

    @classmethod
    def saved_settings(cls, saved: dict, dataset: str) -> dict:
        """A saved run's robustness settings without those its R never read: a run saved before they were
        refused may hold some; they never changed its numbers, so they are dropped rather than refused.
        A run saved before R_CB dithered its images ran without dither."""
        in_use = cls.fields_in_use(saved.get("kind", "none"))
        kept = {k: v for k, v in saved.items() if k in in_use}
        if "cb_dither" in in_use:
            kept.setdefault("cb_dither", 0.0)
        if "error_symbols" in kept:
            method = cls(**{**kept, "error_symbols": DEFAULT_ERROR_SYMBOLS, "dataset": dataset}).resolved_method()
            if method != "crown-symbolic":
                del kept["error_symbols"]
        return kept

    @property
    def uses_certified(self) -> bool:
        return self.kind in ("cb", "combined")

    @property
    def uses_jacobian(self) -> bool:
        return self.kind in ("jacobian", "combined")

    def active(self, epoch: int) -> bool:
        """Whether R enters the architecture loss at ``epoch`` (0-based): on, and past the warm-up."""
        return self.kind != "none" and epoch >= self.warmup_epochs

    # The fields whose None means "the data set's default": in_effect() gives what they resolve to.
    RESOLVED = ("method", "eps", "robust_batch")

    def in_effect(self) -> dict:
        """What the ``RESOLVED`` fields are once the data set's defaults are applied (nothing without
        R). A search checkpoint keeps it, so that resuming after a default changed is refused rather
        than silently computing another R."""
        settings = {} if self.kind == "none" else {"robust_batch": self.resolved_robust_batch()}
        if self.uses_certified:
            settings |= {"method": self.resolved_method(), "cb_eps": self.resolved_eps(certified=True)}
        if self.uses_jacobian:
            settings["jacobian_eps"] = self.resolved_eps()
        return settings

    def resolved_method(self) -> str:
        """R_CB's bound method: ``method``, or the data set's default for ``norm`` when it is None."""
        return self.method if self.method is not None else _certified().certified_defaults(self.dataset, self.norm)[0]

    def resolved_eps(self, certified: bool = False) -> float:
        """``eps``, or the data set's default budget for ``norm`` (R_CB's own if ``certified``) when it is None."""
        if self.eps is not None:
            return self.eps
        if certified:
            return float(_certified().certified_defaults(self.dataset, self.norm)[1])
        return float(_certified().default_eps(self.dataset, self.norm))

    def resolved_robust_batch(self) -> int | None:
        """``robust_batch``; when None, ``SYMBOLIC_ROBUST_BATCH`` if R_CB runs crown-symbolic, else None (all)."""
        if self.robust_batch is None and self.uses_certified and self.resolved_method() == "crown-symbolic":
            return SYMBOLIC_ROBUST_BATCH
        return self.robust_batch


def robustness_terms(net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RobustnessConfig,
                     bn_stats: dict | None) -> dict[str, torch.Tensor]:
    """The terms of R on the batch ``(x, y)`` (already cut to ``config.robust_batch``), scalars to
    maximise: ``"cb"`` (R_CB) and/or ``"jacobian"`` (R_Jac) as ``config.kind`` asks; none for ``none``.

    ``bn_stats`` is the store :func:`dsrna.space.capture_batch_stats` recorded during the clean
    forward pass of this batch (None: the metrics run that pass themselves when the net has
    train-mode batch norms).
    """
    terms = {}
    if config.uses_certified:
        terms["cb"] = _certified().certified_bound_metric(
            net, x, y, config.resolved_eps(certified=True), config.norm, config.resolved_method(), reduce=config.reduce,
            bn_stats=bn_stats, scale=config.cb_scale, dtype=BOUND_DTYPES[config.bound_dtype],
            max_error_symbols=config.error_symbols, dither=config.cb_dither)
    if config.uses_jacobian:
        terms["jacobian"] = jacobian_metric(net, x, norm=config.norm, estimator=config.estimator, n=config.n,
                                            eps=config.resolved_eps(), bn_stats=bn_stats)
    return terms


def robustness_term(net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RobustnessConfig,
                    bn_stats: dict | None) -> torch.Tensor:
    """R on the batch ``(x, y)``: the sum of :func:`robustness_terms` (R_CB + R_Jac for ``combined``);
    kind ``none`` returns a zero tensor without touching the net."""
    terms = robustness_terms(net, x, y, config, bn_stats)
    return sum(terms.values()) if terms else torch.zeros((), dtype=x.dtype, device=x.device)


__all__ = [
    "KINDS", "NORMS", "METHODS", "REDUCTIONS", "SCALES", "ESTIMATORS", "RobustnessConfig", "robustness_term",
    "robustness_terms",
    "certified_bound_metric", "certified_defaults", "default_eps", "jacobian_metric", "jacobian_row_norm_sum",
]
