"""dsrna.compat.darts: a DARTS search script runs unchanged apart from its imports."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna.compat.darts import Architect, Genotype, Network


def darts_search_script(unrolled: bool):
    """The core of DARTS' ``train_search.py`` (one epoch of two steps), verbatim in its calls."""
    args = SimpleNamespace(init_channels=4, layers=3, learning_rate=0.025, momentum=0.9, weight_decay=3e-4,
                           arch_learning_rate=3e-4, arch_weight_decay=1e-3, grad_clip=5, unrolled=unrolled)
    criterion = nn.CrossEntropyLoss()
    model = Network(args.init_channels, 10, args.layers, criterion)
    optimizer = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    architect = Architect(model, args)
    alphas = [a.detach().clone() for a in model.arch_parameters()]
    weight = model.classifier.weight.detach().clone()
    for step in range(2):
        input, target = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        input_search, target_search = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        model.train()
        architect.step(input, target, input_search, target_search, args.learning_rate, optimizer, unrolled=args.unrolled)
        optimizer.zero_grad()
        logits = model(input)
        loss = criterion(logits, target)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
    return model, alphas, weight


@pytest.mark.parametrize("unrolled", [False, True])
def test_darts_script_runs_with_one_import_changed(unrolled):
    model, alphas_before, weight_before = darts_search_script(unrolled)
    assert all(not torch.equal(a, b) for a, b in zip(model.arch_parameters(), alphas_before))
    assert not torch.equal(model.classifier.weight, weight_before)
    genotype = model.genotype()
    assert isinstance(genotype, Genotype) and genotype.validate() is genotype
    assert F.softmax(model.alphas_normal, dim=-1).shape == (14, 8)
    assert model.alphas_reduce is model.arch_parameters()[1]


def test_darts_model_interface():
    model = Network(4, 10, 3, nn.CrossEntropyLoss())
    # alphas: out of model.parameters() (DARTS scripts give those to SGD) but in the state dict
    assert not {id(a) for a in model.arch_parameters()} & {id(p) for p in model.parameters()}
    assert {"alphas_normal", "alphas_reduce"} <= set(model.state_dict())
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
    torch.testing.assert_close(model._loss(x, y), F.cross_entropy(model(x), y))
    twin = model.new()
    assert isinstance(twin, Network) and torch.equal(twin.alphas_normal, model.alphas_normal)
    assert twin._criterion is model._criterion
    mnist = Network(4, 10, 3, nn.CrossEntropyLoss(), in_channels=1, partial_channels=2)
    assert mnist(torch.rand(2, 1, 8, 8)).shape == (2, 10) and mnist.new().partial_channels == 2
    # DARTS' stem: conv, then a batch norm with a learnt scale and shift (the SGD's parameters)
    stem_bn = model.stem[1]
    assert stem_bn.affine and any(p is stem_bn.weight for p in model.parameters())
    assert model.new().stem[1].affine and not Network(4, 10, 3, nn.CrossEntropyLoss(), stem_affine=False).stem[1].affine
    from dsrna import SearchNetwork
    assert SearchNetwork(4, 10, 3, stem_affine=True).new().stem[1].affine
