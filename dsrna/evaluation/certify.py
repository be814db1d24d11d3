"""Verification-based evaluation: the certified radius of every test image (METHOD.md §5).

The radius of an image is the largest eps at which the bound engine proves every margin positive
(:func:`dsrna.bounds.certified_radius`, bisection; 0 for a misclassified image). From the radii
follow their mean, median and histogram, and the certified accuracy at any eps: the fraction of
images classified correctly whose radius is at least eps.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dsrna.attacks import logits_of
from dsrna.bounds.api import DEFAULT_MAX_EPS, DEFAULT_TOL
from dsrna.bounds.engine import METHODS
from dsrna.bounds.perturbation import NORMS
from dsrna.errors import check_finite
from dsrna.evaluation.common import evaluation_pass


def certify(model: nn.Module, loader, norm: str = "linf", method: str = "crown", eps_list=(),
            max_eps: float | None = None, tol: float | None = None, candidates: int | None = None, device="cpu",
            progress: bool = False) -> dict:
    """Certified radii over a loader. Returns a JSON-ready dict with ``radii`` (per image, loader
    order, in the model's precision: a radius is a certified eps, which rounding up could break),
    ``correct``, ``mean_radius``, ``median_radius``, ``clean_acc``, ``certified_acc`` at each of
    ``eps``, the bisection's ``max_eps``, ``tol`` and ``candidates`` (eps tested per bound pass), and
    ``at_max_eps``, the images whose radius reached ``max_eps`` (their true radius may be larger).
    ``max_eps`` defaults to the larger of the bound engine's default and the largest ``eps``."""
    from dsrna.bounds import certified_radius

    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    eps_list = [float(e) for e in eps_list]
    options = bisection_options(max_eps, tol, candidates, eps_list)
    device = torch.device(device)
    model = model.to(device)
    radii, correct = [], []
    with evaluation_pass(model, loader, device, f"certify {norm} {method}", progress) as batches:
        for x, y in batches:
            with torch.no_grad():
                correct.append((logits_of(model, x).argmax(1) == y).cpu())
            radii.append(certified_radius(model, x, y, norm=norm, method=method, **options).detach().double().cpu())
    radii_t, correct_t = torch.cat(radii), torch.cat(correct)
    radii_t = torch.where(correct_t, radii_t, torch.zeros_like(radii_t))
    return dict(norm=norm, method=method, n=int(radii_t.numel()), radii=radii_t.tolist(),
                correct=correct_t.tolist(), mean_radius=radii_t.mean().item(),
                median_radius=radii_t.quantile(0.5).item(), clean_acc=correct_t.double().mean().item(), eps=eps_list,
                certified_acc=[certified_accuracy(radii_t, correct_t, e) for e in eps_list],
                at_max_eps=int((radii_t >= options["max_eps"]).sum()), **options)


def bisection_options(max_eps: float | None, tol: float | None, candidates: int | None, eps_list=()) -> dict:
    """``max_eps``, ``tol`` and ``candidates`` of the bisection, defaults filled in (``max_eps``: the
    larger of the engine's default and the largest ``eps``). Refuses settings that cannot end (an
    infinite upper end) or cannot narrow the radius, and an eps above ``max_eps``, where a radius
    (capped there) could never reach."""
    for name, value in (("--max-eps", max_eps), ("--tol", tol)):
        if value is not None:
            check_finite(name, value, positive=True)
    if candidates is not None and candidates < 1:
        raise ValueError(f"--candidates must be >= 1, got {candidates}")
    options = dict(max_eps=max([DEFAULT_MAX_EPS, *eps_list]) if max_eps is None else max_eps,
                   tol=DEFAULT_TOL if tol is None else tol, candidates=1 if candidates is None else candidates)
    if options["tol"] >= options["max_eps"]:
        raise ValueError(f"--tol {options['tol']:g} is not below the largest radius tried (--max-eps "
                         f"{options['max_eps']:g}): the bisection would stop at once and give every radius as 0")
    if max_eps is not None and eps_list and max(eps_list) > max_eps:
        raise ValueError(f"--eps {max(eps_list):g} is above --max-eps {max_eps:g}: radii stop at max_eps, "
                         f"so no image could be certified there; raise --max-eps")
    return options


def certified_accuracy(radii: torch.Tensor, correct: torch.Tensor, eps: float) -> float:
    """Fraction of images classified correctly and certified at ``eps`` (radius >= eps)."""
    return ((radii >= eps) & correct).double().mean().item()


def certify_table(result: dict) -> str:
    """Markdown summary: mean/median radius, then certified accuracy (%) at each eps."""
    lines = [f"certified radius ({result['norm']}, {result['method']}) over {result['n']} images: "
             f"mean {result['mean_radius']:.4g}, median {result['median_radius']:.4g}; "
             f"clean accuracy {100 * result['clean_acc']:.2f}%"]
    if result.get("at_max_eps"):
        lines.append(f"{result['at_max_eps']} radii reached max_eps {result['max_eps']:g} (their true radius may be "
                     "larger: raise --max-eps)")
    if result["eps"]:
        lines += ["", f"| eps ({result['norm']}) | certified accuracy (%) |", "|---|---|"]
        lines += [f"| {e:g} | {100 * a:.2f} |" for e, a in zip(result["eps"], result["certified_acc"])]
    return "\n".join(lines)
