"""Train-mode batch norm that keeps its output for backward (dsrna.ops.batch_norm) against
F.batch_norm: values, running statistics, gradients (both backward formulas), second derivatives."""

import pytest
import torch

from conftest import DEVICES, require_backend
from dsrna.ops import batch_norm_train, batch_norm_train_reference

FAST = ["native", "triton"]
MOMENTUM, EPS = 0.1, 1e-5


def run(fn, x, running):
    """Output and updated running statistics of ``fn`` on copies of the statistics."""
    mean, var = (r.clone() for r in running)
    return fn(x, mean, var, MOMENTUM, EPS), mean, var


def statistics(C, dtype, device):
    return torch.rand(C, dtype=dtype, device=device), 1 + torch.rand(C, dtype=dtype, device=device)


def check_against_reference(name, device, dtype, shape, assert_error_within, offset=1.0):
    """Output, updated running statistics and input gradient of backend ``name`` within the float32
    (or float64) reference's own error of the float64 values."""
    x = (torch.randn(*shape, dtype=torch.float64, device=device) * 3 + offset).to(dtype)
    running = statistics(shape[1], dtype, device)
    g = torch.randn(*shape, dtype=dtype, device=device)
    results = []
    for fn, xd in ((lambda *a: batch_norm_train(*a, backend_name=name), x),
                   (batch_norm_train_reference, x), (batch_norm_train_reference, x.double())):
        xd = xd.clone().requires_grad_()
        y, mean, var = run(fn, xd, [r.to(xd.dtype) for r in running])
        grad, = torch.autograd.grad(y, xd, g.to(xd.dtype))
        results.append([y, mean, var, grad])
    assert_error_within(*results)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (1, 2, 1, 3), (2, 1, 3, 1)])
def test_matches_reference_values_statistics_and_gradients(name, device, dtype, shape, assert_error_within):
    require_backend(name, device)
    check_against_reference(name, device, dtype, shape, assert_error_within)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 2 samples x 4 pixels, 2 tiles per program. Interpreted, the Triton kernels otherwise
    run one program of one tile per channel; so they merge moments and sums within and across
    programs, over partly masked tiles, as on a GPU."""
    kernels = pytest.importorskip("dsrna.kernels.batch_norm")
    monkeypatch.setattr(kernels, "tiles", lambda N, C, HW: (2, 4, 4, -(-N // 4)))


@pytest.mark.parametrize("device", DEVICES)
# Far from zero mean (1e3) float32 sums of squares would cancel; float64 has no exact value to compare with there.
@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1.0), (torch.float32, 1e3), (torch.float64, 1.0)])
def test_triton_merges_partials_across_tiles_and_programs(small_tiles, device, dtype, offset, assert_error_within):
    require_backend("triton", device)
    check_against_reference("triton", device, dtype, (9, 3, 3, 5), assert_error_within, offset)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_ops_opcheck(device):
    kernels = pytest.importorskip("dsrna.kernels.batch_norm")
    require_backend("triton", device)
    x = torch.randn(2, 3, 4, 5, device=device)
    running = statistics(3, torch.float32, device)
    torch.library.opcheck(kernels.batch_norm_forward_op, (x, *running, MOMENTUM, EPS))
    y, invstd = kernels.batch_norm_forward_op(x, *running, MOMENTUM, EPS)
    torch.library.opcheck(kernels.batch_norm_backward_op, (torch.randn_like(y), y, invstd))


@pytest.mark.parametrize("name", FAST)
def test_gradcheck_and_gradgradcheck(name):
    """Second derivatives run the differentiable formula and the derivative of invstd."""
    require_backend(name, "cpu")

    def fn(x):
        return batch_norm_train(x, torch.zeros(2, dtype=x.dtype), torch.ones(2, dtype=x.dtype), MOMENTUM, EPS,
                                backend_name=name)

    # also a variance of the order of EPS, where y's variance (var / (var + EPS)) is far from 1
    for scale in (1.0, 1e-3):
        x = (scale * torch.randn(3, 2, 4, 3, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_both_backward_formulas_agree():
    """Plain backward uses PyTorch's batch-norm backward kernel on the output; under create_graph
    the same formula runs as differentiable ops."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    y = batch_norm_train(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), MOMENTUM, EPS, "native")
    plain, = torch.autograd.grad(y, x, g, retain_graph=True)
    graphed, = torch.autograd.grad(y, x, g, create_graph=True)
    assert graphed.requires_grad and not plain.requires_grad
    torch.testing.assert_close(plain, graphed, rtol=1e-12, atol=1e-12)


def test_half_precision_takes_the_reference_path():
    x = torch.randn(2, 3, 4, 4).bfloat16()
    running = statistics(3, torch.float32, "cpu")
    fast = run(lambda *a: batch_norm_train(*a, backend_name="native"), x, running)
    ref = run(batch_norm_train_reference, x, running)
    assert fast[0].dtype == torch.bfloat16 and all(torch.equal(a, b) for a, b in zip(fast, ref))


def test_rejects_one_value_per_channel_and_wrong_statistics():
    for requires_grad in (False, True):  # the reference path and the fast one
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            batch_norm_train(torch.rand(1, 3, 1, 1, requires_grad=requires_grad), torch.zeros(3), torch.ones(3),
                             MOMENTUM, EPS, "native")
    with pytest.raises(ValueError, match=r"running statistics \[C\]"):
        batch_norm_train(torch.rand(2, 3, 4, 4), torch.zeros(4), torch.ones(4), MOMENTUM, EPS, "native")
    with pytest.raises(ValueError, match=r"running variance \(4,\)"):
        batch_norm_train(torch.rand(2, 3, 4, 4), torch.zeros(3), torch.ones(4), MOMENTUM, EPS, "native")
