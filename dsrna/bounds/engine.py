"""IBP, CROWN-IBP, CROWN-symbolic and CROWN as walks over one bound graph.

- ``ibp``: intervals forward through every node; a final linear layer is folded into the
  specification (the margin ``f_y - f_t`` is bounded with ``W_y - W_t``, not by subtracting
  logit intervals).
- ``crown-ibp``: intervals forward for every intermediate node, then one CROWN backward pass from
  the output specification (``[B, S, ...]`` coefficient tensors, transposed maps per op).
- ``crown-symbolic``: intermediate bounds from a forward symbolic pass (every node an affine form
  of the input's ``n`` coordinates, :class:`~dsrna.bounds.nodes.Symbolic`, intersected with its
  interval), then CROWN from the output. Nearly exact where few ReLUs and max-pool windows are
  undecided (small eps), where interval bounds on a deep network are vacuous. Costs a forward pass
  of ``n + E`` "images" per example (``n``: 784 for MNIST, 3,072 for CIFAR-10; ``E`` error symbols,
  at most ``max_error_symbols``), one example at a time, under no_grad: the intermediate bounds are
  constants of the gradient, which is exact wherever they decide every neuron.
- ``crown``: as the forward interval walk reaches the input of each ReLU or max pool, the neurons
  whose interval the relaxation reads (undecided ReLU inputs, the inputs of undecided max-pool
  windows) get CROWN bounds by backward passes from that node, intersected with the interval; only
  those neurons become specifications, in chunks of ``max_spec_chunk``, so memory stays
  O(chunk x layer size) per example and never quadratic in the number of pixels.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from dsrna.bounds import nodes
from dsrna.bounds.graph import BoundGraph
from dsrna.bounds.perturbation import Ball

METHODS = ("ibp", "crown-ibp", "crown-symbolic", "crown")
DEFAULT_SPEC_CHUNK = 256
DEFAULT_ERROR_SYMBOLS = 2048


def _widen(sym: nodes.Symbolic, width: int) -> nodes.Symbolic:
    """``sym`` with zero coefficients for the symbols it does not depend on, up to ``width``."""
    missing = width - sym.coef.shape[1]
    if missing == 0:
        return sym
    zeros = sym.coef.new_zeros(sym.coef.shape[0], missing, *sym.coef.shape[2:])
    return nodes.Symbolic(torch.cat([sym.coef, zeros], dim=1), sym.centre, sym.radius)


def _accumulate(total: nodes.Symbolic | None, sym: nodes.Symbolic, weight: torch.Tensor) -> nodes.Symbolic:
    """``total + weight * sym`` (``weight >= 0``, a 0-d tensor), in place on ``total`` (owned by the
    caller), widened when ``sym`` depends on more symbols."""
    if total is None:
        return nodes.Symbolic(sym.coef * weight, sym.centre * weight, None if sym.radius is None else sym.radius * weight)
    total = _widen(total, max(total.coef.shape[1], sym.coef.shape[1]))
    total.coef[:, :sym.coef.shape[1]].addcmul_(sym.coef, weight)
    total.centre.addcmul_(sym.centre, weight)
    if sym.radius is not None:
        total.radius = sym.radius * weight if total.radius is None else total.radius.addcmul_(sym.radius, weight)
    return total


def _intersect(a: nodes.Bound, b: nodes.Bound) -> nodes.Bound:
    """The intersection of two enclosures of the same values; where rounding leaves them disjoint
    (both exact up to rounding, as every interval is at eps 0), their hull instead: a crossed interval
    (lower > upper) would go on as a negative radius, which the interval rules amplify layer by layer
    (at eps 0 crown-symbolic's margins on a 5-cell super-network were off by 1.7)."""
    lower, upper = torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])
    crossed = lower > upper
    return (torch.where(crossed, torch.minimum(a[0], b[0]), lower),
            torch.where(crossed, torch.maximum(a[1], b[1]), upper))


def _stand_in(bound: nodes.Bound, batch: int | None = None) -> nodes.Bound:
    """A released interval: NaN of the same shape, dtype and device, in no memory (one expanded
    scalar). Linear ops' backward rules read only their input's shape; a rule that read the values
    would turn the bound into NaN, which fails loudly, never a wrong number."""
    lower = bound[0]
    shape = lower.shape if batch is None else (batch, *lower.shape[1:])
    nan = torch.full((), float("nan"), dtype=lower.dtype, device=lower.device).expand(shape)
    return nan, nan


def _deviation(coef: torch.Tensor, q: float) -> torch.Tensor:
    """``||coef||_q`` over the symbols (dim 1), as sums over the outer dim, which vectorise along the
    neurons (``linalg.vector_norm`` over a middle dim is several times slower on a CPU)."""
    if q == 1:
        return coef.abs().sum(1)
    if q == 2:
        return coef.square().sum(1).sqrt()
    return coef.abs().amax(1)


class Propagation:
    """Bounds of one graph over one input set. Intervals are computed once at construction.

    ``max_spec_chunk``: ``crown``'s specifications per backward pass (memory O(chunk x layer size)).
    ``max_error_symbols``: ``crown-symbolic``'s budget of error symbols per example (memory and time
    grow with ``n`` plus it); the widest undecided neurons get one, the others an independent
    interval, which is sound but grows like IBP downstream.

    ``bounds[i]`` is node ``i``'s interval where a later step reads it: the inputs of the ReLUs and
    max pools (the relaxations, for every method but ``ibp``), the output and its input. The others
    are released once their last consumer has run, as a forward pass frees its activations, and left
    as NaN stand-ins of their shape (:func:`_stand_in`): an IBP pass through a C=16, 8-cell
    super-network held every node's interval, 13 times what the relaxations read (13.7 GB at batch 64
    on a GPU), where a forward pass peaks at 0.2 GB. ``keep_all_bounds``: keep every interval, to
    inspect them.
    """

    def __init__(self, graph: BoundGraph, ball: Ball, method: str, max_spec_chunk: int = DEFAULT_SPEC_CHUNK,
                 max_error_symbols: int = DEFAULT_ERROR_SYMBOLS, keep_all_bounds: bool = False):
        if method not in METHODS:
            raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
        if max_spec_chunk < 1 or max_error_symbols < 0:
            raise ValueError(f"need max_spec_chunk >= 1 and max_error_symbols >= 0, got {max_spec_chunk}, {max_error_symbols}")
        self.graph, self.ball, self.method, self.max_spec_chunk = graph, ball, method, max_spec_chunk
        self.max_error_symbols = max_error_symbols
        self.released = set() if keep_all_bounds else self._releasable()
        if graph.needs_clean_pass:
            graph.forward(ball.x)
        with torch.no_grad() if method == "crown-symbolic" else contextlib.nullcontext():
            self.bounds = self._intervals()

    # --- forward: intervals ---------------------------------------------------------------------------

    def _releasable(self) -> set[int]:
        """The nodes whose interval no step reads after their consumers' interval rules have run."""
        graph = self.graph
        output = graph.output
        kept = {0, output, *graph.nodes[output].inputs}
        if self.method != "ibp":
            kept.update(i for node in graph.nodes[1:] if node.op.needs_input_bounds for i in node.inputs)
        return set(range(len(graph.nodes))) - kept

    def _intervals(self) -> list[nodes.Bound]:
        if self.method != "crown-symbolic":
            return self._walk(self.ball)
        # One example at a time: the symbolic pass's coefficients are n_in + E "images" per example.
        self.unassigned_error_symbols = 0  # the most undecided neurons of one example that got no error symbol
        walks = [self._walk(self.ball.select(b)) for b in range(self.ball.x.shape[0])]
        if self.unassigned_error_symbols:
            warnings.warn(f"crown-symbolic ran out of its {self.max_error_symbols} error symbols: the undecided neurons "
                          "past them are bounded by intervals, which grow like IBP downstream; raise max_error_symbols "
                          "(dsrna search --error-symbols) or lower eps")
        batch = self.ball.x.shape[0]
        return [_stand_in(walks[0][i], batch) if i in self.released else
                (torch.cat([w[i][0] for w in walks]), torch.cat([w[i][1] for w in walks])) for i in range(len(walks[0]))]

    def _walk(self, ball: Ball) -> list[nodes.Bound]:
        """Every node's bounds over ``ball``, in topological order (node 0: the input's box)."""
        graph = self.graph
        # Nodes whose interval feeds a relaxation, with those relaxations: full CROWN tightens them.
        relaxed: dict[int, list[nodes.BoundOp]] = {}
        for node in graph.nodes[1:]:
            if node.op.needs_input_bounds:
                for i in node.inputs:
                    relaxed.setdefault(i, []).append(node.op)
        self.bounds = [ball.box()]  # in progress: full CROWN's backward passes read the bounds so far
        users: dict[int, list[int]] = {}  # node -> its consumers, in topological order
        for index, node in enumerate(graph.nodes):
            for i in node.inputs:
                users.setdefault(i, []).append(index)
        last_use = {i: u[-1] for i, u in users.items()}
        symbolic = self.method == "crown-symbolic"
        if symbolic:
            coef, centre = ball.symbols()
            inputs = coef.shape[1]
            errors = nodes.ErrorSymbols(inputs, self.max_error_symbols)
            syms = [nodes.Symbolic(coef, centre, None)]
            # A node whose only consumer is a weighted sum (a mixed op's candidate) is added into that
            # sum as soon as it exists and freed: a DARTS node sums up to 35 candidates, which would
            # otherwise all be held at once (the pass's peak memory).
            folded = {i: (u[0], graph.nodes[u[0]].inputs.index(i)) for i, u in users.items()
                      if len(u) == 1 and isinstance(graph.nodes[u[0]].op, nodes.WeightedSum)}
            sums: dict[int, nodes.Symbolic] = {}  # weighted sum -> its folded terms so far
        for index, node in enumerate(graph.nodes[1:], start=1):
            bound = node.op.interval(*(self.bounds[i] for i in node.inputs))
            if self.method == "crown" and index in relaxed:
                bound = self._tighten(index, bound, relaxed[index])
            if symbolic:
                if isinstance(node.op, nodes.WeightedSum):
                    sym = sums.pop(index, None)
                    for k, i in enumerate(node.inputs):
                        if i not in folded:
                            sym = _accumulate(sym, syms[i], node.op.weights[k])
                else:
                    ins = [syms[i] for i in node.inputs]
                    width = max(s.coef.shape[1] for s in ins)  # the terms of a sum depend on different symbols
                    sym = node.op.symbolic([_widen(s, width) for s in ins], [self.bounds[i] for i in node.inputs], errors)
                if index in relaxed:  # the only bounds the relaxations and the final CROWN pass read
                    deviation = _deviation(sym.coef[:, :inputs], ball.symbol_norm) + _deviation(sym.coef[:, inputs:], 1)
                    if sym.radius is not None:
                        deviation = deviation + sym.radius
                    bound = _intersect(bound, (sym.centre - deviation, sym.centre + deviation))
                if index in folded:
                    user, k = folded[index]
                    sums[user] = _accumulate(sums.get(user), sym, graph.nodes[user].op.weights[k])
                syms.append(sym if index in last_use and index not in folded else None)
                for i in node.inputs:
                    if last_use[i] == index:
                        syms[i] = None  # free the coefficients, the pass's bulk, after their last consumer
            self.bounds.append(bound)
            for i in node.inputs:
                if last_use[i] == index and i in self.released:
                    self.bounds[i] = _stand_in(self.bounds[i])
        if symbolic:
            self.unassigned_error_symbols = max(self.unassigned_error_symbols, errors.unassigned)
        return self.bounds

    def _tighten(self, index: int, bound: nodes.Bound, relaxations: list[nodes.BoundOp]) -> nodes.Bound:
        """CROWN bounds for the neurons of node ``index`` whose interval one of ``relaxations`` reads
        (:meth:`~dsrna.bounds.nodes.BoundOp.undecided`): undecided ReLU inputs, every input of an
        undecided max-pool window."""
        lower, upper = bound
        B = lower.shape[0]
        flat_lower, flat_upper = lower.flatten(1), upper.flatten(1)
        N = flat_lower.shape[1]
        needed = torch.zeros_like(lower, dtype=torch.bool)
        for op in relaxations:
            needed |= op.undecided(bound).detach()
        needed = needed.flatten(1)
        count = int(needed.sum(1).max())
        if count == 0:
            return bound
        # Needed neurons first; an example with fewer fills its slots with others, whose CROWN bounds
        # are not written back: each example's bounds must not depend on the rest of the batch.
        order = torch.argsort(needed.to(torch.int8), dim=1, descending=True, stable=True)[:, :count]
        for start in range(0, count, self.max_spec_chunk):
            idx = order[:, start:start + self.max_spec_chunk]  # [B, S]
            S = idx.shape[1]
            spec = lower.new_zeros(B, S, N).scatter(2, idx.unsqueeze(2), 1.0)
            both = self.backward(index, torch.cat([spec, -spec], dim=1).reshape(B, 2 * S, *lower.shape[1:]))
            old = (flat_lower.gather(1, idx), flat_upper.gather(1, idx))
            new = _intersect(old, (both[:, :S], -both[:, S:]))
            write = needed.gather(1, idx)
            flat_lower = flat_lower.scatter(1, idx, torch.where(write, new[0], old[0]))
            flat_upper = flat_upper.scatter(1, idx, torch.where(write, new[1], old[1]))
        return flat_lower.reshape(lower.shape), flat_upper.reshape(upper.shape)

    # --- backward: linear bounds ----------------------------------------------------------------------

    def backward(self, start: int, A: torch.Tensor) -> torch.Tensor:
        """Lower bounds ``[B, S]`` of ``sum A[:, s] * node_start(x')`` over the input set, by CROWN
        from node ``start`` back to the input (ReLU/max-pool relaxations from ``self.bounds``)."""
        # Per node, the coefficients its consumers sent: full tensors, or channel slices
        # ``(part, start)`` (a stacked node feeds many slices: summing them padded to full width
        # would cost the number of slices times the node's size).
        sent: dict[int, list] = {start: [A]}
        bias = A.new_zeros(A.shape[:2])
        for index in range(start, 0, -1):
            if index not in sent:
                continue
            A = self._gather(sent.pop(index), index)
            node = self.graph.nodes[index]
            A_inputs, b = node.op.backward(A, [self.bounds[i] for i in node.inputs])
            if b is not None:
                bias = bias + b
            for i, A_i in zip(node.inputs, A_inputs):
                if A_i is not None:
                    sent.setdefault(i, []).append(A_i)
        return self.ball.concretize(self._gather(sent[0], 0), bias)

    def _gather(self, parts: list, index: int) -> torch.Tensor:
        """The sum of the coefficients sent to node ``index``."""
        full = [p for p in parts if isinstance(p, torch.Tensor)]
        slices = [p for p in parts if not isinstance(p, torch.Tensor)]
        total = None
        for p in full:
            total = p if total is None else total + p
        if not slices:
            return total
        slices.sort(key=lambda part: part[1])
        ends = [start + part.shape[2] for part, start in slices]
        if total is None and slices[0][1] == 0 and ends[-1] == self.bounds[index][0].shape[1] \
                and all(end == start for end, (_, start) in zip(ends, slices[1:])):
            return torch.cat([part for part, _ in slices], dim=2)  # the slices tile the node
        if total is None:
            B, S = slices[0][0].shape[:2]
            total = slices[0][0].new_zeros(B, S, *self.bounds[index][0].shape[1:])
        elif len(full) == 1:
            total = total.clone()  # never write into a tensor a node sent
        for part, start in slices:
            total[:, :, start:start + part.shape[2]] += part
        return total

    def lower_bound(self, spec: torch.Tensor) -> torch.Tensor:
        """Lower bounds ``[B, S]`` of ``spec @ logits`` (``spec`` ``[B, S, K]``) by this method."""
        output = self.graph.output
        if self.method != "ibp":
            return self.backward(output, spec)
        node = self.graph.nodes[output]
        if isinstance(node.op, nodes.Linear):
            # Fold the specification into the last layer, then bound it with its input interval.
            (A,), b = node.op.backward(spec, [self.bounds[node.inputs[0]]])
            lower, upper = self.bounds[node.inputs[0]]
        else:
            A, b = spec, None
            lower, upper = self.bounds[output]
        value = (A.clamp(min=0) * lower.unsqueeze(1) + A.clamp(max=0) * upper.unsqueeze(1)).flatten(2).sum(-1)
        return value if b is None else value + b
