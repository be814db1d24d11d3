"""A tiny dense float64 oracle for IBP / CROWN-IBP / CROWN, independent of the engine.

It turns an ``nn.Sequential`` of Conv2d, BatchNorm2d (eval), AvgPool2d, Flatten, Linear and ReLU
into explicit matrices (conv as a dense Toeplitz matrix built by loops over its taps) and runs the
textbook algorithms on flat vectors. Only for tiny inputs: matrices are dense.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_matrix(conv: nn.Conv2d, shape):
    C, H, W = shape
    Co, Cg, k, _ = conv.weight.shape
    s, p, d, g = conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups
    Ho, Wo = _conv_out(H, k, s, p, d), _conv_out(W, k, s, p, d)
    M = torch.zeros(Co * Ho * Wo, C * H * W, dtype=torch.float64)
    weight = conv.weight.detach().double()
    for co in range(Co):
        group = co // (Co // g)
        for i in range(Ho):
            for j in range(Wo):
                row = (co * Ho + i) * Wo + j
                for cl in range(Cg):
                    ci = group * Cg + cl
                    for a in range(k):
                        for b in range(k):
                            h, w = i * s - p + a * d, j * s - p + b * d
                            if 0 <= h < H and 0 <= w < W:
                                M[row, (ci * H + h) * W + w] += weight[co, cl, a, b]
    bias = torch.zeros(Co * Ho * Wo, dtype=torch.float64)
    if conv.bias is not None:
        bias = conv.bias.detach().double().repeat_interleave(Ho * Wo)
    return M, bias, (Co, Ho, Wo)


def avg_pool_matrix(pool: nn.AvgPool2d, shape):
    C, H, W = shape
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    Ho, Wo = _conv_out(H, k, s, p, 1), _conv_out(W, k, s, p, 1)
    M = torch.zeros(C * Ho * Wo, C * H * W, dtype=torch.float64)
    for c in range(C):
        for i in range(Ho):
            for j in range(Wo):
                taps = [(i * s - p + a, j * s - p + b) for a in range(k) for b in range(k)]
                inside = [(h, w) for h, w in taps if 0 <= h < H and 0 <= w < W]
                count = len(taps) if pool.count_include_pad else len(inside)
                for h, w in inside:
                    M[(c * Ho + i) * Wo + j, (c * H + h) * W + w] = 1.0 / count
    return M, torch.zeros(C * Ho * Wo, dtype=torch.float64), (C, Ho, Wo)


def dense_layers(model: nn.Sequential, in_shape):
    """``[("affine", W, b) | ("relu",)]`` on flat vectors, one affine per linear module."""
    layers, shape = [], tuple(in_shape)
    for m in model:
        if isinstance(m, nn.Conv2d):
            W, b, shape = conv_matrix(m, shape)
        elif isinstance(m, nn.AvgPool2d):
            W, b, shape = avg_pool_matrix(m, shape)
        elif isinstance(m, nn.BatchNorm2d):
            assert not m.training
            scale = (m.running_var.double() + m.eps).rsqrt()
            shift = -m.running_mean.double() * scale
            if m.affine:
                scale, shift = scale * m.weight.double(), shift * m.weight.double() + m.bias.double()
            n = shape[1] * shape[2]
            W, b = torch.diag(scale.detach().repeat_interleave(n)), shift.detach().repeat_interleave(n)
        elif isinstance(m, nn.Linear):
            W, b, shape = m.weight.detach().double(), m.bias.detach().double(), (m.out_features,)
        elif isinstance(m, nn.Flatten):
            continue
        elif isinstance(m, nn.ReLU):
            layers.append(("relu",))
            continue
        else:
            raise TypeError(type(m).__name__)
        layers.append(("affine", W, b))
    return layers


def _relax(l, u):
    unstable = (l < 0) & (u > 0)
    up_slope = torch.where(unstable, u / torch.where(unstable, u - l, torch.ones_like(u)), (l >= 0).double())
    up_icpt = torch.where(unstable, -l * up_slope, torch.zeros_like(u))
    lo_slope = torch.where(unstable, (u > -l).double(), (l >= 0).double())
    return lo_slope, up_slope, up_icpt


def _concretize(A, bias, x, eps, norm, clip):
    """min over the set of A x' + bias; A [S, n], x [n]."""
    lo, hi = x - eps, x + eps
    if clip:
        lo, hi = lo.clamp(min=0), hi.clamp(max=1)
    box = A.clamp(min=0) @ lo + A.clamp(max=0) @ hi
    if norm == "linf":
        return box + bias
    q = {"l2": 2, "l1": float("inf")}[norm]
    ball = A @ x - eps * torch.linalg.vector_norm(A, ord=q, dim=1)
    return (torch.maximum(ball, box) if clip else ball) + bias


class DenseBounds:
    """Bounds of one flat example ``x`` (the model applied to ``x.view(in_shape)``)."""

    def __init__(self, layers, x, eps, norm, method, clip=True):
        self.layers, self.x, self.eps, self.norm, self.clip = layers, x, eps, norm, clip
        lo, hi = x - eps, x + eps
        if clip:
            lo, hi = lo.clamp(min=0), hi.clamp(max=1)
        self.bounds = [(lo, hi)]  # bounds[i]: interval of the input of layer i
        for i, layer in enumerate(layers):
            l, u = self.bounds[-1]
            if layer[0] == "relu":
                self.bounds.append((l.clamp(min=0), u.clamp(min=0)))
                continue
            W, b = layer[1], layer[2]
            c, r = W @ ((l + u) / 2) + b, W.abs() @ ((u - l) / 2)
            l, u = c - r, c + r
            if method == "crown" and i + 1 < len(layers) and layers[i + 1][0] == "relu":
                unstable = torch.nonzero((l < 0) & (u > 0)).flatten()
                if len(unstable):
                    E = torch.eye(len(l), dtype=torch.float64)[unstable]
                    l = l.clone()
                    u = u.clone()
                    l[unstable] = torch.maximum(l[unstable], self.backward(i + 1, E))
                    u[unstable] = torch.minimum(u[unstable], -self.backward(i + 1, -E))
            self.bounds.append((l, u))

    def backward(self, end, A):
        """Lower bound of A @ (output of layer end-1) by CROWN."""
        bias = torch.zeros(A.shape[0], dtype=torch.float64)
        for i in range(end - 1, -1, -1):
            layer = self.layers[i]
            if layer[0] == "affine":
                bias = bias + A @ layer[2]
                A = A @ layer[1]
            else:
                lo_slope, up_slope, up_icpt = _relax(*self.bounds[i])
                bias = bias + A.clamp(max=0) @ up_icpt
                A = A.clamp(min=0) * lo_slope + A.clamp(max=0) * up_slope
        return _concretize(A, bias, self.x, self.eps, self.norm, self.clip)

    def lower_bound(self, spec, method):
        """Lower bound of spec @ logits; IBP folds the spec into the last affine layer."""
        if method != "ibp":
            return self.backward(len(self.layers), spec)
        W, b = self.layers[-1][1], self.layers[-1][2]
        A = spec @ W
        l, u = self.bounds[-2]
        return A.clamp(min=0) @ l + A.clamp(max=0) @ u + spec @ b


# --- points of the input set, for soundness checks --------------------------------------------------


def sample_ball(x: torch.Tensor, eps: float, norm: str, n: int, clip: bool = True) -> torch.Tensor:
    """``n`` points per example, uniform in the ``norm`` ball around each ``x[i]``: ``[n, B, *x.shape[1:]]``.
    With ``clip`` they are clamped into [0, 1], which keeps them in the ball (x itself is in the box)."""
    B, dim = x.shape[0], x[0].numel()
    if norm == "linf":
        d = (torch.rand(n, B, dim, dtype=x.dtype) * 2 - 1) * eps
    elif norm == "l2":
        direction = torch.randn(n, B, dim, dtype=x.dtype)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        d = direction * eps * torch.rand(n, B, 1, dtype=x.dtype) ** (1.0 / dim)
    else:  # uniform in the l1 ball: signs times the first dim coordinates of a Dirichlet(1, ..., 1) point
        e = -torch.rand(n, B, dim + 1, dtype=x.dtype).log()
        d = eps * (e / e.sum(-1, keepdim=True))[..., :dim] * torch.randint(0, 2, (n, B, dim)).mul(2).sub(1).to(x.dtype)
    points = x.unsqueeze(0) + d.view(n, *x.shape)
    return points.clamp(0, 1) if clip else points


def extreme_points(x: torch.Tensor, eps: float, norm: str, n: int, clip: bool = True) -> torch.Tensor:
    """Points on the boundary of the ``norm`` ball, where affine bounds are reached and uniform samples
    in many dimensions never come near: ``n`` random corners (l_inf) or sphere points (l_2), or every
    vertex ``+-eps e_i`` (l_1, ``2 * dim`` points); ``[m, B, *x.shape[1:]]``, clamped into [0, 1]."""
    B, dim = x.shape[0], x[0].numel()
    if norm == "linf":
        d = torch.randint(0, 2, (n, B, dim)).mul(2).sub(1).to(x.dtype) * eps
    elif norm == "l2":
        d = torch.randn(n, B, dim, dtype=x.dtype)
        d = d / d.norm(dim=-1, keepdim=True) * eps
    else:
        vertices = torch.cat([torch.eye(dim, dtype=x.dtype), -torch.eye(dim, dtype=x.dtype)]) * eps
        d = vertices[:, None, :].expand(2 * dim, B, dim)
    points = x.unsqueeze(0) + d.reshape(d.shape[0], *x.shape)
    return points.clamp(0, 1) if clip else points


def project(points: torch.Tensor, x: torch.Tensor, eps: float, norm: str, clip: bool = True) -> torch.Tensor:
    """Some point of the set (ball, then box) near ``points``; exact Euclidean projection is not needed."""
    d = points - x
    flat = d.flatten(1)
    if norm == "linf":
        d = d.clamp(-eps, eps)
    else:
        size = flat.norm(p=2 if norm == "l2" else 1, dim=1).clamp(min=1e-12)
        d = d * (eps / size).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    out = x + d
    return out.clamp(0, 1) if clip else out


def pgd_minimise(model, x, spec, eps, norm, steps=20, clip=True):
    """The outputs ``[B, K]`` at the end of a small PGD attack minimising ``(output * spec).sum(1)``
    (``spec``: ``[B, K]``) over the set."""
    adv = sample_ball(x, eps, norm, 1, clip)[0]
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        grad, = torch.autograd.grad((model(adv) * spec).sum(), adv)
        if norm == "linf":
            step = grad.sign() * eps / 4
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (x.dim() - 1))) * eps / 4
        adv = project(adv - step, x, eps, norm, clip)
    with torch.no_grad():
        return model(adv)


def pgd_min_margin(model, x, y, t, eps, norm, steps=20, clip=True):
    """The margin ``f_y - f_t`` at the end of a small PGD attack minimising it over the set."""
    with torch.no_grad():
        K = model(x).shape[1]
    spec = torch.nn.functional.one_hot(y, K).to(x.dtype) - torch.nn.functional.one_hot(t, K).to(x.dtype)
    out = pgd_minimise(model, x, spec, eps, norm, steps, clip)
    return (out.gather(1, y[:, None]) - out.gather(1, t[:, None])).squeeze(1)


def pgd_logit_extremes(model, x, K, eps, norm, steps=20, clip=True):
    """The outputs ``[2K, B, K]`` where a PGD attack pushed each of the ``K`` logits down, then up."""
    eye = torch.eye(K, dtype=x.dtype)
    return torch.stack([pgd_minimise(model, x, sign * eye[k].expand(x.shape[0], K), eps, norm, steps, clip)
                        for sign in (1, -1) for k in range(K)])
