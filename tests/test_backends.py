"""Network-level equivalence: a SearchNetwork on every available fast backend against the same
network (same weights) on the reference backend. Outputs, weight gradients, architecture gradients
and the double-backward architecture gradient of a Jacobian penalty, each within a few times the
reference's own float32 error (measured against a float64 copy); odd input sizes, normal and
reduction cells, DARTS and PC-DARTS."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from dsrna import SearchNetwork, backend

FAST = [name for name in backend.BACKENDS if name != "reference"]
# Errors compound through a dozen layers whose sums run in another order than the reference's.
FACTOR = 4.0
ULPS = 16.0


def network_ops():
    """The dispatched ops a SearchNetwork forward and backward touch (reference names)."""
    return ("weighted_sum", "depthwise_conv2d", "pool_bn")


def available(name, device):
    ok, why = backend.backend_status(name, device)
    if not ok:
        pytest.skip(f"{name} unavailable on {device}: {why}")
    for op in network_ops():
        try:
            backend.resolve(op, device, name)
        except backend.BackendUnavailable as exc:
            pytest.skip(f"{name} cannot run a whole network on {device}: {exc}")


def triple(device, partial_channels, name):
    """(fast, reference, float64 reference) copies of one tiny super-network in train mode."""
    torch.manual_seed(0)
    ref = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=2, partial_channels=partial_channels,
                        backend="reference").to(device)
    with torch.no_grad():  # move alpha away from uniform so every candidate weighs differently
        for p in ref.arch_parameters():
            p.normal_(0, 0.5)
    fast = copy.deepcopy(ref)
    fast.backend = name
    exact = copy.deepcopy(ref).double()
    return fast, ref, exact


def grads(net, x, y, params):
    loss = F.cross_entropy(net(x), y)
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("partial_channels, size", [(1, 9), (2, 7)])
def test_train_forward_and_gradients_match_reference(name, device, partial_channels, size, assert_error_within):
    available(name, device)
    nets = triple(device, partial_channels, name)
    x = torch.rand(2, 2, size, size, device=device)
    y = torch.tensor([0, 2], device=device)
    outs = [net(x.to(next(net.parameters()).dtype)) for net in nets]
    assert_error_within(outs[0], outs[1], outs[2], FACTOR, ULPS)
    for group in ("weight_parameters", "arch_parameters"):
        results = [grads(net, x.to(next(net.parameters()).dtype), y, getattr(net, group)()) for net in nets]
        assert_error_within(*results, FACTOR, ULPS)
    # running statistics (after the same three train-mode forwards in each copy)
    stats = [[b for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))] for net in nets]
    assert_error_within(*stats, FACTOR, ULPS)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
def test_eval_mode_forward_matches_reference(name, device, assert_error_within):
    available(name, device)
    nets = triple(device, 1, name)
    x = torch.rand(2, 2, 8, 8, device=device)
    for net in nets:
        net(x.to(next(net.parameters()).dtype))  # one train step of running statistics
        net.eval()
    outs = [net(x.to(next(net.parameters()).dtype)) for net in nets]
    assert_error_within(outs[0], outs[1], outs[2], FACTOR, ULPS)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_architecture_gradient_matches_reference(name, device, assert_error_within):
    """The DSRNA-Jacobian architecture step differentiates the input gradient with respect to alpha."""
    available(name, device)
    nets = triple(device, 1, name)
    results = []
    for net in nets:
        x = torch.rand(2, 2, 7, 7, device=device, generator=torch.Generator(device).manual_seed(1))
        x = x.to(next(net.parameters()).dtype).requires_grad_()
        v = torch.ones(2, 3, device=device, dtype=x.dtype)
        (jvp,) = torch.autograd.grad(net(x), x, v, create_graph=True)
        results.append(torch.autograd.grad(jvp.square().sum(), net.arch_parameters()))
    assert_error_within(*results, FACTOR, ULPS)
