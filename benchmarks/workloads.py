"""What the harness times: one builder per metric, each returning a closure that runs one step.

A builder sets up its model, optimiser and random inputs on the device (never zeros: they can hide
unwritten outputs and run faster than real data) and returns ``step()``; the harness warms it up,
times it and counts its kernels. A builder that needs a part of the library that has not landed
raises :class:`Unavailable`, and the row is recorded as skipped.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dsrna import DARTS_V2, Network, SearchNetwork
from dsrna.space import capture_batch_stats

# The steps a CUDA graph replays (static inputs; the search steps as dsrna search --cuda-graph runs them).
GRAPHABLE = frozenset({"forward", "train", "train-bf16", "search-1st", "search-2nd", "search-jacobian", "search-cb",
                       "search-imagenet", "jacobian"})
# Full CROWN, the symbolic pass (a forward of one "image" per input coordinate) and the certified-radius
# bisection cost many passes: they run on the small shape only.
SMALL_ONLY = frozenset({"crown-symbolic", "crown", "radius"})
# The ImageNet-size search iteration runs on its own shape (224x224 inputs, 1000 classes).
IMAGENET_ONLY = frozenset({"search-imagenet"})
# The DSRNA search iterations (R_CB's float64 bound pass makes them the slowest steps): at the first
# batch size only, after everything else.
ROBUST_SEARCH = frozenset({"search-jacobian", "search-cb", "search-cb-symbolic"})

JACOBIAN_GAMMA = 0.01  # the paper's gamma in L = CE - gamma * R_Jac, as in BASELINE.md's Jacobian step
WEIGHT_SGD = dict(lr=0.025, momentum=0.9, weight_decay=3e-4)  # DARTS' weight optimiser


@dataclass(frozen=True)
class Shape:
    """A benchmark configuration: a C-channel, ``layers``-cell network on ``batch`` images of ``image``^2."""

    name: str
    batch: int
    image: int
    C: int
    layers: int
    in_channels: int = 3
    num_classes: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


class Unavailable(Exception):
    """A part of the library a metric needs is not importable here; the row is skipped, not failed."""


def _require(module: str, name: str):
    """``module.name``, or :class:`Unavailable` when that module (or name) has not landed."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise Unavailable(f"{module} not available") from None
        raise
    except (ImportError, AttributeError):
        raise Unavailable(f"{module}.{name} not available") from None


def _batch(shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(shape.batch, shape.in_channels, shape.image, shape.image, device=device)
    y = torch.randint(0, shape.num_classes, (shape.batch,), device=device)
    return x, y


def _search_network(shape: Shape, backend: str, device: torch.device) -> SearchNetwork:
    # Train mode, as in the search: batch norms normalise with batch statistics.
    return SearchNetwork(shape.C, shape.num_classes, shape.layers, shape.in_channels, backend=backend).to(device)


def _forward(shape, backend, device):
    net = _search_network(shape, backend, device)
    x, _ = _batch(shape, device)

    def step():
        with torch.no_grad():
            return net(x)
    return step


def _train(shape, backend, device, bf16=False):
    net = _search_network(shape, backend, device)
    x, y = _batch(shape, device)
    optimizer = torch.optim.SGD(net.weight_parameters(), **WEIGHT_SGD)

    def step():
        optimizer.zero_grad(set_to_none=True)
        # Autocast's weight cache must be off for graph capture; each weight is cast once per step anyway.
        amp = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else contextlib.nullcontext()
        with amp:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
    return step


def _train_bf16(shape, backend, device):
    return _train(shape, backend, device, bf16=True)


# DSRNA-CB's robust sub-batch (``--robust-batch``): CROWN-IBP keeps [images, classes, ...] coefficient
# tensors of every node in the autograd graph, in float64; with 16 images (C=16, 8 cells, 32x32) the
# step outgrew 24 GB of host memory, and with 8 too.
CB_ROBUST_BATCH = 4


def _search(order: int, robustness: str = "none", method: str = "crown-ibp"):
    """One search iteration (architecture step, then weight step); ``robustness``: the R of the
    architecture objective (``cb``: DSRNA-CB, R_CB by ``method`` in float64 at the default eps, by
    CROWN-IBP on the first ``CB_ROBUST_BATCH`` validation images, by crown-symbolic on its default
    robust batch (2); ``jacobian``: DSRNA-Jacobian on the whole batch)."""
    def build(shape, backend, device):
        SearchConfig = _require("dsrna.search", "SearchConfig")
        Searcher = _require("dsrna.search", "Searcher")
        RobustnessConfig = _require("dsrna.robustness", "RobustnessConfig")
        net = _search_network(shape, backend, device)
        dataset = "cifar10" if shape.in_channels == 3 else "mnist"
        r_cb = dict(method=method, robust_batch=min(CB_ROBUST_BATCH, shape.batch) if method == "crown-ibp" else None)
        config = SearchConfig(dataset=dataset, order=order, backend=backend, batch_size=shape.batch, layers=shape.layers,
                              init_channels=shape.C,
                              robustness=RobustnessConfig(kind=robustness, **(r_cb if robustness == "cb" else {})))
        searcher = Searcher(net, config)
        train, val = _batch(shape, device), _batch(shape, device)
        return lambda: searcher.step(train, val)
    return build


def _search_imagenet(shape, backend, device):
    """One first-order search iteration in the PC-DARTS ImageNet protocol (METHOD.md §1, the
    ``imagenet-pcdarts`` preset): three stride-2 stem convs, partial channels K=2, bf16 autocast.
    Per GPU: under torchrun every process runs this on its own batch, plus the gradient all-reduces."""
    SearchConfig = _require("dsrna.search", "SearchConfig")
    Searcher = _require("dsrna.search", "Searcher")
    net = SearchNetwork(shape.C, shape.num_classes, shape.layers, shape.in_channels, partial_channels=2,
                        stem="imagenet", backend=backend).to(device)
    config = SearchConfig(order=1, backend=backend, batch_size=shape.batch, layers=shape.layers, init_channels=shape.C,
                          partial_channels=2, stem="imagenet", amp="bf16")
    searcher = Searcher(net, config)
    train, val = _batch(shape, device), _batch(shape, device)
    return lambda: searcher.step(train, val)


def _jacobian(shape, backend, device):
    """The DSRNA-Jacobian architecture step: loss = CE - gamma * R_Jac (one random Jacobian row per
    image, one VJP with create_graph), then backward through it (double backward)."""
    jacobian_metric = _require("dsrna.robustness", "jacobian_metric")
    net = _search_network(shape, backend, device)
    x, y = _batch(shape, device)

    def step():
        net.zero_grad(set_to_none=True)
        # As in the search's architecture step: the clean pass fixes the batch-norm statistics.
        with capture_batch_stats() as stats:
            loss = F.cross_entropy(net(x), y)
        r_jac = jacobian_metric(net, x, norm="l2", estimator="random-row", n=1, bn_stats=stats)
        (loss - JACOBIAN_GAMMA * r_jac).backward()
    return step


def _default_eps(shape: Shape) -> float:
    default_eps = _require("dsrna.robustness.certified", "default_eps")
    return default_eps("cifar10" if shape.in_channels == 3 else "mnist", "linf")


def _bound_pass(method: str):
    def build(shape, backend, device):
        """One bound pass over the logits of the super-network in search mode (batch statistics of
        the clean batch captured once, outside the timed step, as the architecture step does)."""
        logit_bounds = _require("dsrna.bounds", "logit_bounds")
        eps = _default_eps(shape)
        net = _search_network(shape, backend, device)
        x, _ = _batch(shape, device)
        with torch.no_grad(), capture_batch_stats() as stats:
            net(x)

        def step():
            with torch.no_grad():
                return logit_bounds(net, x, eps, norm="linf", method=method, bn_stats=stats)
        return step
    return build


def _radius(shape, backend, device):
    """Certified l_inf radius (full CROWN, bisection) of every image of the batch on a DARTS_V2 network."""
    certified_radius = _require("dsrna.bounds", "certified_radius")
    net = Network(DARTS_V2, shape.C, shape.num_classes, shape.layers, shape.in_channels).to(device).eval()
    x, y = _batch(shape, device)

    def step():
        return certified_radius(net, x, y, norm="linf", method="crown")
    return step


# In the order the tables list them.
BUILDERS: dict[str, Callable[[Shape, str, torch.device], Callable[[], object]]] = {
    "forward": _forward,
    "train": _train,
    "train-bf16": _train_bf16,
    "search-1st": _search(1),
    "search-2nd": _search(2),
    "search-jacobian": _search(1, "jacobian"),
    "search-cb": _search(1, "cb"),
    "search-cb-symbolic": _search(1, "cb", "crown-symbolic"),
    "search-imagenet": _search_imagenet,
    "jacobian": _jacobian,
    "ibp": _bound_pass("ibp"),
    "crown-ibp": _bound_pass("crown-ibp"),
    "crown-symbolic": _bound_pass("crown-symbolic"),
    "crown": _bound_pass("crown"),
    "radius": _radius,
}
METRICS = tuple(BUILDERS)


def build(metric: str, shape: Shape, backend: str, device: torch.device) -> Callable[[], object]:
    """Set up ``metric`` on ``shape`` with the network's ops on ``backend``; return its step."""
    return BUILDERS[metric](shape, backend, device)
