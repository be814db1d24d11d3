"""The weighted sum ``sum_i w[i] * xs[i]`` of every fast backend against the reference.

Parametrized over every non-reference backend registered for the op (native, Triton, ...), skipped
by capability (``backend_status``), never by failure."""

import pytest
import torch

from dsrna import _native, backend
from dsrna.ops import weighted_sum_reference
from conftest import DEVICES, require_backend

OP = "weighted_sum"
FAST = [b for b in backend.registered_ops()[OP] if b != "reference"]
pytestmark = pytest.mark.usefixtures("small_triton_blocks")  # several programs per launch


def impl(name, device):
    require_backend(name, device)
    return backend.dispatch(OP, device, name)


def make_inputs(n, shape, dtype, device, requires_grad=False):
    xs = [torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(n)]
    w = torch.softmax(torch.randn(n, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device), 0)
    return xs, w.requires_grad_(requires_grad)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, shape", [(1, (3,)), (7, (2, 3, 5, 7)), (12, (1, 4, 3, 3))])
def test_forward_and_gradients_match_reference(name, device, dtype, n, shape):
    fn = impl(name, device)
    xs, w = make_inputs(n, shape, dtype, device, requires_grad=True)
    out, ref = fn(xs, w), weighted_sum_reference(xs, w)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, xs + [w], g)
    ref_grads = torch.autograd.grad(ref, xs + [w], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(name, device):
    fn = impl(name, device)
    base = [torch.randn(3, 6, 5, device=device) for _ in range(4)]
    xs = [b.transpose(0, 2) for b in base[:2]] + [b.transpose(0, 2).contiguous() for b in base[2:]]  # mixed strides
    w = torch.rand(4, device=device)
    torch.testing.assert_close(fn(xs, w), weighted_sum_reference(xs, w))
    # every other channel: dense in the last dims, strided only in dim 1 (not rows of C*H*W)
    xs = [torch.randn(2, 6, 4, device=device)[:, ::2] for _ in range(3)]
    torch.testing.assert_close(fn(xs, w[:3]), weighted_sum_reference(xs, w[:3]))


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h, w", [(5, 7), (17, 40)])  # rows of 140 and of 2,720 elements (native blocks: 1,024)
def test_channel_slices_and_broadcast_rows(name, device, h, w):
    """The batched cell's candidates are channel slices of one stacked tensor (rows over the batch,
    contiguous within a row); the fast paths read them in place. Also a tensor broadcast along the
    batch (row stride 0) and a transposed one (copied). Values and both gradients."""
    fn = impl(name, device)
    stacked = torch.randn(3, 12, h, w, dtype=torch.float64, device=device, requires_grad=True)
    row = torch.randn(1, 4, h, w, dtype=torch.float64, device=device, requires_grad=True)
    other = torch.randn(3, w, h, 4, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.rand(5, dtype=torch.float64, device=device, requires_grad=True)
    inputs = lambda: [*stacked.split(4, dim=1), row.expand(3, 4, h, w), other.transpose(1, 3)]  # noqa: E731
    g = torch.randn(3, 4, h, w, dtype=torch.float64, device=device)
    results = []
    for f in (fn, weighted_sum_reference):
        y = f(inputs(), weights)
        results.append([y, *torch.autograd.grad(y, (stacked, row, other, weights), g)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_no_worse_than_reference(name, device, dtype):
    """Error against float64 at most twice the reference's own error in that dtype (+ one ulp)."""
    fn = impl(name, device)
    xs, w = make_inputs(9, (2, 5, 7, 3), dtype, device)
    exact = weighted_sum_reference([x.double() for x in xs], w.double())
    out = fn(xs, w)
    assert out.dtype == dtype
    ref_err = (weighted_sum_reference(xs, w).double() - exact).abs().max()
    err = (out.double() - exact).abs().max()
    assert err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max()


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sums_in_float32_and_rounds_once(name, device, dtype):
    """The fast paths accumulate in float32 and round the sum once: every element is the exact sum
    rounded to the nearest value of the dtype, up to float32's own accumulation error (rounding each
    product first, as the reference does, misses by more than half a unit in the last place)."""
    fn = impl(name, device)
    torch.manual_seed(0)
    xs = [(torch.rand(4096, device=device) + 0.5).to(dtype) for _ in range(16)]
    w = torch.rand(16, device=device) + 0.1
    exact = weighted_sum_reference([x.double() for x in xs], w.double())
    # exact >= 0.8 stays far from the subnormals: an ulp is eps times its binade. Triton's CPU
    # interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest): a whole ulp there.
    truncates = name == "triton" and device == "cpu" and dtype == torch.bfloat16
    rounding = torch.finfo(dtype).eps * (1 if truncates else 0.5) * 2.0 ** torch.floor(torch.log2(exact))
    accumulation = 16 * 2.0 ** -24 * exact
    assert ((fn(xs, w).double() - exact).abs() <= rounding + accumulation).all()


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(name, device):
    fn = impl(name, device)
    xs, w = make_inputs(3, (2, 3, 2), torch.float64, device, requires_grad=True)
    f = lambda w, *xs: fn(list(xs), w)  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, *xs), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (w, *xs), fast_mode=True)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
def test_many_inputs_and_mixed_dtypes(name, device):
    """More inputs than one kernel launch carries, and bf16 beside fp32 (autocast) promotes like the reference."""
    fn = impl(name, device)
    xs, w = make_inputs(70, (33,), torch.float32, device)
    torch.testing.assert_close(fn(xs, w), weighted_sum_reference(xs, w))
    mixed = [xs[0].bfloat16(), xs[1]]
    out, ref = fn(mixed, w[:2]), weighted_sum_reference(mixed, w[:2])
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=2 ** -7)  # the reference rounds the bf16 product


# --- the native custom ops ---------------------------------------------------------------------------

needs_native = pytest.mark.skipif(_native.C is None, reason=f"dsrna._C not loaded: {_native.LOAD_ERROR}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_opcheck(device):
    xs = [torch.randn(2, 3, 5, device=device, requires_grad=True) for _ in range(3)]
    w = torch.rand(3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dsrna.weighted_sum.default, (xs, w))
    # The AOT-dispatch check traces through torch.compile's machinery (seconds per op): once is enough.
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    # channels-last inputs: the result is contiguous, the fake kernel's too
    last = [torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last) for _ in range(2)]
    torch.library.opcheck(torch.ops.dsrna.weighted_sum.default, (last, w[:2].detach()), test_utils=quick)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):  # the fake's result dtype is the accumulator's
        g = torch.randn(2, 3, 5, device=device, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.dsrna.batched_dot.default, ([x.to(dtype) for x in xs], g), test_utils=quick)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_batched_dot(device):
    xs, _ = make_inputs(5, (3, 40001), torch.float64, device)  # several parallel chunks
    g = torch.randn(3, 40001, dtype=torch.float64, device=device)
    torch.testing.assert_close(torch.ops.dsrna.batched_dot(xs, g), torch.stack([(x * g).sum() for x in xs]))


@needs_native
def test_native_rejects_mismatched_inputs():
    w = torch.rand(2)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.dsrna.weighted_sum([torch.randn(3), torch.randn(4)], w)
    with pytest.raises(RuntimeError, match="one weight per tensor"):
        torch.ops.dsrna.weighted_sum([torch.randn(3), torch.randn(3)], torch.rand(3))


@pytest.mark.parametrize("name", ["reference", "native", "triton"])
def test_wrapper_rejects_mismatched_inputs_on_every_backend(name):
    """The public op checks before any kernel runs, so every backend and torch version raises one line."""
    from dsrna.ops import weighted_sum

    with pytest.raises(ValueError, match="same shape and device"):
        weighted_sum([torch.randn(3), torch.randn(4)], torch.rand(2), backend_name=name)
    with pytest.raises(ValueError, match="2 tensors but 3 weights"):
        weighted_sum([torch.randn(3), torch.randn(3)], torch.rand(3), backend_name=name)
    with pytest.raises(ValueError, match="got \\(3,\\) on cpu and \\(3,\\) on meta"):
        weighted_sum([torch.randn(3), torch.randn(3, device="meta")], torch.rand(2), backend_name=name)


