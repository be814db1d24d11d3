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


def darts_architect_gradient(model, optimizer, args, eta, train, valid, unrolled, r=1e-2):
    """The architecture gradient of DARTS' ``architect.py`` (``_backward_step`` /
    ``_backward_step_unrolled`` with ``_hessian_vector_product``), written out with functional_call:
    the unrolled weights ``w - eta * (momentum * buffer + grad + wd * w)``, the validation gradient
    there, minus ``eta`` times the central difference of the training gradient at ``w +- R v``."""
    arch = model.arch_parameters()
    if not unrolled:
        return torch.autograd.grad(model._loss(*valid), arch)
    arch_ids = {id(a) for a in arch}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in arch_ids]
    names, weights = [n for n, _ in named], [p for _, p in named]
    d_train = torch.autograd.grad(model._loss(*train), weights)
    moment = [args.momentum * optimizer.state[w]["momentum_buffer"] for w in weights]
    leaves = [(w - eta * (m + g + args.weight_decay * w)).detach().requires_grad_(True)
              for w, g, m in zip(weights, d_train, moment)]

    def loss_at(params, batch):
        return model._criterion(torch.func.functional_call(model, dict(zip(names, params)), (batch[0],)), batch[1])

    grads = torch.autograd.grad(loss_at(leaves, valid), list(arch) + leaves)
    d_alpha, vector = grads[:len(arch)], grads[len(arch):]
    R = r / torch.cat([v.flatten() for v in vector]).norm()
    plus = torch.autograd.grad(loss_at([w.detach() + R * v for w, v in zip(weights, vector)], train), arch)
    minus = torch.autograd.grad(loss_at([w.detach() - R * v for w, v in zip(weights, vector)], train), arch)
    return [da - eta * (p - n) / (2 * R) for da, p, n in zip(d_alpha, plus, minus)]


@pytest.mark.parametrize("unrolled", [False, True])
def test_architect_step_takes_darts_gradient_and_adam(unrolled):
    """Float64: the architecture gradient of every step equals DARTS' formula (momentum and weight
    decay in the unrolled step, the model's own criterion, the validation batch for L_val and the
    training batch for the Hessian term), including a later step after alpha moved; the Adam is
    DARTS' (lr, betas (0.5, 0.999), arch weight decay); one unrolled copy serves all steps."""
    torch.manual_seed(0)
    args = SimpleNamespace(learning_rate=0.1, momentum=0.9, weight_decay=0.1, arch_learning_rate=3e-3,
                           arch_weight_decay=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.2)  # not the library's default loss
    model = Network(4, 3, 3, criterion, in_channels=1).double()
    optimizer = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    architect = Architect(model, args)
    group = architect.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.5, 0.999), 1e-3)
    copies = []
    new = model.new
    model.new = lambda: copies.append(new()) or copies[-1]
    assert model.new().alphas_normal.dtype == torch.float64
    copies.clear()

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)

    optimizer.zero_grad()
    model._loss(*batch(0)).backward()
    optimizer.step()  # fills the momentum buffers the unrolled step reads
    for step in range(2):
        train, valid = batch(2 * step + 1), batch(2 * step + 2)
        expected = darts_architect_gradient(model, optimizer, args, args.learning_rate, train, valid, unrolled)
        before = [a.detach().clone() for a in model.arch_parameters()]
        architect.step(*train, *valid, args.learning_rate, optimizer, unrolled=unrolled)
        for a, a0, e in zip(model.arch_parameters(), before, expected):
            torch.testing.assert_close(a.grad, e, rtol=1e-6, atol=1e-9 * e.abs().max().item())
            if step == 0:  # Adam's first step: lr * g / (|g| + 1e-8), g with the arch weight decay
                g = e + 1e-3 * a0
                torch.testing.assert_close(a.detach(), a0 - 3e-3 * g / (g.abs() + 1e-8), rtol=0, atol=1e-12)
        with torch.no_grad():  # move alpha away from the unrolled copy's
            for a in model.arch_parameters():
                a.add_(0.3 * torch.randn_like(a))
    assert len(copies) == (1 if unrolled else 0)


def test_unrolled_step_of_an_eval_mode_model_uses_its_running_statistics():
    """An eval-mode model's unrolled step is DARTS' eval-mode gradient: the unrolled copy runs in eval
    mode and normalises with the model's running statistics of the moment (DARTS' unrolled model
    loads the whole state_dict), here after train-mode steps moved them past the copy's."""
    torch.manual_seed(1)
    args = SimpleNamespace(learning_rate=0.1, momentum=0.9, weight_decay=0.1, arch_learning_rate=3e-3,
                           arch_weight_decay=1e-3)
    model = Network(4, 3, 3, nn.CrossEntropyLoss(), in_channels=1).double()
    optimizer = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum)
    architect = Architect(model, args)
    x, y = torch.rand(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    architect.step(x[:4], y[:4], x[4:], y[4:], 0.1, optimizer, unrolled=True)  # builds the copy
    for _ in range(3):  # the model's running statistics move; the copy's would not on their own
        optimizer.zero_grad()
        model._loss(x[:4], y[:4]).backward()
        optimizer.step()
    model.eval()
    expected = darts_architect_gradient(model, optimizer, args, 0.1, (x[:4], y[:4]), (x[4:], y[4:]), True)
    architect.step(x[:4], y[:4], x[4:], y[4:], 0.1, optimizer, unrolled=True)
    for a, e in zip(model.arch_parameters(), expected):
        torch.testing.assert_close(a.grad, e, rtol=1e-6, atol=1e-9 * e.abs().max().item())
