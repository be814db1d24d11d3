"""The DARTS search space: op list and order, edge counts, shapes, parameters and alpha bookkeeping."""

import re

import pytest
import torch

from dsrna import DARTS_V1, DARTS_V2, PRIMITIVES, Network, SearchNetwork
from dsrna.space import count_parameters
from dsrna.space.ops import DilConv, FactorizedReduce, Identity, PoolBN, SepConv, Zero, make_op
from dsrna.space.search_network import MixedOp


def test_primitives_in_method_order():
    assert PRIMITIVES == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                          "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_candidates_follow_primitives(stride):
    op = MixedOp(4, stride)
    kinds = [type(m) for m in op.ops]
    skip = Identity if stride == 1 else FactorizedReduce
    assert kinds == [Zero, PoolBN, PoolBN, skip, SepConv, SepConv, DilConv, DilConv]
    assert [op.ops[1].kind, op.ops[2].kind] == ["max", "avg"]
    assert not op.ops[2].pool.count_include_pad
    # super-network BNs carry no affine parameters, pools are followed by one
    assert all(not m.affine for m in op.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert op.ops[1].bn is not None and op.ops[2].bn is not None
    # kernel sizes and dilations of the conv candidates
    assert op.ops[4].op[1].kernel_size == (3, 3) and op.ops[5].op[1].kernel_size == (5, 5)
    assert op.ops[6].op[1].dilation == (2, 2) and op.ops[7].op[1].kernel_size == (5, 5)
    assert op.ops[4].op[1].stride == (stride, stride) and op.ops[4].op[5].stride == (1, 1)


def test_edge_counts_and_alpha_shapes():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1)
    for cell in net.cells:
        assert len(cell.edges) == 14
        assert [(n, e, j) for n, e, j in cell.edge_index()][:5] == [(2, 0, 0), (2, 1, 1), (3, 2, 0), (3, 3, 1), (3, 4, 2)]
        assert sum(1 for _ in cell.edge_index()) == 14
    assert [c.reduction for c in net.cells] == [False, True, True]
    assert [tuple(a.shape) for a in net.arch_parameters()] == [(14, 8), (14, 8)]
    pc = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=2)
    assert [tuple(a.shape) for a in pc.arch_parameters()] == [(14, 8), (14, 8), (14,), (14,)]


def test_reduction_positions():
    net = SearchNetwork(C=4, num_classes=3, layers=8, in_channels=1)
    assert [i for i, c in enumerate(net.cells) if c.reduction] == [2, 5]


@pytest.mark.parametrize("size", [8, 9, 15])
@pytest.mark.parametrize("partial_channels", [1, 2])
def test_search_network_shapes_odd_sizes(size, partial_channels):
    net = SearchNetwork(C=4, num_classes=5, layers=3, in_channels=3, partial_channels=partial_channels)
    out = net(torch.rand(2, 3, size, size))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in net.arch_parameters())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_every_candidate_keeps_the_edge_shape(stride, size):
    x = torch.randn(2, 4, size, size)
    expected = (2, 4, -(-size // stride), -(-size // stride))
    for name in PRIMITIVES:
        assert make_op(name, 4, stride, affine=False, pool_bn=True)(x).shape == expected, name


def test_depthwise_conv_takes_one_value_per_setting():
    """Its kernels take one stride, padding and dilation for both axes: a per-axis value would run as
    the first axis' (and the bound graph would lower the per-axis conv: another function)."""
    from dsrna.space.ops import DepthwiseConv2d

    assert DepthwiseConv2d(2, 3, stride=(2, 2), padding=1).stride == (2, 2)
    for geometry, message in ((dict(kernel_size=(3, 5), stride=1, padding=1), "kernel_size=(3, 5)"),
                              (dict(kernel_size=3, stride=1, padding=(1, 2), dilation=(1, 2)),
                               "padding=(1, 2), dilation=(1, 2)")):
        with pytest.raises(ValueError, match=re.escape(f"same value for both axes, got {message}")):
            DepthwiseConv2d(2, **geometry)


def test_imagenet_stem_reduces_by_eight():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=3, stem="imagenet", partial_channels=2)
    s0 = net.stem(torch.rand(1, 3, 64, 64))
    assert s0.shape[-1] == 16 and net.stem1(s0).shape[-1] == 8
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    assert net.new().stem_kind == "imagenet"
    with pytest.raises(ValueError, match="stem"):
        SearchNetwork(C=4, stem="mobile")


def test_arch_parameters_are_in_state_dict_and_separate_from_weights():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=2)
    state = net.state_dict()
    for name in ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"):
        assert name in state
    arch = {id(p) for p in net.arch_parameters()}
    weights = net.weight_parameters()
    assert not arch & {id(p) for p in weights}
    assert len(weights) + len(arch) == len(list(net.parameters()))
    # a state dict round trip restores the architecture exactly
    other = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=2)
    other.load_state_dict(state)
    assert torch.equal(other.alphas_reduce, net.alphas_reduce)


def test_new_copies_architecture_not_weights():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1)
    with torch.no_grad():
        net.alphas_normal.add_(1.0)
    twin = net.new()
    assert torch.equal(twin.alphas_normal, net.alphas_normal)
    assert twin.alphas_normal.data_ptr() != net.alphas_normal.data_ptr()
    assert not torch.equal(twin.classifier.weight, net.classifier.weight)


def test_mixed_op_weights_are_softmax_of_alpha():
    # With all alpha mass on one op, the edge equals that op alone.
    op = MixedOp(4, 1)
    x = torch.randn(2, 4, 6, 6)
    for k, name in enumerate(PRIMITIVES):
        w = torch.zeros(8)
        w[k] = 1.0
        expected = op.ops[k](x)
        torch.testing.assert_close(op(x, w), expected, msg=name)


def test_partial_channel_edge_normalisation_sums_to_one_per_node():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=2)
    _, beta = net.edge_weights(False)
    sums, start = [], 0
    for i in range(4):
        sums.append(beta[start:start + 2 + i].sum())
        start += 2 + i
    torch.testing.assert_close(torch.stack(sums), torch.ones(4))


def test_darts_v2_parameter_count_matches_published_size():
    # DARTS reports 3.3M parameters for its CIFAR-10 model (C=36, 20 cells, auxiliary head left out).
    net = Network(DARTS_V2, C=36, num_classes=10, layers=20, in_channels=3, auxiliary=True)
    assert count_parameters(net) == 3_349_342
    assert count_parameters(Network(DARTS_V1, C=36, num_classes=10, layers=20)) == pytest.approx(3.3e6, rel=0.05)


def test_auxiliary_head_pools_as_darts():
    """Two overlapping 5x5 windows per side: DARTS' stride 3 on its 8x8 CIFAR map, stride 2 on 7x7."""
    from dsrna.space.network import AuxiliaryHead

    pool = AuxiliaryHead(1, 10).features[1]
    grid = torch.arange(64.0).view(1, 1, 8, 8)
    assert pool(grid).flatten().tolist() == [18.0, 21.0, 42.0, 45.0]
    torch.testing.assert_close(pool(grid[..., :7, :7]), torch.nn.functional.avg_pool2d(grid[..., :7, :7], 5, 2))
    assert pool(torch.rand(2, 3, 4, 5)).shape == (2, 3, 2, 2)  # a small map: 2x2 average
    # DARTS' ImageNet head has no batch norm after its 768-channel conv (the CIFAR head has one):
    # the mobile setting with its head holds exactly DARTS' 5,979,528 parameters.
    mobile = Network(DARTS_V2, C=48, num_classes=1000, layers=14, in_channels=3, auxiliary=True, stem="imagenet")
    assert sum(p.numel() for p in mobile.parameters()) == 5_979_528


@pytest.mark.parametrize("stem,size", [("cifar", 9), ("imagenet", 32)])
def test_final_network_shapes_and_auxiliary(stem, size):
    net = Network(DARTS_V2, C=8, num_classes=4, layers=5, in_channels=3, auxiliary=True, drop_path_prob=0.2, stem=stem)
    logits, aux = net(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 4) and aux.shape == (2, 4)
    net.eval()
    assert net(torch.rand(2, 3, size, size)).shape == (2, 4)
    assert all(m.affine for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_drop_path_drops_op_outputs_in_training_only_and_never_a_skip():
    from dsrna.space.genotype import Genotype
    from dsrna.space.network import Cell

    def cell(op):
        edges = [(op, 0), (op, 1)] * 4
        return Cell(Genotype(edges, [2, 3, 4, 5], edges, [2, 3, 4, 5]), 4, 4, 4, False, False).train()

    s0, s1 = torch.rand(2, 4, 6, 6), torch.rand(2, 4, 6, 6)

    def run(c, drop, seed):
        torch.manual_seed(seed)
        return c(s0, s1, drop)

    skips, convs = cell("skip_connect"), cell("sep_conv_3x3")
    assert torch.equal(run(skips, 0.9, 0), run(skips, 0.0, 0))  # identities are never dropped
    assert not torch.equal(run(convs, 0.5, 0), run(convs, 0.5, 1))  # random masks per sample
    assert torch.equal(run(convs, 0.0, 0), run(convs, 0.0, 1))
    convs.eval()
    assert torch.equal(run(convs, 0.5, 0), run(convs, 0.5, 1))  # evaluation never drops


def test_search_network_genotype_concatenates_the_last_multiplier_states():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, steps=4, multiplier=3)
    genotype = net.genotype()
    assert list(genotype.normal_concat) == [3, 4, 5] and list(genotype.reduce_concat) == [3, 4, 5]
