"""The DARTS search space: op list and order, edge counts, shapes, parameters and alpha bookkeeping."""

import re

import pytest
import torch
import torch.nn.utils.prune as prune
from conftest import OpsRun

from dsrna import DARTS_V1, DARTS_V2, PRIMITIVES, Network, SearchNetwork
from dsrna.backend import use_backend
from dsrna.space import capture_batch_stats, count_parameters, frozen_batch_stats
from dsrna.space.genotype import Genotype
from dsrna.space.network import AuxiliaryHead, Cell
from dsrna.space.ops import (BatchNorm2d, DepthwiseConv2d, DilConv, FactorizedReduce, Identity, PoolBN, ReLUConvBN,
                             SepConv, Zero, drop_path, make_op)
from dsrna.space.search_network import MixedOp, cell_nodes_reference


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


def test_partial_channel_edge_shuffles_the_mixed_and_the_bypass_channels():
    """PC-DARTS: the first C/K channels go through the candidates, the other ones bypass them (max-pooled
    2x2 in a reduction cell), and channel_shuffle(groups=K) interleaves the two: with all the weight on
    the stride-1 skip the edge is a fixed permutation of its input; with no weight at all only the
    pooled bypass is left, in every other channel."""
    skip = torch.zeros(8)
    skip[PRIMITIVES.index("skip_connect")] = 1.0
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(MixedOp(6, 1, partial_channels=2)(x, skip), x[:, [0, 3, 1, 4, 2, 5]])
    x = torch.randn(2, 8, 5, 5)
    out = MixedOp(8, 2, partial_channels=2)(x, torch.zeros(8))
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out[:, 1::2], torch.nn.functional.max_pool2d(x[:, 4:], 2, 2, ceil_mode=True))
    assert not out[:, 0::2].any()


def test_drop_path_zeroes_whole_examples_and_rescales_the_kept_ones():
    """DARTS' drop path keeps each example with probability 1 - p and divides it by 1 - p (the
    expectation is unchanged); an example is kept or dropped as a whole."""
    out = drop_path(torch.ones(4000, 2, 3, 3), 0.25).flatten(1)
    assert torch.equal(out, out[:, :1].expand_as(out))
    kept = out[:, 0] != 0
    torch.testing.assert_close(out[kept, 0], torch.full((int(kept.sum()),), 1 / 0.75))
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("kind", ["search", "final"])
def test_inputs_are_normalised_inside_the_model(kind):
    """Models take inputs in [0, 1] and normalise them with their own mean and std (so budgets are
    in pixel units): the same weights without normalisation, fed (x - mean) / std, give the same logits."""
    mean, std = [0.2, 0.6], [0.5, 0.25]

    def build(**kw):
        torch.manual_seed(0)
        if kind == "search":
            return SearchNetwork(C=4, num_classes=3, layers=3, in_channels=2, **kw).eval()
        return Network(DARTS_V2, C=4, num_classes=3, layers=3, in_channels=2, **kw).eval()

    x = torch.rand(2, 2, 8, 8)
    expected = build()((x - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1))
    torch.testing.assert_close(build(mean=mean, std=std)(x), expected)


def test_new_keeps_the_input_normalisation():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=2, mean=[0.2, 0.6], std=[0.5, 0.25])
    twin = net.new()
    assert torch.equal(twin.normalize.mean, net.normalize.mean) and torch.equal(twin.normalize.std, net.normalize.std)


def test_frozen_statistics_replay_the_clean_pass():
    """Replaying the statistics captured on the same batch gives the clean outputs and the clean
    gradients of the batch norm's affine parameters and of the weights before it: the statistics are
    biased variances with eps, and stay in the autograd graph of the weights (METHOD.md §2)."""
    conv, bn = torch.nn.Conv2d(2, 3, 3).double(), BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    with capture_batch_stats() as store:
        clean = bn(conv(x))
    with frozen_batch_stats(store):
        replayed = bn(conv(x))
    torch.testing.assert_close(replayed, clean, rtol=1e-12, atol=1e-12)
    r = torch.randn_like(clean)
    params = [conv.weight, bn.weight, bn.bias]
    expected = torch.autograd.grad((clean * r).sum(), params, retain_graph=True)
    for got, want in zip(torch.autograd.grad((replayed * r).sum(), params), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_eval_mode_batch_norm_ignores_captured_and_frozen_statistics():
    """In eval mode a batch norm uses its running statistics: it records nothing under capture and
    needs nothing under replay."""
    bn = BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = bn(x)
    with capture_batch_stats() as store:
        assert torch.equal(bn(x), expected)
    assert not store
    with frozen_batch_stats({}):
        assert torch.equal(bn(x), expected)


def test_train_mode_batch_norm_updates_running_statistics_as_torch_does():
    """The fast train-mode path keeps nn.BatchNorm2d's bookkeeping: its momentum, its counter."""
    ours, theirs = BatchNorm2d(3, momentum=0.3), torch.nn.BatchNorm2d(3, momentum=0.3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)


def test_statistics_contexts_restore_the_outer_mode():
    """A capture nested in a replay hands the replay back on exit (not plain batch statistics)."""
    bn = BatchNorm2d(2).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with capture_batch_stats() as outer:
        bn(x)
    with frozen_batch_stats(outer):
        expected = bn(2 * x + 1)
        with capture_batch_stats():
            bn(x)
        torch.testing.assert_close(bn(2 * x + 1), expected)


def test_pointwise_relu_conv_bn_is_its_sequence():
    """The cells' 1x1 preprocessing runs through the backend's pointwise conv: the same function as
    its ReLU -> conv -> BN sequence, strided or not."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for stride in (1, 2):
        m = ReLUConvBN(4, 6, 1, stride, 0, affine=False).double().eval()
        assert m.pointwise
        torch.testing.assert_close(m(x), m.op(x))


def test_factorized_reduce_halves_read_even_and_odd_pixels():
    """DARTS' FactorizedReduce: conv_1 reads the pixels (0, 0), (0, 2)...; conv_2 those shifted by one
    row and one column, zero past the edge for odd sizes."""
    fr = FactorizedReduce(1, 2, affine=False).double().eval()
    with torch.no_grad():
        fr.conv_1.weight.fill_(1.0)
        fr.conv_2.weight.fill_(1.0)
    x = torch.arange(25.0, dtype=torch.float64).view(1, 1, 5, 5)
    out = fr(x) * (1 + fr.bn.eps) ** 0.5  # eval BN with fresh running statistics: x / sqrt(1 + eps)
    torch.testing.assert_close(out[0, 0], x[0, 0, ::2, ::2])
    torch.testing.assert_close(out[0, 1], torch.nn.functional.pad(x, (0, 1, 0, 1))[0, 0, 1::2, 1::2])
    with pytest.raises(ValueError, match="even output channel count"):
        FactorizedReduce(4, 5)


def test_auxiliary_pool_of_a_five_pixel_map_is_two_by_two():
    """Under 6 pixels the two 5x5 windows would not fit apart: the map is average-pooled to 2x2."""
    pool = AuxiliaryHead(1, 10).features[1]
    x = torch.rand(1, 2, 5, 5)
    torch.testing.assert_close(pool(x), torch.nn.functional.adaptive_avg_pool2d(x, 2))


def test_search_network_refuses_configurations_it_cannot_build():
    """Named errors, not a shape error deep inside a cell: more outputs per cell than nodes, a partial
    channel count below 1 or one that does not divide the channels."""
    with pytest.raises(ValueError, match="1 <= multiplier <= steps"):
        SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, steps=2, multiplier=3)
    with pytest.raises(ValueError, match="partial_channels must be >= 1"):
        SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=0)
    with pytest.raises(ValueError, match="partial_channels=3 must divide the channel count 4"):
        MixedOp(4, 1, partial_channels=3)


def test_a_candidate_replaced_by_zero_drops_out_of_its_edge_and_node():
    """Mixed ops skip `none`-like candidates: with one replaced by Zero (kept candidates no longer
    contiguous, and no longer the same on every edge of a node) the edge and the node are still the
    softmax-weighted sums of their candidates, each edge with its own row of weights."""
    op = MixedOp(4, 1).double()
    op.ops[4] = Zero(1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0)
    torch.testing.assert_close(op(x, w), sum(w[k] * op.ops[k](x) for k in range(8)))

    cell = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, backend="reference").double().cells[0]
    cell.edges[3].ops[4] = Zero(1)  # node 3, from state 1
    states = [torch.randn(2, 4, 6, 6, dtype=torch.float64) for _ in range(2)]
    weights = torch.softmax(torch.randn(14, 8, dtype=torch.float64), -1)
    expected, start = list(states), 0
    for i in range(4):
        expected.append(sum(cell.edges[start + j](expected[j], weights[start + j]) for j in range(2 + i)))
        start += 2 + i
    for got, want in zip(cell_nodes_reference(cell, list(states), weights, None), expected):
        torch.testing.assert_close(got, want)


def test_edge_weights_are_row_softmaxes_in_the_requested_dtype():
    """softmax(alpha) over each edge's candidates and softmax(beta) over each node's edges, in the
    dtype asked for (the bound engine asks float64 of a float32 model)."""
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=2)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_(0, 1)
    weights, beta = net.edge_weights(True, dtype=torch.float64)
    assert weights.dtype == beta.dtype == torch.float64
    torch.testing.assert_close(weights, torch.softmax(net.alphas_reduce.double(), -1))
    torch.testing.assert_close(beta[2:5], torch.softmax(net.betas_reduce[2:5].double(), 0))
    weights, _ = net.edge_weights(False)
    torch.testing.assert_close(weights, torch.softmax(net.alphas_normal, -1))


def test_architecture_starts_near_uniform():
    """DARTS initialises alpha (and PC-DARTS beta) as 1e-3 * N(0, 1): every candidate and edge
    starts with about the same weight, the ties broken at random."""
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=2)
    for p in net.arch_parameters():
        assert 0 < p.abs().max() < 1e-2 and p.std() > 1e-4


def test_auxiliary_pool_covers_a_non_square_map_per_side():
    """Two overlapping 5x5 windows per side, each side its own stride: an 8x7 map takes stride 3 down
    and 2 across, so the last window ends on the map's last row and column."""
    pool = AuxiliaryHead(1, 10).features[1]
    x = torch.rand(1, 2, 8, 7)
    torch.testing.assert_close(pool(x), torch.nn.functional.avg_pool2d(x, 5, stride=(3, 2)))


def test_cell_outputs_the_states_its_genotype_concatenates():
    """A cell concatenates the states named by its *_concat, in that order, not just the last ones."""
    # skips only: node 2 = 2 p0, node 3 = 2 p1, node 4 = 4 p0, node 5 = 4 p1 (p: the preprocessed inputs)
    edges = [("skip_connect", 0)] * 2 + [("skip_connect", 1)] * 2 + [("skip_connect", 2)] * 2 + [("skip_connect", 3)] * 2
    # a reduction cell: node 2 = FR(p0) + FR'(p1) (strided skips), then 3 = 2 n2, 4 = 4 n2, 5 = 8 n2
    reduce = [("skip_connect", 0), ("skip_connect", 1)] + [("skip_connect", i) for i in (2, 2, 3, 3, 4, 4)]
    genotype = Genotype(edges, [2, 5], reduce, [3, 4, 5])
    cell = Cell(genotype, 4, 4, 4, False, False).eval()
    s0, s1 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    expected = torch.cat([2 * cell.preprocess0(s0), 4 * cell.preprocess1(s1)], dim=1)
    torch.testing.assert_close(cell(s0, s1), expected)
    cell = Cell(genotype, 4, 4, 4, True, False).eval()
    n2 = cell.ops[0](cell.preprocess0(s0)) + cell.ops[1](cell.preprocess1(s1))
    torch.testing.assert_close(cell(s0, s1), torch.cat([2 * n2, 4 * n2, 8 * n2], dim=1))


def test_final_network_applies_its_drop_path_rate():
    """Network.drop_path_prob (ramped by the training loop) reaches every cell in training mode."""
    net = Network(DARTS_V2, C=4, num_classes=3, layers=3, in_channels=1, drop_path_prob=0.5).train()
    x = torch.rand(2, 1, 8, 8)

    def run(seed):
        torch.manual_seed(seed)
        return net(x)

    assert not torch.equal(run(0), run(1))
    net.drop_path_prob = 0.0
    assert torch.equal(run(0), run(1))


def test_imagenet_stems_put_a_relu_before_their_last_stride_two_conv():
    """DARTS' mobile stem: s1 = BN(conv(ReLU(s0))), so the negative values of s0 do not reach s1
    (a count of parameters cannot tell)."""
    for net in (Network(DARTS_V2, C=8, num_classes=3, layers=3, stem="imagenet"),
                SearchNetwork(C=4, num_classes=3, layers=3, stem="imagenet")):
        net.eval()
        s0 = -torch.rand(1, net.stem1[1].in_channels, 8, 8)
        assert torch.equal(net.stem1(s0), net.stem1(torch.zeros_like(s0)))


def test_final_network_validates_a_genotype_object():
    """A Genotype built in Python is checked as a JSON one is: a node reading a later state is named
    when the network is built, not an IndexError in its first forward."""
    normal = list(DARTS_V2.normal)
    normal[0] = ("skip_connect", 5)
    with pytest.raises(ValueError, match=r"normal\[0\]: node 2 cannot take input 5"):
        Network(Genotype(normal, [2, 3, 4, 5], DARTS_V2.reduce, [2, 3, 4, 5]), C=4, num_classes=3, layers=3)


def test_one_by_one_convs_run_their_hooks_and_current_pruned_weights():
    """The preprocessing ReLUConvBN and FactorizedReduce compute their 1x1 convs with the backend's
    matrix product, not the conv module; a conv with hooks (pruned: its weight is rebuilt in a
    pre-hook), or under a global module hook, runs as the module, so the hook sees it and the weight
    is the current one."""
    x = torch.randn(2, 4, 6, 6)
    plain = ReLUConvBN(4, 4, 1, 1, 0).eval()
    with OpsRun() as ran, use_backend("native"):
        plain(x)
    assert "aten.convolution" not in ran.names and ran.names & {"aten.bmm", "aten.mm"}

    hooked = ReLUConvBN(4, 4, 1, 1, 0).eval()
    hooked.op[1].register_forward_hook(lambda module, inputs, out: out * 2)
    torch.testing.assert_close(hooked(x), hooked.op(x))
    pruned = ReLUConvBN(4, 4, 1, 1, 0).eval()
    prune.l1_unstructured(pruned.op[1], "weight", 0.5)
    with torch.no_grad():
        pruned.op[1].weight_orig.mul_(3)  # as an optimizer step would: the pruned weight follows
    torch.testing.assert_close(pruned(x), pruned.op(x))

    reduce = FactorizedReduce(4, 4).eval()
    clean = reduce(x)
    handle = reduce.conv_1.register_forward_hook(lambda module, inputs, out: out * 0)
    out = reduce(x)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2])) and torch.equal(out[:, 2:], clean[:, 2:])
    handle.remove()
    seen = []
    with torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, out: seen.append(module)):
        reduce(x)
    assert reduce.conv_1 in seen and reduce.conv_2 in seen


# --- found untested by a mutation audit of the final network ------------------------------------------

def test_the_auxiliary_head_reads_the_cell_at_two_thirds_of_the_depth():
    """DARTS' head sits after cell 2 * layers // 3 (the second reduction); any other cell with the same
    channel count would give an auxiliary output of the same shape."""
    torch.manual_seed(0)
    net = Network(DARTS_V2, C=4, num_classes=3, layers=5, in_channels=1, auxiliary=True).train()
    seen = {}
    net.cells[2 * 5 // 3].register_forward_hook(lambda module, inputs, output: seen.update(output=output))
    _, aux = net(torch.rand(2, 1, 8, 8))
    torch.testing.assert_close(aux, net.auxiliary_head(seen["output"]))


def test_drop_path_reaches_every_op_at_its_full_rate():
    """At a drop rate of nearly 1 every op of every node is dropped: the cell's output is all zeros
    (dropping only some edges, or at half the rate, leaves values)."""
    edges = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 4
    cell = Cell(Genotype(edges, [2, 3, 4, 5], edges, [2, 3, 4, 5]), 4, 4, 4, False, False).train()
    torch.manual_seed(0)
    assert not cell(torch.rand(64, 4, 6, 6), torch.rand(64, 4, 6, 6), 1 - 1e-7).any()
