"""Lowering models into the bound graph: a small DAG of :mod:`dsrna.bounds.nodes` ops.

Supported: :class:`~dsrna.space.SearchNetwork` (PC-DARTS included), :class:`~dsrna.space.Network`,
and ``nn.Sequential`` stacks of supported layers. Batch norm uses the running statistics in eval
mode; in train mode (the search) the statistics of the clean pass over the same batch (METHOD.md
§2 [choice]): taken from a ``capture_batch_stats()`` store when one is given, else computed by the
engine's own clean pass. The architecture weights (softmax(alpha), softmax(beta)) are computed
once per lowering and stay in the autograd graph, so a graph is built per call. The ``none`` op is
pruned: it adds nothing to any sum. On the fast backends a standard DARTS search cell lowers state
by state into the stacked nodes the batched cell computes (:func:`_batched_state`), the same maps in
far fewer ops; on the reference backend edge by edge, as its cell runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import _SpectralNorm

from dsrna import backend
from dsrna.bounds import nodes
from dsrna.space import batched_cell
from dsrna.space.batched_cell import (CONV_KINDS, FIRST_DEPTHWISE, STAGE1_DILATIONS, STAGE1_KERNELS, STAGE1_PADDINGS,
                                      cat_weights)
from dsrna.space.network import Network
from dsrna.space.ops import (
    DilConv,
    FactorizedReduce,
    Identity,
    Normalize,
    PoolBN,
    ReLUConvBN,
    SepConv,
    Zero,
    bn_scale_shift,
    global_hooks_set,
)
from dsrna.space.search_network import MixedOp, SearchNetwork


@dataclass
class Node:
    op: nodes.BoundOp | None  # None for the input
    inputs: tuple[int, ...]


@dataclass
class BoundGraph:
    """Nodes in topological order; node 0 is the input, ``output`` the logits."""

    relu_mode: str = "adaptive"
    bn_stats: dict | None = None
    dtype: torch.dtype | None = None  # derived parameters (batch-norm and normalisation affines) computed in it
    nodes: list[Node] = field(default_factory=lambda: [Node(None, ())])
    output: int = 0
    needs_clean_pass: bool = False  # some train-mode BN has no captured statistics

    def add(self, op: nodes.BoundOp, *inputs: int) -> int:
        self.nodes.append(Node(op, tuple(inputs)))
        return len(self.nodes) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The clean pass through the graph (it fixes batch-norm statistics left unknown)."""
        values = [x]
        for node in self.nodes[1:]:
            values.append(node.op.forward(*(values[i] for i in node.inputs)))
        self.needs_clean_pass = False
        return values[self.output]

    def cast(self, dtype: torch.dtype) -> "BoundGraph":
        """Every op's tensors (weights, batch-norm scales, mixing weights) in ``dtype``, in place.
        The casts are differentiable: gradients still reach the model's own parameters."""
        def cast(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(dtype)
            if isinstance(value, list):  # the weights of a stack of convs
                return [cast(v) for v in value]
            return value

        for node in self.nodes[1:]:
            for name, value in vars(node.op).items():
                setattr(node.op, name, cast(value))
        return self


def lower(model: nn.Module, bn_stats: dict | None = None, relu_mode: str = "adaptive",
          dtype: torch.dtype | None = None, stacked: bool = True) -> BoundGraph:
    """The bound graph of ``model`` (see the module docstring for what is supported), in ``dtype`` if
    given: the batch-norm and normalisation affines are derived from their statistics in that
    precision and every other tensor is cast, so a float64 graph of a float32 model is that model's
    function evaluated in float64 (``1/sqrt(var)`` rounded in float32 would move a deep network's
    margins by more than a small eps does).

    ``stacked=False`` lowers a search cell edge by edge on every backend: the same bounds from many
    small nodes instead of a few large ones, for passes whose memory is a multiple of the largest
    node (crown-symbolic holds ``n + E`` coefficients per neuron of a node)."""
    _refuse_changed_calls(model)
    graph = BoundGraph(relu_mode=relu_mode, bn_stats=bn_stats, dtype=dtype)
    if _is(model, SearchNetwork):
        graph.output = _lower_search_network(model, graph, 0, stacked)
    elif _is(model, Network):
        graph.output = _lower_network(model, graph, 0)
    else:
        graph.output = _lower_module(model, graph, 0)
    if graph.output is None:
        raise TypeError(f"{type(model).__name__} has a constant zero output: nothing to bound")
    return graph if dtype is None else graph.cast(dtype)


# --- modules ---------------------------------------------------------------------------------------

# What a subclass may define and still compute its base class's function: construction and printing.
_BOILERPLATE = {"__module__", "__qualname__", "__doc__", "__annotations__", "__dict__", "__weakref__", "__init__",
                "extra_repr", "__firstlineno__", "__static_attributes__", "__classcell__", "__orig_bases__",
                "__parameters__"}


def _is(m: nn.Module, *classes: type) -> bool:
    """``isinstance(m, classes)``, refusing a subclass that may compute another function: the graph
    lowers the class's function, so a residual ``nn.Sequential`` or a weight-standardised ``nn.Conv2d``
    would get the bounds of another network. Every class between ``type(m)`` and the matched one must
    define nothing but construction and printing, or declare ``lowers_as_base = True`` (the library's
    own subclasses that compute the same function through the backends); torch.nn.utils.parametrize's
    generated class is fine too (the graph reads the parametrised weight)."""
    for cls in classes:
        if isinstance(m, cls):
            # every class the lowered one does not have, also mixins listed after it (MyReLU(nn.ReLU, Mixin))
            for klass in (k for k in type(m).__mro__ if k not in cls.__mro__):
                own = set(vars(klass)) - _BOILERPLATE
                trusted = vars(klass).get("lowers_as_base", False) or (
                    klass is type(m) and parametrize.is_parametrized(m) and klass.__name__.startswith("Parametrized"))
                if own and not trusted:
                    raise TypeError(f"bound propagation does not support {type(m).__name__}: {klass.__name__} defines "
                                    f"{', '.join(sorted(own))} over {cls.__name__}, so it may compute another function "
                                    f"than the one the bounds would cover")
            return True
    return False


def _refuse_changed_calls(model: nn.Module) -> None:
    """Hooks and per-instance overrides may change what a module returns, which the graph would not
    see. torch.nn.utils.prune's pre-hooks only refresh the pruned weight: they are run, so the graph
    reads the current one."""
    if global_hooks_set():
        raise TypeError("bound propagation does not support global forward hooks (they may change outputs): "
                        "remove them first")
    for name, m in model.named_modules():
        where = f"{type(m).__name__} {name or '(the model)'}"
        overrides = sorted(key for key in vars(m) if callable(getattr(type(m), key, None)))
        if overrides:  # forward, _conv_forward, ...: any method replaced on the instance
            raise TypeError(f"bound propagation does not support methods set on the instance: {where} sets "
                            f"{', '.join(overrides)}")
        compiled = getattr(m, "_compiled_call_impl", None)  # what Module.__call__ runs instead, when set
        if compiled is not None and not _compiles_own_call(m, compiled):
            raise TypeError(f"bound propagation does not support a replaced _compiled_call_impl: {where} has one")
        stateful = [key for key, chain in getattr(m, "parametrizations", {}).items()
                    if any(isinstance(p, _SpectralNorm) and p.training for p in chain)]
        if stateful:  # its power iteration changes the weight on every read: the graph reads it once
            raise TypeError(f"bound propagation does not support spectral norm in training mode: {where} "
                            f"({', '.join(stateful)}); call .eval() on the model first")
        if m._forward_hooks or any(not isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values()):
            raise TypeError(f"bound propagation does not support forward hooks (they may change outputs): {where} has one")
        for hook in m._forward_pre_hooks.values():
            hook(m, ())


def _compiles_own_call(m: nn.Module, compiled) -> bool:
    """Whether ``compiled`` is what ``m.compile()`` sets: torch.compile of the module's own ``_call_impl``."""
    original = inspect.unwrap(compiled)
    return getattr(original, "__func__", None) is type(m)._call_impl and getattr(original, "__self__", None) is m


def _batch_norm(bn: nn.BatchNorm2d, graph: BoundGraph) -> nodes.ChannelAffine:
    if not bn.training and bn.track_running_stats:
        return nodes.ChannelAffine(*bn_scale_shift(bn, *_cast(graph, bn.running_mean, bn.running_var)))
    if graph.bn_stats is not None:
        if bn not in graph.bn_stats:
            raise ValueError("bn_stats has no statistics for a train-mode BatchNorm2d: capture them over this model's clean pass")
        return nodes.ChannelAffine(*bn_scale_shift(bn, *_cast(graph, *graph.bn_stats[bn])))
    graph.needs_clean_pass = True
    return nodes.ChannelAffine(None, None, bn)


def _cast(graph: BoundGraph, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tensors if graph.dtype is None else tuple(t.to(graph.dtype) for t in tensors)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _lower_module(m: nn.Module, graph: BoundGraph, x: int | None) -> int | None:
    """Append ``m`` applied to node ``x``; return its output node (None: constant zero)."""
    if x is None or _is(m, Zero):
        return None
    if _is(m, nn.Sequential):
        for child in m:
            x = _lower_module(child, graph, x)
        return x
    if _is(m, Identity, nn.Identity) or (_is(m, nn.Dropout) and not m.training):
        return x
    if _is(m, Normalize):
        mean, std = _cast(graph, m.mean.flatten(), m.std.flatten())
        return graph.add(nodes.ChannelAffine(1.0 / std, -mean / std), x)
    if _is(m, nn.BatchNorm2d):
        return graph.add(_batch_norm(m, graph), x)
    if _is(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise TypeError(f"bound propagation supports Conv2d with numeric zero padding only, got {m.padding!r}/{m.padding_mode!r}")
        op = nodes.Conv2d(m.weight, m.bias, _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.groups)
        return graph.add(op, x)
    if _is(m, nn.Linear):
        return graph.add(nodes.Linear(m.weight, m.bias), x)
    if _is(m, nn.ReLU):
        return graph.add(nodes.ReLU(graph.relu_mode), x)
    if _is(m, nn.MaxPool2d):
        if m.dilation not in (1, (1, 1)) or m.return_indices:
            raise TypeError("bound propagation supports MaxPool2d without dilation or returned indices")
        return graph.add(nodes.MaxPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode), x)
    if _is(m, nn.AvgPool2d):
        kernel, stride, padding = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
        if m.ceil_mode or m.divisor_override is not None or any(a != b for a, b in (kernel, stride, padding)):
            raise TypeError("bound propagation supports AvgPool2d with a square kernel, stride and padding, no ceil_mode, "
                            "no divisor_override")
        return graph.add(nodes.AvgPool2d(kernel[0], stride[0], padding[0], m.count_include_pad), x)
    if _is(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise TypeError(f"bound propagation supports AdaptiveAvgPool2d(1) only, got output size {m.output_size}")
        return graph.add(nodes.GlobalAvgPool(), x)
    if _is(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise TypeError("bound propagation supports Flatten(1, -1) only")
        return graph.add(nodes.Flatten(), x)
    if _is(m, ReLUConvBN, DilConv, SepConv):
        return _lower_module(m.op, graph, x)
    if _is(m, PoolBN):
        x = _lower_module(m.pool, graph, x)
        return x if m.bn is None else _lower_module(m.bn, graph, x)
    if _is(m, FactorizedReduce):
        return _lower_after_relu(m, graph, graph.add(nodes.ReLU(graph.relu_mode), x))
    raise TypeError(f"bound propagation does not support {type(m).__name__}")


def _lower_after_relu(op: nn.Module, graph: BoundGraph, relu_x: int) -> int:
    """A candidate that starts with ReLU, applied to an input that already went through it."""
    if _is(op, DilConv, SepConv):
        return _lower_module(op.op[1:], graph, relu_x)
    if _is(op, FactorizedReduce):
        a = _lower_module(op.conv_1, graph, relu_x)
        b = _lower_module(op.conv_2, graph, graph.add(nodes.Shift(), relu_x))
        return _lower_module(op.bn, graph, graph.add(nodes.Concat(), a, b))
    raise TypeError(f"{type(op).__name__} has no after_relu form")


def _head(model: nn.Module, graph: BoundGraph, s: int) -> int:
    pooled = _lower_module(model.global_pooling, graph, s)
    return _lower_module(model.classifier, graph, graph.add(nodes.Flatten(), pooled))


# --- the super-network -----------------------------------------------------------------------------


def _mixed_terms(edge: MixedOp, weights: torch.Tensor, graph: BoundGraph, x: int, shared: dict) -> tuple[list[int], list[torch.Tensor]]:
    """The non-``none`` candidates of one edge as nodes, with their weights (mirrors ``MixedOp.outputs`` and ``MixedOp.kept_weights``).
    ``shared`` holds the nodes every edge leaving a state computes alike: the candidates' leading ReLU
    and each kind and stride of pooling (their batch norms stay per edge). One shared node is bounded
    once, and CROWN relaxes it once for the sum of its consumers' coefficients, which is never looser."""
    outs, ws = [], []
    for k, op in enumerate(edge.ops):
        if _is(op, Zero):
            continue
        if hasattr(op, "after_relu"):
            if x not in shared:
                shared[x] = graph.add(nodes.ReLU(graph.relu_mode), x)
            outs.append(_lower_after_relu(op, graph, shared[x]))
        elif _is(op, PoolBN):
            key = (x, op.kind, op.stride)
            if key not in shared:
                shared[key] = _lower_module(op.pool, graph, x)
            outs.append(shared[key] if op.bn is None else _lower_module(op.bn, graph, shared[key]))
        else:
            outs.append(_lower_module(op, graph, x))
        ws.append(weights[k])
    return outs, ws


def _stacked_batch_norm(bns: tuple[nn.BatchNorm2d, ...], graph: BoundGraph) -> nodes.ChannelAffine | None:
    """One affine node for batch norms over channel-stacked inputs, or None when some of them have
    known statistics and others must take theirs from the clean pass."""
    affines = [_batch_norm(bn, graph) for bn in bns]
    known = [a.scale is not None for a in affines]
    if all(known):
        return nodes.ChannelAffine(torch.cat([a.scale for a in affines]), torch.cat([a.shift for a in affines]))
    if not any(known):  # the clean pass computes each stacked channel's statistics, as each module would
        return nodes.ChannelAffine(None, None, bns[0])
    return None


def _batched_state(plan, weights: torch.Tensor, graph: BoundGraph, x: int,
                   shared: dict) -> dict[int, tuple[list[int], list[torch.Tensor]]] | None:
    """The kept candidates of every edge leaving state node ``x`` (``plan``: its
    :class:`dsrna.space.batched_cell` plan), with their weights, by edge: the conv candidates of all
    the edges in stacked nodes as the batched cell computes them (a few large ops instead of eight
    small ones per candidate), the rest as :func:`_mixed_terms` builds them. None when their batch
    norms cannot be stacked (mixed modes)."""
    stage1_bn = _stacked_batch_norm(plan.stage1_bns, graph)
    stage2_bn = _stacked_batch_norm(plan.stage2_bns, graph)
    if stage1_bn is None or stage2_bn is None:
        return None
    E = len(plan.edges)
    C = plan.ops["sep3"][0].op[1].weight.shape[0]

    def cat(kinds, layer):
        return cat_weights([op for kind in kinds for op in plan.ops[kind]], layer)

    def pointwise(kinds, layer, x):
        return graph.add(nodes.Conv2d(cat(kinds, layer), None, (1, 1), (0, 0), (1, 1), len(kinds) * E), x)

    def slice_(x, block):
        return graph.add(nodes.ChannelSlice(block * C, (block + 1) * C), x)

    if x not in shared:
        shared[x] = graph.add(nodes.ReLU(graph.relu_mode), x)
    relu_x = shared[x]
    depthwise = [cat([kind], 1).view(E, C, k, k) for kind, k in zip(CONV_KINDS, STAGE1_KERNELS)]
    stack = graph.add(nodes.DepthwiseStack(depthwise, plan.stride, STAGE1_PADDINGS, STAGE1_DILATIONS), relu_x)
    stage1 = graph.add(stage1_bn, pointwise(CONV_KINDS, 2, stack))
    sep_in = graph.add(nodes.ReLU(graph.relu_mode), graph.add(nodes.ChannelSlice(0, 2 * E * C), stage1))
    second = []
    for t, kind in enumerate(("sep3", "sep5")):
        part = graph.add(nodes.ChannelSlice(t * E * C, (t + 1) * E * C), sep_in)
        padding = FIRST_DEPTHWISE[kind][1]
        second.append(graph.add(nodes.Conv2d(cat([kind], 5), None, (1, 1), (padding, padding), (1, 1), E * C), part))
    stage2 = graph.add(stage2_bn, pointwise(("sep3", "sep5"), 6, graph.add(nodes.Concat(), *second)))

    out = {}
    for n, e in enumerate(plan.edges):
        terms = []
        for kind in ("max", "avg"):
            op = plan.ops[kind][n]
            key = (x, op.kind, op.stride)
            if key not in shared:
                shared[key] = _lower_module(op.pool, graph, x)
            terms.append(_lower_module(op.bn, graph, shared[key]))
        skip = plan.ops["skip"][n]
        terms.append(x if isinstance(skip, Identity) else _lower_after_relu(skip, graph, relu_x))
        terms += [slice_(stage2, n), slice_(stage2, E + n), slice_(stage1, 2 * E + n), slice_(stage1, 3 * E + n)]
        out[e] = terms, list(weights[e][1:])  # PRIMITIVES order; weight 0 is `none`'s
    return out


def _lower_partial_edge(edge: MixedOp, weights: torch.Tensor, graph: BoundGraph, x: int, channels: int,
                        shared: dict) -> int:
    """A PC-DARTS edge: candidates on the first C/K channels, bypass for the rest, channel shuffle.
    The edges leaving a state share the slices and the bypass pooling too."""
    key = (x, "partial")
    if key not in shared:
        bypass = graph.add(nodes.ChannelSlice(edge.C_op, channels), x)
        if edge.stride == 2:
            bypass = _lower_module(edge.bypass_pool, graph, bypass)
        shared[key] = graph.add(nodes.ChannelSlice(0, edge.C_op), x), bypass
    active, bypass = shared[key]
    outs, ws = _mixed_terms(edge, weights, graph, active, shared)
    mixed = graph.add(nodes.WeightedSum(torch.stack(ws)), *outs)
    return graph.add(nodes.ChannelShuffle(edge.partial_channels), graph.add(nodes.Concat(), mixed, bypass))


def _lower_search_network(net: SearchNetwork, graph: BoundGraph, x: int, stacked: bool) -> int:
    s0 = _lower_module(net.stem, graph, _lower_module(net.normalize, graph, x))
    s1 = _lower_module(net.stem1, graph, s0) if net.stem1 is not None else s0
    mixing = {False: net.edge_weights(False, graph.dtype), True: net.edge_weights(True, graph.dtype)}
    # The graph mirrors the forward of the backend in use: on the fast backends a standard DARTS
    # cell lowers state by state, as the batched cell runs it (the same bounds in far fewer ops);
    # the reference lowers edge by edge, as its cell runs.
    stacked = stacked and backend.resolve("search_cell", net.alphas_normal.device) != "reference"
    for cell in net.cells:
        weights, edge_weights = mixing[cell.reduction]
        states = [_lower_module(cell.preprocess0, graph, s0), _lower_module(cell.preprocess1, graph, s1)]
        C = cell.preprocess1.op[1].out_channels
        plan = batched_cell.cell_plan(cell) if stacked and cell.partial_channels == 1 else None
        batched: dict[int, dict | None] = {}  # state -> its edges' candidates, once lowered
        shared: dict = {}
        outs, ws = [], []
        for node, e, j in cell.edge_index():
            if cell.partial_channels > 1:
                outs.append(_lower_partial_edge(cell.edges[e], weights[e], graph, states[j], C, shared))
                ws.append(edge_weights[e])
            else:
                if plan is not None and j not in batched:
                    batched[j] = _batched_state(plan.states[j], weights, graph, states[j], shared)
                o, w = batched[j][e] if batched.get(j) else _mixed_terms(cell.edges[e], weights[e], graph, states[j], shared)
                outs += o
                ws += w
            if j == node - 1:
                states.append(graph.add(nodes.WeightedSum(torch.stack(ws)), *outs))
                outs, ws = [], []
        s0, s1 = s1, graph.add(nodes.Concat(), *states[-cell.multiplier:])
    return _head(net, graph, s1)


# --- the final network -----------------------------------------------------------------------------


def _lower_network(net: Network, graph: BoundGraph, x: int) -> int:
    """Bounds of the logits; drop path and the auxiliary head play no part (evaluation semantics)."""
    s0 = _lower_module(net.stem, graph, _lower_module(net.normalize, graph, x))
    s1 = _lower_module(net.stem1, graph, s0) if net.stem1 is not None else s0
    for cell in net.cells:
        states = [_lower_module(cell.preprocess0, graph, s0), _lower_module(cell.preprocess1, graph, s1)]
        for i in range(cell.steps):
            terms = [_lower_module(cell.ops[k], graph, states[cell.indices[k]]) for k in (2 * i, 2 * i + 1)]
            terms = [t for t in terms if t is not None]
            if not terms:
                raise TypeError("a final-network node made only of 'none' ops has a constant zero output")
            ones = torch.ones(len(terms), dtype=net.classifier.weight.dtype, device=net.classifier.weight.device)
            states.append(graph.add(nodes.WeightedSum(ones), *terms))
        s0, s1 = s1, graph.add(nodes.Concat(), *(states[i] for i in cell.concat))
    return _head(net, graph, s1)
