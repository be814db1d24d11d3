"""The DARTS super-network: mixed ops on every edge, weighted by softmax(alpha) (and PC-DARTS beta)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna import backend as _backend
from dsrna.ops import weighted_sum
from dsrna.space import batched_cell
from dsrna.space.genotype import PRIMITIVES, Genotype
from dsrna.space.ops import (
    BatchNorm2d,
    FactorizedReduce,
    Normalize,
    ReLUConvBN,
    Zero,
    channel_shuffle,
    make_op,
    runs_hooks,
)


class MixedOp(nn.Module):
    """One edge: every candidate of ``PRIMITIVES`` (in order) on ``C // partial_channels`` channels.

    With ``partial_channels=K > 1`` (PC-DARTS) only the first ``C/K`` channels go through the
    candidates; the rest bypass (max-pooled 2x2 at stride 2) and the result is channel-shuffled.
    """

    def __init__(self, C: int, stride: int, partial_channels: int = 1):
        super().__init__()
        if C % partial_channels:
            raise ValueError(f"partial_channels={partial_channels} must divide the channel count {C}")
        self.stride = stride
        self.partial_channels = partial_channels
        self.C_op = C // partial_channels
        self.ops = nn.ModuleList(make_op(p, self.C_op, stride, affine=False, pool_bn=True) for p in PRIMITIVES)
        if partial_channels > 1 and stride == 2:
            self.bypass_pool = nn.MaxPool2d(2, 2, ceil_mode=True)

    def _candidates(self) -> tuple:
        """``(ops, ((op, starts_with_relu) for every candidate but none), kept indices, contiguous)``,
        cached; rebuilt when ``ops`` change (a replica, an op replaced).

        Looked up once, not per call: ``hasattr`` on a module without the attribute raises and
        catches an ``AttributeError`` inside ``nn.Module.__getattr__``.
        """
        ops = tuple(self.ops)
        cache = self.__dict__.get("_candidates_cache")
        if cache is None or cache[0] != ops:
            kept = tuple(k for k, op in enumerate(ops) if not isinstance(op, Zero))
            cands = tuple((ops[k], hasattr(ops[k], "after_relu")) for k in kept)
            contiguous = kept == tuple(range(kept[0], kept[-1] + 1))
            cache = (ops, cands, kept, contiguous)
            self.__dict__["_candidates_cache"] = cache
        return cache

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The non-``none`` candidate outputs in order (``none`` adds nothing to the sum)."""
        outs = []
        relu_x = None
        for op, after_relu in self._candidates()[1]:
            if after_relu and not runs_hooks(op):
                # The conv candidates (and the strided skip) all start with ReLU: compute it once per edge
                # (a candidate with hooks is called instead, so that they run).
                if relu_x is None:
                    relu_x = F.relu(x)
                outs.append(op.after_relu(relu_x))
            else:
                outs.append(op(x))  # the stride-1 skip returns x itself: no copy
        return outs

    def kept_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The weights of :meth:`outputs`, a 1-D tensor: a view of ``weights`` (last dimension: the
        candidates), or of its rows (``weights[..., first:last + 1]`` for 2-D ``weights``) when the
        kept candidates are contiguous in ``PRIMITIVES``, as they are."""
        _, _, kept, contiguous = self._candidates()
        if contiguous:
            return weights[..., kept[0]:kept[-1] + 1].reshape(-1)
        return weights[..., list(kept)].reshape(-1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.partial_channels == 1:
            return weighted_sum(self.outputs(x), self.kept_weights(weights))
        active, bypass = x[:, : self.C_op], x[:, self.C_op:]
        mixed = weighted_sum(self.outputs(active), self.kept_weights(weights))
        if self.stride == 2:
            bypass = self.bypass_pool(bypass)
        return channel_shuffle(torch.cat([mixed, bypass], dim=1), self.partial_channels)


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, partial_channels=1):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.partial_channels = partial_channels
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(C, stride, partial_channels))

    def edge_index(self):
        """Yield ``(node, edge, input_state)`` for every edge in order (node counts from 2)."""
        e = 0
        for i in range(self.steps):
            for j in range(2 + i):
                yield 2 + i, e, j
                e += 1

    def forward(self, s0, s1, weights, edge_weights=None):
        """``weights``: softmax(alpha) ``[edges, ops]``; ``edge_weights``: per-edge beta weights or None."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        nodes = _backend.dispatch("search_cell", s0.device)(self, states, weights, edge_weights)
        return torch.cat(nodes[-self.multiplier:], dim=1)


def cell_nodes_reference(cell: SearchCell, states: list[torch.Tensor], weights: torch.Tensor,
                         edge_weights: torch.Tensor | None) -> list[torch.Tensor]:
    """Appends the cell's nodes to ``states`` (its two preprocessed inputs), one mixed op per edge."""
    edges = list(cell.edges)
    start = 0
    for i in range(cell.steps):
        end = start + 2 + i
        if cell.partial_channels == 1:
            # Node-level fusion: every candidate of every incoming edge goes into one weighted sum.
            # Every edge keeps the same candidates, so the node's weights are one slice of rows
            # ``start:end`` of ``weights``, flattened (one copy; its backward one slice).
            outs = []
            for j in range(2 + i):
                outs += edges[start + j].outputs(states[j])
            if all(edges[start + j]._candidates()[2] == edges[start]._candidates()[2] for j in range(1, 2 + i)):
                w = edges[start].kept_weights(weights[start:end])
            else:  # not so in the DARTS space; kept for modified cells
                w = torch.cat([edges[start + j].kept_weights(weights[start + j]) for j in range(2 + i)])
            states.append(weighted_sum(outs, w))
        else:
            outs = [edges[start + j](states[j], weights[start + j]) for j in range(2 + i)]
            states.append(weighted_sum(outs, edge_weights[start:end]))
        start = end
    return states


def cell_nodes_batched(cell: SearchCell, states: list[torch.Tensor], weights: torch.Tensor,
                       edge_weights: torch.Tensor | None) -> list[torch.Tensor]:
    """The fast backends' cell: the edges leaving each state run together (:mod:`.batched_cell`)
    when the cell has the DARTS candidates and its batch norms share one mode, else one mixed op per edge."""
    plan = batched_cell.usable_plan(cell)
    if plan is not None:
        return batched_cell.forward_batched(cell, plan, states, weights, edge_weights)
    return cell_nodes_reference(cell, states, weights, edge_weights)


_backend.register("search_cell", "reference", cell_nodes_reference)
for _name in ("native", "triton"):
    _backend.register("search_cell", _name, cell_nodes_batched)


def _parse(weights: torch.Tensor, steps: int) -> list[tuple[str, int]]:
    """DARTS discretisation: per node the two inputs whose best non-``none`` weight is largest."""
    none = PRIMITIVES.index("none")
    gene, start = [], 0
    for i in range(steps):
        end = start + 2 + i
        W = weights[start:end].clone()
        W[:, none] = float("-inf")
        best_weight, best_op = W.max(dim=1)
        # stable sort, so ties go to the lower input index as in DARTS' sorted()
        order = sorted(range(2 + i), key=lambda j: -best_weight[j].item())[:2]
        gene += [(PRIMITIVES[best_op[j].item()], j) for j in order]
        start = end
    return gene


class SearchNetwork(nn.Module):
    """The DARTS super-network (METHOD.md §1). Inputs are in [0, 1]; ``mean``/``std`` normalise inside.

    ``arch_parameters()`` are ``alphas_normal``/``alphas_reduce`` ``[14, 8]`` (and, for
    ``partial_channels > 1``, ``betas_normal``/``betas_reduce`` ``[14]``); they are registered
    parameters, so they are saved in ``state_dict``. ``weight_parameters()`` are all the others.
    ``stem_affine``: the stem's batch norms learn a scale and shift, as in DARTS' and PC-DARTS' code
    (METHOD.md §1 keeps every batch norm of the super-network affine-free; the DARTS drop-in
    :mod:`dsrna.compat.darts` turns it on).
    """

    def __init__(self, C=16, num_classes=10, layers=8, in_channels=3, steps=4, multiplier=4,
                 partial_channels=1, backend="auto", stem_multiplier=3, mean=None, std=None, stem="cifar",
                 stem_affine=False):
        super().__init__()
        _backend.check_name(backend)
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if layers < 1 or steps < 1 or not 1 <= multiplier <= steps:
            raise ValueError(f"need layers >= 1 and 1 <= multiplier <= steps, got layers={layers}, steps={steps}, multiplier={multiplier}")
        if partial_channels < 1:
            raise ValueError(f"partial_channels must be >= 1 (1 = plain DARTS), got {partial_channels}")
        self.C, self.num_classes, self.layers = C, num_classes, layers
        self.in_channels, self.steps, self.multiplier = in_channels, steps, multiplier
        self.partial_channels, self.backend, self.stem_multiplier = partial_channels, backend, stem_multiplier
        self.stem_kind, self.stem_affine = stem, stem_affine
        self.normalize = Normalize(mean if mean is not None else [0.0] * in_channels,
                                   std if std is not None else [1.0] * in_channels)
        if stem == "cifar":
            C_curr = stem_multiplier * C
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
                                      BatchNorm2d(C_curr, affine=stem_affine))
            self.stem1 = None
            C_prev_prev, C_prev = C_curr, C_curr
            reduction_prev = False
        else:
            # PC-DARTS' ImageNet search stem: three stride-2 convs for 224x224 inputs; s0 leaves at
            # stride 4 and s1 at stride 8, so the first cell aligns s0 with a FactorizedReduce.
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
                BatchNorm2d(C // 2, affine=stem_affine),
                nn.ReLU(inplace=False),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), BatchNorm2d(C, affine=stem_affine),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                BatchNorm2d(C, affine=stem_affine),
            )
            C_prev_prev, C_prev = C, C
            reduction_prev = True
        C_curr = C
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, partial_channels))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        n_edges = sum(2 + i for i in range(steps))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))
        if partial_channels > 1:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(n_edges))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges))

    # --- parameters ---------------------------------------------------------------------------------

    _ARCH_NAMES = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")

    def arch_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._ARCH_NAMES if hasattr(self, n)]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def new(self) -> "SearchNetwork":
        """A fresh network of the same configuration with a copy of the architecture parameters."""
        net = SearchNetwork(self.C, self.num_classes, self.layers, self.in_channels, self.steps, self.multiplier,
                            self.partial_channels, self.backend, self.stem_multiplier,
                            self.normalize.mean.flatten().tolist(), self.normalize.std.flatten().tolist(), self.stem_kind,
                            self.stem_affine)
        net = net.to(device=self.alphas_normal.device, dtype=self.alphas_normal.dtype)
        for mine, theirs in zip(net.arch_parameters(), self.arch_parameters()):
            mine.data.copy_(theirs.data)
        return net

    # --- weights of the mixed ops -------------------------------------------------------------------

    def edge_weights(self, reduction: bool, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(alpha) ``[edges, ops]`` and, for PC-DARTS, per-edge softmax(beta) within each node;
        computed in ``dtype`` if given (the bound engine's precision)."""
        alpha = self.alphas_reduce if reduction else self.alphas_normal
        weights = F.softmax(alpha, dim=-1, dtype=dtype)
        if self.partial_channels == 1:
            return weights, None
        beta = self.betas_reduce if reduction else self.betas_normal
        parts, start = [], 0
        for i in range(self.steps):
            parts.append(F.softmax(beta[start:start + 2 + i], dim=-1, dtype=dtype))
            start += 2 + i
        return weights, torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The model's own backend, when set, overrides the global choice for every op inside.
        with contextlib.nullcontext() if self.backend == "auto" else _backend.use_backend(self.backend):
            s0 = self.stem(self.normalize(x))
            s1 = self.stem1(s0) if self.stem1 is not None else s0
            mixing = {False: self.edge_weights(False), True: self.edge_weights(True)}
            for cell in self.cells:
                weights, edge_weights = mixing[cell.reduction]
                s0, s1 = s1, cell(s0, s1, weights, edge_weights)
            return self.classifier(self.global_pooling(s1).flatten(1))

    # --- discretisation -----------------------------------------------------------------------------

    def genotype(self) -> Genotype:
        """The discrete architecture by the DARTS rule (PC-DARTS: edge strength = alpha weight * beta weight)."""
        genes = []
        for reduction in (False, True):
            weights, edge_weights = self.edge_weights(reduction)
            weights = weights.detach().float().cpu()
            if edge_weights is not None:
                weights = weights * edge_weights.detach().float().cpu()[:, None]
            genes.append(_parse(weights, self.steps))
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        return Genotype(normal=genes[0], normal_concat=concat, reduce=genes[1], reduce_concat=concat)
