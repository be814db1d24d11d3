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
# Far from zero mean float32 sums of squares would cancel; a float64 input has no exact value to compare with there.
@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1.0), (torch.float32, 1e3), (torch.float64, 1.0)])
def test_triton_merges_partials_across_tiles_and_programs(small_tiles, device, dtype, offset, assert_error_within):
    require_backend("triton", device)
    check_against_reference("triton", device, dtype, (9, 3, 3, 5), assert_error_within, offset)


@pytest.mark.parametrize("name", FAST)
def test_running_statistics_may_be_strided_views(name):
    """A view such as ``buffer[:, 0]`` is updated where it lies, as by F.batch_norm."""
    require_backend(name, "cpu")
    x = torch.randn(3, 4, 5, 2, requires_grad=True)
    initial = torch.rand(4, 2, 2) + 0.5
    results = []
    for fn in (lambda *a: batch_norm_train(*a, backend_name=name), batch_norm_train_reference):
        storage = initial.clone()
        fn(x, storage[:, 0, 1], storage[:, 1, 0], MOMENTUM, EPS)  # mean and variance: views of stride 4
        results.append(storage)
    assert not torch.equal(results[1], initial)
    torch.testing.assert_close(*results)


def test_triton_tiles_on_a_gpu_cover_every_sample_once(monkeypatch):
    """The GPU branch of ``tiles`` (the interpreter takes the other one): chunks are whole tiles, cover
    every sample once, stay few per channel, and blocks are powers of two."""
    kernels = pytest.importorskip("dsrna.kernels.batch_norm")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    for N in (1, 2, 3, 7, 64, 256, 1000, 4096, 65536):
        for C in (1, 16, 256, 1024):
            for HW in (1, 7, 49, 64, 196, 784, 1024, 3136, 12544):
                block_n, block_hw, chunk_n, chunks = kernels.tiles(N, C, HW)
                assert block_n & (block_n - 1) == 0 and block_hw & (block_hw - 1) == 0
                assert block_n * block_hw <= 2048 and chunk_n % block_n == 0
                assert (chunks - 1) * chunk_n < N <= chunks * chunk_n, (N, C, HW)
                assert chunks <= kernels.MAX_CHUNKS


@pytest.mark.parametrize("name", FAST)
def test_variance_far_from_zero_mean_keeps_float64_precision(small_tiles, name):
    """A float64 channel at 1e4 +- 3: moments about a value of the channel keep its variance to about
    1e-15; sums of squares about zero would lose about 1e-9."""
    require_backend(name, "cpu")
    x = (torch.randn(9, 2, 3, 5, dtype=torch.float64) * 3 + 1e4).requires_grad_()
    var = torch.zeros(2, dtype=torch.float64)
    batch_norm_train(x, torch.zeros(2, dtype=torch.float64), var, 1.0, EPS, name)  # momentum 1: the batch's
    exact = (x - x.mean((0, 2, 3), keepdim=True)).square().sum((0, 2, 3)) / (x[:, 0].numel() - 1)
    torch.testing.assert_close(var, exact.detach(), rtol=1e-12, atol=0)


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
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("name", FAST)
def test_both_backward_formulas_agree(name):
    """Plain backward runs the backend's kernel on the output (PyTorch's batch-norm backward kernel
    for native, our own for triton); under create_graph the same formula runs as differentiable ops."""
    require_backend(name, "cpu")
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    y = batch_norm_train(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), MOMENTUM, EPS, name)
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
