"""The depthwise convolution family of every fast backend against the reference: forward, transposed
conv (gradient to the input), every gradient and the double backward, the interval variant, on odd
shapes for every DARTS kernel size, dilation and stride.

Parametrized over every non-reference backend registered for each op, skipped by capability
(``backend_status``), never by failure."""

import pytest
import torch
import torch.nn.functional as F

from dsrna import SearchNetwork, _native, backend, use_backend
from dsrna.ops import (depthwise_conv2d, depthwise_conv2d_reference, depthwise_conv2d_stack,
                       depthwise_conv2d_stack_reference, depthwise_conv2d_stack_transpose,
                       depthwise_conv2d_stack_transpose_reference, depthwise_conv2d_transpose,
                       depthwise_conv2d_transpose_reference)
from dsrna.ops.bound_ops import interval_depthwise_conv2d
from conftest import DEVICES, OpsRun, require_backend

# (kernel, padding, dilation) of sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5
DARTS = [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 4, 2)]
GEOMETRIES = [(k, s, p, d) for k, p, d in DARTS for s in (1, 2)]
GEOMETRY_IDS = [f"k{k}s{s}p{p}d{d}" for k, s, p, d in GEOMETRIES]


def fast_backends(op):
    return [b for b in backend.registered_ops().get(op, ()) if b != "reference"]


def impl(op, name, device):
    require_backend(name, device)
    return backend.dispatch(op, device, name)


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def conv_inputs(shape, k, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(shape[1], 1, k, k, dtype=dtype, device=device, requires_grad=True)
    return x, w


def assert_all_close(actual, expected, **tol):
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", fast_backends("depthwise_conv2d"))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, s, p, d", GEOMETRIES, ids=GEOMETRY_IDS)
def test_conv_forward_backward_and_double_backward(name, device, dtype, k, s, p, d):
    fn = impl("depthwise_conv2d", name, device)
    x, w = conv_inputs((2, 3, 9, 7), k, dtype, device)
    results = []
    for conv in (fn, depthwise_conv2d_reference):
        y = conv(x, w, s, p, d)
        g = torch.ones_like(y).mul_(torch.linspace(-1, 1, y.shape[-1], dtype=dtype, device=device)).requires_grad_()
        gx, gw = torch.autograd.grad(y, (x, w), g, create_graph=True)
        # Jacobian-step shape: a loss on the first gradients, differentiated again.
        second = torch.autograd.grad((gx.square().sum() + (gw * w).sum()), (x, w, g))
        results.append((y, gx, gw, *second))
    assert_all_close(*results, **tolerance(dtype))


@pytest.mark.parametrize("name", fast_backends("depthwise_conv2d_transpose"))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, s, p, d", GEOMETRIES, ids=GEOMETRY_IDS)
def test_transpose_matches_reference(name, device, dtype, k, s, p, d):
    fn = impl("depthwise_conv2d_transpose", name, device)
    hw = (8, 7)  # at stride 2 an even side has a row no output tap reaches from the end
    out_hw = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n in hw]
    g, w = conv_inputs((2, 3, *out_hw), k, dtype, device)
    results = []
    for transpose in (fn, depthwise_conv2d_transpose_reference):
        z = transpose(g, w, hw, s, p, d)
        assert z.shape == (2, 3, *hw)
        v = torch.randn(z.shape, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(1))
        results.append((z, *torch.autograd.grad(z, (g, w), v)))
    assert_all_close(*results, **tolerance(dtype))


@pytest.mark.parametrize("name", fast_backends("depthwise_conv2d"))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, s, p, d", GEOMETRIES, ids=GEOMETRY_IDS)
def test_gradcheck_and_gradgradcheck(name, device, k, s, p, d):
    conv = impl("depthwise_conv2d", name, device)
    x, w = conv_inputs((1, 2, 5, 6), k, torch.float64, device)
    f = lambda x, w: conv(x, w, s, p, d)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, w), fast_mode=True)


@pytest.mark.parametrize("name", fast_backends("depthwise_conv2d"))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_no_worse_than_reference(name, device, dtype):
    """Error against float64 at most twice the reference's own error in that dtype (+ one ulp)."""
    conv = impl("depthwise_conv2d", name, device)
    if device == "cpu" and dtype == torch.float16:
        try:
            depthwise_conv2d_reference(torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 3, 3, dtype=dtype), 1, 1, 1)
        except RuntimeError:
            pytest.skip("PyTorch has no float16 depthwise conv on CPU to compare against")
    x, w = conv_inputs((2, 4, 11, 10), 5, dtype, device)
    exact = depthwise_conv2d_reference(x.double(), w.double(), 2, 4, 2)
    out = conv(x, w, 2, 4, 2)
    assert out.dtype == dtype
    ref_err = (depthwise_conv2d_reference(x, w, 2, 4, 2).double() - exact).abs().max()
    err = (out.double() - exact).abs().max()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max()


# --- interval bounds ---------------------------------------------------------------------------------


def interval_reference(lower, upper, weight, stride, padding, dilation):
    """Centre through W, radius through |W|, with the reference conv."""
    centre = depthwise_conv2d_reference((upper + lower) / 2, weight, stride, padding, dilation)
    radius = depthwise_conv2d_reference((upper - lower) / 2, weight.abs(), stride, padding, dilation)
    return centre - radius, centre + radius


# The library's reference is checked too: the bound engine runs it where no fast backend is usable.
@pytest.mark.parametrize("name", ["reference"] + fast_backends("interval_depthwise_conv2d"))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, s, p, d", GEOMETRIES, ids=GEOMETRY_IDS)
def test_interval_matches_reference_and_is_sound(name, device, k, s, p, d):
    fn = impl("interval_depthwise_conv2d", name, device)
    dtype = torch.float64
    lower = torch.randn(2, 3, 9, 8, dtype=dtype, device=device)
    upper = (lower + torch.rand_like(lower)).requires_grad_()
    lower.requires_grad_()
    w = torch.randn(3, 1, k, k, dtype=dtype, device=device, requires_grad=True)
    results = []
    for interval in (fn, interval_reference):
        lo, up = interval(lower, upper, w, s, p, d)
        loss = (lo * torch.linspace(0, 1, lo.shape[-1], dtype=dtype, device=device)).sum() - up.square().sum()
        results.append((lo, up, *torch.autograd.grad(loss, (lower, upper, w))))
    assert_all_close(*results, **tolerance(dtype))
    # every point of the box maps inside the bounds
    lo, up = results[0][:2]
    point = lower + torch.rand_like(lower) * (upper - lower)
    y = depthwise_conv2d_reference(point, w, s, p, d)
    assert bool((lo <= y + 1e-12).all() and (y <= up + 1e-12).all())


@pytest.mark.parametrize("name", fast_backends("interval_depthwise_conv2d"))
@pytest.mark.parametrize("device", DEVICES)
def test_interval_gradcheck_and_gradgradcheck(name, device):
    fn = impl("interval_depthwise_conv2d", name, device)
    lower = torch.randn(1, 2, 6, 5, dtype=torch.float64, device=device)
    upper = (lower + torch.rand_like(lower)).requires_grad_()
    lower.requires_grad_()
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    f = lambda lower, upper, w: fn(lower, upper, w, 2, 2, 2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (lower, upper, w), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (lower, upper, w), fast_mode=True)


# --- the native custom ops ---------------------------------------------------------------------------

needs_native = pytest.mark.skipif(_native.C is None, reason=f"dsrna._C not loaded: {_native.LOAD_ERROR}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_opcheck(device):
    ops = torch.ops.dsrna
    x, w = conv_inputs((2, 3, 7, 6), 3, torch.float32, device)
    g = torch.randn(2, 3, 4, 3, device=device, requires_grad=True)  # output of the stride-2, dilation-2 conv
    torch.library.opcheck(ops.depthwise_conv2d.default, (x, w, 2, 2, 2))
    # The AOT-dispatch check traces through torch.compile's machinery (seconds per op): once is enough.
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.depthwise_conv2d_transpose.default, (g, w, [7, 6], 2, 2, 2), test_utils=quick)
    torch.library.opcheck(ops.depthwise_conv2d_weight.default, (x, g, 3, 2, 2, 2), test_utils=quick)
    torch.library.opcheck(ops.interval_depthwise_conv2d.default, (x, x + 1, w, 2, 2, 2), test_utils=quick)


@needs_native
@pytest.mark.parametrize("k", [3, 7])  # on a CPU every kernel size runs on the C++ kernels
def test_native_backend_runs_its_kernels(k):
    """Comparisons with the reference cannot tell a fast backend that quietly runs the reference
    itself: the native ops must run dsrna's kernels, forward and both gradients."""
    x, w = conv_inputs((2, 3, 9, 8), k, torch.float32, "cpu")
    with OpsRun() as ran:
        y = depthwise_conv2d(x, w, 1, k // 2, 1, backend_name="native")
        torch.autograd.grad(y.sum(), (x, w))
    assert {"dsrna.depthwise_conv2d", "dsrna.depthwise_conv2d_transpose", "dsrna.depthwise_conv2d_weight"} <= ran.names
    assert "aten.convolution" not in ran.names
    with OpsRun() as ran:
        stacked = w.reshape(1, 3, k, k)  # [M, C, k, k]
        y = depthwise_conv2d_stack(x, [stacked, stacked], 1, [k // 2, k - 1], [1, 2], backend_name="native")
        torch.autograd.grad(y.sum(), x)
    assert {"dsrna.depthwise_conv2d_stack", "dsrna.depthwise_conv2d_stack_transpose"} <= ran.names
    with OpsRun() as ran:
        interval_depthwise_conv2d(x.detach(), x.detach() + 1, w.detach(), 2, k // 2, 1, backend_name="native")
    assert ran.names >= {"dsrna.interval_depthwise_conv2d"} and "aten.convolution" not in ran.names
    # The transposed maps called directly, as the CROWN backward step calls them, and their gradients.
    g = torch.randn(2, 3, 9, 8, requires_grad=True)
    with OpsRun() as ran:
        out = depthwise_conv2d_transpose(g, w, (9, 8), 1, k // 2, 1, backend_name="native")
        torch.autograd.grad(out.sum(), (g, w))
        g2 = torch.randn(2, 6, 9, 8, requires_grad=True)
        out = depthwise_conv2d_stack_transpose(g2, [stacked, stacked], (9, 8), 1, [k // 2, k - 1], [1, 2],
                                               backend_name="native")
        torch.autograd.grad(out.sum(), g2)
    assert {"dsrna.depthwise_conv2d_transpose", "dsrna.depthwise_conv2d_stack_transpose"} <= ran.names
    assert not ran.names & {"aten.convolution", "aten.convolution_backward"}


@needs_native
@pytest.mark.parametrize("k, s, d", [(3, 1, 1), (5, 2, 2)])
def test_native_cpu_kernels_split_their_planes_over_threads(k, s, d):
    """With two threads (the tests otherwise run on one) the CPU kernels' planes are split into
    several tasks: the results equal the one-thread results exactly (every plane is computed alone,
    weight-gradient partials are summed in a fixed order) and the reference's within rounding."""
    x, w = conv_inputs((8, 64, 8, 8), k, torch.float64, "cpu")  # 512 planes, several grains of work
    p = d * (k - 1) // 2
    stacked = w.detach().reshape(1, 64, k, k)

    def run():
        y = depthwise_conv2d(x, w, s, p, d, backend_name="native")
        g = torch.ones_like(y) + y.detach()
        return [y, *torch.autograd.grad(y, (x, w), g),
                depthwise_conv2d_stack(x.detach(), [stacked, stacked], s, [p, p], [d, d], backend_name="native")]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = run()
        torch.set_num_threads(1)
        serial = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(parallel, serial):
        assert torch.equal(a, b)
    y = depthwise_conv2d_reference(x, w, s, p, d)
    torch.testing.assert_close(parallel[0], y)
    torch.testing.assert_close(parallel[1:3], list(torch.autograd.grad(y, (x, w), torch.ones_like(y) + y.detach())))


def test_default_geometry_is_pytorchs():
    x, w = conv_inputs((2, 3, 9, 8), 3, torch.float64, "cpu")
    torch.testing.assert_close(depthwise_conv2d(x, w), F.conv2d(x, w, groups=3))  # no padding, stride 1


@needs_native
def test_native_weight_gradient():
    x, w = conv_inputs((3, 2, 10, 9), 5, torch.float64, "cpu")
    g = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    expected, = torch.autograd.grad(depthwise_conv2d_reference(x, w, 2, 2, 1), w, g)
    torch.testing.assert_close(torch.ops.dsrna.depthwise_conv2d_weight(x, g, 5, 2, 2, 1), expected)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_weight_gradient_of_no_channels(device):
    """Zero channels: zero weight gradients (the CUDA launcher divided by the channel count)."""
    x, g = torch.randn(2, 0, 8, 8, device=device), torch.randn(2, 0, 8, 8, device=device)
    assert torch.ops.dsrna.depthwise_conv2d_weight(x, g, 3, 1, 1, 1).shape == (0, 1, 3, 3)


@needs_native
def test_native_kernels_raise_on_bad_arguments():
    """Raised by the C++ checks, under the C++ autograd formula (a Python formula crashed torch 2.11)."""
    x, w = conv_inputs((3, 2, 10, 9), 5, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match=r"weight must be \[C, 1, k, k\]"):
        torch.ops.dsrna.depthwise_conv2d(x, torch.randn(3, 1, 3, 3, dtype=torch.float64), 1, 1, 1)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.dsrna.depthwise_conv2d(x[:, :, :2, :2], w, 1, 0, 2)


@needs_native
@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 37, 45), (4, 64, 8, 8), (2, 3, 1, 70)])
def test_cuda_tiles_match_reference(dtype, shape):
    """Shapes spanning several tiles, many small planes per block, and a one-row image."""
    ops = torch.ops.dsrna
    x = torch.randn(shape, device="cuda", dtype=dtype)
    tol = tolerance(torch.float32) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for k, s, p, d in GEOMETRIES:
        w = torch.randn(shape[1], 1, k, k, device="cuda", dtype=dtype)
        xd, wd = x.double(), w.double()
        y = depthwise_conv2d_reference(xd, wd, s, p, d)
        torch.testing.assert_close(ops.depthwise_conv2d(x, w, s, p, d).double(), y, **tol)
        g = torch.randn_like(y).to(dtype)
        torch.testing.assert_close(ops.depthwise_conv2d_transpose(g, w, list(shape[2:]), s, p, d).double(),
                                   depthwise_conv2d_transpose_reference(g.double(), wd, shape[2:], s, p, d), **tol)
        gw_ref = F.grad.conv2d_weight(xd, wd.shape, g.double(), s, p, d, groups=shape[1])
        torch.testing.assert_close(ops.depthwise_conv2d_weight(x, g, k, s, p, d).double(), gw_ref,
                                   rtol=tol["rtol"], atol=tol["atol"] * shape[0] * y.shape[2] * y.shape[3] ** 0.5)


# --- several convs of one input, channel-stacked ------------------------------------------------------


def stack_inputs(M, C, hw, dtype, device, kernels=tuple(k for k, _, _ in DARTS)):
    x = torch.randn(2, C, *hw, dtype=dtype, device=device, requires_grad=True)
    ws = [torch.randn(M, C, k, k, dtype=dtype, device=device, requires_grad=True) for k in kernels]
    return x, ws


STACK_ARGS = ([p for _, p, _ in DARTS], [d for _, _, d in DARTS])  # paddings, dilations


@pytest.mark.parametrize("name", fast_backends("depthwise_conv2d_stack"))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M, s", [(1, 1), (3, 1), (2, 2)])
def test_stack_forward_backward_and_double_backward(name, device, dtype, M, s):
    """The four first-stage convs of the DARTS candidates, M copies each (M edges leaving a state)."""
    fn = impl("depthwise_conv2d_stack", name, device)
    x, ws = stack_inputs(M, 3, (9, 7), dtype, device)
    results = []
    for stack in (fn, depthwise_conv2d_stack_reference):
        y = stack(x, ws, s, *STACK_ARGS)
        g = torch.ones_like(y).mul_(torch.linspace(-1, 1, y.shape[1], dtype=dtype, device=device)[:, None, None])
        grads = torch.autograd.grad(y, (x, *ws), g.requires_grad_(), create_graph=True)
        second = torch.autograd.grad(grads[0].square().sum() + sum((gw * w).sum() for gw, w in zip(grads[1:], ws)),
                                     (x, *ws, g))
        results.append((y, *grads, *second))
    assert results[0][0].shape == (2, 4 * M * 3, *results[0][0].shape[2:])
    assert_all_close(*results, **tolerance(dtype))


@pytest.mark.parametrize("name", fast_backends("depthwise_conv2d_stack"))
@pytest.mark.parametrize("device", DEVICES)
def test_stack_gradcheck_and_gradgradcheck(name, device):
    stack = impl("depthwise_conv2d_stack", name, device)
    x, ws = stack_inputs(2, 2, (5, 6), torch.float64, device, kernels=(3, 5))
    f = lambda x, *ws: stack(x, ws, 2, [1, 4], [1, 2])  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *ws), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, *ws), fast_mode=True)


@pytest.mark.parametrize("name", ["reference"] + fast_backends("depthwise_conv2d_stack_transpose"))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M, s, hw", [(1, 1, (9, 7)), (3, 2, (9, 7)), (2, 2, (8, 6))])
def test_stack_transpose_is_the_adjoint_of_the_stack(name, device, M, s, hw):
    """<stack(x), g> = <x, stack_transpose(g)> in float64 (odd and even sizes at stride 2: the
    transpose must give back the input's size), and its gradients match the reference's."""
    fn = impl("depthwise_conv2d_stack_transpose", name, device)
    x, ws = stack_inputs(M, 3, hw, torch.float64, device)
    y = depthwise_conv2d_stack_reference(x, ws, s, *STACK_ARGS)
    g = torch.randn_like(y).requires_grad_()
    back = fn(g, ws, hw, s, *STACK_ARGS)
    assert back.shape == x.shape
    torch.testing.assert_close((y * g).sum(), (x * back).sum(), rtol=1e-12, atol=1e-12)
    reference = depthwise_conv2d_stack_transpose_reference(g, ws, hw, s, *STACK_ARGS)
    direction = torch.randn_like(back)
    assert_all_close([back, *torch.autograd.grad((back * direction).sum(), (g, *ws))],
                     [reference, *torch.autograd.grad((reference * direction).sum(), (g, *ws))], **tolerance(torch.float64))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_stack_opcheck_and_gradient_ops(device):
    ops = torch.ops.dsrna
    x, ws = stack_inputs(2, 3, (7, 6), torch.float32, device)
    y = ops.depthwise_conv2d_stack(x, ws, 2, *STACK_ARGS)
    g = torch.randn_like(y).requires_grad_()
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.depthwise_conv2d_stack.default, (x, ws, 2, *STACK_ARGS))
    torch.library.opcheck(ops.depthwise_conv2d_stack_transpose.default, (g, ws, [7, 6], 2, *STACK_ARGS), test_utils=quick)
    torch.library.opcheck(ops.depthwise_conv2d_stack_weight.default, (x, g, [3, 5, 3, 5], 2, *STACK_ARGS),
                          test_utils=quick)
    # Only some weight gradients used: the missing ones count as zero in the double backward.
    gws = ops.depthwise_conv2d_stack_weight(x, g, [3, 5, 3, 5], 2, *STACK_ARGS)
    gx, gg = torch.autograd.grad(gws[1].sum(), (x, g))
    ref_y = depthwise_conv2d_stack_reference(x, ws, 2, *STACK_ARGS)
    ref_gws = torch.autograd.grad(ref_y, ws, g, create_graph=True)
    ref_gx, ref_gg = torch.autograd.grad(ref_gws[1].sum(), (x, g))
    assert_all_close((gx, gg), (ref_gx, ref_gg), **tolerance(torch.float32))


@needs_native
def test_native_stack_rejects_bad_arguments():
    x, ws = stack_inputs(1, 2, (8, 8), torch.float64, "cpu")
    ops = torch.ops.dsrna
    with pytest.raises(RuntimeError, match="conv 1 gives 6x6 outputs but conv 0 gives 8x8"):
        ops.depthwise_conv2d_stack(x, ws[:2], 1, [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"must be \[M, C, k, k\]"):
        ops.depthwise_conv2d_stack(x, [ws[0], torch.randn(2, 2, 5, 5, dtype=torch.float64)], 1, [1, 2], [1, 1])
    with pytest.raises(RuntimeError, match="one padding and one dilation per weight"):
        ops.depthwise_conv2d_stack(x, ws, 1, [1, 2], [1, 1])
    with pytest.raises(ValueError, match="one padding and one dilation per weight"):
        depthwise_conv2d_stack(x, ws, 1, [1, 2], [1, 1], backend_name="reference")


@needs_native
@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("M, C, hw", [(3, 16, (17, 16)), (1, 5, (37, 45)), (2, 64, (8, 8)), (1, 3, (1, 70))])
def test_cuda_stack_matches_reference(dtype, M, C, hw):
    """The fused forward kernel (one staged tile for all convs) on shapes spanning several tiles, many
    small planes per block and a one-row image, against the reference in float64; the gradients
    (composed around it) in float32 and float64."""
    x, ws = stack_inputs(M, C, hw, dtype, "cuda")
    xd, wd = x.detach().double().requires_grad_(), [w.detach().double().requires_grad_() for w in ws]
    for s in (1, 2):
        y = torch.ops.dsrna.depthwise_conv2d_stack(x, ws, s, *STACK_ARGS)
        y_ref = depthwise_conv2d_stack_reference(xd, wd, s, *STACK_ARGS)
        if dtype == torch.bfloat16:  # one rounding of a float32 sum: 8 significant bits
            torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=5e-2)
            continue
        g = torch.randn_like(y_ref)
        got = [y, *torch.autograd.grad(y, (x, *ws), g.to(dtype))]
        want = [y_ref, *torch.autograd.grad(y_ref, (xd, *wd), g)]
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else tolerance(dtype)
        assert_all_close([t.double() for t in got], want, **tol)


# --- end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_search_network_matches_reference(device):
    """A tiny super-network in float64 on the native backend (ops without a native kernel stay on
    the reference): logits, and the weight and alpha gradients of a loss with a Jacobian-norm term
    (double backward), agree with the reference."""
    for op in ("weighted_sum", "depthwise_conv2d"):
        impl(op, "native", device)
        if backend.resolve(op, device, "native") != "native":
            pytest.skip(f"native {op} is not registered for {device}")
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=2, in_channels=1).to(device=device, dtype=torch.float64)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, device=device)
    y = torch.tensor([0, 2], device=device)
    params = list(net.parameters())
    results = []
    for chosen in ("native", "reference"):
        with use_backend(chosen):
            xi = x.clone().requires_grad_()
            logits = net(xi)
            jac, = torch.autograd.grad(logits[:, 0].sum(), xi, create_graph=True)
            loss = F.cross_entropy(logits, y) + 0.01 * jac.square().sum()
            # allow_unused: with two cells both reduce, so alphas_normal takes no part
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            results.append((logits, *(g for g in grads if g is not None)))
    assert len(results[0]) == len(results[1])
    assert_all_close(*results, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7])
def test_kernel_sizes_outside_the_darts_family_work_on_every_device(device, k):
    """The CUDA kernels take kernel sizes 3 and 5 only: a user's depthwise conv of another size runs on
    the reference path there (on the CPU the native kernels take any size). Same values and gradients
    as the reference for the conv, its transpose, its interval form and the stack."""
    require_backend("native", device)
    dtype, p = torch.float64, k // 2
    x, w = conv_inputs((2, 3, 9, 7), k, dtype, device)
    for op, args in (("depthwise_conv2d", (x, w, 1, p, 1)),
                     ("depthwise_conv2d_transpose", (x, w, (9, 7), 1, p, 1)),
                     ("interval_depthwise_conv2d", (x - 1, x + 1, w, 1, p, 1)),
                     ("depthwise_conv2d_stack", (x, [w.reshape(1, 3, k, k)], 2, [p], [1])),
                     ("depthwise_conv2d_stack_transpose", (x, [w.reshape(1, 3, k, k)], (18, 14), 2, [p], [1]))):
        results = []
        for name in ("native", "reference"):
            out = backend.dispatch(op, device, name)(*args)
            out = out if isinstance(out, tuple) else (out,)
            results.append((*out, *torch.autograd.grad(sum(o.square().sum() for o in out), (x, w))))
        assert_all_close(*results, **tolerance(dtype))
