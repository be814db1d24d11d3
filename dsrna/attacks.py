"""Adversarial attacks for game-based evaluation (METHOD.md §5).

Models take images in [0, 1] (normalisation is inside the model), so every budget ``eps`` is in
pixel units and every adversarial input returned here lies in the l_p ball of radius ``eps``
around ``x`` *and* in the [0, 1] box. The attacks run the model in eval mode and restore its mode.

- :func:`fgsm` is one steepest-ascent step of size ``eps`` from ``x`` (FGSM for l_inf, the fast
  gradient method for l_2, one sparse step for l_1).
- :func:`pgd` iterates steepest-ascent steps with projection, from a random start uniform in the
  ball, over ``restarts`` runs, and keeps the worst case per example (the first input found
  misclassified, else the one with the largest loss).
- Projection onto ``ball ∩ box``: the exact Euclidean projection onto the ball (clipping for
  l_inf, rescaling for l_2, the sort-based projection of Duchi et al. 2008 for l_1) followed by
  clipping to the box. Clipping moves every coordinate of ``delta`` towards 0 (the box contains
  ``x``), so it never increases ``|delta_i|`` and the result satisfies both constraints. For l_inf
  this is the exact projection onto the intersection; for l_2 and l_1 it is a feasible point
  rather than the nearest one, which is all an attack needs.
- The l_1 step is the sparse steepest ascent of Tramer & Boneh 2019 (SLIDE): the step goes only
  along the coordinates whose gradient magnitude is in the top ``l1_sparsity`` fraction, leaving out
  coordinates already at the box face the gradient pushes towards (a dense l_1 step would be a
  single coordinate, a plain sign step would leave the ball at once).

C&W (l_2) and AutoAttack (l_2, l_inf) come from the optional ``torchattacks`` dependency
(``pip install 'dsrna[attacks]'``).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna.errors import DsrnaError

NORMS = ("linf", "l2", "l1")
ATTACKS = ("fgsm", "pgd", "cw", "autoattack")
INSTALL_HINT = "pip install 'dsrna[attacks]'"
# Fraction of coordinates an l_1 step moves (SLIDE uses the top 1% of gradient magnitudes).
DEFAULT_L1_SPARSITY = 0.01


class MissingExtraError(DsrnaError):
    """An attack needs an optional dependency that is not installed."""


def _check(norm: str, eps: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits (a final network in training mode also returns auxiliary logits)."""
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


class _EvalMode:
    """Run the model in eval mode and put its (possibly mixed) per-module modes back afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training


def _flat_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of ``v``, shaped ``[B, 1, ..., 1]`` to broadcast against ``v``."""
    flat = v.flatten(1)
    if norm == "linf":
        n = flat.abs().amax(dim=1)
    elif norm == "l2":
        n = flat.norm(p=2, dim=1)
    else:
        n = flat.abs().sum(dim=1)
    return n.view(-1, *([1] * (v.dim() - 1)))


def project_l1_ball(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each example of ``v`` onto ``{d : ||d||_1 <= eps}`` (Duchi et al. 2008).

    Soft-thresholds ``|v|`` at the ``theta`` making the l_1 norm exactly ``eps``; examples already
    inside are returned unchanged.
    """
    flat = v.flatten(1)
    magnitude = flat.abs()
    outside = magnitude.sum(dim=1) > eps
    if not bool(outside.any()):
        return v
    u, _ = magnitude.sort(dim=1, descending=True)
    cumulative = u.cumsum(dim=1) - eps
    ranks = torch.arange(1, u.size(1) + 1, device=v.device, dtype=v.dtype)
    # rho = the largest (1-based) rank j with u_j > (sum_{i<=j} u_i - eps) / j. It exists when eps > 0;
    # for eps = 0 none qualifies and rho = 1 gives theta = max |v|, i.e. the projection 0.
    active = (u * ranks > cumulative).to(v.dtype)
    rho = (active * ranks).amax(dim=1, keepdim=True).long().clamp(min=1)
    theta = (cumulative.gather(1, rho - 1) / rho.to(v.dtype)).clamp(min=0)
    projected = flat.sign() * (magnitude - theta).clamp(min=0)
    return torch.where(outside[:, None], projected, flat).view_as(v)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A point of ``ball_p(x, eps) ∩ [0, 1]^d`` (see the module docstring for why this is feasible)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = delta * (eps / _flat_norm(delta, "l2").clamp(min=1e-12)).clamp(max=1.0)
    else:
        delta = project_l1_ball(delta, eps)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A point drawn uniformly from the ball around ``x``, then clipped to the box."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        d = x[0].numel()
        # Radius distribution of the uniform law on a d-dimensional ball: eps * U^(1/d).
        radius = eps * torch.rand(x.size(0), device=x.device, dtype=x.dtype) ** (1.0 / d)
        radius = radius.view(-1, *([1] * (x.dim() - 1)))
        if norm == "l2":
            direction = torch.randn_like(x)
        else:
            # Laplace coordinates normalised to unit l_1 norm are uniform on the l_1 sphere.
            direction = torch.empty_like(x).exponential_() * (torch.randint_like(x, 2) * 2 - 1)
        delta = direction / _flat_norm(direction, norm).clamp(min=1e-12) * radius
    return (x + delta).clamp(0.0, 1.0)


def _ascent_direction(grad: torch.Tensor, x_adv: torch.Tensor, norm: str, sparsity: float) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm`` for the gradient ``grad``."""
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / _flat_norm(grad, "l2").clamp(min=1e-12)
    # l_1: drop coordinates that cannot move in the gradient's direction (already on that box face),
    # then step equally along the top `sparsity` fraction of the rest by |gradient|.
    movable = ~(((grad > 0) & (x_adv >= 1.0)) | ((grad < 0) & (x_adv <= 0.0)))
    magnitude = (grad.abs() * movable).flatten(1)
    k = max(1, int(round(sparsity * magnitude.size(1))))
    threshold = magnitude.topk(k, dim=1).values[:, -1:]
    chosen = (magnitude >= threshold) & (magnitude > 0)
    direction = grad.sign().flatten(1) * chosen
    return (direction / chosen.sum(dim=1, keepdim=True).clamp(min=1)).view_as(grad)


def _loss_and_grad(model, x_adv, y):
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = logits_of(model, x_adv)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        # Summed, not averaged: each example's gradient must not depend on the batch size.
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return logits.detach(), loss.detach(), grad


def _steepest_ascent(model, x, y, eps, norm, steps, step_size, random_start, l1_sparsity):
    """One attack run. Returns the adversarial inputs and, per example, whether each is misclassified
    and its loss; a misclassified iterate is kept even if a later step repairs it."""
    x_adv = _random_start(x, eps, norm) if random_start else x.clone()
    best = x_adv.clone()
    best_loss = torch.full((x.size(0),), -float("inf"), device=x.device)
    fooled = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)
    for step in range(steps + 1):
        logits, loss, grad = _loss_and_grad(model, x_adv, y)
        wrong = logits.argmax(dim=1) != y
        # Prefer a misclassified point; among points of the same kind, the one with the larger loss.
        better = (wrong & ~fooled) | ((wrong == fooled) & (loss > best_loss))
        best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
        best_loss = torch.where(better, loss, best_loss)
        fooled = fooled | wrong
        if step == steps:
            break
        x_adv = project(x_adv + step_size * _ascent_direction(grad, x_adv, norm, l1_sparsity), x, eps, norm)
    return best, fooled, best_loss


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
         l1_sparsity: float = DEFAULT_L1_SPARSITY) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one steepest-ascent step of size ``eps``
    from ``x`` (for l_2 the fast gradient method; for l_1 one sparse step, see the module docstring)."""
    _check(norm, eps)
    x, y = x.detach(), y.detach()
    if eps == 0:
        return x.clone()
    with _EvalMode(model):
        _, _, grad = _loss_and_grad(model, x, y)
        return project(x + eps * _ascent_direction(grad, x, norm, l1_sparsity), x, eps, norm).detach()


def default_step_size(eps: float, steps: int) -> float:
    """``2.5 * eps / steps`` (Madry et al. 2018): enough to cross the ball and come back."""
    return 2.5 * eps / max(steps, 1)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", steps: int = 20,
        step_size: float | None = None, random_start: bool = True, restarts: int = 1,
        l1_sparsity: float = DEFAULT_L1_SPARSITY) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy (Madry et al. 2018), batched.

    ``step_size`` defaults to :func:`default_step_size`. With ``restarts > 1`` each run starts from
    a fresh random point (``random_start=False`` makes all runs identical, so it allows only one);
    the worst case per example over runs and iterates is returned. ``l1_sparsity`` is the fraction
    of coordinates an l_1 step moves (see the module docstring).
    """
    _check(norm, eps)
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    if not random_start and restarts > 1:
        raise ValueError("restarts > 1 needs random_start=True (the runs would be identical)")
    if not 0 < l1_sparsity <= 1:
        raise ValueError(f"l1_sparsity must be in (0, 1], got {l1_sparsity}")
    x, y = x.detach(), y.detach()
    if eps == 0:
        return x.clone()
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    with _EvalMode(model):
        best, fooled, best_loss = _steepest_ascent(model, x, y, eps, norm, steps, step_size, random_start, l1_sparsity)
        for _ in range(restarts - 1):
            candidate, c_fooled, c_loss = _steepest_ascent(model, x, y, eps, norm, steps, step_size, True, l1_sparsity)
            better = (c_fooled & ~fooled) | ((c_fooled == fooled) & (c_loss > best_loss))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), candidate, best)
            best_loss = torch.where(better, c_loss, best_loss)
            fooled = fooled | c_fooled
    return best.detach()


# --- attacks from the optional torchattacks dependency ----------------------------------------------


def require_torchattacks(attack: str):
    try:
        return importlib.import_module("torchattacks")
    except ImportError:
        raise MissingExtraError(f"{attack} needs the optional dependency torchattacks: {INSTALL_HINT}") from None


def has_torchattacks() -> bool:
    return importlib.util.find_spec("torchattacks") is not None


class _LogitsOnly(nn.Module):
    """torchattacks expects a module returning a logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return logits_of(self.model, x)


def carlini_wagner(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, c: float = 1.0,
                   kappa: float = 0.0, steps: int = 100, lr: float = 0.01) -> torch.Tensor:
    """C&W l_2 (Carlini & Wagner 2017, via torchattacks), judged at budget ``eps``.

    C&W minimises the perturbation instead of staying in a ball, so an example whose C&W
    perturbation is larger than ``eps`` keeps its clean input: the result lies in the l_2 ball.
    """
    _check("l2", eps)
    torchattacks = require_torchattacks("C&W")
    x, y = x.detach(), y.detach()
    with _EvalMode(model):
        x_cw = torchattacks.CW(_LogitsOnly(model), c=c, kappa=kappa, steps=steps, lr=lr)(x, y).detach()
    inside = _flat_norm(x_cw - x, "l2") <= eps
    return torch.where(inside, x_cw, x)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    """AutoAttack, standard version (Croce & Hein 2020, via torchattacks), for l_inf or l_2."""
    _check(norm, eps)
    if norm == "l1":
        raise ValueError("autoattack supports norms linf and l2")
    torchattacks = require_torchattacks("AutoAttack")
    x, y = x.detach(), y.detach()
    if eps == 0:
        return x.clone()
    with _EvalMode(model):
        attack = torchattacks.AutoAttack(_LogitsOnly(model), norm="Linf" if norm == "linf" else "L2", eps=eps,
                                         version="standard", n_classes=num_classes, seed=seed)
        x_adv = attack(x, y).detach()
    return project(x_adv, x, eps, norm)


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               steps: int = 20, restarts: int = 1, num_classes: int = 10) -> torch.Tensor:
    """Dispatch by attack name (one of :data:`ATTACKS`); ``steps`` and ``restarts`` are PGD's."""
    if name == "fgsm":
        return fgsm(model, x, y, eps, norm)
    if name == "pgd":
        return pgd(model, x, y, eps, norm, steps=steps, restarts=restarts)
    if name == "cw":
        if norm != "l2":
            raise ValueError(f"cw is an l2 attack; got norm {norm!r}")
        return carlini_wagner(model, x, y, eps)
    if name == "autoattack":
        return autoattack(model, x, y, eps, norm, num_classes=num_classes)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
