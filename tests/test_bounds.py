"""The bound engine against the dense oracle, op by op soundness, tightness order, errors."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

from dense_bounds import DenseBounds, dense_layers, extreme_points, pgd_logit_extremes, sample_ball
from dsrna import SearchNetwork
from dsrna.bounds import METHODS, BoundModel, logit_bounds, margin_lower_bound, margin_spec
from dsrna.bounds import nodes
from dsrna.bounds.nodes import ErrorSymbols
from dsrna.ops.bound_ops import crown_relu_backward_reference, relu_relaxation_reference
from dsrna.space import capture_batch_stats, frozen_batch_stats
from dsrna.space.ops import DilConv, FactorizedReduce, PoolBN, SepConv

ORACLE_METHODS = ("ibp", "crown-ibp", "crown")  # the dense oracle's; "crown-symbolic" is checked by exactness below
NORMS = ("linf", "l2", "l1")


def _sequential():
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=2, dilation=2, groups=3), nn.BatchNorm2d(3), nn.ReLU(),
        nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.AvgPool2d(3, 1, 1, count_include_pad=True),
        nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(36, 4),
    ).double().eval()
    net[3].running_mean.normal_()
    net[3].running_var.uniform_(0.5, 2.0)
    with torch.no_grad():  # a negative scale swaps the interval's ends
        net[3].weight.copy_(torch.tensor([-1.5, 0.7, -0.2]))
    return net


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("clip", [True, False])
def test_matches_dense_oracle(norm, clip):
    net = _sequential()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    spec = torch.randn(3, 5, 4, dtype=torch.float64)
    layers = dense_layers(net, (1, 6, 6))
    box = (0.0, 1.0) if clip else None
    with torch.no_grad():
        for method in ORACLE_METHODS:
            got = BoundModel(net).lower_bound(x, spec, 0.15, norm, method, box)
            want = torch.stack([DenseBounds(layers, x[i].flatten(), 0.15, norm, method, clip).lower_bound(spec[i], method)
                                for i in range(3)])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{method}")
        propagation = BoundModel(net).propagation(x, 0.15, norm, "ibp", box, keep_all_bounds=True)
        assert all(bool((lower <= upper).all()) for lower, upper in propagation.bounds if lower is not None)


def test_max_pool_symbolic_form_holds_at_samples():
    """The max-pool rule of crown-symbolic on its own: for inputs sampled in a box given as an exact
    affine form, every window's max lies in the output form's range (input symbols at the sample,
    the new error symbols free in [-1, 1])."""
    pool = nodes.MaxPool2d(2, 2, 0, False)
    lower = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    upper = lower + 0.8 * torch.rand_like(lower)
    mid, half = (upper + lower) / 2, (upper - lower) / 2
    n = mid[0].numel()
    coef = torch.diag_embed(half.reshape(1, -1)).reshape(1, n, 2, 4, 4)
    out = pool.symbolic([nodes.Symbolic(coef, mid, None)], [(lower, upper)], ErrorSymbols(n, 100))
    d = torch.rand(5000, n, dtype=torch.float64) * 2 - 1
    y = pool.forward(mid + (d * half.reshape(1, -1)).view(5000, 2, 4, 4))
    affine = out.centre + torch.einsum("sn,nchw->schw", d, out.coef[0, :n])
    slack = out.coef[0, n:].abs().sum(0) + (0 if out.radius is None else out.radius[0])
    assert float(torch.maximum(y - (affine + slack), (affine - slack) - y).max()) <= 1e-12


def test_max_pool_relaxation_picks_the_input_with_the_largest_lower_bound():
    """The CROWN lower line of a max-pool window is its input with the largest lower bound, and the
    gap is how far another input's upper bound reaches above it: window [0, 0.5], [-1, 1], and two
    dead ones: max >= x_0 >= 0 (the line through the input with the largest upper bound gives -1)."""
    pool = nodes.MaxPool2d(2, 2, 0, False)
    lower = torch.tensor([[[[0.0, -1.0], [-2.0, -2.0]]]], dtype=torch.float64)
    upper = torch.tensor([[[[0.5, 1.0], [-1.5, -1.5]]]], dtype=torch.float64)
    index, gap = pool._windows(lower, upper)
    assert index.item() == 0 and gap.item() == 1.0
    (A,), bias = pool.backward(torch.ones(1, 1, 1, 1, 1, dtype=torch.float64), [(lower, upper)])
    assert float((A.clamp(min=0) * lower).sum() + (A.clamp(max=0) * upper).sum() + bias.sum()) == 0.0


def test_symbolic_radii_scale_exactly():
    """The per-neuron radius (the overflow past the error symbols) is carried exactly, not only
    soundly: through a ReLU by its chord's slope (plus the band it adds), into a mixed op's sum by
    the candidate's weight."""
    from dsrna.bounds.engine import _accumulate

    lower = torch.tensor([[-1.0, 0.5, -2.0]], dtype=torch.float64)
    upper = torch.tensor([[3.0, 2.0, -1.0]], dtype=torch.float64)
    radius = torch.tensor([[0.25, 0.5, 0.1]], dtype=torch.float64)
    sym = nodes.Symbolic(torch.zeros(1, 1, 3, dtype=torch.float64), (lower + upper) / 2, radius)
    out = nodes.ReLU().symbolic([sym], [(lower, upper)], ErrorSymbols(1, 0))  # no error symbols left
    slope = torch.tensor([[0.75, 1.0, 0.0]], dtype=torch.float64)  # chord 3 / 4, active, dead
    band = torch.tensor([[0.375, 0.0, 0.0]], dtype=torch.float64)  # half the chord's intercept 0.75
    torch.testing.assert_close(out.radius, radius * slope + band, rtol=0, atol=1e-15)
    total = _accumulate(None, sym, torch.tensor(0.25, dtype=torch.float64))
    total = _accumulate(total, sym, torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(total.radius, 0.75 * radius, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kernel", [(2, 3), (3, 2)])
def test_non_square_max_pools_are_sound_and_exact_at_eps_zero(kernel):
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(kernel, kernel), nn.Flatten(),
                        nn.Linear(3 * (6 // kernel[0]) * (6 // kernel[1]), 3)).double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        samples = net(sample_ball(x, 0.05, "linf", 2000).flatten(0, 1)).view(2000, 2, 3)
        clean = net(x)
        for method in METHODS:
            lower, upper = logit_bounds(net, x, 0.05, "linf", method)
            assert bool((lower <= samples + 1e-9).all() and (samples <= upper + 1e-9).all()), method
            lower, upper = logit_bounds(net, x, 0.0, "linf", method)
            torch.testing.assert_close(lower, clean, rtol=0, atol=1e-9, msg=method)
            torch.testing.assert_close(upper, clean, rtol=0, atol=1e-9, msg=method)


@pytest.mark.parametrize("kernel", [3, 7])
def test_bias_free_depthwise_conv_matches_dense_oracle(kernel):
    """Bias-free depthwise convs of the DARTS sizes run on the dispatched depthwise ops, other sizes
    (which the CUDA kernels lack) on the generic conv: the same bounds either way."""
    net = nn.Sequential(nn.Conv2d(2, 2, kernel, padding=kernel // 2, groups=2, bias=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(50, 3)).double()
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    spec = torch.randn(2, 4, 3, dtype=torch.float64)
    layers = dense_layers(net, (2, 5, 5))
    with torch.no_grad():
        for method in ORACLE_METHODS:
            got = BoundModel(net).lower_bound(x, spec, 0.1, "linf", method)
            want = torch.stack([DenseBounds(layers, x[i].flatten(), 0.1, "linf", method, True).lower_bound(spec[i], method)
                                for i in range(2)])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{method}")


def test_crown_tighter_than_ibp_on_sequential():
    net = _sequential()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        widths = {m: torch.sub(*reversed(logit_bounds(net, x, 0.1, "linf", m))) for m in ORACLE_METHODS}
    assert (widths["crown"] <= widths["ibp"] + 1e-9).all()
    assert (widths["crown"] <= widths["crown-ibp"] + 1e-9).all()
    assert widths["crown"].sum() < widths["ibp"].sum()


def _op_cases():
    return [
        ("max_pool s1", lambda: PoolBN("max", 2, 1, bn=False)),
        ("max_pool s2", lambda: PoolBN("max", 2, 2, bn=False)),
        ("max_pool 2x2 ceil", lambda: nn.MaxPool2d(2, 2, ceil_mode=True)),
        ("avg_pool s1", lambda: PoolBN("avg", 2, 1, bn=False)),
        ("avg_pool s2", lambda: PoolBN("avg", 2, 2, bn=False)),
        ("factorized_reduce", lambda: FactorizedReduce(2, 4, affine=True)),
        ("sep_conv_3x3 s2", lambda: SepConv(2, 2, 3, 2, 1, affine=True)),
        ("sep_conv_5x5 s1", lambda: SepConv(2, 2, 5, 1, 2, affine=True)),
        ("dil_conv_3x3 s1", lambda: DilConv(2, 2, 3, 1, 2, 2, affine=True)),
        ("dil_conv_5x5 s2", lambda: DilConv(2, 2, 5, 2, 4, 2, affine=True)),
    ]


@pytest.mark.parametrize("name,make", _op_cases(), ids=[c[0] for c in _op_cases()])
def test_each_op_sound(name, make):
    """Each op alone (plus a linear read-out) on a 5x5 input: bounds hold at sampled and attacked
    points, every norm and method."""
    op = make()
    with torch.no_grad():
        for m in op.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    features = op.double().eval()(x).flatten(1).shape[1]
    net = nn.Sequential(op, nn.Flatten(), nn.Linear(features, 3)).double().eval()
    for norm in NORMS:
        # Uniform samples, points of the ball's boundary, and each logit pushed down and up by PGD:
        # uniform samples in 50 dimensions stay far from the bounds (bounds 10% too narrow passed).
        points = torch.cat([sample_ball(x, 0.2, norm, 500), extreme_points(x, 0.2, norm, 100)])
        attacked = pgd_logit_extremes(net, x, 3, 0.2, norm)
        with torch.no_grad():
            outputs = torch.cat([net(points.flatten(0, 1)).view(len(points), 2, 3), attacked])
            for method in METHODS:
                lower, upper = logit_bounds(net, x, 0.2, norm, method)
                assert (outputs >= lower - 1e-9).all() and (outputs <= upper + 1e-9).all(), (norm, method)
            # No error symbols at all: every undecided neuron's error goes to the independent radius.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # running out of error symbols is the point here
                prop = BoundModel(net, max_error_symbols=0).propagation(x, 0.2, norm, "crown-symbolic")
            eye = torch.eye(3, dtype=x.dtype).expand(2, 3, 3)
            lower, upper = prop.lower_bound(eye), -prop.lower_bound(-eye)
            assert (outputs >= lower - 1e-9).all() and (outputs <= upper + 1e-9).all(), (norm, "no error symbols")


def _deep_search_network():
    torch.manual_seed(0)
    return SearchNetwork(C=4, num_classes=5, layers=3, in_channels=1).double().train()


def test_every_method_gives_the_clean_margins_at_eps_zero():
    """At eps 0 every interval is exact up to rounding, and two of them (the interval rule's and the
    symbolic or CROWN one) can come out disjoint: intersected, they gave a crossed interval whose
    negative radius grew through the network (crown-symbolic was off by 1.7 on these 5 cells)."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=5, in_channels=3, mean=[0.49, 0.48, 0.45],
                        std=[0.25, 0.24, 0.26]).double().train()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad(), capture_batch_stats() as stats:
        out = net(x)
        for method in METHODS:
            bound = margin_lower_bound(net, x[:2], y[:2], 0.0, "linf", method, bn_stats=stats)
            torch.testing.assert_close(bound, (out.gather(1, y[:, None]) - out)[:2], rtol=0, atol=1e-9, msg=method)
    flat = torch.cat([x[:1], torch.full_like(x[:1], 0.5)])  # a flat image: ties in every max-pool window
    with torch.no_grad(), capture_batch_stats() as stats:
        net(flat)
        for method in METHODS:  # logit bounds come from two passes, which rounding alone could cross
            lower, upper = logit_bounds(net, flat, 0.0, "linf", method, bn_stats=stats)
            assert (lower <= upper).all(), method


@pytest.mark.parametrize("norm", NORMS)
def test_crown_symbolic_is_exact_where_every_neuron_is_decided(norm):
    """At an eps small enough that no ReLU or max-pool window is undecided the network is affine on the
    ball, so the exact minimum of each margin is its first-order value ``m(x) - eps ||grad m||_q``:
    crown-symbolic must reach it, where CROWN-IBP on the same 3-cell super-network is vacuous."""
    net = _deep_search_network()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 3])
    model = BoundModel(net)
    eps = 1e-7
    prop = model.propagation(x, eps, norm, "crown-symbolic", clip=None)
    bound = prop.lower_bound(margin_spec(y, 5, x.dtype))
    x_ = x.clone().requires_grad_()
    margins = margin_spec(y, 5, x.dtype) @ prop.graph.forward(x_).unsqueeze(-1)  # statistics fixed by the pass above
    margins = margins.squeeze(-1)
    q = {"linf": 1, "l2": 2, "l1": float("inf")}[norm]
    for t in range(5):
        grad, = torch.autograd.grad(margins[:, t].sum(), x_, retain_graph=True)
        exact = margins[:, t].detach() - eps * torch.linalg.vector_norm(grad.flatten(1), ord=q, dim=1)
        torch.testing.assert_close(bound[:, t], exact, rtol=0, atol=1e-12)
    loose = model.margin_lower_bound(x, y, eps, norm, "crown-ibp", clip=None)[:, 4]  # t = 4, the last exact
    assert (exact - loose > 1.0).all(), exact - loose  # the truth loses about 1e-6 here


def test_error_symbols_are_numbered_globally_within_the_budget():
    errors = ErrorSymbols(count=3, budget=3)
    coef = torch.ones(1, 2, 4)  # depends on the first 2 of the 3 symbols so far
    out, left = errors.add(coef, torch.tensor([[0.0, 0.5, 0.0, 2.0]]))
    assert out.shape == (1, 5, 4) and left is None and (errors.count, errors.left) == (5, 1)
    assert (out[0, :2] == 1).all() and (out[0, 2] == 0).all()  # symbol 2 was created elsewhere
    assert out[0, 3].tolist() == [0, 0, 0, 2.0] and out[0, 4].tolist() == [0, 0.5, 0, 0]  # the widest first
    out, left = errors.add(out, torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
    assert out.shape == (1, 6, 4) and out[0, 5].tolist() == [0, 0, 3.0, 0] and errors.left == 0
    assert left.tolist() == [[1.0, 0, 0, 0]]  # past the budget: an independent interval
    assert errors.unassigned == 1


def test_crown_symbolic_warns_when_its_error_symbols_run_out():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)).double()
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    lower, upper = BoundModel(net).propagation(x, 0.5, "linf", "ibp", keep_all_bounds=True).bounds[1]
    assert ((lower < 0) & (upper > 0)).flatten(1).sum(1).min() > 4  # the 4-symbol budget below runs out
    with pytest.warns(UserWarning, match="ran out of its 4 error symbols"):
        BoundModel(net, max_error_symbols=4).propagation(x, 0.5, "linf", "crown-symbolic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BoundModel(net, max_error_symbols=72).propagation(x, 0.5, "linf", "crown-symbolic")  # one per neuron


def test_crown_symbolic_gradient_in_alpha_where_every_neuron_is_decided():
    """The intermediate bounds are constants of the gradient; where they decide every neuron the bound
    is locally affine in the relaxations' choices, so the gradient in alpha is the true one."""
    net = _deep_search_network()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2])
    direction = [torch.randn_like(p) for p in net.arch_parameters()]

    def value():
        return margin_lower_bound(net, x, y, 1e-7, "l2", "crown-symbolic").sum()

    net.zero_grad()
    value().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(net.arch_parameters(), direction))
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(net.arch_parameters(), direction):
            p.add_(h * d)
        plus = value()
        for p, d in zip(net.arch_parameters(), direction):
            p.sub_(2 * h * d)
        minus = value()
    torch.testing.assert_close(analytic, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-9)


def test_relu_relaxation_is_exact_when_stable_and_sound_otherwise():
    lower = torch.tensor([0.5, -2.0, -1.0, -1.0, -3.0])
    upper = torch.tensor([1.0, -0.5, 3.0, 0.5, 3.0])
    for mode in ("adaptive", "fast-lin"):
        ls, us, ui = relu_relaxation_reference(lower, upper, mode)
        z = lower + (upper - lower) * torch.linspace(0, 1, 101)[:, None]
        assert (ls * z <= torch.relu(z) + 1e-7).all() and (torch.relu(z) <= us * z + ui + 1e-7).all()
        assert ls[0] == us[0] == 1 and ui[0] == 0 and ls[1] == us[1] == ui[1] == 0
    ls, _, _ = relu_relaxation_reference(lower, upper, "adaptive")
    assert ls.tolist()[2:] == [1.0, 0.0, 0.0]  # u > -l picks slope 1; a tie (u = -l) picks 0


def test_crown_relu_backward_picks_lines_by_sign():
    A = torch.tensor([[[2.0, -3.0]]])
    A_out, bias = crown_relu_backward_reference(A, torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]]), torch.tensor([[1.0, 2.0]]))
    assert A_out.tolist() == [[[1.0, -2.25]]] and bias.tolist() == [[-6.0]]


def test_margin_column_of_label_is_zero_and_clean_margin_at_eps_zero():
    net = _sequential()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():
        margins = margin_lower_bound(net, x, y, 0.0, "linf", "crown")
        out = net(x)
    assert (margins.gather(1, y[:, None]) == 0).all()
    torch.testing.assert_close(margins, out.gather(1, y[:, None]) - out)


def _pooled_sequential():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                        nn.Flatten(), nn.Linear(36, 3)).double().eval()
    net[1].running_mean.normal_(0, 0.2)
    net[1].running_var.uniform_(0.5, 2)
    return net


def test_crown_bounds_of_an_image_do_not_depend_on_the_rest_of_the_batch():
    """Full CROWN tightens, per example, the neurons its relaxations read. It used to tighten as many
    per example as the batch's most and write all of them back, so an image's bounds (and a certified
    radius) changed with its neighbours and with ``certified_radius``'s candidates."""
    net = _pooled_sequential()
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    # Each image with others beside it, and beside itself at larger eps (more neurons to tighten).
    for images, labels, eps in ((x, y, [0.2, 0.25, 0.375]), (x[:1].repeat(3, 1, 1, 1), y[:1].repeat(3), [0.05, 0.25, 0.375])):
        eps = torch.tensor(eps, dtype=torch.float64)
        together = margin_lower_bound(net, images, labels, eps, "l1", "crown")
        # every node's interval too: the final margins rarely feel a neighbour's extra tightening
        together_nodes = BoundModel(net).propagation(images, eps, "l1", "crown", keep_all_bounds=True).bounds
        for i in range(3):
            alone = margin_lower_bound(net, images[i:i + 1], labels[i:i + 1], float(eps[i]), "l1", "crown")
            torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-12)
            alone_nodes = BoundModel(net).propagation(images[i:i + 1], float(eps[i]), "l1", "crown",
                                                      keep_all_bounds=True).bounds
            for node, (lower, upper) in enumerate(alone_nodes):
                torch.testing.assert_close((together_nodes[node][0][i:i + 1], together_nodes[node][1][i:i + 1]),
                                           (lower, upper), rtol=0, atol=1e-12, msg=lambda m: f"node {node}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_released_intervals_change_no_bound_and_hold_no_memory(method):
    """A pass keeps only the intervals a later step reads (relaxation inputs, the output): the others
    become NaN stand-ins without storage. Every bound and gradient equals the keep-everything pass's,
    also with PC-DARTS, and an IBP pass keeps a handful of the super-network's 400-odd intervals."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=5, layers=3, in_channels=1, partial_channels=2).double().train()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    spec = margin_spec(torch.tensor([0, 3]), 5, x.dtype)
    with torch.no_grad(), capture_batch_stats() as stats:
        net(x)
    results = []
    for keep in (True, False):
        prop = BoundModel(net, stats).propagation(x, 0.01, "l2", method, keep_all_bounds=keep)
        bound = prop.lower_bound(spec)
        grads = torch.autograd.grad(bound.sum(), net.arch_parameters())
        results.append((bound, grads))
        stored = [i for i, (lower, _) in enumerate(prop.bounds) if lower.untyped_storage().nbytes() > lower.element_size()]
        released = [i for i, (lower, _) in enumerate(prop.bounds) if torch.isnan(lower).all()]
        assert len(stored) + len(released) == len(prop.bounds)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    feeds_relaxation = {i for node in prop.graph.nodes if isinstance(node.op, (nodes.ReLU, nodes.MaxPool2d))
                        for i in node.inputs}
    if method == "ibp":
        assert len(stored) <= 4, stored
    else:
        assert released and not feeds_relaxation & set(released)


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, hw", [(3, 2, 1, False, (7, 6)), (3, 1, 1, False, (5, 5)),
                                                                      (2, 2, 0, True, (5, 7)), (3, 3, 0, False, (8, 7))])
def test_max_pool_undecided_inputs_are_those_of_undecided_windows(kernel, stride, padding, ceil_mode, hw):
    pool = nodes.MaxPool2d(kernel, stride, padding, ceil_mode)
    lower = torch.randn(2, 3, *hw, dtype=torch.float64)
    upper = lower + torch.rand_like(lower) * torch.rand_like(lower).lt(0.3)  # many points: some windows decided
    _, gap = pool._windows(lower, upper)
    expected = torch.zeros_like(lower, dtype=torch.bool)
    for b, c, i, j in (gap > 0).nonzero().tolist():
        rows = range(max(i * stride - padding, 0), min(i * stride - padding + kernel, hw[0]))
        cols = range(max(j * stride - padding, 0), min(j * stride - padding + kernel, hw[1]))
        expected[b, c, rows.start:rows.stop, cols.start:cols.stop] = True
    assert (gap > 0).any() and (gap == 0).any()
    assert torch.equal(pool.undecided((lower, upper)), expected)


def test_max_pool_relaxation_picks_a_real_input_where_lower_bounds_overflowed():
    """float32 intervals of a deep network reach -inf; such a window's j* tied with the -inf padding,
    whose index lies outside the image (the bound pass crashed)."""
    pool = nodes.MaxPool2d(3, 2, 1, False)
    lower, upper = torch.full((1, 2, 5, 5), -math.inf), torch.zeros(1, 2, 5, 5)
    index, _ = pool._windows(lower, upper)
    assert ((index >= 0) & (index < 25)).all()
    (A_in,), _ = pool.backward(torch.randn(1, 4, 2, 3, 3), [(lower, upper)])
    assert A_in.shape == (1, 4, 2, 5, 5)


def test_lowering_takes_square_pools_given_as_pairs_and_keeps_non_square_depthwise_convs_generic():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, (3, 5), padding=(1, 2), groups=2, bias=False),
                        nn.ReLU(), nn.AvgPool2d(3, stride=(2, 2), padding=(1, 1), count_include_pad=False),
                        nn.Flatten(), nn.Linear(18, 3)).double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    points = sample_ball(x, 0.05, "linf", 2000)
    with torch.no_grad():
        outputs = net(points.flatten(0, 1)).reshape(-1, 2, 3)
    for method in METHODS:
        lower, upper = logit_bounds(net, x, 0.05, "linf", method)
        assert (outputs >= lower - 1e-9).all() and (outputs <= upper + 1e-9).all(), method
    with pytest.raises(TypeError, match="square kernel, stride and padding"):
        logit_bounds(nn.Sequential(nn.AvgPool2d(3, stride=(1, 2)), nn.Flatten()), x, 0.1)


def test_avg_pools_of_other_sizes_take_the_reference_transpose(monkeypatch):
    """The fast depthwise ops cover the DARTS kernel sizes (on CUDA only those): a 2x2 average pool's
    CROWN step must not reach them."""
    fast = nodes.depthwise_conv2d_transpose

    def darts_sizes_only(grad, weight, *args):
        assert weight.shape[-1] in (3, 5), f"a {weight.shape[-1]}x{weight.shape[-1]} kernel reached the fast op"
        return fast(grad, weight, *args)

    monkeypatch.setattr(nodes, "depthwise_conv2d_transpose", darts_sizes_only)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(18, 3)).double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    points = sample_ball(x, 0.05, "linf", 2000)
    with torch.no_grad():
        outputs = net(points.flatten(0, 1)).reshape(-1, 2, 3)
    for method in ("crown-ibp", "crown"):
        lower, upper = logit_bounds(net, x, 0.05, "linf", method)
        assert (outputs >= lower - 1e-9).all() and (outputs <= upper + 1e-9).all(), method


class _Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class _StandardisedConv(nn.Conv2d):  # timm's StdConv2d overrides the helper nn.Conv2d.forward calls
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, (weight - weight.mean()) / weight.std(), bias)


class _PlainSubclass(nn.ReLU):
    """A subclass that only documents itself computes ReLU."""


class _Doubling(nn.Module):
    def _call_impl(self, *args, **kwargs):
        return 2 * super()._call_impl(*args, **kwargs)


class _ReLUWithMixin(nn.ReLU, _Doubling):  # the mixin comes after nn.ReLU in the MRO: computes 2 relu(x)
    pass


def test_modules_that_may_compute_another_function_are_refused():
    """The graph lowers a class's function: a subclass adding behaviour, a forward set on an instance,
    or a hook changing an output would get the bounds of a different network (they came back silently
    wrong). Pruned and parametrised weights are read as they are."""
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)

    def head():
        return [nn.Flatten(), nn.Linear(2 * 36, 3)]

    patched = nn.Conv2d(1, 2, 3, padding=1)
    patched.forward = lambda inp: nn.functional.conv2d(inp, 2 * patched.weight, patched.bias, padding=1)
    helper_patched = nn.Conv2d(1, 2, 3, padding=1)  # the instance form of _StandardisedConv
    helper_patched._conv_forward = lambda inp, weight, bias: nn.functional.conv2d(inp, 2 * weight, bias, padding=1)
    recompiled = nn.ReLU()  # what Module.__call__ runs instead of _call_impl once set (by Module.compile)
    recompiled._compiled_call_impl = lambda inp: 2 * torch.relu(inp)
    for net, message in ((nn.Sequential(_Residual(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU()), nn.Conv2d(1, 2, 1), *head()),
                          "_Residual: _Residual defines forward over Sequential"),
                         (nn.Sequential(_StandardisedConv(1, 2, 3, padding=1), *head()), "defines _conv_forward over Conv2d"),
                         (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), _ReLUWithMixin(), *head()),
                          "_ReLUWithMixin: _Doubling defines _call_impl over ReLU"),
                         (nn.Sequential(patched, *head()), "methods set on the instance: Conv2d 0 sets forward"),
                         (nn.Sequential(helper_patched, *head()), "methods set on the instance: Conv2d 0 sets _conv_forward"),
                         (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), recompiled, *head()),
                          "a replaced _compiled_call_impl: ReLU 1"),
                         (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), *head()[:1],
                                        torch.nn.utils.parametrizations.spectral_norm(head()[1])).train(),
                          r"spectral norm in training mode: ParametrizedLinear 2 \(weight\); call .eval\(\)")):
        with pytest.raises(TypeError, match=message):
            logit_bounds(net.double(), x, 0.01)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), _PlainSubclass(), *head()).double()
    logit_bounds(plain, x, 0.01)
    handle = plain[0].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(TypeError, match="forward hooks .*: Conv2d 0 has one"):
        logit_bounds(plain, x, 0.01)
    handle.remove()
    # pruning (a pre-hook that refreshes the weight) and parametrisation: the bounds hold the outputs
    torch.nn.utils.prune.l1_unstructured(plain[0], "weight", amount=0.5)
    torch.nn.utils.parametrizations.weight_norm(plain[3])
    with torch.no_grad():
        out = plain(x)
    lower, upper = logit_bounds(plain, x, 0.0)
    assert (lower <= out + 1e-12).all() and (out <= upper + 1e-12).all()
    torch.testing.assert_close(lower, out)
    # spectral norm in eval mode (a fixed weight) and a module compiled by Module.compile are bounded
    fixed = nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(1, 2, 3, padding=1)), nn.ReLU(),
                          *head()).double().eval()
    with torch.no_grad():
        out = fixed(x)
    fixed[1].compile()  # sets what __call__ runs (compiled lazily: the bounds never call it)
    torch.testing.assert_close(logit_bounds(fixed, x, 0.0)[0], out)


def test_linear_layer_on_feature_maps_gets_the_bias_once_per_position():
    """``nn.Linear`` acting on the last axis of a 4-D map: CROWN's bias term must contract over every
    position (it came back with the wrong shape, or at C = H = 1 silently mixed specifications)."""
    torch.manual_seed(0)
    for shape in ((1, 1, 1, 4), (2, 2, 3, 4)):
        net = nn.Sequential(nn.Conv2d(shape[1], shape[1], 1), nn.Linear(4, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(shape[1] * shape[2] * 3, 3)).double().eval()
        x, y = torch.rand(*shape, dtype=torch.float64), torch.zeros(shape[0], dtype=torch.long)
        with torch.no_grad():
            out = net(x)
        for method in ("ibp", "crown-ibp", "crown-symbolic", "crown"):
            torch.testing.assert_close(margin_lower_bound(net, x, y, 0.0, method=method), out[:, :1] - out)
        for norm, eps in (("linf", 0.05), ("l2", 0.2), ("l1", 0.5)):
            with torch.no_grad():
                outputs = net(sample_ball(x, eps, norm, 500).flatten(0, 1)).view(500, *out.shape)
            for method in ("ibp", "crown-ibp", "crown-symbolic", "crown"):
                lower, upper = logit_bounds(net, x, eps, norm, method)
                assert lower.shape == out.shape, (norm, method)
                assert (outputs >= lower - 1e-9).all() and (outputs <= upper + 1e-9).all(), (norm, method)


def test_one_bound_model_fixes_its_batch_statistics_once_for_every_method():
    """crown-symbolic bounds the edge-by-edge graph, the other methods the stacked one: both take the
    statistics of the first batch the object saw."""
    net = _deep_search_network()
    x, y = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    model = BoundModel(net)
    first = model.margin_lower_bound(x, y, 0.0, method="crown-ibp")
    later = model.margin_lower_bound(x[:2], y[:2], 0.0, method="crown-symbolic")
    torch.testing.assert_close(later, first[:2], rtol=0, atol=1e-9)


def test_unsupported_module_names_its_type():
    with pytest.raises(TypeError, match="Sigmoid"):
        logit_bounds(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Sigmoid()), torch.rand(1, 1, 2, 2), 0.1)


def test_bad_arguments():
    net = _sequential()
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        logit_bounds(net, x, 0.1, method="deeppoly")
    with pytest.raises(ValueError, match="norm"):
        logit_bounds(net, x, 0.1, norm="l3")
    for eps in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number"):
            logit_bounds(net, x, eps)


def test_search_network_with_imagenet_stem_is_bounded_soundly():
    """The stride-8 stem feeds the first cell two different states (s0 at stride 4, s1 at stride 8)."""
    from dsrna import SearchNetwork

    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, steps=2, multiplier=2, stem="imagenet").double().eval()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        points = sample_ball(x, 0.01, "linf", 300).flatten(0, 1)
        outputs = net(points).view(300, 2, 3)
        for method in ("ibp", "crown-ibp"):
            lower, upper = logit_bounds(net, x, 0.01, "linf", method)
            assert (outputs >= lower - 1e-9).all() and (outputs <= upper + 1e-9).all(), method


@pytest.mark.parametrize("mode", ["train", "captured", "eval", "mixed"])
def test_stacked_lowering_gives_the_per_edge_bounds(monkeypatch, mode):
    """The search network's conv candidates lower state by state into stacked nodes (as the batched
    cell runs them): IBP and CROWN-IBP give the bounds of the per-edge graph, with far fewer nodes.
    (Full CROWN takes minutes here; its neuron-wise relaxation choices can flip on rounding
    differences, so it is checked for soundness in test_bounds_soundness.py instead.)
    `mixed`: batch norms in different modes cannot stack, and that state lowers per edge."""
    import dsrna.bounds.graph as graph_module
    from dsrna import SearchNetwork
    from dsrna.bounds.graph import lower
    from dsrna.space import capture_batch_stats

    from dsrna import backend

    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1).double()
    net.backend = next(name for name in ("native", "triton") if backend.backend_status(name, "cpu")[0])
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_(0, 0.5)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    stats = None
    if mode == "captured":
        with torch.no_grad(), capture_batch_stats() as stats:
            net(x)
    elif mode == "eval":
        net(x)  # running statistics away from their initial values
        net.eval()
    elif mode == "mixed":
        net.cells[0].edges[0].ops[7].op[3].eval()  # one stage-1 batch norm of the first state
    with backend.use_backend("reference"):  # the reference lowers edge by edge, as its cell runs
        reference_size = len(lower(net, stats).nodes)
    results, sizes = [], []
    for stacked in (True, False):
        if not stacked:
            monkeypatch.setattr(graph_module.batched_cell, "cell_plan", lambda cell: None)
        with backend.use_backend(net.backend):  # as BoundModel lowers a model with its own backend
            sizes.append(len(lower(net, stats).nodes))
        with torch.no_grad():
            results += [torch.cat(logit_bounds(net, x, 0.02, "linf", method, bn_stats=stats), 1)
                        for method in ("ibp", "crown-ibp")]
    for a, b in zip(results[:2], results[2:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert sizes[0] < sizes[1] * (0.8 if mode == "mixed" else 0.6), sizes
    assert reference_size == sizes[1]


def test_crown_symbolic_bounds_a_search_network_edge_by_edge():
    """crown-symbolic holds n + E coefficients per neuron of a node, so on the fast backends it runs on
    the edge-by-edge graph (small nodes), the interval methods on the stacked one: the same bounds
    either way (checked against a stacked crown-symbolic pass)."""
    from dsrna import backend
    from dsrna.bounds import Propagation
    from dsrna.bounds.graph import lower
    from dsrna.bounds.perturbation import Ball

    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1).double()
    net.backend = next(name for name in ("native", "triton") if backend.backend_status(name, "cpu")[0])
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad(), capture_batch_stats() as stats:
        net(x)
    model = BoundModel(net, stats)
    symbolic = model.propagation(x, 1e-3, "linf", "crown-symbolic")
    edge_nodes = len(symbolic.graph.nodes)
    assert len(model.propagation(x, 1e-3, "linf", "crown-ibp").graph.nodes) < 0.6 * edge_nodes
    with backend.use_backend("reference"):
        assert len(lower(net, stats).nodes) == edge_nodes
    with backend.use_backend(net.backend):
        stacked = Propagation(model.graph, Ball(x, 1e-3, "linf", (0.0, 1.0)), "crown-symbolic")
        spec = margin_spec(torch.tensor([0, 2]), 3, x.dtype)
        torch.testing.assert_close(symbolic.lower_bound(spec), stacked.lower_bound(spec), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("train", [True, False])
def test_float64_graph_of_a_float32_model_is_its_float64_twin(train):
    """A float64 bound graph of a float32 super-network derives its batch-norm affines, input
    normalisation and mixing weights in float64: the function it certifies is the float64 twin's
    (in float32, 1/sqrt(var) alone moved this net's logits by about 1e-6)."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=5, layers=2, in_channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
    net.train(train)
    x = torch.rand(2, 3, 8, 8)
    if not train:  # running statistics away from their initial values
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.01, 2.0)
    with torch.no_grad(), capture_batch_stats() as stats:
        net(x)
    twin = copy.deepcopy(net).double()
    twins = dict(zip(net.modules(), twin.modules()))
    with torch.no_grad(), frozen_batch_stats({twins[bn]: tuple(v.double() for v in s) for bn, s in stats.items()}):
        expected = twin(x.double())
    graph = BoundModel(net, stats if train else None, dtype=torch.float64).graph
    with torch.no_grad():
        torch.testing.assert_close(graph.forward(x.double()), expected, rtol=0, atol=1e-12)


def test_logit_bounds_and_radius_take_the_margin_bounds_options():
    """The three entry points accept the same precision and crown-symbolic budget options."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).eval()
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    with pytest.warns(UserWarning, match="ran out of its 4 error symbols"):
        lower, upper = logit_bounds(net, x, 0.3, dtype=torch.float64, method="crown-symbolic", max_error_symbols=4)
    assert lower.dtype == upper.dtype == torch.float64 and (lower <= upper).all()
    exact = net.double()(x.double())
    assert (lower <= exact).all() and (exact <= upper).all()
    from dsrna.bounds import certified_radius
    with pytest.warns(UserWarning, match="ran out of its 4 error symbols"):
        radius = certified_radius(net, x.double(), y, method="crown-symbolic", max_eps=0.5, tol=1e-3, max_error_symbols=4)
    assert radius.shape == (2,) and (radius >= 0).all()


def test_crown_symbolic_equals_crown_on_one_hidden_layer():
    """With one hidden layer both methods bound its pre-activations exactly (W x + b -+ eps ||W_i||_q):
    the same relaxations, the same final pass, the same bounds, in every norm."""
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.rand(3, 6, dtype=torch.float64)
    for norm in ("linf", "l2", "l1"):
        symbolic = logit_bounds(net, x, 0.3, norm, "crown-symbolic", clip=None)
        crown = logit_bounds(net, x, 0.3, norm, "crown", clip=None)
        for a, b in zip(symbolic, crown):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_crown_symbolic_relu_is_the_tight_triangle():
    """relu(|x| - 0.5) over x in [-1, 1], with |x| = relu(x) + relu(-x): at most 0.5, which the
    symbolic pass reaches (its ReLU splits the undecided band in half around the chord)."""
    m = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU()).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        m[0].bias.zero_()
        m[2].weight.fill_(1.0)
        m[2].bias.fill_(-0.5)
    lower, upper = logit_bounds(m, torch.zeros(1, 1, dtype=torch.float64), 1.0, "linf", "crown-symbolic", clip=None)
    assert lower.item() == 0.0 and upper.item() == pytest.approx(0.5, abs=1e-12)
    # Without error symbols the undecided band is an interval of its own (the radius), carried
    # through the linear layers exactly: still the tight triangle here.
    with pytest.warns(UserWarning, match="ran out of its 0 error symbols"):
        lower, upper = logit_bounds(m, torch.zeros(1, 1, dtype=torch.float64), 1.0, "linf", "crown-symbolic",
                                    clip=None, max_error_symbols=0)
    assert lower.item() == 0.0 and upper.item() == pytest.approx(0.5, abs=1e-12)


def test_a_ball_clipped_to_the_box_is_bounded_at_least_as_tightly_as_the_box():
    from dsrna.bounds.perturbation import Ball

    x = torch.full((1, 8), 0.05, dtype=torch.float64)
    A, bias = torch.ones(1, 1, 8, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    box_only = Ball(x, 1.0, "linf", (0.0, 1.0)).concretize(A, bias)  # the whole box: min sum = 0
    for norm in ("l2", "l1"):
        bound = Ball(x, 5.0, norm, (0.0, 1.0)).concretize(A, bias)
        assert (bound >= box_only).all() and bound.item() == 0.0


def test_crown_symbolic_clips_the_ball_to_the_pixel_box():
    """The l_inf ball of radius 0.5 around 0, clipped to [0, 1], is the ball of radius 0.25 around 0.25:
    the same bound (an unclipped ball is only looser, which no soundness test sees)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 3)).double().eval()
    x, y = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    clipped = margin_lower_bound(net, x, y, 0.5, "linf", "crown-symbolic")
    torch.testing.assert_close(clipped, margin_lower_bound(net, x + 0.25, y, 0.25, "linf", "crown-symbolic"))


def test_a_budget_of_one_covers_the_whole_box():
    from dsrna.bounds.perturbation import warn_if_whole_box

    with pytest.warns(UserWarning, match="covers the whole"):
        warn_if_whole_box(1.0, "linf", "eps")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_whole_box(0.99, "linf", "eps")
        warn_if_whole_box(2.0, "l2", "eps")
