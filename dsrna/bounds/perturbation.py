"""The input set: an l_p ball around x, optionally intersected with a box (the valid pixel range)."""

from __future__ import annotations

import math
import warnings

import torch

NORMS = ("linf", "l2", "l1")
# Dual norm exponent q of each ball: sup_{||d||_p <= eps} a.d = eps * ||a||_q.
_DUAL = {"linf": 1, "l2": 2, "l1": float("inf")}


def warn_if_whole_box(eps: float, norm: str, name: str) -> None:
    """Warn that an l_inf budget of 1 or more holds every image in [0, 1] (so nothing is robust): most
    likely a budget given in 0-255 units or as a count of levels."""
    if norm == "linf" and eps >= 1:
        warnings.warn(f"{name} {eps:g} in l_inf covers the whole [0, 1] pixel range, so no image can be robust; "
                      f"budgets are in pixel units (8/255 is {name} {8 / 255:.4f})", stacklevel=3)


class Ball:
    """``{x' : ||x' - x||_p <= eps}`` (intersected with ``[clip[0], clip[1]]`` when ``clip``).

    ``eps`` is a number or a tensor ``[B]`` (one radius per example, used by the batched bisection
    of :func:`dsrna.bounds.certified_radius`).
    """

    def __init__(self, x: torch.Tensor, eps, norm: str = "linf", clip: tuple[float, float] | None = (0.0, 1.0)):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        if not torch.is_tensor(eps) and not 0 <= eps < math.inf:  # tensors are not checked: that would sync with the device
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        if eps.dim() > 1 or (eps.dim() == 1 and eps.numel() != x.shape[0]):
            raise ValueError(f"eps must be a number or one value per example ({x.shape[0]}), got shape {tuple(eps.shape)}")
        if eps.dim() == 0:
            eps = eps.expand(x.shape[0])
        self.x, self.norm, self.clip = x, norm, clip
        self.eps = eps  # [B]

    def select(self, index: int) -> "Ball":
        """The set of example ``index`` alone (a batch of one)."""
        return Ball(self.x[index:index + 1], self.eps[index:index + 1], self.norm, self.clip)

    def _eps_like(self, t: torch.Tensor) -> torch.Tensor:
        return self.eps.reshape(-1, *([1] * (t.dim() - 1)))

    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest box holding the set: ``x -+ eps`` for every norm (``||d||_inf <= ||d||_p``), clipped."""
        eps = self._eps_like(self.x)
        lower, upper = self.x - eps, self.x + eps
        if self.clip is not None:
            lower, upper = lower.clamp(min=self.clip[0]), upper.clamp(max=self.clip[1])
        return lower, upper

    def symbols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coef [B, n, *x.shape[1:]], centre)``: the input as ``centre + coef . d`` over the
        ``n = x[0].numel()`` symbols ``d`` in the unit ball of :attr:`symbol_norm`. l_inf: the
        (clipped) box, ``d`` in ``[-1, 1]^n``; l_2 / l_1: the ball itself (the box is left to the
        intervals the forward symbolic pass is intersected with)."""
        if self.norm == "linf":
            lower, upper = self.box()
            centre, half = (upper + lower) / 2, (upper - lower) / 2
        else:
            centre, half = self.x, self._eps_like(self.x).expand_as(self.x)
        B = self.x.shape[0]
        return torch.diag_embed(half.reshape(B, -1)).reshape(B, -1, *self.x.shape[1:]), centre

    @property
    def symbol_norm(self) -> float:
        """The dual exponent q of the symbols' ball: ``sup_d coef . d = ||coef||_q``."""
        return _DUAL[self.norm]

    def concretize(self, A: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``min over the set of sum A * x' + bias``, a sound lower bound ``[B, S]``; ``A`` is ``[B, S, *x.shape[1:]]``.

        l_inf (with or without the box): exact, by the box corners. l_2 / l_1 without the box: exact
        by the dual norm, ``A.x - eps ||A||_q``. l_2 / l_1 with the box: the larger of the ball bound
        and the box bound, both sound over the intersection (exact minimisation over a ball-box
        intersection would need a small optimisation per specification).
        """
        A = A.flatten(2)
        if self.norm == "linf" or self.clip is not None:
            lower, upper = self.box()
            box_bound = (A.clamp(min=0) * lower.flatten(1).unsqueeze(1)
                         + A.clamp(max=0) * upper.flatten(1).unsqueeze(1)).sum(-1)
            if self.norm == "linf":
                return box_bound + bias
        centre = (A * self.x.flatten(1).unsqueeze(1)).sum(-1)
        ball_bound = centre - self.eps.unsqueeze(1) * torch.linalg.vector_norm(A, ord=_DUAL[self.norm], dim=-1)
        if self.clip is not None:
            return torch.maximum(ball_bound, box_bound) + bias
        return ball_bound + bias
