"""R_CB (certified_bound_metric), default_eps and certified_radius."""

import warnings

import pytest
import torch
import torch.nn as nn

from dense_bounds import pgd_min_margin
from dsrna import SearchNetwork
from dsrna.bounds import certified_radius, margin_lower_bound
from dsrna.robustness.certified import (certified_bound_metric, certified_defaults, default_eps, dithered,
                                       shows_vacuous_bound)
from dsrna.space import capture_batch_stats, frozen_batch_stats


def _tiny_search():
    return SearchNetwork(C=4, num_classes=3, layers=2, in_channels=1, steps=2, multiplier=2).double()


def test_metric_is_min_mean_softmin_of_margins():
    net = _tiny_search().eval()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        gamma = margin_lower_bound(net, x, y, 0.001, "linf", "crown-ibp")
        others = gamma[torch.arange(3)[:, None], torch.tensor([[1, 2], [0, 2], [0, 1]])]
        r_min = certified_bound_metric(net, x, y, 0.001, "linf", "crown-ibp", reduce="min")
        r_mean = certified_bound_metric(net, x, y, 0.001, "linf", "crown-ibp", reduce="mean")
        r_soft = certified_bound_metric(net, x, y, 0.001, "linf", "crown-ibp", reduce="softmin")
    torch.testing.assert_close(r_min, others.min(1).values.mean())
    torch.testing.assert_close(r_mean, others.mean())
    torch.testing.assert_close(r_soft, (-torch.logsumexp(-others, 1)).mean())
    assert r_soft <= r_min
    with pytest.raises(ValueError, match="reduce"):
        certified_bound_metric(net, x, y, 0.001, reduce="max")


def test_asinh_scale_and_float64_bound_pass_of_a_float32_net():
    """scale="asinh" averages asinh of the per-example bound; dtype=float64 on a float32 net gives the
    bounds of the same net converted to float64, and the gradient still reaches its float32 alpha."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=2, in_channels=1, steps=2, multiplier=2).train()
    x = torch.rand(3, 1, 6, 6)
    y = torch.tensor([0, 1, 2])
    twin = SearchNetwork(C=4, num_classes=3, layers=2, in_channels=1, steps=2, multiplier=2).train().double()
    twin.load_state_dict(net.state_dict())
    gamma64 = margin_lower_bound(twin, x.double(), y, 0.01, "linf", "crown-ibp")
    gamma = margin_lower_bound(net, x, y, 0.01, "linf", "crown-ibp", dtype=torch.float64)
    assert gamma.dtype == torch.float64
    # Only the softmax of alpha differs: float32 then cast, against float64 in the twin.
    torch.testing.assert_close(gamma, gamma64, rtol=1e-6, atol=1e-9)

    per_example = gamma64.masked_fill(torch.eye(3, dtype=torch.bool)[y], float("inf")).min(1).values
    r = certified_bound_metric(net, x, y, 0.01, "linf", "crown-ibp", scale="asinh", dtype=torch.float64)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, torch.asinh(per_example).mean().float())
    r.backward()
    grad = net.alphas_reduce.grad  # two layers: both cells reduce
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scale"):
        certified_bound_metric(net, x, y, 0.01, scale="log")


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_directional_derivative_wrt_architecture(method):
    """R_CB is differentiable in alpha (train-mode BN with the clean batch's statistics in the graph):
    the autograd derivative along a random direction matches central differences (a full gradcheck
    over all 112 entries of alpha is too slow for the test budget)."""
    net = _tiny_search()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    alpha = net.alphas_reduce.detach().clone()  # two cells, both reduction cells: alphas_normal is unused
    direction = torch.randn_like(alpha)
    del net.alphas_reduce

    def metric(a):
        net.alphas_reduce = a  # a plain tensor in place of the parameter
        with capture_batch_stats() as bn_stats:
            net(x)
        return certified_bound_metric(net, x, y, 1e-4, "linf", method, reduce="mean", bn_stats=bn_stats)

    a = alpha.clone().requires_grad_(True)
    analytic = (torch.autograd.grad(metric(a), a)[0] * direction).sum()
    h = 1e-6
    with torch.no_grad():
        numeric = (metric(alpha + h * direction) - metric(alpha - h * direction)) / (2 * h)
    assert analytic.abs() > 0
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-7)


def test_gradient_reaches_weights_and_architecture():
    net = _tiny_search()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    certified_bound_metric(net, x, y, 1e-3, "l2", "crown-ibp").backward()
    assert net.alphas_reduce.grad.abs().sum() > 0
    assert net.classifier.weight.grad.abs().sum() > 0


def test_default_eps():
    assert default_eps("cifar10", "linf") > 0 and default_eps("mnist", "l2") > 0
    with pytest.raises(ValueError, match="no default eps"):
        default_eps("svhn", "linf")


def _classifier():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double().eval()


@pytest.mark.parametrize("method", ["crown", "crown-symbolic"])
@pytest.mark.parametrize("norm,candidates", [("linf", 1), ("l2", 3)])
def test_certified_radius_is_tight_and_unbroken(norm, candidates, method):
    net = _classifier()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one misclassified image: radius 0
    tol = 1e-4
    radius = certified_radius(net, x, y, norm, method, max_eps=2.0, tol=tol, candidates=candidates)
    assert radius[0] == 0 and (radius[1:] > 0).all()
    ok = slice(1, None)
    with torch.no_grad():
        below = margin_lower_bound(net, x[ok], y[ok], radius[ok], norm, method)
        above = margin_lower_bound(net, x[ok], y[ok], radius[ok] + tol, norm, method)
    label = torch.nn.functional.one_hot(y[ok], 3).bool()
    assert (below.masked_fill(label, float("inf")).min(1).values > 0).all()
    assert (above.masked_fill(label, float("inf")).min(1).values <= 0).all()
    for t in range(3):
        target = torch.full_like(y[ok], t)
        keep = target != y[ok]
        for i in torch.nonzero(keep).flatten().tolist():
            attacked = pgd_min_margin(net, x[ok][i:i + 1], y[ok][i:i + 1], target[i:i + 1], float(radius[ok][i]), norm, steps=40)
            assert attacked.item() > 0


def test_default_budgets_cover_every_data_set_and_follow_its_input_space():
    """Every data set the search knows has a budget per norm; data sets with the same 28x28 grey
    inputs share them (mnist-mini is a sample of MNIST); per pixel (l_inf) and in l_2 the budget
    shrinks as the input grows (MNIST > CIFAR-10 > ImageNet, as the usual evaluation curves); and
    the norm defaults to l_inf, the search's."""
    from dsrna.data import DATASETS

    for norm in ("linf", "l2", "l1"):
        assert all(0 < default_eps(d, norm) < 1 for d in DATASETS)
        assert default_eps("mnist-mini", norm) == default_eps("mnist", norm) == default_eps("fashion-mnist", norm)
    for norm in ("linf", "l2"):
        assert default_eps("mnist", norm) > default_eps("cifar10", norm) > default_eps("imagenet", norm)
    assert default_eps("cifar10") == default_eps("cifar10", "linf")
    assert certified_defaults("cifar10") == certified_defaults("cifar10", "linf")
    assert certified_defaults("mnist") == certified_defaults("mnist", "linf")


def test_defaults_are_the_papers_metric():
    """Called with eps alone, R_CB is the paper's: the l_inf ball, crown-ibp bounds, the min over
    the targets, averaged on the linear scale."""
    net = _tiny_search().eval()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        gamma = margin_lower_bound(net, x, y, 0.01, "linf", "crown-ibp")
        expected = gamma.masked_fill(torch.eye(3, dtype=torch.bool)[y], float("inf")).min(1).values.mean()
        torch.testing.assert_close(certified_bound_metric(net, x, y, 0.01), expected)


def test_bound_pass_uses_the_given_batch_statistics():
    """Train-mode BN: the bounds use the statistics passed in (the whole validation batch's, with R
    on a slice of it), not those of the slice alone."""
    net = _tiny_search().train()
    x = torch.rand(6, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    with capture_batch_stats() as stats:
        net(x)
    r = certified_bound_metric(net, x[:3], y, 1e-3, "linf", "crown-ibp", bn_stats=stats)
    with torch.no_grad():
        gamma = margin_lower_bound(net, x[:3], y, 1e-3, "linf", "crown-ibp", bn_stats=stats)
    torch.testing.assert_close(r, gamma.masked_fill(torch.eye(3, dtype=torch.bool)[y], float("inf")).min(1).values.mean())
    assert not torch.allclose(r, certified_bound_metric(net, x[:3], y, 1e-3, "linf", "crown-ibp"))


def test_float64_bound_pass_keeps_a_float32_nets_vacuous_bound_finite():
    """dtype=float64 runs the bound pass in float64: interval bounds that overflow float32 (large
    weights, three layers) stay finite there, and the asinh scale returns a finite float32 R."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        for layer in (net[1], net[3], net[5]):
            layer.weight.mul_(1e15)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    r = certified_bound_metric(net, x, y, 0.1, "linf", "ibp", scale="asinh", dtype=torch.float64)
    assert r.dtype == torch.float32 and torch.isfinite(r) and r < -80
    assert not torch.isfinite(certified_bound_metric(net, x, y, 0.1, "linf", "ibp", scale="asinh"))
    # which the search reports as vacuous, on either scale; an informative bound is not
    linear = certified_bound_metric(net, x, y, 0.1, "linf", "ibp", dtype=torch.float64)
    assert shows_vacuous_bound(r.item(), "asinh") and shows_vacuous_bound(linear.item(), "linear")
    assert not shows_vacuous_bound(-14.0, "asinh") and not shows_vacuous_bound(-14.0, "linear")
    assert shows_vacuous_bound(-14.6, "asinh") and not shows_vacuous_bound(-9e5, "linear")


def test_metric_bounds_the_ball_of_the_given_norm():
    """R_CB's ball is the one named: l_2 and l_1 give their own bounds, not the l_inf ball's."""
    net = _tiny_search().eval()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    label = torch.eye(3, dtype=torch.bool)[y]
    with torch.no_grad():
        for norm in ("l2", "l1"):
            gamma = margin_lower_bound(net, x, y, 0.01, norm, "crown-ibp")
            r = certified_bound_metric(net, x, y, 0.01, norm, "crown-ibp")
            torch.testing.assert_close(r, gamma.masked_fill(label, float("inf")).min(1).values.mean())
            assert not torch.allclose(r, certified_bound_metric(net, x, y, 0.01, "linf", "crown-ibp"))


def test_certified_defaults_per_data_set_and_norm():
    """R_CB's own defaults (docs/bounds.md): crown-symbolic at a small budget where it is measured
    tight on the search super-network (CIFAR-10 l_inf 1e-6 and l_2 4.4e-5; MNIST and Fashion-MNIST
    l_inf 1e-6 and l_2 2e-6), else crown-ibp at the evaluation default."""
    assert certified_defaults("cifar10", "linf") == ("crown-symbolic", 1e-6)
    assert certified_defaults("cifar10", "l2") == ("crown-symbolic", 4.4e-5)
    for dataset in ("mnist", "mnist-mini", "fashion-mnist"):
        assert certified_defaults(dataset, "linf") == ("crown-symbolic", 1e-6)
        assert certified_defaults(dataset, "l2") == ("crown-symbolic", 2e-6)
    for dataset, norm in (("cifar10", "l1"), ("mnist", "l1"), ("fashion-mnist", "l1"), ("imagenet", "linf"),
                          ("imagenet", "l2")):
        assert certified_defaults(dataset, norm) == ("crown-ibp", default_eps(dataset, norm))
    with pytest.raises(ValueError, match="no default eps"):
        certified_defaults("svhn", "linf")
    # the evaluation defaults themselves (docs/robustness.md)
    assert (default_eps("cifar10", "linf"), default_eps("cifar10", "l2"), default_eps("mnist", "linf")) == (0.001, 0.02, 0.003)


def test_dithered_images_stay_in_the_pixel_box_and_round_to_the_same_8_bit_image():
    levels = torch.randint(0, 256, (2, 3, 8, 8))
    x = levels / 255.0
    noisy = dithered(x, 1e-3, torch.Generator().manual_seed(0))
    assert (noisy - x).abs().max() <= 1e-3 and (noisy != x).float().mean() > 0.9
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert torch.equal((noisy * 255).round().long(), levels)
    torch.testing.assert_close(noisy, dithered(x, 1e-3, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    assert dithered(x, 0.0) is x
    for bad in (-1e-3, 1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"dither must be a number in \[0, 1\)"):
            certified_bound_metric(_tiny_search().eval(), x[:, :1], torch.tensor([0, 1]), 0.01, dither=bad)


def test_dither_breaks_the_ties_of_a_flat_image_region():
    """A flat image region makes every max-pool window over it an exact tie, which no eps > 0 decides:
    crown-symbolic runs out of error symbols and its bound is vacuous. Dithered by a quarter of an
    8-bit level, the same image is bounded tightly (the first-order drop of the margin at eps 1e-6)
    by the images' bound at the dithered point, drawn from the generator."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1).double().train()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    x[:, :, :, :5] = 0.0  # a flat background, as MNIST's
    y = torch.tensor([0, 1, 2, 0])
    with torch.no_grad(), capture_batch_stats() as stats:
        net(x)

    def metric(dither):
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = certified_bound_metric(net, x[:1], y[:1], 1e-6, "linf", "crown-symbolic", bn_stats=stats,
                                       max_error_symbols=64, dither=dither, generator=torch.Generator().manual_seed(3))
        return r.item(), [str(w.message) for w in caught]

    tied, tied_warnings = metric(0.0)
    assert tied < -100 and any("ran out of its 64 error symbols" in w for w in tied_warnings)
    bound, warned = metric(1e-3)
    assert not warned
    point = dithered(x[:1], 1e-3, torch.Generator().manual_seed(3))
    with torch.no_grad(), frozen_batch_stats(stats):
        logits = net(point)
    clean = (logits[0, y[0]] - logits[0]).masked_fill(torch.arange(3) == y[0], float("inf")).min().item()
    assert 0 <= clean - bound < 1e-4, (clean, bound)
    with torch.no_grad():
        at_point = margin_lower_bound(net, point, y[:1], 1e-6, "linf", "crown-symbolic", bn_stats=stats,
                                      max_error_symbols=64)
    assert bound == at_point.masked_fill(torch.arange(3) == y[0], float("inf")).min().item()


def test_each_rank_dithers_its_own_images_as_one_process_would(monkeypatch):
    """Under torch.distributed each rank keeps its slice (r, r + W, ...) of one draw for the global
    batch, as DistributedSampler deals the images: W processes dither what one process would."""
    x = torch.full((3, 1, 4, 4), 0.5)
    one_process = dithered(torch.full((6, 1, 4, 4), 0.5), 1e-3, torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    torch.testing.assert_close(dithered(x, 1e-3, torch.Generator().manual_seed(0)), one_process[1::2], rtol=0, atol=0)
