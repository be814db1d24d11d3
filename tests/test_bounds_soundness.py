"""Soundness in float64 on whole networks: the bounds hold at 10,000 points of the input set (and at
points of its boundary), at the end of a PGD attack on every margin and on every logit in both
directions, for every norm and method. Zero violations allowed."""

import pytest
import torch

from dense_bounds import extreme_points, pgd_logit_extremes, pgd_min_margin, sample_ball
from dsrna import Genotype, Network, SearchNetwork
from dsrna.bounds import METHODS, BoundModel, logit_bounds, margin_spec
from dsrna.space import capture_batch_stats, frozen_batch_stats

NORMS = ("linf", "l2", "l1")
SAMPLES = 5000  # per example, two examples
NODE_SAMPLES = 1000  # per example, for the intermediate bounds of every node
TOL = 1e-9

# Every candidate op, both strides (reduction cells hold the stride-2 edges).
ALL_OPS = Genotype(
    normal=[("max_pool_3x3", 0), ("avg_pool_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 2)], normal_concat=[2, 3],
    reduce=[("sep_conv_5x5", 0), ("dil_conv_3x3", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 0)], reduce_concat=[2, 3],
)
ALL_OPS_STRIDED_SKIP = Genotype(ALL_OPS.normal, [2, 3], [("skip_connect", 0), ("avg_pool_3x3", 1), ("sep_conv_3x3", 2),
                                                          ("dil_conv_3x3", 0)], [2, 3])


def _search(partial_channels):
    # Two cells, both reduction cells: stride-2 edges from the inputs, stride-1 edges between nodes.
    return SearchNetwork(C=4, num_classes=3, layers=2, in_channels=1, steps=2, multiplier=2,
                         partial_channels=partial_channels).double()


def _final(genotype):
    net = Network(genotype, C=4, num_classes=3, layers=3, in_channels=1).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net


VARIANTS = {m: BoundModel for m in METHODS}
VARIANTS["crown-symbolic (2 error symbols)"] = lambda net, bn_stats: BoundModel(net, bn_stats, max_error_symbols=2)

MODELS = {
    "search-train": lambda: _search(1),
    "pc-darts-train": lambda: _search(2),
    "final-eval": lambda: _final(ALL_OPS),
    "final-strided-skip": lambda: _final(ALL_OPS_STRIDED_SKIP),
}


def _assert_every_node_holds(prop, points, what):
    """Every node's interval (the intermediate bounds each method computes) holds at every sampled point."""
    values = points.flatten(0, 1)
    outputs = [values]
    for index, node in enumerate(prop.graph.nodes[1:], start=1):
        outputs.append(node.op.forward(*(outputs[i] for i in node.inputs)))
        lower, upper = prop.bounds[index]
        value = outputs[index].view(points.shape[0], *lower.shape)
        assert (value >= lower - TOL).all() and (value <= upper + TOL).all(), (*what, index, node.op)


@pytest.mark.parametrize("kind", list(MODELS))
def test_bounds_hold_at_samples_and_pgd(kind):
    net = MODELS[kind]()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2])
    with capture_batch_stats() as bn_stats:
        net(x)
    eps = {"linf": 0.002, "l2": 0.01, "l1": 0.05}

    def model(z):  # the function the engine bounds: batch norm fixed to the clean batch's statistics
        with frozen_batch_stats(bn_stats):
            return net(z)

    for norm in NORMS:
        # Uniform samples stay far from the bounds in many dimensions: also the set's boundary, and
        # each logit pushed down and up by PGD.
        attacked = pgd_logit_extremes(model, x, 3, eps[norm], norm)
        with torch.no_grad():
            points = torch.cat([sample_ball(x, eps[norm], norm, SAMPLES), extreme_points(x, eps[norm], norm, 500)])
            outputs = torch.cat([model(points.flatten(0, 1)).view(len(points), 2, 3), attacked])
            bounds, margins = {}, {}
            eye = torch.eye(3, dtype=x.dtype).expand(2, 3, 3)
            # One propagation per method serves the logit and the margin specifications; crown-symbolic
            # also with a budget of 2 error symbols, so that most undecided neurons take the interval path.
            for m, bound_model in VARIANTS.items():
                prop = bound_model(net, bn_stats).propagation(x, eps[norm], norm, m.split(" ")[0], keep_all_bounds=True)
                bounds[m] = prop.lower_bound(eye), -prop.lower_bound(-eye)
                margins[m] = prop.lower_bound(margin_spec(y, 3, x.dtype))
                _assert_every_node_holds(prop, points[:NODE_SAMPLES], (norm, m))
        for method in VARIANTS:
            lower, upper = bounds[method]
            assert (outputs >= lower - TOL).all() and (outputs <= upper + TOL).all(), (norm, method)
            sampled_margins = outputs.gather(2, y.view(1, 2, 1).expand(len(outputs), 2, 1)) - outputs
            assert (sampled_margins >= margins[method] - TOL).all(), (norm, method)
        for t in range(3):
            target = torch.full_like(y, t)
            attacked = pgd_min_margin(model, x, y, target, eps[norm], norm)
            for method in VARIANTS:
                assert (attacked >= margins[method][:, t] - TOL).all(), (norm, method, t)
        # CROWN is at least as tight as IBP (same intervals underneath, linear bounds on top).
        width = {m: bounds[m][1] - bounds[m][0] for m in METHODS}
        assert (width["crown"] <= width["ibp"] + TOL).all()
        assert (width["crown"] <= width["crown-ibp"] + TOL).all()


def test_train_mode_without_store_equals_captured_store():
    """bn_stats=None: the engine's own clean pass gives the statistics capture_batch_stats records."""
    net = _search(1)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    with capture_batch_stats() as bn_stats:
        net(x)
    with torch.no_grad():
        given = logit_bounds(net, x, 0.001, "linf", "crown-ibp", bn_stats=bn_stats)
        own = logit_bounds(net, x, 0.001, "linf", "crown-ibp")
    torch.testing.assert_close(own, given)
