"""The state-batched cell of the fast backends (dsrna.space.batched_cell) against the per-edge
reference cell, in float64 where the two must agree to rounding: when it runs and when it must not,
batch-norm bookkeeping (running statistics from any prior state, counters, captured and frozen
statistics), and cells it does not know."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

from conftest import DEVICES
from dsrna import SearchNetwork, backend
from dsrna.space import batched_cell, capture_batch_stats, frozen_batch_stats
from dsrna.space.ops import SepConv, Zero

def fast_backend(device):
    """Native first: the Triton interpreter takes minutes at these sizes on a CPU
    (tests/test_backends.py runs the batched cell on Triton at a smaller one)."""
    for name in ("native", "triton"):
        if backend.backend_status(name, device)[0]:
            return name
    pytest.skip(f"no fast backend runs on {device}")
TOL = dict(rtol=1e-10, atol=1e-12)


def pair(partial_channels=1, device="cpu", steps=4, multiplier=4):
    """(fast, reference) copies of one small float64 super-network, alpha away from uniform."""
    torch.manual_seed(0)
    ref = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=2, partial_channels=partial_channels,
                        steps=steps, multiplier=multiplier, backend="reference").to(device, torch.float64)
    with torch.no_grad():
        for p in ref.arch_parameters():
            p.normal_(0, 0.5)
    fast = copy.deepcopy(ref)
    fast.backend = fast_backend(device)
    return fast, ref


def step(net, x, y):
    """Logits and the gradients of the cross-entropy with respect to every parameter."""
    logits = net(x)
    return (logits, *torch.autograd.grad(F.cross_entropy(logits, y), list(net.parameters())))


@pytest.fixture
def batched(monkeypatch):
    """The cells that ran on the batched path: the comparisons alone would also pass if every cell
    quietly ran edge by edge."""
    cells = []
    original = batched_cell.forward_batched

    def counted(cell, *args, **kwargs):
        cells.append(cell)
        return original(cell, *args, **kwargs)

    monkeypatch.setattr(batched_cell, "forward_batched", counted)
    return cells


def batch_norm_state(net):
    return [b for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def assert_close_all(a, b):
    """Every pair of tensors close; compared as one flat vector (a thousand separate assert_close
    calls take a minute)."""
    assert len(a) == len(b) and all(u.shape == v.shape for u, v in zip(a, b))
    torch.testing.assert_close(torch.cat([u.double().flatten().cpu() for u in a]),
                               torch.cat([v.double().flatten().cpu() for v in b]), **TOL)


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_every_darts_cell_runs_batched_in_train_and_in_eval_mode(partial_channels):
    fast, _ = pair(partial_channels)
    assert all(batched_cell.usable_plan(cell) is not None for cell in fast.cells)  # normal and reduction cells
    fast.eval()
    assert all(batched_cell.usable_plan(cell) is not None for cell in fast.cells)
    fast.train()
    fast.cells[0].edges[3].ops[2].bn.eval()  # one batch norm in another mode than the rest
    assert batched_cell.usable_plan(fast.cells[0]) is None and batched_cell.usable_plan(fast.cells[1]) is not None


@pytest.mark.parametrize("partial_channels", [1, 2])
def test_eval_mode_uses_each_edges_running_statistics(partial_channels, batched):
    """In eval mode the edges' pool outputs differ (each batch norm has its own running statistics,
    here made different on purpose); the batched cell pools once and normalises per edge."""
    fast, ref = pair(partial_channels)
    with torch.no_grad():
        for net in (fast, ref):
            for n, (name, buf) in enumerate(net.named_buffers()):
                if name.endswith(("running_mean", "running_var")):
                    buf.copy_(torch.linspace(0.5, 1.5, buf.numel(), dtype=buf.dtype) * (1 + n % 7))
            net.eval()
    x = torch.rand(2, 2, 9, 9, dtype=torch.float64)
    assert_close_all([fast(x)], [ref(x)])
    assert batched == list(fast.cells)
    assert_close_all(batch_norm_state(fast), batch_norm_state(ref))  # nothing updated


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("partial_channels, steps, multiplier", [(1, 4, 4), (2, 4, 4), (1, 3, 2)])
def test_two_train_steps_match_reference_with_batch_norm_bookkeeping(partial_channels, steps, multiplier, device,
                                                                     batched):
    fast, ref = pair(partial_channels, device, steps, multiplier)
    x = torch.rand(3, 2, 9, 9, dtype=torch.float64, device=device)
    y = torch.tensor([0, 2, 1], device=device)
    for _ in range(2):
        assert_close_all(step(fast, x, y), step(ref, x, y))
    assert batched == 2 * list(fast.cells)
    assert_close_all(batch_norm_state(fast), batch_norm_state(ref))


def test_pool_statistics_update_exactly_from_unequal_running_statistics():
    """The edges leaving a state share one pooling pass; each edge's running statistics still take
    their own update, whatever they held before (here: different per edge)."""
    fast, ref = pair()
    with torch.no_grad():
        for net in (fast, ref):
            for n, (name, buf) in enumerate(net.named_buffers()):
                if name.endswith(("running_mean", "running_var")):
                    buf.copy_(torch.linspace(0.5, 1.5, buf.numel(), dtype=buf.dtype) * (1 + n % 7))
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    fast(x), ref(x)
    assert_close_all(batch_norm_state(fast), batch_norm_state(ref))


@pytest.mark.parametrize("device", DEVICES)
def test_captured_and_frozen_statistics_match_reference(device):
    """The robustness metrics capture the clean batch's statistics, then differentiate a pass that
    replays them (double backward for the Jacobian term)."""
    fast, ref = pair(device=device)
    x = torch.rand(2, 2, 7, 7, dtype=torch.float64, device=device)
    results = []
    for net in (fast, ref):
        with capture_batch_stats() as store:
            clean = net(x)
        xi = (x + 0.01).requires_grad_()
        with frozen_batch_stats(store):
            logits = net(xi)
        jac, = torch.autograd.grad(logits[:, 1].sum(), xi, create_graph=True)
        arch = torch.autograd.grad(jac.square().sum(), net.arch_parameters())
        names = {module: name for name, module in net.named_modules()}
        stats = [t for bn in sorted(store, key=names.get) for t in store[bn]]
        results.append((clean, logits, jac, *arch, *stats, torch.tensor(float(len(store)))))
    assert_close_all(*results)


def test_statistics_captured_under_bf16_autocast_are_float32():
    """The float32/float64 robustness passes replay them: bf16 statistics were percents off."""
    fast, ref = (net.float() for net in pair())
    x = torch.rand(4, 2, 8, 8)
    for net in (fast, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16), capture_batch_stats() as store:
            net(x)
        assert store and {t.dtype for stats in store.values() for t in stats} == {torch.float32}


def test_cells_it_does_not_know_run_per_edge(batched):
    """An edge whose candidate differs from the DARTS op (here a 3x3 where the 5x5 sep conv goes)
    leaves its cell on the per-edge path, with the same results as the reference."""
    fast, ref = pair()
    for net in (fast, ref):
        torch.manual_seed(1)
        net.cells[0].edges[2].ops[5] = SepConv(4, 4, 3, 1, 1, affine=False).double()
    assert batched_cell.cell_plan(fast.cells[0]) is None and batched_cell.usable_plan(fast.cells[1]) is not None
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 0])
    assert_close_all(step(fast, x, y), step(ref, x, y))
    assert batched == list(fast.cells[1:])


def _prune_a_conv(net):
    prune.l1_unstructured(net.cells[0].edges[1].ops[4].op[2], "weight", amount=0.5)


def _hook_a_batch_norm(net):
    net.cells[0].edges[1].ops[6].op[3].register_forward_hook(lambda module, inputs, output: output * 2)


def _pool_batch_norm_of_its_own(net):
    net.cells[0].edges[1].ops[1].bn.momentum = 0.5


@pytest.mark.parametrize("change", [_prune_a_conv, _hook_a_batch_norm, _pool_batch_norm_of_its_own])
def test_candidates_the_plan_cannot_honour_run_per_edge(change):
    """The batched cell computes from the modules' tensors without calling them: a pruned conv (which
    crashed it), a hook (which it skipped), a pool batch norm with its own momentum (which it
    ignored) leave their cell on the per-edge path, with the reference's results."""
    fast, ref = pair()
    for net in (fast, ref):
        change(net)
    assert batched_cell.cell_plan(fast.cells[0]) is None and batched_cell.usable_plan(fast.cells[1]) is not None
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 0])
    assert_close_all(step(fast, x, y), step(ref, x, y))


@pytest.mark.parametrize("amp", [False, True])
def test_recomputed_stages_give_the_gradients_of_kept_ones(monkeypatch, amp):
    """The depthwise stages keep only their inputs and run again in backward, on the forward's
    backend and autocast state; first and second derivatives equal those of the same cell keeping
    everything (in bf16 autocast too: the recomputation runs in bf16 again, so only the order of the
    float32 gradient sums differs)."""
    fast, _ = pair()
    kept = copy.deepcopy(fast)
    dtype = torch.float32 if amp else torch.float64
    fast, kept = fast.to(dtype), kept.to(dtype)
    x = torch.rand(2, 2, 8, 8, dtype=dtype, requires_grad=True)
    results = []
    for net, recompute in ((fast, True), (kept, False)):
        if not recompute:
            monkeypatch.setattr(batched_cell, "_recomputed", lambda fn, *inputs: fn(*inputs))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        jac, = torch.autograd.grad(logits[:, 1].sum(), x, create_graph=True)
        results.append([logits, jac, *torch.autograd.grad(jac.square().sum(), list(net.parameters()), allow_unused=True,
                                                          materialize_grads=True)])
    assert all(a.dtype == b.dtype for a, b in zip(*results))
    if amp:
        torch.testing.assert_close(torch.cat([t.flatten() for t in results[0]]),
                                   torch.cat([t.flatten() for t in results[1]]), rtol=1e-5, atol=1e-12)
    else:
        assert_close_all(*results)


def test_an_op_replaced_after_a_forward_is_the_one_that_runs():
    """The per-edge candidates and the batched plan are cached per cell, and rebuilt when an op is
    replaced: after a first forward, each net with the op replaced computes what a net that never
    ran computes with it."""
    fast, ref = pair()
    fresh = copy.deepcopy(ref)
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    fast(x), ref(x)  # build the caches
    for net in (fast, ref, fresh):
        torch.manual_seed(1)
        net.cells[0].edges[2].ops[5] = SepConv(4, 4, 3, 1, 1, affine=False).double()
    assert_close_all([fast(x), ref(x)], [fresh(x), fresh(x)])


def test_an_affine_pool_batch_norm_runs_per_edge_with_its_scale_and_shift():
    """The batched cell and the fused pool -> BN op assume affine-free batch norms: a pool whose
    batch norm learns a scale and shift leaves its cell on the per-edge path, which applies them."""
    from dsrna.space.ops import BatchNorm2d

    fast, ref = pair()
    for net in (fast, ref):
        bn = BatchNorm2d(4, affine=True).double()
        with torch.no_grad():
            bn.weight.fill_(2.0)
            bn.bias.fill_(0.5)
        net.cells[0].edges[1].ops[2].bn = bn
    assert batched_cell.cell_plan(fast.cells[0]) is None
    pool = fast.cells[0].edges[1].ops[2]
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(pool(x), pool.bn(pool.pool(x)))
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 0])
    assert_close_all(step(fast, x, y), step(ref, x, y))


def test_four_partial_channel_groups_match_reference(batched):
    """PC-DARTS' own K=4 (the other tests take K=2): the batched cell splits off C/K channels and
    shuffles in K groups as the reference mixed op does."""
    fast, ref = pair(4)
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 0])
    assert_close_all(step(fast, x, y), step(ref, x, y))
    assert batched == list(fast.cells)


def test_a_replayed_pass_changes_no_batch_norm_state():
    """Replaying captured statistics normalises with them only: no running statistics (here unequal
    per edge, so a shared update would show) and no counters change, batched or per edge."""
    for net in pair():
        with torch.no_grad():
            for n, (name, buf) in enumerate(net.named_buffers()):
                if name.endswith(("running_mean", "running_var")):
                    buf.copy_(torch.linspace(0.5, 1.5, buf.numel(), dtype=buf.dtype) * (1 + n % 7))
        x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
        with capture_batch_stats() as store:
            net(x)
        before = [t.clone() for t in batch_norm_state(net)]
        with frozen_batch_stats(store):
            net(x + 0.01)
        assert_close_all(batch_norm_state(net), before)


def test_global_module_hooks_see_every_candidate():
    """The batched plan computes from the candidates' tensors without calling them; while a global
    module hook is registered the cells run edge by edge, calling every candidate (but `none`, which
    adds nothing), so the hook sees each."""
    fast, _ = pair()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    fast(x)  # the plan exists
    seen = set()
    with torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, out: seen.add(module)):
        fast(x)
    candidates = {op for edge in fast.cells[0].edges for op in edge.ops if not isinstance(op, Zero)}
    assert candidates <= seen


def test_a_hooked_conv_candidate_is_called_on_the_per_edge_path():
    """Per edge the conv candidates share one ReLU and skip their own (``after_relu``); a candidate with
    a hook of its own is called instead, so the hook runs (and changes the edge, as it would alone)."""
    _, ref = pair()
    edge = ref.cells[0].edges[0]
    x = torch.rand(2, 4, 8, 8, dtype=torch.float64)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0)
    plain = edge(x, w)
    sep3 = edge.ops[4]
    sep3.register_forward_hook(lambda module, inputs, out: out * 3)
    assert isinstance(sep3, SepConv)
    hooked = edge(x, w)
    torch.testing.assert_close(hooked, plain + 2 * w[4] * sep3(x) / 3)  # sep3's term counted three times
