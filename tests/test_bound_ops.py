"""Fast bound-propagation primitives (interval weighted sum, ReLU relaxation, CROWN step through ReLU)
of every registered fast backend against the references in dsrna.ops.bound_ops."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from conftest import DEVICES, OTHER_GPU, require_backend
from dsrna import backend
from dsrna.ops import bound_ops

OPS = ("interval_weighted_sum", "relu_relaxation", "crown_relu_backward")
CASES = [(op, name) for op in OPS for name in backend.registered_ops()[op] if name != "reference"]
pytestmark = pytest.mark.usefixtures("small_triton_blocks")  # several programs per launch
REFERENCE = {
    "interval_weighted_sum": bound_ops.interval_weighted_sum_reference,
    "relu_relaxation": bound_ops.relu_relaxation_reference,
    "crown_relu_backward": bound_ops.crown_relu_backward_reference,
}


def impl(op, name, device):
    """The backend's implementation; skipped where it has none for this device (the op would run on
    the reference, and the comparison would be the reference with itself)."""
    require_backend(name, device)
    if backend.resolve(op, device, name) != name:
        pytest.skip(f"{name} {op} is not registered for {device}")
    return backend.dispatch(op, device, name)


def bounds(shape, dtype, device, unstable_share=0.6):
    """Pre-activation bounds with stable and unstable neurons and exact zeros at both ends."""
    centre = torch.randn(shape, dtype=dtype, device=device)
    radius = torch.rand(shape, dtype=dtype, device=device) * unstable_share * 2
    lower, upper = centre - radius, centre + radius
    lower.view(-1)[:2] = 0.0
    upper.view(-1)[2:4] = 0.0
    return lower, upper


def inputs(op, dtype, device, small=False):
    """Arguments of ``op`` (tensors requiring grad where the op is differentiable in them)."""
    if op == "interval_weighted_sum":
        shape = (2, 3) if small else (2, 3, 5, 5)
        pairs = [bounds(shape, dtype, device) for _ in range(3)]
        lowers = [lo.requires_grad_() for lo, _ in pairs]
        uppers = [up.requires_grad_() for _, up in pairs]
        w = torch.softmax(torch.randn(3, dtype=dtype, device=device), 0).requires_grad_()
        return lowers, uppers, w
    if op == "relu_relaxation":
        lower, upper = bounds((2, 4) if small else (2, 3, 5, 7), dtype, device)
        if small:  # gradcheck needs differentiable points: keep off the kinks at l = 0 and u = 0
            lower, upper = lower - 0.25 * (lower == 0), upper + 0.25 * (upper == 0)
        return lower.requires_grad_(), upper.requires_grad_()
    shape = (2, 2, 3) if small else (2, 3, 4, 5, 5)  # [B, S, *layer shape]
    A = torch.randn(shape, dtype=dtype, device=device)
    if not small:
        A.view(-1)[::7] = 0.0  # zero coefficients are common (inactive neurons, pruned specs)
    layer = (shape[0],) + shape[2:]
    lower, upper = bounds(layer, dtype, device)
    slopes = [t.detach().requires_grad_() for t in bound_ops.relu_relaxation_reference(lower, upper, "fast-lin")]
    return (A.requires_grad_(), *slopes)


def call(op, fn, args, mode="adaptive"):
    if op == "interval_weighted_sum":
        return fn(*args)
    if op == "relu_relaxation":
        return fn(*args, mode)
    return fn(*args)


def flat_inputs(op, args):
    return (*args[0], *args[1], args[2]) if op == "interval_weighted_sum" else tuple(args)


def unflat(op, flat):
    if op == "interval_weighted_sum":
        n = (len(flat) - 1) // 2
        return list(flat[:n]), list(flat[n:2 * n]), flat[-1]
    return flat


def differentiable(outs):
    return [t for t in outs if t.requires_grad]


@pytest.mark.parametrize("op, name, mode", [(op, name, mode) for op, name in CASES
                                            for mode in (("adaptive", "fast-lin") if op == "relu_relaxation" else
                                                         ("adaptive",))])  # the mode concerns the relaxation only
@pytest.mark.parametrize("device", DEVICES + OTHER_GPU)
def test_float32_values_and_gradients_within_reference_error(op, name, device, mode, assert_error_within):
    fn = impl(op, name, device)
    args = inputs(op, torch.float32, device)
    leaves = flat_inputs(op, args)
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    args64 = unflat(op, leaves64)
    fast, ref, exact = call(op, fn, args, mode), call(op, REFERENCE[op], args, mode), call(op, REFERENCE[op], args64, mode)
    assert_error_within(fast, ref, exact)
    assert [t.requires_grad for t in fast] == [t.requires_grad for t in ref]
    grads_out = [torch.randn_like(t) for t in differentiable(ref)]
    grads = [torch.autograd.grad(differentiable(o), ins, grads_out, allow_unused=True, materialize_grads=True)
             for o, ins in ((fast, leaves), (ref, leaves))]
    exact_grads = torch.autograd.grad(differentiable(exact), leaves64, [g.double() for g in grads_out],
                                      allow_unused=True, materialize_grads=True)
    assert_error_within(grads[0], grads[1], exact_grads)


@pytest.mark.parametrize("op, name", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(op, name, device):
    """R_CB is maximised through these ops, and its gradient may itself be differentiated."""
    fn = impl(op, name, device)
    leaves = flat_inputs(op, inputs(op, torch.float64, device, small=True))
    f = lambda *flat: tuple(differentiable(call(op, fn, unflat(op, flat), "fast-lin")))  # noqa: E731
    assert gradcheck(f, leaves, fast_mode=True)
    assert gradgradcheck(f, leaves, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_ops_opcheck(device):
    kernels = pytest.importorskip("dsrna.kernels.bound_ops")
    impl("relu_relaxation", "triton", device)
    lower, upper = inputs("relu_relaxation", torch.float64, device)
    torch.library.opcheck(kernels.relu_relaxation_op, (lower, upper, True))
    torch.library.opcheck(kernels.crown_relu_backward_op, inputs("crown_relu_backward", torch.float64, device))


def test_native_crown_relu_backward_opcheck_and_rejects_bad_shapes():
    impl("crown_relu_backward", "native", "cpu")
    args = inputs("crown_relu_backward", torch.float64, "cpu")
    torch.library.opcheck(torch.ops.dsrna.crown_relu_backward.default, args)
    A, lower_slope, upper_slope, upper_intercept = args
    # A permuted A: the kernel's output is contiguous, and so must be the fake's
    permuted = A.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    torch.library.opcheck(torch.ops.dsrna.crown_relu_backward.default, (permuted, *args[1:]))
    with pytest.raises(RuntimeError, match=r"the relaxation must be \[B, ...\]"):
        torch.ops.dsrna.crown_relu_backward(A, lower_slope[:1], upper_slope, upper_intercept)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_relu_relaxation_rejects_unknown_mode(device):
    fn = impl("relu_relaxation", "triton", device)
    with pytest.raises(ValueError, match="relaxation"):
        fn(torch.zeros(2, device=device), torch.ones(2, device=device), "deeppoly")


@pytest.mark.parametrize("name", ["reference", "native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
def test_public_ops_refuse_mismatched_shapes_on_every_backend(name, device):
    """The Triton kernels index flat memory: a broadcastable but smaller operand (a relaxation of one
    image for a batch of coefficients) would be read past its end, so the public ops check shapes
    first, with one message for every backend (the reference would have broadcast it silently)."""
    require_backend(name, device)
    A, lower_slope, upper_slope, upper_intercept = inputs("crown_relu_backward", torch.float32, device)
    lower, upper = bounds((3, 4), torch.float32, device)
    w = torch.softmax(torch.randn(2, device=device), 0)
    for call, message in (
        (lambda: bound_ops.crown_relu_backward(A, lower_slope[:1], upper_slope, upper_intercept, name),
         r"crown_relu_backward .*: tensors must have the same shape"),
        (lambda: bound_ops.crown_relu_backward(A, lower_slope, upper_slope, upper_intercept[:1], name),
         r"crown_relu_backward .*: tensors must have the same shape"),
        (lambda: bound_ops.relu_relaxation(lower, upper[:1], backend_name=name), "relu_relaxation: tensors must have"),
        (lambda: bound_ops.interval_weighted_sum([lower, lower[:1]], [upper, upper], w, name),
         "interval_weighted_sum: tensors must have the same shape"),
        (lambda: bound_ops.interval_weighted_sum([lower], [upper], w, name), "1 lower and 1 upper bounds but 2 weights"),
        (lambda: bound_ops.interval_weighted_sum([lower, lower], [upper], w, name), "2 lower and 1 upper bounds"),
        (lambda: bound_ops.interval_weighted_sum([lower, lower], [upper, upper[:1]], w, name),
         "interval_weighted_sum: tensors must have the same shape"),
        (lambda: bound_ops.relu_relaxation(lower, upper, "deeppoly", name), "unknown ReLU relaxation 'deeppoly'"),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("name", ["reference", "native", "triton"])
@pytest.mark.parametrize("mode", ["adaptive", "fast-lin"])
def test_relaxation_gradients_stay_finite_on_point_intervals(name, mode):
    """lower == upper (eps 0, or a neuron fixed by the batch): stable neurons, where the chord's
    width is 0. The chord is not used there, and its division must not put NaN into the gradient."""
    require_backend(name, "cpu")
    lower = torch.tensor([-1.0, 0.0, 2.0, -0.5], dtype=torch.float64, requires_grad=True)
    upper = lower.detach().clone().requires_grad_()
    relaxation = bound_ops.relu_relaxation(lower, upper, mode, name)
    grads = torch.autograd.grad(sum(r.sum() for r in relaxation), (lower, upper))
    assert all(torch.isfinite(g).all() for g in grads), grads
