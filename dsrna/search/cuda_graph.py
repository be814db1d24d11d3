"""Whole steps replayed from CUDA graphs: the same kernels, without the host's launch cost.

An eager search or train step on a GPU is launch-bound (thousands of small kernels per step; the
H100 waits for the host most of the time), so recording a step once and replaying it is the largest
single speed-up on a GPU. What a graph fixes at capture time, and how this module keeps it right:

- tensor addresses: the batches are copied into the captured input tensors before each replay;
  the optimisers' states and the parameters stay where they are (Adam is built ``capturable``);
- Python numbers: the learning rate of the epoch, the drop-path rate, whether the architecture step
  and the robustness term are on. A graph serves one epoch; the next epoch captures anew;
- shapes: one graph per batch shape (a last, smaller batch runs eagerly: it never reaches the
  warm-up count).

The first ``warmup`` steps of every graph run eagerly on a side stream (the capture recipe of
``torch.cuda.graphs``: lazy initialisation, optimiser state and autotuning happen outside the
capture); they are real steps, not wasted ones.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import torch

from dsrna import backend
from dsrna.search import distributed


def run_on_side_stream(fn: Callable, *args):
    """``fn(*args)`` on a fresh side stream, ordered after and before the current stream's work."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    return out


class CudaGraph:
    """``fn(*inputs)`` captured once as a CUDA graph. :meth:`replay` copies new tensors into the
    captured inputs, replays and returns the captured outputs, which the next replay overwrites.
    ``fn`` must not synchronise with the host (``.item()``, printing a tensor, data-dependent shapes)."""

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor] = ()):
        self.inputs = list(inputs)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a data-loading thread pinning memory during the capture does not break it.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def replay(self, *inputs: torch.Tensor):
        for captured, new in zip(self.inputs, inputs, strict=True):
            if new is not captured:
                captured.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.outputs


class StepGraphs:
    """Steps replayed from CUDA graphs. :meth:`run` calls ``fn(*inputs)`` (tensors in, a dict of
    tensors out) and keeps one graph per step kind and input shapes for the current ``phase`` (an
    epoch: what a graph fixes as Python numbers, such as the learning rate, holds within it). The
    first ``warmup`` calls of each graph run eagerly on a side stream; outputs come back as fresh
    tensors. A step that cannot be captured (an op that synchronises with the host) warns once, and
    every step runs eagerly from then on."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._phase = None
        self._graphs: dict[tuple, CudaGraph] = {}
        self._eager_runs: dict[tuple, int] = {}
        self.failed: str | None = None  # why capture failed, once it has

    def run(self, kind: str, fn: Callable, inputs: tuple[torch.Tensor, ...], phase,
            parameters: Callable[[], Iterable[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``fn(*inputs)``, replayed where possible; ``parameters()``: the tensors whose gradients a
        failed capture leaves behind (the model's parameters)."""
        if self.failed is not None:
            return fn(*inputs)
        # Side streams and captures belong to the current device: make it the inputs' (cuda:1 ...).
        with backend.device_scope(inputs[0].device):
            return self._run(kind, fn, inputs, phase, parameters)

    def _run(self, kind, fn, inputs, phase, parameters):
        if phase != self._phase:
            self._phase = phase
            self._graphs.clear()  # frees the old graphs' memory pools
            self._eager_runs.clear()
        key = (kind, tuple((t.shape, t.dtype) for t in inputs))
        graph = self._graphs.get(key)
        if graph is None:
            runs = self._eager_runs.get(key, 0)
            if runs < self.warmup:
                self._eager_runs[key] = runs + 1
                return run_on_side_stream(fn, *inputs)
            try:
                graph = self._graphs[key] = CudaGraph(fn, [t.clone() for t in inputs])
            except RuntimeError as exc:
                self.failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                warnings.warn(f"dsrna: the {kind.replace('_', ' ')} could not be captured as a CUDA graph "
                              f"({self.failed}); running eagerly", RuntimeWarning, stacklevel=3)
                self._graphs.clear()
                # The failed capture ran the Python side of the step but none of its kernels: drop
                # the gradients it left behind; parameters and optimiser states are as they were.
                for p in parameters():
                    p.grad = None
                return fn(*inputs)
        return {name: value.clone() for name, value in graph.replay(*inputs).items()}


def check_cuda_graphs(device: torch.device) -> None:
    """Raise ValueError where ``--cuda-graph`` cannot work: off a CUDA device, or under torch.distributed."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
    if distributed.is_distributed():
        raise ValueError("CUDA graphs run in one process; run without torchrun or without --cuda-graph")


class GraphedSearcher:
    """:meth:`Searcher.step` and :meth:`Searcher.weight_step` of ``searcher`` replayed from CUDA
    graphs (``dsrna search --cuda-graph``; :class:`StepGraphs`, one phase per epoch): same calls,
    same results up to the order of floating-point sums, metrics returned as fresh tensors. The
    searcher keeps its schedule (``set_epoch``) and its checkpoints. One process only.
    """

    def __init__(self, searcher, warmup: int = 2):
        check_cuda_graphs(searcher.net.alphas_normal.device)
        self.searcher, self.graphs = searcher, StepGraphs(warmup)
        # R_CB by crown-symbolic gives each undecided neuron an error symbol of its own: its tensors'
        # shapes depend on the data, which a graph cannot replay. Its architecture step runs eagerly
        # and only the weight step is replayed (instead of a failed capture making every step eager).
        robustness = searcher.config.robustness
        self.eager_arch_step = robustness.uses_certified and robustness.resolved_method() == "crown-symbolic"

    def step(self, train_batch, val_batch) -> dict[str, torch.Tensor]:
        if self.eager_arch_step:
            metrics = self.searcher.arch_step(val_batch, train_batch) if self.searcher.arch_active else {}
            metrics.update(self.weight_step(train_batch))
            return metrics
        return self.graphs.run("search_step", lambda xt, yt, xv, yv: self.searcher.step((xt, yt), (xv, yv)),
                               (*train_batch, *val_batch), self.searcher.epoch, self.searcher.net.parameters)

    def weight_step(self, train_batch) -> dict[str, torch.Tensor]:
        return self.graphs.run("weight_step", lambda x, y: self.searcher.weight_step((x, y)), tuple(train_batch),
                               self.searcher.epoch, self.searcher.net.parameters)
