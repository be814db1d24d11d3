"""Search and train steps replayed from CUDA graphs (dsrna.search.cuda_graph, ``--cuda-graph``)
against the same steps run eagerly. The replay tests need a GPU (benchmarks/gpu_check.sh runs them);
the errors are checked everywhere."""

import copy
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from dsrna import SearchNetwork
from dsrna.errors import DsrnaError
from dsrna.evaluation.train import TrainConfig, train
from dsrna.robustness import RobustnessConfig
from dsrna.search import GraphedSearcher, SearchConfig, SearchData, Searcher, run_search

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


# (order, robustness, backend, amp) of the replay tests
REPLAY_CASES = [(1, "none", "native", "none"), (2, "none", "native", "none"), (1, "jacobian", "native", "none"),
                (1, "none", "reference", "none"), (1, "none", "auto", "bf16")]


def search_config(order=1, robustness="none", amp="none") -> SearchConfig:
    # The exact Jacobian estimator: no random rows, which eager and replayed steps would draw at
    # different offsets of the generator.
    estimator = {"estimator": "exact"} if robustness == "jacobian" else {}
    return SearchConfig(layers=3, init_channels=4, epochs=4, batch_size=8, order=order, amp=amp,
                        robustness=RobustnessConfig(kind=robustness, dataset="mnist-mini", **estimator))


def train_config(tmp_path, graphed: bool, device: str) -> TrainConfig:
    # Drop path off: a replay draws its random masks at other offsets of the generator.
    return TrainConfig(out=str(tmp_path / f"run-{graphed}"), cuda_graph=graphed, device=device, dataset="mnist-mini",
                       layers=3, init_channels=4, batch_size=16, epochs=2, max_steps_per_epoch=5, eval_limit=32,
                       progress=False, report=False, drop_path_prob=0.0)


def test_the_gpu_tests_settings_are_valid_here(tmp_path):
    """The GPU-only tests below run only on the GPU machine: their settings are checked on every
    machine, so that a tightened check cannot break them unseen (it did once)."""
    for order, robustness, backend, amp in REPLAY_CASES:
        search_config(order, robustness, amp)
    for graphed in (False, True):
        train_config(tmp_path, graphed, "cuda").resolved()


def searcher_pair(order=1, robustness="none", backend="native", amp="none"):
    """Two searchers on identical copies of one small super-network on the GPU: (eager, graphed)."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, backend=backend).cuda()
    config = search_config(order, robustness, amp)
    eager = Searcher(net, config)
    graphed = Searcher(copy.deepcopy(net), config)
    return eager, graphed, GraphedSearcher(graphed, warmup=1)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(t.cuda() for t in (torch.rand(8, 1, 12, 12, generator=g), torch.randint(0, 3, (8,), generator=g)))
            for _ in range(n)]


def assert_same_state(a, b, tol):
    for (name, p), q in zip(a.net.named_parameters(), b.net.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")
    for (name, p), q in zip(a.net.named_buffers(), b.net.buffers()):
        torch.testing.assert_close(p.float(), q.float(), **tol, msg=lambda m: f"{name}: {m}")


@cuda_only
@pytest.mark.parametrize("order, robustness, backend, amp", REPLAY_CASES)
def test_replayed_steps_match_eager_steps(order, robustness, backend, amp):
    """Three steps per epoch over two epochs (a new learning rate: a new capture), then weight steps
    alone; the same parameters, batch-norm statistics, optimiser states and metrics as eagerly."""
    eager, graphed, replay = searcher_pair(order, robustness, backend, amp)
    train, val = batches(6, seed=1), batches(6, seed=2)
    tol = dict(rtol=1e-4, atol=1e-5) if amp == "none" else dict(rtol=2e-2, atol=2e-3)
    for epoch in range(2):
        eager.set_epoch(epoch)
        graphed.set_epoch(epoch)
        for i in range(3):
            m_eager = eager.step(train[3 * epoch + i], val[3 * epoch + i])
            m_graph = replay.step(train[3 * epoch + i], val[3 * epoch + i])
            for key in m_eager:
                torch.testing.assert_close(m_graph[key].float(), m_eager[key].float(), **tol, msg=lambda m: f"{key}: {m}")
        assert_same_state(eager, graphed, tol)
    assert len(replay.graphs._graphs) == 1 and replay.graphs.failed is None  # the first epoch's graph was dropped
    for i in range(3):
        eager.weight_step(train[i])
        replay.weight_step(train[i])
    assert_same_state(eager, graphed, tol)
    a, b = eager.a_optimizer.state_dict()["state"], graphed.a_optimizer.state_dict()["state"]
    for k in a:
        torch.testing.assert_close(b[k]["exp_avg"], a[k]["exp_avg"], **tol)


@cuda_only
def test_metrics_are_fresh_tensors_not_the_graphs_outputs():
    _, _, replay = searcher_pair()
    train, val = batches(4, seed=1), batches(4, seed=2)
    seen = [replay.step(t, v)["val_loss"] for t, v in zip(train, val)]
    assert seen[2] is not seen[3] and seen[2].data_ptr() != seen[3].data_ptr()
    assert not torch.equal(seen[2], seen[3])  # the second replay did not overwrite the first one's


@cuda_only
def test_a_step_that_synchronises_with_the_host_warns_once_and_runs_eagerly(monkeypatch):
    eager, graphed, replay = searcher_pair()
    real_step = Searcher.weight_step

    def syncing(self, batch):
        metrics = real_step(self, batch)
        metrics["train_loss"].item()  # not allowed while a graph is being captured
        return metrics

    monkeypatch.setattr(Searcher, "weight_step", syncing)
    train = batches(3, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in train:
            eager.weight_step(batch)
            replay.weight_step(batch)
    messages = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert len(messages) == 1 and "running eagerly" in messages[0] and replay.graphs.failed
    assert_same_state(eager, graphed, dict(rtol=1e-4, atol=1e-5))


@cuda_only
def test_search_run_with_cuda_graph_matches_the_eager_run(tmp_path):
    """`dsrna search --cuda-graph` end to end (two epochs, so a re-capture): the same losses and
    architecture weights as the eager run, up to the order of floating-point sums."""
    g = torch.Generator().manual_seed(0)
    half = TensorDataset(torch.rand(48, 1, 10, 10, generator=g), torch.randint(0, 3, (48,), generator=g))
    data = SearchData(half, half, num_classes=3, in_channels=1, mean=(0.5,), std=(0.5,))
    results = []
    for graphed in (False, True):
        config = SearchConfig(layers=3, init_channels=4, epochs=2, batch_size=8, cuda_graph=graphed, progress=False,
                              out=str(tmp_path / f"run-{graphed}"))
        results.append(run_search(config, data))
    eager, replayed = (r.history for r in results)
    assert len(eager) == len(replayed) == 2
    for a, b in zip(eager, replayed):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        for kind in ("normal", "reduce"):
            torch.testing.assert_close(torch.tensor(b["alphas"][kind]), torch.tensor(a["alphas"][kind]), rtol=0, atol=1e-5)


@cuda_only
@pytest.mark.parametrize("device", ["cuda", pytest.param("cuda:1", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs a second CUDA device"))])
def test_cuda_graph_training_matches_eager_training(tmp_path, device):
    """`dsrna train --cuda-graph`: the same losses and weights as eager training (two epochs: a new
    learning rate and drop-path rate, so a second capture), up to the order of floating-point sums.
    On cuda:1 while cuda:0 is current, the capture must follow the model (it captured nothing)."""
    results = []
    for graphed in (False, True):
        results.append(train(train_config(tmp_path, graphed, device)))
    logs = [[json.loads(line) for line in (r.out / "log.jsonl").read_text().splitlines()] for r in results]
    for a, b in zip(*logs):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    weights = [torch.load(r.model_path, weights_only=True)["state_dict"] for r in results]
    for name, value in weights[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(weights[1][name], value, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_needs_a_cuda_device():
    searcher = Searcher(SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1), SearchConfig(layers=3, init_channels=4))
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedSearcher(searcher)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the search runs on the GPU here")
def test_search_with_cuda_graph_on_a_cpu_is_a_one_line_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    half = TensorDataset(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
    data = SearchData(half, half, num_classes=3, in_channels=1, mean=(0.5,), std=(0.5,))
    config = SearchConfig(layers=3, init_channels=4, epochs=1, batch_size=4, cuda_graph=True, progress=False,
                          out=str(tmp_path / "run"))
    with pytest.raises(DsrnaError, match=r"^--cuda-graph: CUDA graphs need the model on a CUDA device") as info:
        run_search(config, data)
    assert "\n" not in str(info.value)


class FakeGraph:
    """Stands in for CudaGraph on a CPU: 'capture' records the call, a replay calls ``fn`` on the
    captured inputs after copying the new ones in (the data flow of a real replay)."""

    log: list = []
    fail = False  # a capture raises, as one of a step that synchronises with the host does

    def __init__(self, fn, inputs=()):
        self.fn, self.inputs = fn, list(inputs)
        FakeGraph.log.append("capture")
        if FakeGraph.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    def replay(self, *inputs):
        for captured, new in zip(self.inputs, inputs):
            captured.copy_(new)
        FakeGraph.log.append("replay")
        outputs = self.fn(*self.inputs)
        if not hasattr(self, "outputs"):
            self.outputs = outputs
        for name, value in outputs.items():  # a real replay overwrites the captured outputs in place
            self.outputs[name].copy_(value)
        return self.outputs


class FakeSearcher:
    """Records the steps it runs; ``epoch`` is set by the test."""

    def __init__(self, robustness=RobustnessConfig()):
        # what GraphedSearcher reads of the network: the device of alpha, and the parameters
        self.net = SimpleNamespace(alphas_normal=SimpleNamespace(device=torch.device("cuda")), parameters=lambda: [])
        self.config = SimpleNamespace(robustness=robustness)
        self.epoch, self.calls, self.arch_active = 0, [], True

    def step(self, train, val):
        self.calls.append(("step", self.epoch))
        return {"loss": train[0].sum() + val[0].sum()}

    def arch_step(self, val, train):
        self.calls.append(("arch_step", self.epoch))
        return {"val_loss": val[0].sum()}

    def weight_step(self, train):
        self.calls.append(("weight_step", self.epoch))
        return {"loss": train[0].sum()}


def test_the_capture_schedule(monkeypatch):
    """Without a GPU, with the graph faked: ``warmup`` eager steps per graph, then one capture and
    replays; a new epoch or batch shape captures anew; metrics are fresh tensors; a failed capture
    warns once and runs eagerly from then on."""
    import dsrna.search.cuda_graph as cuda_graph

    monkeypatch.setattr(cuda_graph, "CudaGraph", FakeGraph)
    monkeypatch.setattr(cuda_graph, "run_on_side_stream", lambda fn, *args: FakeGraph.log.append("eager") or fn(*args))
    monkeypatch.setattr(FakeGraph, "log", [])
    searcher = FakeSearcher()
    replay = GraphedSearcher(searcher, warmup=2)
    batch = lambda value, n=4: (torch.full((n,), float(value)), torch.zeros(n, dtype=torch.long))
    seen = [replay.step(batch(i), batch(10 * i))["loss"] for i in range(5)]
    assert FakeGraph.log == ["eager", "eager", "capture", "replay", "replay", "replay"]
    assert [t.item() for t in seen] == [44.0 * i for i in range(5)]  # each step saw its own batch
    assert seen[3] is not replay.graphs._graphs[next(iter(replay.graphs._graphs))].outputs["loss"]  # a fresh tensor

    FakeGraph.log = []
    replay.weight_step(batch(1))
    replay.step(batch(1, n=6), batch(1, n=6))  # another shape: its own graph after its own warm-up
    searcher.epoch = 1
    replay.step(batch(1), batch(1))
    assert FakeGraph.log == ["eager", "eager", "eager"] and len(replay.graphs._graphs) == 0

    replay.step(batch(2), batch(2))  # the second eager step of epoch 1
    monkeypatch.setattr(FakeGraph, "fail", True)
    with pytest.warns(RuntimeWarning, match=r"could not be captured as a CUDA graph \(operation not permitted .*\); running eagerly$"):
        out = replay.step(batch(2), batch(2))
    assert replay.graphs.failed == "operation not permitted when stream is capturing" and out["loss"].item() == 16.0
    FakeGraph.log = []
    replay.step(batch(3), batch(3))
    assert FakeGraph.log == [] and searcher.calls[-1] == ("step", 1)


def test_crown_symbolic_architecture_steps_run_eagerly_and_weight_steps_replay(monkeypatch):
    """R_CB by crown-symbolic has data-dependent shapes: its architecture step is never captured (a
    failed capture would make every later step eager); the weight step still is. Other R_CB methods
    and R_Jac are captured whole."""
    import dsrna.search.cuda_graph as cuda_graph

    monkeypatch.setattr(cuda_graph, "CudaGraph", FakeGraph)
    monkeypatch.setattr(cuda_graph, "run_on_side_stream", lambda fn, *args: FakeGraph.log.append("eager") or fn(*args))
    monkeypatch.setattr(FakeGraph, "log", [])
    searcher = FakeSearcher(RobustnessConfig(kind="cb", dataset="cifar10"))  # its default method: crown-symbolic
    replay = GraphedSearcher(searcher, warmup=1)
    batch = lambda value: (torch.full((4,), float(value)), torch.zeros(4, dtype=torch.long))
    metrics = [replay.step(batch(i), batch(10 * i)) for i in range(3)]
    assert searcher.calls == [("arch_step", 0), ("weight_step", 0)] * 3
    assert FakeGraph.log == ["eager", "capture", "replay", "replay"] and replay.graphs.failed is None
    assert [m["val_loss"].item() for m in metrics] == [0.0, 40.0, 80.0] and metrics[2]["loss"].item() == 8.0
    searcher.arch_active, searcher.calls = False, []  # architecture frozen (PC-DARTS' first epochs)
    replay.step(batch(1), batch(1))
    assert searcher.calls == [("weight_step", 0)]
    for robustness in (RobustnessConfig(kind="cb", dataset="cifar10", method="crown-ibp"),
                       RobustnessConfig(kind="jacobian")):
        assert not GraphedSearcher(FakeSearcher(robustness)).eager_arch_step
