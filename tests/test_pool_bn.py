"""Pooling fused with BatchNorm2d(affine=False): the reference twin equals the two modules, and every
fast backend registered for ``pool_bn`` matches it (values, gradients, running statistics)."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.autograd import gradcheck, gradgradcheck

from conftest import DEVICES, require_backend
from dsrna import backend
from dsrna.ops.pool_bn import pool_bn, pool_bn_reference, pool3x3
from dsrna.space.ops import PoolBN, capture_batch_stats, frozen_batch_stats

FAST = [b for b in backend.registered_ops()["pool_bn"] if b != "reference"]
CASES = [(kind, stride) for kind in ("max", "avg") for stride in (1, 2)]


def make_bn(C, device, dtype=torch.float32, training=True):
    bn = nn.BatchNorm2d(C, affine=False).to(device=device, dtype=dtype)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return bn.train(training)


def with_ties(x):
    """Plateaus of equal values exercise max pooling's first-maximum rule."""
    x = x.detach().clone()
    x[:, :, :2, :3] = 0.5
    return x


@pytest.mark.parametrize("kind, stride", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_reference_equals_pool_then_batchnorm_module(kind, stride, training):
    x = torch.randn(3, 4, 7, 9)
    bn = make_bn(4, "cpu", training=training)
    modules = copy.deepcopy(bn)
    pool = nn.MaxPool2d(3, stride, 1) if kind == "max" else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    expected = modules(pool(x))
    out = pool_bn(x, kind, stride, bn, backend_name="reference")
    torch.testing.assert_close(out, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(modules, name))


def test_rejects_bad_arguments():
    bn = make_bn(2, "cpu")
    with pytest.raises(ValueError, match="pool kind"):
        pool_bn(torch.zeros(1, 2, 3, 3), "min", 1, bn)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):  # the kernels handle those two
        pool_bn(torch.zeros(1, 2, 3, 3), "avg", 3, bn)
    with pytest.raises(ValueError, match="affine=False"):
        pool_bn(torch.zeros(1, 2, 3, 3), "max", 1, nn.BatchNorm2d(2))


def check_against_reference(name, device, kind, stride, training, assert_error_within, shape=(2, 3, 7, 9)):
    """Output, input gradient and running statistics, errors relative to float64."""
    x = with_ties(torch.randn(*shape, device=device) * 2 + 1).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    bns = [make_bn(shape[1], device, training=training) for _ in range(2)]
    bns[1].load_state_dict(bns[0].state_dict())
    bn64 = copy.deepcopy(bns[0]).double()
    fast = pool_bn(x, kind, stride, bns[0], backend_name=name)
    ref = pool_bn(x, kind, stride, bns[1], backend_name="reference")
    exact = pool_bn(x64, kind, stride, bn64, backend_name="reference")
    assert_error_within(fast, ref, exact)
    g = torch.randn_like(ref)
    assert_error_within(torch.autograd.grad(fast, x, g), torch.autograd.grad(ref, x, g),
                        torch.autograd.grad(exact, x64, g.double()))
    assert_error_within([bns[0].running_mean, bns[0].running_var], [bns[1].running_mean, bns[1].running_var],
                        [bn64.running_mean, bn64.running_var])
    assert bns[0].num_batches_tracked.item() == bns[1].num_batches_tracked.item() == int(training)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, stride", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_fast_matches_reference_float32(name, device, kind, stride, training, assert_error_within):
    """Odd sizes, ties in the max-pool windows."""
    require_backend(name, device)
    check_against_reference(name, device, kind, stride, training, assert_error_within)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, stride", CASES)
def test_triton_merges_partials_across_programs(monkeypatch, device, kind, stride, assert_error_within):
    """Interpreted, the Triton kernels otherwise run one program per channel; with blocks of 4 and
    chunks of 8 they merge statistics within and across programs over partly masked blocks, as on a GPU."""
    kernels = pytest.importorskip("dsrna.kernels.pool_bn")
    require_backend("triton", device)
    monkeypatch.setattr(kernels, "_grid", lambda length: (4, 8, -(-length // 8)))
    monkeypatch.setattr(kernels.batch_norm, "tiles", lambda N, C, HW: (2, 4, 4, -(-N // 4)))
    check_against_reference("triton", device, kind, stride, True, assert_error_within, shape=(5, 2, 5, 6))


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, stride, training", [("max", 1, True), ("avg", 2, True), ("max", 2, False)])
def test_fast_gradcheck_and_gradgradcheck(name, device, kind, stride, training):
    require_backend(name, device)
    bn = make_bn(2, device, torch.float64, training)
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())

    def f(x):
        # fresh copies: gradcheck calls f many times and train mode updates the statistics
        rm, rv, nbt = (t.clone() for t in stats)
        return backend.dispatch("pool_bn", device, name)(x, kind, stride, rm, rv, nbt, training, 0.1, 1e-5)

    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(f, (x,), fast_mode=True)
    assert gradgradcheck(f, (x,), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_ops_opcheck(device):
    kernels = pytest.importorskip("dsrna.kernels.pool_bn")
    require_backend("triton", device)
    x = torch.randn(2, 3, 5, 5, device=device)
    bn = make_bn(3, device)
    args = (x, bn.running_mean, bn.running_var, bn.num_batches_tracked, "max", 2, True, 0.1, 1e-5)
    torch.library.opcheck(kernels.pool_bn_forward_op, args)
    y, stats, arg = kernels.pool_bn_forward_op(*args)
    torch.library.opcheck(kernels.pool_bn_backward_op, (torch.randn_like(y), x, y, stats, arg, "max", 2, True))


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("device", DEVICES)
def test_module_keeps_captured_and_frozen_batch_statistics(name, device):
    """PoolBN uses the fused op in plain train mode, and the BN module itself while batch statistics
    are captured or replayed, so frozen statistics stay constants of the input."""
    require_backend(name, device)
    op = PoolBN("avg", 3, 1).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    with backend.use_backend(name):
        with capture_batch_stats() as store:
            clean = op(x)
        assert op.bn in store
        perturbed = (x + 0.1 * torch.randn_like(x)).requires_grad_()
        with frozen_batch_stats(store):
            out = op(perturbed)
        plain = op(x)
    mean, var = store[op.bn]
    pooled = pool3x3(perturbed, "avg", 1)
    torch.testing.assert_close(out, (pooled - mean[:, None, None]) / torch.sqrt(var[:, None, None] + op.bn.eps))
    torch.testing.assert_close(plain, clean)
    assert op.bn.num_batches_tracked.item() == 2  # the capture pass and the plain one


def test_reference_is_registered_and_used_by_module():
    op = PoolBN("max", 2, 2)
    x = torch.randn(2, 2, 5, 5)
    expected = pool_bn_reference(x, "max", 2, op.bn.running_mean.clone(), op.bn.running_var.clone(),
                                 op.bn.num_batches_tracked.clone(), True, 0.1, 1e-5)
    with backend.use_backend("reference"):
        torch.testing.assert_close(op(x), expected)


@pytest.mark.parametrize("training", [True, False])
def test_module_runs_the_fused_op_in_plain_modes(monkeypatch, training):
    """Outside capture and replay, PoolBN runs pool -> BN as the one fused op (the fast backends'
    kernel), not as the two modules: the same numbers, so only the call tells."""
    from dsrna.space import ops as space_ops

    calls = []
    monkeypatch.setattr(space_ops, "pool_bn", lambda x, kind, *rest: calls.append(kind) or pool_bn(x, kind, *rest))
    op = PoolBN("max", 3, 2).train(training)
    op(torch.randn(2, 3, 5, 5))
    assert calls == ["max"]


def test_module_with_hooks_runs_its_pool_and_batch_norm():
    """A hook on the pool or the batch norm (or a global one) must see its module called: the fused op
    would bypass both, so such a PoolBN runs them as modules, with the hook's effect."""
    x = torch.randn(2, 3, 5, 5)
    op = PoolBN("avg", 3, 1).eval()
    plain = op(x)
    handle = op.bn.register_forward_hook(lambda module, inputs, out: out + 1)
    torch.testing.assert_close(op(x), plain + 1)
    handle.remove()
    seen = []
    with nn.modules.module.register_module_forward_hook(lambda module, inputs, out: seen.append(module)):
        op(x)
    assert op.pool in seen and op.bn in seen
