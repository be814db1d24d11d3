"""A drop-in for the original DARTS code (Liu et al. 2019, ``cnn/model_search.py`` and
``cnn/architect.py``): change ::

    from model_search import Network
    from architect import Architect

into ::

    from dsrna.compat.darts import Network, Architect

and an existing DARTS search script runs on this library's super-network and backends. The
interfaces are DARTS': ``Network(C, num_classes, layers, criterion, steps=4, multiplier=4,
stem_multiplier=3)`` with ``arch_parameters()``, ``genotype()``, ``_loss(input, target)``, ``new()``,
``alphas_normal``/``alphas_reduce``; ``Architect(model, args)`` reads ``args.momentum``,
``args.weight_decay``, ``args.arch_learning_rate`` and ``args.arch_weight_decay``, and its
``step(input_train, target_train, input_valid, target_valid, eta, network_optimizer, unrolled)``
updates the architecture.

The same functions (float64 outputs and gradients agree to rounding with DARTS' code; the stem's
batch norm is affine, as DARTS', where :class:`dsrna.SearchNetwork` keeps it affine-free). The
differences fix problems of public DARTS code (METHOD.md §6): the architecture parameters are in
``state_dict``; the unrolled step reuses one shadow network instead of building a model per step;
the architecture step computes no weight gradients (DARTS' ``loss.backward()`` also filled the
weights' ``.grad``, which its training loop then discarded). The modules are this library's, so
DARTS' own ``weights.pt`` files do not load (other parameter names).
"""

from __future__ import annotations

import torch

from dsrna.search.searcher import finite_difference_hvp, sgd_lookahead
from dsrna.space import SearchNetwork
from dsrna.space.genotype import PRIMITIVES, Genotype

__all__ = ["Architect", "Genotype", "Network", "PRIMITIVES"]


class Network(SearchNetwork):
    """DARTS' ``model_search.Network``; extra keywords (``in_channels``, ``partial_channels``,
    ``backend``, ``mean``, ``std``, ``stem``, ``stem_affine``) go to :class:`dsrna.SearchNetwork`;
    the stem's batch norm is affine unless ``stem_affine=False``."""

    lowers_as_base = True  # SearchNetwork's function (dsrna.bounds lowers it as that)

    def __init__(self, C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3, **kwargs):
        kwargs.setdefault("stem_affine", True)
        super().__init__(C, num_classes, layers, steps=steps, multiplier=multiplier,
                         stem_multiplier=stem_multiplier, **kwargs)
        self._criterion = criterion
        self._kwargs = kwargs

    def parameters(self, recurse: bool = True):
        """The weights only, as in DARTS, whose scripts hand ``model.parameters()`` to the weights'
        SGD (its alphas were unregistered tensors). Here they are registered, so they stay in
        ``state_dict``; ``arch_parameters()`` returns them."""
        arch = {id(p) for p in self.arch_parameters()}
        return (p for _, p in self.named_parameters(recurse=recurse) if id(p) not in arch)

    def weight_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.parameters())

    def _loss(self, input, target):
        return self._criterion(self(input), target)

    def new(self) -> "Network":
        net = Network(self.C, self.num_classes, self.layers, self._criterion, self.steps, self.multiplier,
                      self.stem_multiplier, **self._kwargs)
        net = net.to(device=self.alphas_normal.device, dtype=self.alphas_normal.dtype)
        with torch.no_grad():
            for mine, theirs in zip(net.arch_parameters(), self.arch_parameters()):
                mine.copy_(theirs)
        return net


class Architect:
    """DARTS' ``architect.Architect``: Adam on the architecture, first order or unrolled."""

    def __init__(self, model: Network, args):
        self.model = model
        self.network_momentum = args.momentum
        self.network_weight_decay = args.weight_decay
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=args.arch_learning_rate, betas=(0.5, 0.999),
                                          weight_decay=args.arch_weight_decay)
        self._shadow = None

    def step(self, input_train, target_train, input_valid, target_valid, eta, network_optimizer, unrolled):
        arch = self.model.arch_parameters()
        if unrolled:
            grads = self._unrolled_gradient(input_train, target_train, input_valid, target_valid, eta, network_optimizer)
        else:
            grads = torch.autograd.grad(self.model._loss(input_valid, target_valid), arch)
        self.optimizer.zero_grad()
        for p, g in zip(arch, grads):
            p.grad = g
        self.optimizer.step()

    def _unrolled_gradient(self, input_train, target_train, input_valid, target_valid, eta, network_optimizer):
        model = self.model
        weights = model.weight_parameters()
        g_train = torch.autograd.grad(model._loss(input_train, target_train), weights)
        unrolled = sgd_lookahead(weights, g_train, network_optimizer, eta, self.network_momentum,
                                 self.network_weight_decay)
        if self._shadow is None:
            self._shadow = model.new()
        shadow = self._shadow
        shadow.train(model.training)
        with torch.no_grad():
            for w_shadow, w in zip(shadow.weight_parameters(), unrolled):
                w_shadow.copy_(w)
            for a_shadow, a in zip(shadow.arch_parameters(), model.arch_parameters()):
                a_shadow.copy_(a)
            # The running statistics too, as DARTS' unrolled model loads the whole state_dict: an
            # eval-mode step normalises with the model's, not with those of the copy's creation.
            for b_shadow, b in zip(shadow.buffers(), model.buffers()):
                b_shadow.copy_(b)
        shadow_arch = shadow.arch_parameters()
        grads = torch.autograd.grad(shadow._loss(input_valid, target_valid), shadow_arch + shadow.weight_parameters())
        d_alpha, v = grads[:len(shadow_arch)], grads[len(shadow_arch):]
        hvp = finite_difference_hvp(shadow, weights, v, input_train, target_train, criterion=model._criterion)
        return [da - eta * h for da, h in zip(d_alpha, hvp)]
