"""Genotypes: derivation from hand-made alphas by the DARTS rule, JSON round trips and rejections."""

import json

import pytest
import torch

from dsrna import DARTS_V1, DARTS_V2, PRIMITIVES, Genotype, SearchNetwork

P = {name: k for k, name in enumerate(PRIMITIVES)}


def _alphas_with(choices: dict[int, dict[int, tuple[str, float]]]) -> torch.Tensor:
    """[14, 8] alphas, zero except ``choices[node][input] = (op, value)``."""
    alpha = torch.zeros(14, 8)
    start = 0
    for i in range(4):
        node = 2 + i
        for j, (op, value) in choices.get(node, {}).items():
            alpha[start + j, P[op]] = value
        start += node
    return alpha


def test_derivation_on_hand_made_alphas():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1)
    normal = _alphas_with({
        2: {0: ("sep_conv_3x3", 5.0), 1: ("skip_connect", 4.0)},
        3: {0: ("max_pool_3x3", 1.0), 1: ("dil_conv_5x5", 6.0), 2: ("avg_pool_3x3", 3.0)},
        4: {0: ("sep_conv_5x5", 2.0), 3: ("dil_conv_3x3", 7.0), 2: ("sep_conv_3x3", 1.0)},
        # a strong `none` never wins: input 0 is kept for its best non-none op
        5: {0: ("none", 9.0), 4: ("skip_connect", 8.0), 2: ("max_pool_3x3", 2.0)},
    })
    reduce = _alphas_with({2: {1: ("max_pool_3x3", 3.0), 0: ("avg_pool_3x3", 2.0)}})
    with torch.no_grad():
        net.alphas_normal.copy_(normal)
        net.alphas_reduce.copy_(reduce)
    g = net.genotype()
    assert g.normal == [("sep_conv_3x3", 0), ("skip_connect", 1),
                        ("dil_conv_5x5", 1), ("avg_pool_3x3", 2),
                        ("dil_conv_3x3", 3), ("sep_conv_5x5", 0),
                        ("skip_connect", 4), ("max_pool_3x3", 2)]
    assert g.reduce[:2] == [("max_pool_3x3", 1), ("avg_pool_3x3", 0)]
    assert g.normal_concat == [2, 3, 4, 5] == g.reduce_concat
    g.validate()


def test_derivation_partial_channels_uses_edge_weights():
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, partial_channels=2)
    with torch.no_grad():
        net.alphas_normal.copy_(_alphas_with({2: {0: ("sep_conv_3x3", 3.0), 1: ("sep_conv_5x5", 3.0)}}))
        net.betas_normal.zero_()
        net.betas_normal[1] = 5.0  # the edge from input 1 is much stronger
    assert net.genotype().normal[0] == ("sep_conv_5x5", 1)


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2, Genotype(DARTS_V2.normal, [2, 5], DARTS_V2.reduce, [3, 4, 5])])
def test_json_round_trip(genotype, tmp_path):
    """Every field survives (the last genotype: concat lists that differ, as DARTS' never do)."""
    text = genotype.to_json(tmp_path / "g.json")
    assert Genotype.from_json(text) == genotype
    assert Genotype.from_json(tmp_path / "g.json") == genotype
    assert Genotype.from_json("DARTS_V2") == DARTS_V2
    # DARTS' own printed form pastes in unchanged
    assert Genotype(normal=DARTS_V2.normal, normal_concat=range(2, 6), reduce=DARTS_V2.reduce,
                    reduce_concat=range(2, 6)).validate().steps == 4


def _edit(**changes) -> str:
    data = DARTS_V2.to_dict()
    data.update(changes)
    return json.dumps(data)


def test_a_file_whose_name_starts_like_json_is_read(tmp_path):
    path = tmp_path / "[v2]genotype.json"
    DARTS_V2.to_json(path)
    assert Genotype.from_json(str(path)) == DARTS_V2


def test_a_binary_file_is_named(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ValueError, match=f"genotype file {path}: not a text"):
        Genotype.from_json(path)


def test_rejections_say_what_and_where():
    bad_op = DARTS_V2.to_dict()["normal"]
    bad_op[3] = ["conv_7x7", 1]
    with pytest.raises(ValueError, match=r"normal\[3\].*unknown op 'conv_7x7'"):
        Genotype.from_json(_edit(normal=bad_op))
    bad_index = DARTS_V2.to_dict()["reduce"]
    bad_index[2] = ["skip_connect", 3]  # node 3 may only take states 0..2
    with pytest.raises(ValueError, match=r"reduce\[2\].*node 3 cannot take input 3"):
        Genotype.from_json(_edit(reduce=bad_index))
    with pytest.raises(ValueError, match=r"normal.*two \(op, input\) pairs per node, got 7"):
        Genotype.from_json(_edit(normal=DARTS_V2.to_dict()["normal"][:7]))
    with pytest.raises(ValueError, match="normal has 3 nodes but reduce has 4"):
        Genotype.from_json(_edit(normal=DARTS_V2.to_dict()["normal"][:6], normal_concat=[2, 3, 4]))
    with pytest.raises(ValueError, match=r"none"):
        Genotype.from_json(_edit(normal=[["none", 0]] + DARTS_V2.to_dict()["normal"][1:]))
    with pytest.raises(ValueError, match="reduce_concat"):
        Genotype.from_json(_edit(reduce_concat=[2, 9]))
    with pytest.raises(ValueError, match="normal_concat"):  # one past the last state (0..5)
        Genotype.from_json(_edit(normal_concat=[2, 3, 4, 6]))
    with pytest.raises(ValueError, match="missing field"):
        Genotype.from_json('{"normal": []}')
    for field, value in (("normal_concat", 2), ("reduce", None), ("normal", 5)):
        with pytest.raises(ValueError, match=rf"genotype\.{field}: expected a list"):
            Genotype.from_json(_edit(**{field: value}))
    with pytest.raises(ValueError, match=r"reduce_concat: \[0, 1\] must name the cell's nodes, states 2..5"):
        Genotype.from_json(_edit(reduce_concat=[0, 1]))  # the inputs, at the previous resolution
    with pytest.raises(ValueError, match="normal_concat"):  # true is not state 1
        Genotype.from_json(_edit(normal_concat=[True, 2]))
    with pytest.raises(ValueError, match="invalid JSON"):
        Genotype.from_json("{not json")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):  # JSON, not a file name
        Genotype.from_json("[1, 2]")
    with pytest.raises(ValueError, match="invalid JSON .RecursionError"):  # no traceback out of the decoder
        Genotype.from_json("[" * 100_000 + "]" * 100_000)


def test_builtin_genotypes_are_the_published_darts_cells():
    """DARTS_V1/V2 as printed in DARTS' genotypes.py (the parameter count alone cannot tell a pool
    from another pool, or a skip's input); "DARTS" names V2, as there."""
    v1 = ("Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), "
          "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], "
          "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
          "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])")
    v2 = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
          "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
          "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
          "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
    assert eval(v1, {"Genotype": Genotype}) == DARTS_V1
    assert eval(v2, {"Genotype": Genotype}) == DARTS_V2
    assert Genotype.from_json("DARTS") == DARTS_V2


def test_json_text_may_start_with_whitespace():
    assert Genotype.from_json("\n  " + DARTS_V2.to_json()) == DARTS_V2


def test_rejects_self_and_boolean_inputs_and_an_empty_concat():
    """A node takes earlier states only (both of its edges), JSON true is no state index, and a cell
    must output at least one node."""
    normal = DARTS_V2.to_dict()["normal"]
    normal[1] = ["sep_conv_3x3", 2]  # node 2's second edge
    with pytest.raises(ValueError, match=r"normal\[1\].*node 2 cannot take input 2"):
        Genotype.from_json(_edit(normal=normal))
    normal[1] = ["sep_conv_3x3", True]
    with pytest.raises(ValueError, match=r"normal\[1\].*node 2 cannot take input True"):
        Genotype.from_json(_edit(normal=normal))
    with pytest.raises(ValueError, match="normal_concat"):
        Genotype.from_json(_edit(normal_concat=[]))


def test_ties_go_to_the_lower_input_and_the_first_op():
    """DARTS' rule on equal weights (all alphas zero, as at the start of a search): each node keeps its
    two lowest-numbered inputs, each with the first op that is not `none`."""
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_reduce.zero_()
    genotype = net.genotype()
    assert genotype.normal == [(PRIMITIVES[1], 0), (PRIMITIVES[1], 1)] * 4 == genotype.reduce
