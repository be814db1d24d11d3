"""The Triton weighted-sum family (dsrna.kernels.weighted_sum): op registration, gradients of every
order, and accuracy against float64 relative to the reference's own error.

Runs under TRITON_INTERPRET=1 on CPU tensors (set in conftest) and on CUDA when Triton can run there.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from conftest import DEVICES, require_backend
from dsrna import backend
from dsrna.ops.weighted_sum import weighted_sum_reference

kernels = pytest.importorskip("dsrna.kernels.weighted_sum")
pytestmark = pytest.mark.usefixtures("small_triton_blocks")  # several programs per launch


def triton_device(device):
    require_backend("triton", device)
    return device


def tensors(n, shape, dtype, device, requires_grad=False):
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(n)]


def weights(n, device, dtype=torch.float32, requires_grad=False):
    return torch.softmax(torch.randn(n, device=device, dtype=dtype), 0).requires_grad_(requires_grad)


def flat_outputs(out):
    """gradcheck wants a tensor or a flat tuple of tensors."""
    if isinstance(out, tuple):
        return tuple(t for part in out for t in (part if isinstance(part, list) else [part]))
    return tuple(out) if isinstance(out, list) else out


def test_registered_as_triton_backend():
    assert "triton" in backend.registered_ops()["weighted_sum"]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    triton_device(device)
    xs = tensors(3, (2, 3, 4), torch.float64, device, requires_grad=True)
    w = weights(3, device, torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(kernels.weighted_sum_op, (xs, w))
    torch.library.opcheck(kernels.weighted_sum_backward_op, (xs, w, g))
    torch.library.opcheck(kernels.scaled_copies_op, (g, w))
    torch.library.opcheck(kernels.batched_dot_op, (xs, g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["weighted_sum", "weighted_sum_backward", "scaled_copies", "batched_dot"])
def test_gradcheck_and_gradgradcheck(device, op):
    """Every op's backward is built from the ops themselves, so second derivatives are checked too."""
    triton_device(device)
    xs = tensors(3, (2, 3), torch.float64, device, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    fn, inputs = {
        "weighted_sum": (lambda w, *xs: kernels.weighted_sum_op(list(xs), w), (w, *xs)),
        "weighted_sum_backward": (lambda w, g, *xs: kernels.weighted_sum_backward_op(list(xs), w, g), (w, g, *xs)),
        "scaled_copies": (kernels.scaled_copies_op, (g, w)),
        "batched_dot": (lambda g, *xs: kernels.batched_dot_op(list(xs), g), (g, *xs)),
    }[op]
    f = lambda *args: flat_outputs(fn(*args))  # noqa: E731
    assert gradcheck(f, inputs, fast_mode=True)
    assert gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_backward_with_some_gradients_undefined(device):
    """Double backward through weighted_sum where only the input gradients are used (a VJP in the
    input, as in the Jacobian metric) and where only some candidates reach the loss."""
    triton_device(device)
    xs = tensors(4, (2, 5), torch.float64, device, requires_grad=True)
    w = weights(4, device, torch.float64, requires_grad=True)
    v = torch.randn(2, 5, dtype=torch.float64, device=device)
    results = []
    for fn in (kernels.weighted_sum_op, weighted_sum_reference):
        out = fn(xs, w)
        grads = torch.autograd.grad(out, xs, v, create_graph=True)
        loss = grads[0].square().sum() + (grads[2] * xs[1]).sum()  # grads[1], grads[3] unused
        results.append(torch.autograd.grad(loss, xs + [w], allow_unused=True, materialize_grads=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, shape", [(1, (5,)), (14, (2, 3, 7, 7)), (35, (2, 1, 3, 5))])
def test_float32_forward_and_gradients_within_reference_error(device, n, shape, assert_error_within):
    triton_device(device)
    xs = tensors(n, shape, torch.float32, device, requires_grad=True)
    w = weights(n, device, requires_grad=True)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    w64 = w.detach().double().requires_grad_()
    g = torch.randn(shape, device=device)
    fast, ref, exact = kernels.weighted_sum_op(xs, w), weighted_sum_reference(xs, w), weighted_sum_reference(xs64, w64)
    assert_error_within(fast, ref, exact)
    assert_error_within(torch.autograd.grad(fast, xs + [w], g), torch.autograd.grad(ref, xs + [w], g),
                        torch.autograd.grad(exact, xs64 + [w64], g.double()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_and_mixed_dtypes(device, dtype, assert_error_within):
    """Half-precision inputs with float32 weights (autocast) give a half-precision result; a float32
    input among them (a skip connection) promotes like the reference's arithmetic."""
    triton_device(device)
    xs, w = tensors(9, (2, 4, 5), dtype, device), weights(9, device)
    exact = weighted_sum_reference([x.double() for x in xs], w.double())
    assert_error_within(kernels.weighted_sum_op(xs, w), weighted_sum_reference(xs, w), exact)
    mixed = xs[:-1] + [xs[-1].float()]
    out, ref = kernels.weighted_sum_op(mixed, w), weighted_sum_reference(mixed, w)
    assert out.dtype == ref.dtype == torch.float32
    assert_error_within(out, ref, exact)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_dispatch(device):
    triton_device(device)
    base = tensors(3, (4, 3, 5), torch.float32, device)
    xs = [base[0].transpose(0, 2), base[1][:, :, ::1].transpose(0, 2), base[2].transpose(0, 2).contiguous()]
    w = weights(3, device)
    out = backend.dispatch("weighted_sum", device, "triton")(xs, w)
    torch.testing.assert_close(out, weighted_sum_reference(xs, w))


@pytest.mark.parametrize("device", DEVICES)
def test_channel_slices_are_read_in_place(device):
    """The batched cell hands over channel slices of stacked tensors (rows lying apart): the kernels
    read them where they are, forward and backward (the dot products read them too)."""
    triton_device(device)
    torch.manual_seed(0)
    stacked = torch.randn(2, 6, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    other = torch.randn(2, 2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)

    def node(stacked, other, w, impl):
        a, b, c = stacked.split(2, dim=1)
        return impl([a, other, c, b], w)

    fast = lambda *args: node(*args, backend.dispatch("weighted_sum", device, "triton"))  # noqa: E731
    torch.testing.assert_close(fast(stacked, other, w), node(stacked, other, w, weighted_sum_reference))
    assert gradcheck(fast, (stacked, other, w), fast_mode=True)
    assert gradgradcheck(fast, (stacked, other, w), fast_mode=True)
    xs = list(stacked.detach().split(2, dim=1))
    assert not xs[1].is_contiguous()
    torch.library.opcheck(torch.ops.dsrna_triton.weighted_sum.default, (xs, w.detach()))
