"""Network-level equivalence: a SearchNetwork on every available fast backend against the same
network (same weights) on the reference backend. Outputs, weight gradients, architecture gradients
and the double-backward architecture gradient of a Jacobian penalty, each within a few times the
reference's own float32 error (measured against a float64 copy); odd input sizes, normal and
reduction cells, DARTS and PC-DARTS."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, OTHER_GPU, require_backend
from dsrna import SearchNetwork, backend

FAST = [name for name in backend.BACKENDS if name != "reference"]
# Errors compound through a dozen layers whose sums run in another order than the reference's.
FACTOR = 4.0
ULPS = 16.0


def triple(device, partial_channels, name):
    """(fast, reference, float64 reference) copies of one tiny super-network in train mode."""
    torch.manual_seed(0)
    # two nodes per cell keep the interpreter's launch count low; cell 0 is normal, cells 1 and 2 reduce
    ref = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=2, steps=2, multiplier=2,
                        partial_channels=partial_channels, backend="reference").to(device)
    with torch.no_grad():  # move alpha away from uniform so every candidate weighs differently
        for p in ref.arch_parameters():
            p.normal_(0, 0.5)
    fast = copy.deepcopy(ref)
    fast.backend = name
    exact = copy.deepcopy(ref).double()
    return fast, ref, exact


def outputs_and_gradients(net, x, y):
    """Logits, then the weight and the architecture gradients of the cross-entropy, one pass."""
    x = x.to(next(net.parameters()).dtype)
    logits = net(x)
    weights, arch = net.weight_parameters(), net.arch_parameters()
    grads = torch.autograd.grad(F.cross_entropy(logits, y), weights + arch)
    return logits, list(grads[:len(weights)]), list(grads[len(weights):])


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES + OTHER_GPU)
@pytest.mark.parametrize("partial_channels, size", [(1, 9), (2, 7)])
def test_train_forward_and_gradients_match_reference(name, device, partial_channels, size, assert_error_within):
    require_backend(name, device)
    nets = triple(device, partial_channels, name)
    x = torch.rand(2, 2, size, size, device=device)
    y = torch.tensor([0, 2], device=device)
    fast, ref, exact = (outputs_and_gradients(net, x, y) for net in nets)
    for part in range(3):  # logits, weight gradients, architecture gradients
        assert_error_within(fast[part], ref[part], exact[part], FACTOR, ULPS)
    stats = [[b for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))] for net in nets]
    assert_error_within(*stats, FACTOR, ULPS)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
def test_eval_mode_forward_matches_reference(name, device, assert_error_within):
    require_backend(name, device)
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
    require_backend(name, device)
    nets = triple(device, 1, name)
    results = []
    for net in nets:
        x = torch.rand(2, 2, 7, 7, device=device, generator=torch.Generator(device).manual_seed(1))
        x = x.to(next(net.parameters()).dtype).requires_grad_()
        v = torch.randn(2, 3, device=device, generator=torch.Generator(device).manual_seed(2)).to(x.dtype)
        (jvp,) = torch.autograd.grad(net(x), x, v, create_graph=True)
        grads = torch.autograd.grad(jvp.square().sum(), net.arch_parameters())
        # one flat vector: some entries are nearly zero, so errors are measured at the group's scale
        results.append(torch.cat([g.flatten() for g in grads]))
    assert_error_within(*results, FACTOR, ULPS)
