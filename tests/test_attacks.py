"""Attacks: every adversarial input lies in the ball and the box, projections are exact, PGD beats
FGSM on a trained network, restarts keep the worst case, the model's mode is restored."""

import sys

import pytest
import torch
import torch.nn as nn

from conftest import fit_mnist_mlp
from dsrna.attacks import MissingExtraError, autoattack, carlini_wagner, fgsm, pgd, project, project_l1_ball

NORMS = ["linf", "l2", "l1"]


def _norm(delta, norm):
    flat = delta.flatten(1)
    return {"linf": flat.abs().amax(1), "l2": flat.norm(dim=1), "l1": flat.abs().sum(1)}[norm]


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


@pytest.fixture(scope="module")
def trained_mlp():
    """An MLP fitted for a second on 512 mnist-mini images, with 256 test images."""
    return fit_mnist_mlp(hidden=64, n_test=256)


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_adversarial_inputs_stay_in_ball_and_box(norm, eps):
    model = _small_cnn()
    # Pixels on the box faces too, where a careless projection leaves the box.
    x = torch.rand(6, 1, 8, 8)
    x[0], x[1, :, :4] = 0.0, 1.0
    y = torch.randint(0, 10, (6,))
    for x_adv in (fgsm(model, x, y, eps, norm),
                  pgd(model, x, y, eps, norm, steps=5, restarts=2),
                  pgd(model, x, y, eps, norm, steps=3, step_size=10 * eps, random_start=False)):
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (_norm(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
        assert (x_adv != x).any()  # the attack moved


def _l1_projection_by_bisection(v, eps):
    """Independent reference: soft-threshold at the theta found by bisection on sum(max(|v|-theta, 0)) = eps."""
    out = []
    for row in v.flatten(1).double():
        if row.abs().sum() <= eps:
            out.append(row)
            continue
        lo, hi = 0.0, row.abs().max().item()
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (row.abs() - mid).clamp(min=0).sum() > eps else (lo, mid)
        out.append(row.sign() * (row.abs() - hi).clamp(min=0))
    return torch.stack(out).view_as(v).to(v.dtype)


def test_l1_projection_is_the_euclidean_projection():
    v = torch.randn(8, 3, 5, 5, dtype=torch.float64) * torch.rand(8, 1, 1, 1, dtype=torch.float64) * 2
    for eps in (0.0, 0.3, 2.0, 10.0):
        projected = project_l1_ball(v, eps)
        torch.testing.assert_close(projected, _l1_projection_by_bisection(v, eps), atol=1e-9, rtol=0)
        assert (_norm(projected, "l1") <= eps + 1e-9).all()
    inside = v / _norm(v, "l1").view(-1, 1, 1, 1) * 0.5
    torch.testing.assert_close(project_l1_ball(inside, 1.0), inside)  # points inside stay put


def test_linf_projection_is_exact_on_ball_and_box():
    x = torch.rand(4, 1, 6, 6)
    far = x + 3 * torch.randn_like(x)
    exact = torch.maximum(torch.maximum(x - 0.1, torch.zeros_like(x)),
                          torch.minimum(torch.minimum(x + 0.1, torch.ones_like(x)), far))
    torch.testing.assert_close(project(far, x, 0.1, "linf"), exact)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5), ("l1", 10.0)])
def test_pgd_at_least_as_strong_as_fgsm_on_a_trained_network(trained_mlp, norm, eps):
    model, x, y = trained_mlp
    clean = _accuracy(model, x, y)
    assert clean > 0.75  # the network did learn something
    fgsm_acc = _accuracy(model, fgsm(model, x, y, eps, norm), y)
    pgd_acc = _accuracy(model, pgd(model, x, y, eps, norm, steps=20), y)
    assert pgd_acc <= fgsm_acc
    assert pgd_acc < clean - 0.2  # and it is a real attack


def test_restarts_keep_the_worst_case_per_example(trained_mlp):
    model, x, y = trained_mlp
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    torch.manual_seed(1)
    single = pgd(model, x, y, 0.05, "linf", steps=5)
    torch.manual_seed(1)  # the first of three runs draws the same start as the single run
    triple = pgd(model, x, y, 0.05, "linf", steps=5, restarts=3)
    with torch.no_grad():
        broken_single = correct & (model(single).argmax(1) != y)
        broken_triple = correct & (model(triple).argmax(1) != y)
    assert not (broken_single & ~broken_triple).any()
    assert broken_triple.sum() >= broken_single.sum()


def test_attacks_run_in_eval_mode_and_restore_the_mode():
    model = _small_cnn().train()
    model[1].eval()  # a mixed mode must come back as it was
    running_mean = model[1].running_mean.clone()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(model.training))
    pgd(model, x, y, 0.1, steps=2)
    fgsm(model, x, y, 0.1)
    assert seen and not any(seen)
    assert model.training and model[0].training and not model[1].training
    torch.testing.assert_close(model[1].running_mean, running_mean)
    assert all(p.grad is None for p in model.parameters())  # only the input is differentiated


def test_final_network_tuple_output_and_zero_eps():
    from dsrna import DARTS_V2, Network

    net = Network(DARTS_V2, C=4, num_classes=10, layers=3, in_channels=1, auxiliary=True).train()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    x_adv = pgd(net, x, y, 0.03, steps=1)
    assert (x_adv - x).abs().max() <= 0.03 + 1e-6 and net.training
    assert torch.equal(pgd(net, x, y, 0.0), x) and torch.equal(fgsm(net, x, y, 0.0), x)


def test_bad_arguments_are_value_errors():
    model, x, y = _small_cnn(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown norm"):
        pgd(model, x, y, 0.1, "l3")
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match="random_start"):
        pgd(model, x, y, 0.1, restarts=2, random_start=False)


def test_optional_attacks_without_the_extra_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # as if not installed
    model, x, y = _small_cnn(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(MissingExtraError, match=r"pip install 'dsrna\[attacks\]'"):
        carlini_wagner(model, x, y, 0.5)
    with pytest.raises(MissingExtraError, match=r"pip install 'dsrna\[attacks\]'"):
        autoattack(model, x, y, 0.5, "l2")


def test_cli_attack_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys):
    from dsrna.cli import main

    monkeypatch.setitem(sys.modules, "torchattacks", None)
    status = main(["attack", str(tmp_path / "model.pt"), "--norm", "l2", "--eps", "0.5", "--attacks", "cw"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().count("\n") == 0
    assert "pip install 'dsrna[attacks]'" in err
