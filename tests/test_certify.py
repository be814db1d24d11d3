"""Certification: no image with certified radius r is broken by PGD at eps < r, and the summary
statistics (certified accuracy, mean, median) follow from the radii."""

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import fit_mnist_mlp
from dsrna.attacks import pgd
from dsrna.bounds import certified_radius, margin_lower_bound
from dsrna.evaluation.certify import certified_accuracy, certify, certify_table


@pytest.fixture(scope="module")
def trained_mlp():
    """An MLP fitted for a second on 512 mnist-mini images, with 48 test images."""
    return fit_mnist_mlp(hidden=32, n_test=48)


@pytest.mark.parametrize("norm,method", [("linf", "crown"), ("l2", "crown"), ("l2", "crown-ibp"), ("linf", "crown-symbolic"),
                                         ("l1", "crown"), ("l1", "crown-ibp"), ("l1", "ibp")])
def test_pgd_never_breaks_an_image_below_its_certified_radius(trained_mlp, norm, method):
    model, x, y = trained_mlp
    radii = certified_radius(model, x, y, norm=norm, method=method, max_eps=4.0, tol=1e-4)
    certified = radii > 0
    assert certified.sum() >= len(y) // 2  # enough images to make the check meaningful
    torch.manual_seed(0)
    for i in torch.nonzero(certified).flatten().tolist():
        xi, yi = x[i:i + 1], y[i:i + 1]
        x_adv = pgd(model, xi, yi, 0.999 * radii[i].item(), norm, steps=30, restarts=2)
        with torch.no_grad():
            assert model(x_adv).argmax(1).item() == yi.item(), f"image {i} broken below its radius {radii[i]:.4g}"
    # The radius is as large as the bound allows: just above it (2 tol) some margin bound is not positive.
    inner = certified & (radii < 4.0 - 1e-3)
    assert inner.any()
    above = margin_lower_bound(model, x[inner], y[inner], radii[inner] + 2e-4, norm, method)
    above = above.scatter(1, y[inner][:, None], math.inf)  # the column t = y holds 0
    assert (above.min(1).values <= 0).all()
    # The radius is not vacuous: attacking far beyond it breaks some image (the bound is not infinitely loose).
    far = pgd(model, x[certified], y[certified], 20 * radii[certified].max().item(), norm, steps=30)
    with torch.no_grad():
        assert (model(far).argmax(1) != y[certified]).any()


def test_certify_summary_follows_from_the_radii(trained_mlp):
    model, x, y = trained_mlp
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # four labels the model does not predict: misclassified, radius 0
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    result = certify(model, loader, "l2", "crown-ibp", eps_list=[0.0, 0.05, 0.2, 1.5], max_eps=2.0, tol=1e-3)
    radii, correct = torch.tensor(result["radii"]), torch.tensor(result["correct"])
    assert result["n"] == len(y) == len(radii)
    assert (radii[~correct] == 0).all() and not correct[:4].any()
    with torch.no_grad():
        assert result["clean_acc"] == pytest.approx((model(x).argmax(1) == y).double().mean().item())
    assert result["certified_acc"][0] == pytest.approx(result["clean_acc"])
    assert result["certified_acc"] == sorted(result["certified_acc"], reverse=True)
    assert result["mean_radius"] == pytest.approx(radii.mean().item())
    assert result["median_radius"] == pytest.approx(radii.double().quantile(0.5).item())  # mean of the middle two
    assert (result["max_eps"], result["tol"], result["candidates"]) == (2.0, 1e-3, 1)
    assert result["at_max_eps"] == int((radii >= 2.0).sum())
    assert certified_accuracy(radii, correct, 0.05) == pytest.approx(result["certified_acc"][1])
    assert "mean" in certify_table(result)


def test_certify_counts_clean_accuracy_in_eval_mode_and_refuses_an_empty_loader():
    """A model handed over in train mode is certified as the network it is at test time (running
    statistics), as the bound engine assumes; an empty test set is an error, not a mean over nothing."""
    from test_attacks import _bn_model_whose_modes_disagree

    from dsrna.evaluation.attack import evaluate_attacks

    model, x, y, _, _ = _bn_model_whose_modes_disagree()
    result = certify(model, DataLoader(TensorDataset(x, y), batch_size=5), "linf", "ibp", tol=1e-2)
    assert result["clean_acc"] == pytest.approx(8 / 12) and result["correct"][:4] == [False] * 4
    assert model.training
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=5)
    for run in (lambda: certify(model, empty, "linf", "ibp"), lambda: evaluate_attacks(model, empty, [0.1])):
        with pytest.raises(ValueError, match="no test images: the loader is empty"):
            run()


def test_certify_rejects_unknown_choices(trained_mlp):
    model, x, y = trained_mlp
    loader = DataLoader(TensorDataset(x[:2], y[:2]), batch_size=2)
    with pytest.raises(ValueError, match="unknown norm"):
        certify(model, loader, "l3")
    with pytest.raises(ValueError, match="unknown method"):
        certify(model, loader, "l2", "exact")


def test_certify_radii_stay_certified_and_reach_the_largest_eps_asked(trained_mlp):
    """Radii keep the model's precision (a float32 copy of a float64 radius can round past it), and
    max_eps defaults to the largest eps asked (a default cap of 1 gave 0% certified above it)."""
    from dsrna.bounds import margin_lower_bound

    model, x, y = trained_mlp
    model = copy.deepcopy(model).double()
    x = x[:8].double()
    with torch.no_grad():
        y = model(x).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    result = certify(model, loader, "l2", "crown", eps_list=[0.1, 1.5], tol=1e-10)
    assert result["max_eps"] == 1.5
    radii = torch.tensor(result["radii"], dtype=torch.float64)
    margins = margin_lower_bound(model, x, y, radii, "l2", "crown")
    assert (margins.scatter(1, y[:, None], float("inf")).amin(1) > 0).all()
    with pytest.raises(ValueError, match="above --max-eps"):
        certify(model, loader, "l2", "crown", eps_list=[2.0], max_eps=1.0)
    # a cap that float32 cannot hold (float32(1.3) < 1.3) is rounded up, so a radius at the cap counts at 1.3
    robust = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        robust[1].weight.mul_(1e-4)
        robust[1].bias.copy_(torch.arange(10.0) * 100)
    images = x[:4].float()
    capped = certify(robust, DataLoader(TensorDataset(images, torch.full((4,), 9)), batch_size=4), "l2", "crown",
                     eps_list=[0.5, 1.3])
    assert capped["certified_acc"] == [1.0, 1.0] and capped["at_max_eps"] == 4
    # a cap float32 holds exactly: radii equal to it count as certified there (radius >= eps)
    exact = certify(robust, DataLoader(TensorDataset(images, torch.full((4,), 9)), batch_size=4), "l2", "crown",
                    eps_list=[0.5, 1.5])
    assert exact["radii"] == [1.5] * 4 and exact["certified_acc"] == [1.0, 1.0] and exact["at_max_eps"] == 4
    for bad in (dict(max_eps=float("nan")), dict(max_eps=float("inf")), dict(tol=float("nan"))):
        with pytest.raises(ValueError, match="finite"):
            certified_radius(model, x, y, "l2", **bad)
    with pytest.raises(ValueError, match=r"tol \(1\) must be below max_eps \(1\)"):  # no pass: every radius 0
        certified_radius(model, x, y, "l2", max_eps=1.0, tol=1.0)
