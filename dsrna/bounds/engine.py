"""IBP, CROWN-IBP and CROWN as walks over one bound graph.

- ``ibp``: intervals forward through every node; a final linear layer is folded into the
  specification (the margin ``f_y - f_t`` is bounded with ``W_y - W_t``, not by subtracting
  logit intervals).
- ``crown-ibp``: intervals forward for every intermediate node, then one CROWN backward pass from
  the output specification (``[B, S, ...]`` coefficient tensors, transposed maps per op).
- ``crown``: as the forward interval walk reaches the input of each ReLU or max pool, the neurons
  still unstable there get CROWN bounds by backward passes from that node, intersected with the
  interval; only those neurons become specifications, in chunks of ``max_spec_chunk``, so memory
  stays O(chunk x layer size) per example and never quadratic in the number of pixels.
"""

from __future__ import annotations

import torch

from dsrna.bounds import nodes
from dsrna.bounds.graph import BoundGraph
from dsrna.bounds.perturbation import Ball

METHODS = ("ibp", "crown-ibp", "crown")
DEFAULT_SPEC_CHUNK = 256


class Propagation:
    """Bounds of one graph over one input set. Intervals are computed once at construction."""

    def __init__(self, graph: BoundGraph, ball: Ball, method: str, max_spec_chunk: int = DEFAULT_SPEC_CHUNK):
        if method not in METHODS:
            raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
        if max_spec_chunk < 1:
            raise ValueError(f"max_spec_chunk must be >= 1, got {max_spec_chunk}")
        self.graph, self.ball, self.method, self.max_spec_chunk = graph, ball, method, max_spec_chunk
        if graph.needs_clean_pass:
            graph.forward(ball.x)
        self.bounds = self._intervals()

    # --- forward: intervals ---------------------------------------------------------------------------

    def _intervals(self) -> list[nodes.Bound]:
        graph = self.graph
        # Nodes whose interval feeds a relaxation: full CROWN tightens them.
        relaxed = {i for node in graph.nodes[1:] if node.op.needs_input_bounds for i in node.inputs}
        self.bounds = [self.ball.box()]
        for index, node in enumerate(graph.nodes[1:], start=1):
            bound = node.op.interval(*(self.bounds[i] for i in node.inputs))
            if self.method == "crown" and index in relaxed:
                bound = self._tighten(index, bound)
            self.bounds.append(bound)
        return self.bounds

    def _tighten(self, index: int, bound: nodes.Bound) -> nodes.Bound:
        """CROWN bounds for the neurons of node ``index`` that the interval leaves unstable (lower < 0 < upper)."""
        lower, upper = bound
        B = lower.shape[0]
        flat_lower, flat_upper = lower.flatten(1), upper.flatten(1)
        N = flat_lower.shape[1]
        unstable = ((flat_lower < 0) & (flat_upper > 0)).detach()
        count = int(unstable.sum(1).max())
        if count == 0:
            return bound
        # Unstable neurons first; the padding slots of examples with fewer are distinct stable neurons,
        # whose CROWN bounds are just as sound, so no mask is needed when writing back.
        order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :count]
        for start in range(0, count, self.max_spec_chunk):
            idx = order[:, start:start + self.max_spec_chunk]  # [B, S]
            S = idx.shape[1]
            spec = lower.new_zeros(B, S, N).scatter(2, idx.unsqueeze(2), 1.0)
            both = self.backward(index, torch.cat([spec, -spec], dim=1).reshape(B, 2 * S, *lower.shape[1:]))
            crown_lower, crown_upper = both[:, :S], -both[:, S:]
            flat_lower = flat_lower.scatter(1, idx, torch.maximum(flat_lower.gather(1, idx), crown_lower))
            flat_upper = flat_upper.scatter(1, idx, torch.minimum(flat_upper.gather(1, idx), crown_upper))
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
