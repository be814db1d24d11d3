"""State-batched execution of a search cell: the fast backends' cell forward.

The reference cell (:func:`dsrna.space.search_network.cell_nodes_reference`) runs each of its 14
mixed ops on its own, about 25 small kernels per edge, each over one ``[B, C, H, W]`` tensor: on a GPU
the step is bound by kernel launches (BASELINE.md). Here the same arithmetic is grouped by the *state*
the edges leave, since every edge leaving a state reads the same tensor at the same stride:

- pools: one pooling pass per kind; in train mode the edges' ``pool -> BN(affine=False)`` outputs are
  equal (same input, same stride, same batch statistics), so one pass serves them all;
- strided skips (FactorizedReduce, reduction cells): each half's 1x1 convs of all edges as one conv,
  one batch norm;
- conv candidates: one ReLU; the first-stage depthwise convs of every edge's four conv candidates,
  channel-stacked (``[B, 4E*C, H, W]``, type-major: all sep 3x3, all sep 5x5, all dil 3x3, all dil
  5x5); one grouped 1x1 conv (:mod:`dsrna.ops.pointwise`); one batch norm over all those channels;
  the separable convs' second stage likewise (``[B, 2E*C, H, W]``). Per-channel batch norm and
  grouped convs compute each channel exactly as the per-edge modules do; only the launches are shared.

The modules, parameters and buffers stay the per-edge ones (checkpoints, the bound engine and the
optimizer see no difference): their weights are concatenated per call (a copy of the small weight
tensors; its backward is views), and the running statistics of the stacked batch norms are written
back to each module (in eval mode each module's running statistics are used, as the modules would).
Cells whose batch norms are in mixed modes, or with modules this plan does not know, run per edge.

Activation memory: the depthwise-then-1x1 stages keep only their inputs and run again in backward
(:class:`_Recomputed`), and the stacked batch norms keep their output, not their input
(:mod:`dsrna.ops.batch_norm`); autograd keeps about 0.38x of the reference cell's activations.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna import backend
from dsrna.ops import batch_norm_train, depthwise_conv2d, depthwise_conv2d_stack, pointwise_conv2d, weighted_sum
from dsrna.ops.pool_bn import pool3x3
from dsrna.space import ops as _ops
from dsrna.space.ops import BatchNorm2d, DilConv, FactorizedReduce, Identity, PoolBN, SepConv, Zero, channel_shuffle

# The kept candidates of PRIMITIVES (all but `none`), in order, with the module type each must have.
_LAYOUT = (("max", PoolBN), ("avg", PoolBN), ("skip", (Identity, FactorizedReduce)),
           ("sep3", SepConv), ("sep5", SepConv), ("dil3", DilConv), ("dil5", DilConv))
CONV_KINDS = ("sep3", "sep5", "dil3", "dil5")
# (kernel size, padding, dilation) of each conv candidate's first depthwise conv (METHOD.md §1).
FIRST_DEPTHWISE = {"sep3": (3, 1, 1), "sep5": (5, 2, 1), "dil3": (3, 2, 2), "dil5": (5, 4, 2)}
# The stacked first stage's kernel sizes, paddings and dilations, in CONV_KINDS order.
STAGE1_KERNELS, STAGE1_PADDINGS, STAGE1_DILATIONS = zip(*(FIRST_DEPTHWISE[kind] for kind in CONV_KINDS))


@dataclass
class _StatePlan:
    """The edges leaving one state: their indices in the cell, stride, and candidate modules by kind."""

    edges: tuple[int, ...]
    stride: int
    ops: dict[str, tuple[nn.Module, ...]]
    stage1_bns: tuple[BatchNorm2d, ...]  # channel order of the stacked first stage
    stage2_bns: tuple[BatchNorm2d, ...]  # ... and of the separable convs' second stage
    bypass_pool: nn.Module | None  # PC-DARTS: the stride-2 bypass pooling (parameter-free, shared)


def _module_ok(op: nn.Module, kind: str, stride: int) -> bool:
    """Whether candidate ``op`` is the standard DARTS module this plan assumes for ``kind``. The plan
    computes from the modules' tensors without calling them, so a module with hooks (which also
    covers ``torch.nn.utils.prune``: it keeps the class and moves the weight) is not one."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in op.modules()):
        return False
    if kind in ("max", "avg"):
        return op.kind == kind and op.stride == stride and _batch_norm_ok(op.bn)
    if kind == "skip":
        if stride == 1:
            return isinstance(op, Identity)
        return isinstance(op, FactorizedReduce) and _batch_norm_ok(op.bn) and all(
            conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.padding == (0, 0) and conv.bias is None
            and conv.groups == 1 for conv in (op.conv_1, op.conv_2))
    k, p, d = FIRST_DEPTHWISE[kind]
    seq = list(op.op)
    stages = [seq[:4], seq[4:]] if kind.startswith("sep") else [seq]
    for n, (relu, dw, pw, bn) in enumerate(stages):
        s = stride if n == 0 else 1
        if not (type(relu) is nn.ReLU and type(dw) is _ops.DepthwiseConv2d and type(pw) is nn.Conv2d
                and dw.kernel_size[0] == k and dw.padding[0] == p and dw.dilation[0] == d and dw.stride[0] == s
                and pw.kernel_size == (1, 1) and pw.bias is None and pw.groups == 1 and _batch_norm_ok(bn)):
            return False
    return True


def _batch_norm_ok(bn) -> bool:
    return (type(bn) is BatchNorm2d and not bn.affine and bn.track_running_stats and bn.momentum is not None
            and bn.running_mean is not None)


@dataclass
class _CellPlan:
    states: list[_StatePlan]  # indexed by state (the two inputs, then the nodes with outgoing edges)
    batch_norms: tuple[BatchNorm2d, ...]  # every batch norm the batched path runs for the modules


def build_plan(cell) -> _CellPlan | None:
    """The per-state plan of ``cell``, or None when its edges are not the standard DARTS mixed ops."""
    by_state: dict[int, list[int]] = {}
    for _, e, j in cell.edge_index():
        by_state.setdefault(j, []).append(e)
    plans = []
    for j, edge_ids in sorted(by_state.items()):
        mixed = [cell.edges[e] for e in edge_ids]
        stride = mixed[0].stride
        if any(m.stride != stride or len(m.ops) != len(_LAYOUT) + 1 or not isinstance(m.ops[0], Zero) for m in mixed):
            return None
        ops = {}
        for k, (kind, cls) in enumerate(_LAYOUT, start=1):
            ops[kind] = tuple(m.ops[k] for m in mixed)
            if not all(isinstance(op, cls) and _module_ok(op, kind, stride) for op in ops[kind]):
                return None
        stage1 = tuple(op.op[3] for kind in CONV_KINDS for op in ops[kind])
        stage2 = tuple(op.op[7] for kind in ("sep3", "sep5") for op in ops[kind])
        plans.append(_StatePlan(tuple(edge_ids), stride, ops, stage1, stage2, getattr(mixed[0], "bypass_pool", None)))
    reduce_bns = [op.bn for p in plans if p.stride == 2 for op in p.ops["skip"]]
    stacked = [bn for p in plans for bn in p.stage1_bns + p.stage2_bns] + reduce_bns
    pools = [op.bn for p in plans for kind in ("max", "avg") for op in p.ops[kind]]
    # One batch_norm call needs one eps and one momentum; the pools of a state share one output.
    if len({(bn.eps, bn.momentum) for bn in stacked + pools}) > 1:
        return None
    return _CellPlan(plans, tuple(stacked + pools))


# --- batch norm over the channel-stacked outputs of several modules ----------------------------------


def _buffers(bns, name: str) -> list[torch.Tensor]:
    """Buffer ``name`` of every module, read from the module dictionaries (``bn.running_mean`` goes
    through ``nn.Module.__getattr__``: thousands of lookups per step, and a GPU step is host-bound)."""
    return [bn._buffers[name] for bn in bns]


def _stacked_batch_norm(x: torch.Tensor, bns: tuple[BatchNorm2d, ...]) -> torch.Tensor:
    """``cat([bn(part) for bn, part in zip(bns, x.chunk(len(bns), 1))], 1)`` in one call, in every
    mode of :class:`BatchNorm2d` (eval, plain train, capturing, replaying frozen statistics)."""
    bn0 = bns[0]
    if not bn0.training:  # each module's running statistics, no update
        return torch.batch_norm(x, None, None, torch.cat(_buffers(bns, "running_mean")),
                                torch.cat(_buffers(bns, "running_var")), False, 0.0, bn0.eps,
                                torch.backends.cudnn.enabled)
    mode = getattr(_ops._bn_mode, "value", None)
    if mode is not None and mode[0] == "replay":
        store = mode[1]
        if any(bn not in store for bn in bns):
            raise RuntimeError("frozen_batch_stats: this BatchNorm2d ran no clean pass under capture_batch_stats")
        mean = torch.cat([store[bn][0] for bn in bns])
        var = torch.cat([store[bn][1] for bn in bns])
        return _ops.batch_norm_affine(bn0, mean, var, x)
    if mode is not None:  # capture: record each module's statistics as BatchNorm2d would
        mean, var = _ops.batch_statistics(x)
        for bn, m, v in zip(bns, mean.chunk(len(bns)), var.chunk(len(bns))):
            mode[1][bn] = (m, v)
    means, variances = _buffers(bns, "running_mean"), _buffers(bns, "running_var")
    running_mean, running_var = torch.cat(means), torch.cat(variances)
    if mode is None:  # plain train mode: the fast backends keep the output only for backward
        out = batch_norm_train(x, running_mean, running_var, bn0.momentum, bn0.eps)
    else:
        out = torch.batch_norm(x, None, None, running_mean, running_var, True, bn0.momentum, bn0.eps,
                               torch.backends.cudnn.enabled)
    torch._foreach_copy_(means, list(running_mean.chunk(len(bns))))
    torch._foreach_copy_(variances, list(running_var.chunk(len(bns))))
    torch._foreach_add_(_buffers(bns, "num_batches_tracked"), 1)
    return out


def _shared_pools(x: torch.Tensor, pools: tuple[PoolBN, ...]) -> list[torch.Tensor]:
    """The outputs of ``pools`` (same kind and stride) on input ``x``, one per edge. In train mode they
    are equal (batch statistics): the first module computes it and the others' running statistics take
    the same update. In eval mode the pooling runs once and each edge normalises it with its own
    running statistics."""
    first = pools[0]
    if not first.bn.training:
        pooled = pool3x3(x, first.kind, first.stride)
        return [p.bn(pooled) for p in pools]
    mode = getattr(_ops._bn_mode, "value", None)
    if len(pools) == 1 or (mode is not None and mode[0] == "replay"):
        return [first(x)] * len(pools)
    bn0, others = first.bn, [p.bn for p in pools[1:]]
    # new_k = (1 - m) old_k + m stat, and m stat = new_0 - (1 - m) old_0: exact for any prior state,
    # in five multi-tensor launches whatever the number of edges.
    keep = 1.0 - bn0.momentum
    first_stats = _buffers([bn0], "running_mean") + _buffers([bn0], "running_var")
    kept_old = torch._foreach_mul(first_stats, keep)
    out = first(x)
    update = torch._foreach_sub(first_stats, kept_old)
    stats = _buffers(others, "running_mean") + _buffers(others, "running_var")
    torch._foreach_mul_(stats, keep)
    torch._foreach_add_(stats, [update[0]] * len(others) + [update[1]] * len(others))
    torch._foreach_add_(_buffers(others, "num_batches_tracked"), 1)
    if mode is not None:  # capture: every module recorded the same statistics
        for bn in others:
            mode[1][bn] = mode[1][bn0]
    return [out] * len(pools)


# --- one state's candidates --------------------------------------------------------------------------


def cat_weights(modules, index: int) -> torch.Tensor:
    """The weights of layer ``index`` of each candidate's ``op`` sequence, concatenated. Read from the
    module dictionaries directly: ``m.op[index].weight`` costs three ``nn.Module`` lookups per weight,
    about a sixth of the batched cell's host time, and a GPU step is bound by host time."""
    key = str(index)
    return torch.cat([m._modules["op"]._modules[key]._parameters["weight"] for m in modules])


class _Recomputed(torch.autograd.Function):
    """``fn(*inputs)`` that keeps only its inputs for backward and runs ``fn`` again there (on the
    forward's backend and autocast state), differentiable to any order: under ``create_graph`` the
    recomputation hangs off the inputs themselves. A lean ``torch.utils.checkpoint``, whose
    bookkeeping cost more host time than the recomputation on a CPU."""

    @staticmethod
    def forward(ctx, fn, backend_name, *inputs):
        device_type = inputs[0].device.type
        ctx.fn, ctx.backend_name, ctx.device_type = fn, backend_name, device_type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad[2:]
        inputs = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        if not create_graph:
            inputs = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), backend.use_backend(ctx.backend_name), \
                torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled, cache_enabled=False):
            out = ctx.fn(*inputs)
        wanted = [t for t, n in zip(inputs, needs) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph, allow_unused=True,
                                         materialize_grads=True))
        return (None, None, *(next(grads) if n else None for n in needs))


def _recomputed(fn, *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)``, keeping only its inputs for backward (:class:`_Recomputed`). For the
    depthwise-then-1x1 stages below: their intermediate maps (the 1x1 convs' inputs) were about a
    third of the activation memory of a train step, and recomputing them costs a few depthwise convs."""
    mode = getattr(_ops._bn_mode, "value", None)
    if not torch.is_grad_enabled() or (mode is not None and mode[0] == "replay"):
        # The robustness passes (replayed statistics) are differentiated twice: a recomputation
        # would run in both backward passes, and cost more than the memory is worth.
        return fn(*inputs)
    return _Recomputed.apply(fn, backend.get_backend(), *inputs)


def _stage1(stride, relu_x, pointwise_weight, *depthwise_weights):
    """The conv candidates' first stage, depthwise -> grouped 1x1 (each conv's C channels a group)."""
    stacked = depthwise_conv2d_stack(relu_x, depthwise_weights, stride, STAGE1_PADDINGS, STAGE1_DILATIONS)
    return pointwise_conv2d(stacked, pointwise_weight, groups=stacked.shape[1] // pointwise_weight.shape[1])


_STAGE1 = {stride: functools.partial(_stage1, stride) for stride in (1, 2)}


def _stage2(sep3_in, sep5_in, sep3_weight, sep5_weight, pointwise_weight):
    """The separable convs' second stage, ReLU -> depthwise -> grouped 1x1, of every edge."""
    stacked = torch.cat([depthwise_conv2d(F.relu(part), weight, 1, FIRST_DEPTHWISE[kind][1], 1)
                         for kind, part, weight in (("sep3", sep3_in, sep3_weight), ("sep5", sep5_in, sep5_weight))], dim=1)
    return pointwise_conv2d(stacked, pointwise_weight, groups=stacked.shape[1] // pointwise_weight.shape[1])


def _conv_candidates(relu_x: torch.Tensor, plan: _StatePlan) -> dict[str, list[torch.Tensor]]:
    """The four conv candidates of every edge of ``plan`` from the shared ``relu(x)``."""
    E, C = len(plan.edges), relu_x.shape[1]
    weights = [cat_weights(plan.ops[kind], 1).view(E, C, k, k) for kind, k in zip(CONV_KINDS, STAGE1_KERNELS)]
    stage1_convs = [op for kind in CONV_KINDS for op in plan.ops[kind]]
    stage1 = _recomputed(_STAGE1[plan.stride], relu_x, cat_weights(stage1_convs, 2), *weights)
    stage1 = _stacked_batch_norm(stage1, plan.stage1_bns)
    sep3_in, sep5_in, *dil = stage1.split([E * C, E * C] + [C] * (2 * E), dim=1)

    stage2_convs = [op for kind in ("sep3", "sep5") for op in plan.ops[kind]]
    stage2 = _recomputed(_stage2, sep3_in, sep5_in, cat_weights(plan.ops["sep3"], 5), cat_weights(plan.ops["sep5"], 5),
                         cat_weights(stage2_convs, 6))
    sep = _stacked_batch_norm(stage2, plan.stage2_bns).split(C, dim=1)
    return {"sep3": sep[:E], "sep5": sep[E:], "dil3": dil[:E], "dil5": dil[E:]}


def _factorized_reduces(relu_x: torch.Tensor, reduces: tuple[FactorizedReduce, ...]) -> tuple[torch.Tensor, ...]:
    """The strided skips of every edge leaving a state of a reduction cell: each half's 1x1 convs of
    all edges as one conv, one batch norm over all their channels (each edge's channels in its own
    order: its ``conv_1`` half, then its ``conv_2`` half)."""
    E, half = len(reduces), reduces[0].conv_1.weight.shape[0]
    first = pointwise_conv2d(relu_x, torch.cat([r.conv_1.weight for r in reduces]), 2)
    second = pointwise_conv2d(FactorizedReduce.shift(relu_x), torch.cat([r.conv_2.weight for r in reduces]), 2)
    n, _, h, w = first.shape
    both = torch.stack([first.view(n, E, half, h, w), second.view(n, E, half, h, w)], dim=2)
    return _stacked_batch_norm(both.view(n, E * 2 * half, h, w), tuple(r.bn for r in reduces)).split(2 * half, dim=1)


def _state_candidates(x: torch.Tensor, plan: _StatePlan) -> list[list[torch.Tensor]]:
    """For every edge of ``plan``, its kept candidates' outputs in PRIMITIVES order."""
    relu_x = F.relu(x)
    max_pools, avg_pools = _shared_pools(x, plan.ops["max"]), _shared_pools(x, plan.ops["avg"])
    skips = [x] * len(plan.edges) if plan.stride == 1 else _factorized_reduces(relu_x, plan.ops["skip"])
    convs = _conv_candidates(relu_x, plan)
    return [[max_pools[e], avg_pools[e], skips[e]] + [convs[kind][e] for kind in CONV_KINDS]
            for e in range(len(plan.edges))]


# --- the cell ----------------------------------------------------------------------------------------


def cell_plan(cell) -> _CellPlan | None:
    """The cell's plan, cached; rebuilt when its edges' ops change (replaced, or a replica)."""
    key = tuple(itertools.chain.from_iterable(tuple(m.ops) for m in cell.edges))
    cache = cell.__dict__.get("_batched_plan")
    if cache is None or cache[0] != key:
        cache = (key, build_plan(cell))
        cell.__dict__["_batched_plan"] = cache
    return cache[1]


def usable_plan(cell) -> _CellPlan | None:
    """The cell's plan when it can run state-batched now (a known layout, its batch norms all in train
    mode or all in eval mode, no global module hooks, which the plan would skip), else None."""
    if _ops.global_hooks_set():
        return None
    plan = cell_plan(cell)
    return plan if plan is not None and len({bn.training for bn in plan.batch_norms}) == 1 else None


def forward_batched(cell, plan: _CellPlan, states: list[torch.Tensor], weights: torch.Tensor,
                    edge_weights: torch.Tensor | None) -> list[torch.Tensor]:
    """Appends the cell's nodes to ``states`` (its two preprocessed inputs), by ``usable_plan(cell)``."""
    plans = plan.states
    candidates: dict[int, list[torch.Tensor]] = {}  # edge index -> its kept candidate outputs
    bypass: dict[int, torch.Tensor] = {}  # PC-DARTS: state index -> the channels that skip the mixed op
    K = cell.partial_channels
    start = 0
    for i in range(cell.steps):
        # Node i's last edge leaves the newest state: batch every edge leaving that state now.
        for j in ((0, 1) if i == 0 else (1 + i,)):
            plan, x = plans[j], states[j]
            if K > 1:
                C_op = x.shape[1] // K
                x, rest = x[:, :C_op], x[:, C_op:]
                bypass[j] = plan.bypass_pool(rest) if plan.stride == 2 else rest
            candidates.update(zip(plan.edges, _state_candidates(x, plan)))
        end = start + 2 + i
        if K == 1:
            outs = [t for e in range(start, end) for t in candidates.pop(e)]
            states.append(weighted_sum(outs, cell.edges[start].kept_weights(weights[start:end])))
        else:
            mixed = []
            for j, e in enumerate(range(start, end)):
                out = weighted_sum(candidates.pop(e), cell.edges[e].kept_weights(weights[e]))
                mixed.append(channel_shuffle(torch.cat([out, bypass[j]], dim=1), K))
            states.append(weighted_sum(mixed, edge_weights[start:end]))
        start = end
    return states
