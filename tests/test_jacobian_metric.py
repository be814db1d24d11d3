"""R_Jac (dsrna.robustness.jacobian) against Jacobians from torch.autograd.functional.jacobian.

Float64 tiny nets (C=4, 3 cells, 8x8 inputs, 4 classes). Statistical tests use a fixed generator
and accept the estimate within 3 standard errors of the exact value: with that seed the outcome is
deterministic, and a wrong scale (a missing factor K) or a biased draw misses by many errors.
"""

import contextlib

import pytest
import torch
import torch.nn as nn

from dsrna import DARTS_V2, Network, SearchNetwork
from dsrna.robustness import jacobian_metric, jacobian_row_norm_sum
from dsrna.space import capture_batch_stats, frozen_batch_stats

K = 4
NORM_DUAL = {"linf": 1, "l2": 2, "l1": float("inf")}


def tiny_search_net(train: bool) -> SearchNetwork:
    net = SearchNetwork(C=4, num_classes=K, layers=3, in_channels=1).double()
    with torch.no_grad():  # alphas away from uniform so the test sees the softmax weights matter
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    return net.train(train)


def full_jacobian(net, x, bn_stats=None) -> torch.Tensor:
    """``[B, K, B, D]``: d logits[i, k] / d x[j] for the whole batch, by autograd.functional."""
    def logits(inp):
        out = net(inp)
        return out[0] if isinstance(out, tuple) else out

    ctx = frozen_batch_stats(bn_stats) if bn_stats is not None else contextlib.nullcontext()
    with ctx:
        jac = torch.autograd.functional.jacobian(logits, x)
    return jac.flatten(3)


def per_example_rows(net, x, bn_stats=None) -> torch.Tensor:
    """``[B, K, D]``: each image's own Jacobian rows (the diagonal blocks)."""
    jac = full_jacobian(net, x, bn_stats)
    return torch.stack([jac[i, :, i] for i in range(x.shape[0])])


def clean_stats(net, x) -> dict:
    with torch.no_grad(), capture_batch_stats() as store:
        net(x)
    return store


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-frozen-stats"])
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_exact_matches_autograd_functional_jacobian(train, norm):
    net = tiny_search_net(train)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    stats = clean_stats(net, x) if train else None
    rows = per_example_rows(net, x, stats)
    expected = torch.linalg.vector_norm(rows, ord=NORM_DUAL[norm], dim=2).sum(dim=1)
    with torch.no_grad():
        got = jacobian_row_norm_sum(net, x, norm, "exact", bn_stats=stats)
        # Without bn_stats the metric runs the clean pass itself and must land on the same statistics.
        self_captured = jacobian_row_norm_sum(net, x, norm, "exact")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(self_captured, expected, rtol=1e-10, atol=1e-12)
    eps = 0.3
    torch.testing.assert_close(jacobian_metric(net, x, norm, "exact", eps=eps, bn_stats=stats),
                               -(eps / K) * expected.mean(), rtol=1e-10, atol=1e-12)


def test_train_mode_jacobian_has_no_cross_example_terms():
    net = tiny_search_net(True)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    stats = clean_stats(net, x)
    jac = full_jacobian(net, x, stats)
    off_diagonal = [jac[0, :, 1], jac[1, :, 0]]
    assert all(block.abs().max() == 0 for block in off_diagonal)
    # The coupling the frozen statistics remove is real: live batch statistics mix the images.
    assert full_jacobian(net, x)[0, :, 1].abs().max() > 1e-6
    # So with the statistics fixed, the metric of image 0 does not depend on image 1.
    other = x.clone()
    other[1] = torch.rand(1, 8, 8, dtype=torch.float64)
    first = jacobian_row_norm_sum(net, x, "l2", "exact", bn_stats=stats)
    second = jacobian_row_norm_sum(net, other, "l2", "exact", bn_stats=stats)
    torch.testing.assert_close(first[0], second[0], rtol=1e-12, atol=0)
    assert not torch.allclose(first[1], second[1])


def test_random_row_is_unbiased():
    net = tiny_search_net(False)
    image = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    exact = jacobian_row_norm_sum(net, image, "l2", "exact")[0]
    copies = image.expand(400, -1, -1, -1)  # each copy draws its own rows: 400 independent estimates
    for n in (1, 2):
        with torch.no_grad():  # the value is what is tested: skip the double-backward graph
            draws = jacobian_row_norm_sum(net, copies, "l2", "random-row", n=n, generator=torch.Generator().manual_seed(n))
        stderr = draws.std() / draws.numel() ** 0.5
        assert stderr > 1e-3 * exact  # the rows differ, so the test has power
        assert abs(draws.mean() - exact) < 3 * stderr
    # n = K draws every row once: the exact value.
    torch.testing.assert_close(jacobian_row_norm_sum(net, image, "l2", "random-row", n=K), exact.view(1))


def test_top1_is_the_predicted_row_scaled_by_K():
    net = tiny_search_net(False)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    rows = per_example_rows(net, x)
    predicted = net(x).argmax(dim=1)
    expected = K * torch.stack([rows[i, predicted[i]].abs().sum() for i in range(3)])
    torch.testing.assert_close(jacobian_row_norm_sum(net, x, "linf", "top1"), expected)


def test_projection_estimates_squared_frobenius_norm():
    net = tiny_search_net(False)
    image = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    frobenius_sq = per_example_rows(net, image)[0].pow(2).sum()
    copies = image.expand(400, -1, -1, -1)
    for n in (1, 2):
        with torch.no_grad():
            sums = jacobian_row_norm_sum(net, copies, "l2", "projection", n=n, generator=torch.Generator().manual_seed(n))
        estimates = sums.pow(2) / K  # the estimator is sqrt(K * F) with F unbiased for ||J||_F^2
        stderr = estimates.std() / estimates.numel() ** 0.5
        assert stderr > 1e-3 * frobenius_sq
        assert abs(estimates.mean() - frobenius_sq) < 3 * stderr
    # The Cauchy-Schwarz bound it stands for lies above the exact row-norm sum.
    exact = jacobian_row_norm_sum(net, image, "l2", "exact")[0]
    assert (K * frobenius_sq).sqrt() >= exact


class _WithArch(nn.Module):
    """The net with its architecture parameters replaced by given tensors, for gradcheck."""

    def __init__(self, net, names):
        super().__init__()
        self.net, self.names, self.values = net, names, None

    def forward(self, x):
        return torch.func.functional_call(self.net, dict(zip(self.names, self.values)), (x,))


def test_gradcheck_wrt_architecture_parameters():
    # Train mode: alpha reaches R through the mixed ops and through the captured batch statistics.
    net = tiny_search_net(True)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    wrapped = _WithArch(net, ["alphas_normal", "alphas_reduce"])

    def metric(alphas_normal, alphas_reduce):
        wrapped.values = [alphas_normal, alphas_reduce]
        return jacobian_metric(wrapped, x, "l2", "exact", eps=0.1)

    alphas = [a.detach().clone().requires_grad_(True) for a in net.arch_parameters()]
    assert torch.autograd.gradcheck(metric, alphas, fast_mode=True, check_undefined_grad=False)


def test_differentiable_in_weights_and_value_only_under_no_grad():
    net = tiny_search_net(True)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    r = jacobian_metric(net, x, "linf", "random-row", generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(r, [net.alphas_normal, net.stem[0].weight])
    assert all(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        value = jacobian_metric(net, x, "linf", "random-row", generator=torch.Generator().manual_seed(0))
    assert value.grad_fn is None
    torch.testing.assert_close(value, r.detach())


def test_final_network_with_auxiliary_head_in_train_mode():
    net = Network(DARTS_V2, C=4, num_classes=K, layers=3, in_channels=1, auxiliary=True).double().train()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert isinstance(net(x), tuple)
    stats = clean_stats(net, x)
    expected = per_example_rows(net, x, stats).norm(dim=2).sum(dim=1)
    torch.testing.assert_close(jacobian_row_norm_sum(net, x, "l2", "exact", bn_stats=stats), expected)


def test_any_module_returning_logits():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    expected = per_example_rows(net, x).abs().amax(dim=2).sum(dim=1)  # l1 perturbation: q = inf
    torch.testing.assert_close(jacobian_row_norm_sum(net, x, "l1", "exact"), expected)


def test_bad_input_raises_one_clear_error():
    net = tiny_search_net(False)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="estimator"):
        jacobian_metric(net, x, estimator="rows")
    with pytest.raises(ValueError, match="norm"):
        jacobian_metric(net, x, norm="l3")
    with pytest.raises(ValueError, match="projection"):
        jacobian_metric(net, x, norm="linf", estimator="projection")
    with pytest.raises(ValueError, match="exceeds"):
        jacobian_metric(net, x, estimator="random-row", n=K + 1)
    with pytest.raises(ValueError, match="integer >= 1"):
        jacobian_metric(net, x, n=0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got -1.0"):
        jacobian_metric(net, x, eps=-1.0)
    coupled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3)).double().train()
    with pytest.raises(ValueError, match="batch statistics"):
        jacobian_metric(coupled, x)


def test_value_only_pass_keeps_no_graph_and_leaves_the_input_alone():
    """Under no_grad the per-image sums carry no autograd graph (no double-backward graph is kept
    alive), and the metric differentiates a detached copy: the caller's input never starts to
    require gradients."""
    net = tiny_search_net(True)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        sums = jacobian_row_norm_sum(net, x, "l2", "exact")
    assert not sums.requires_grad and sums.grad_fn is None
    jacobian_metric(net, x, "l2", "exact")
    assert not x.requires_grad


def test_eval_mode_batch_norm_without_running_statistics_is_refused():
    """A BN without running statistics normalises with the batch's even in eval mode: it couples the
    images' Jacobians and no captured statistics freeze it, so the metric must refuse it."""
    from dsrna.space.ops import BatchNorm2d

    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    for bn in (nn.BatchNorm2d(2, track_running_stats=False), BatchNorm2d(2, track_running_stats=False)):
        net = nn.Sequential(nn.Conv2d(1, 2, 3), bn, nn.Flatten(), nn.Linear(72, 3)).double().eval()
        with pytest.raises(ValueError, match="batch statistics"):
            jacobian_metric(net, x, estimator="exact")


@pytest.mark.parametrize("estimator", ["random-row", "projection"])
def test_ranks_draw_the_slices_of_one_global_draw(monkeypatch, estimator):
    """Under torch.distributed each rank keeps images r, r + W, ... of one draw for the global batch
    (as DistributedSampler deals them): W ranks estimate what one process with the global batch
    would. Faked here with W = 2 in one process (the net is in eval mode: images independent)."""
    net = tiny_search_net(False)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        whole = jacobian_row_norm_sum(net, x, "l2", estimator, n=2, generator=torch.Generator().manual_seed(3))
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        for rank in (0, 1):
            monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
            mine = jacobian_row_norm_sum(net, x[rank::2], "l2", estimator, n=2, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(mine, whole[rank::2], rtol=1e-10, atol=0)
