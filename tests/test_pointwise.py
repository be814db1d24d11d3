"""The 1x1 convolution of the fast backends (a matrix product, dsrna.ops.pointwise) against the
reference convolution: forward, gradients and double backward, strided, grouped, non-contiguous."""

import pytest
import torch

from conftest import DEVICES, OpsRun, require_backend
from dsrna import backend
from dsrna.ops import pointwise_conv2d, pointwise_conv2d_reference

FAST = [b for b in backend.registered_ops()["pointwise_conv2d"] if b != "reference"]


def impl(name, device):
    require_backend(name, device)
    return backend.dispatch("pointwise_conv2d", device, name)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride, groups", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_matches_reference_through_double_backward(name, device, dtype, stride, groups, assert_error_within):
    """Within twice the reference's own error against float64 (plus a few ulps)."""
    fn = impl(name, device)
    base = torch.randn(2, 9, 7, 5, dtype=torch.float64, device=device)
    weight = torch.randn(9, 6 // groups, 1, 1, dtype=torch.float64, device=device)
    results = []
    for conv, dt in ((fn, dtype), (pointwise_conv2d_reference, dtype), (pointwise_conv2d_reference, torch.float64)):
        x = base.to(dt)[:, 1:7].requires_grad_()  # 6 of 9 channels: not contiguous; odd sizes
        w = weight.to(dt).requires_grad_()
        y = conv(x, w, stride, groups)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
        second = torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w))
        results.append((y, gx, gw, *second))
    assert_error_within(*results, 2.0, 8.0)


@pytest.mark.parametrize("name", FAST)
def test_gradcheck_and_gradgradcheck_on_a_channel_slice(name):
    fn = impl(name, "cpu")
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)[:, 2:6].requires_grad_()  # not contiguous
    w = torch.randn(6, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    f = lambda x, w: fn(x, w, 2, 2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


def test_rejects_weights_that_are_not_1x1_or_do_not_match():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"\[C_out, C / groups, 1, 1\] weight with groups=1"):
        pointwise_conv2d(x, torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="groups=2"):
        pointwise_conv2d(x, torch.randn(2, 4, 1, 1), groups=2)


@pytest.mark.parametrize("name", FAST)
def test_fast_backends_run_one_matrix_product_not_the_convolution(name):
    """The fast backends' formulation is a batched matrix product (every derivative order is one too):
    a registration falling back to the reference convolution would pass every comparison above."""
    require_backend(name, "cpu")
    x, w = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(6, 2, 1, 1, requires_grad=True)
    with OpsRun() as ran:
        torch.autograd.grad(pointwise_conv2d(x, w, 2, 2, backend_name=name).sum(), (x, w))
    assert "aten.convolution" not in ran.names and "aten.convolution_backward" not in ran.names, ran.names
