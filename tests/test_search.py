"""The bilevel search engine: steps, the second-order gradient, the robustness hook, runs and resume."""

import copy
import json
import math
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from conftest import refuse_new_files

import dsrna.robustness
from dsrna import Genotype, SearchNetwork
from dsrna.cli import main
from dsrna.errors import CheckpointError, DivergenceError, DsrnaError
from dsrna.robustness import RobustnessConfig
from dsrna.search import SearchConfig, SearchData, Searcher, finite_difference_hvp, learning_rate, run_search
from dsrna.space import capture_batch_stats


def tiny_net(dtype=torch.float32, **kwargs):
    return SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1, **kwargs).to(dtype)


def batch(n=4, size=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def config(**kwargs) -> SearchConfig:
    base = dict(layers=3, init_channels=4, epochs=2, batch_size=4, log_every=1, progress=False)
    base.update(kwargs)
    return SearchConfig(**base)


# The super-network is piecewise smooth (ReLU, max pool): a central difference is exact to O(eps^2)
# only while no unit changes state between w - eps v and w + eps v. On this tiny net (BN over a few
# values) DARTS' radius 0.01 already crosses such kinks, so the formula is checked at radius 1e-6 (float64 keeps the rounding error near 1e-8).
RADIUS = 1e-6


def test_finite_difference_hvp_matches_double_backward():
    net = tiny_net(torch.float64)
    x, y = batch(dtype=torch.float64)
    weights = net.weight_parameters()
    v = [torch.randn_like(w) for w in weights]
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), weights, create_graph=True)
    exact = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, v)), net.arch_parameters())
    approx = finite_difference_hvp(net, [w.detach() for w in weights], v, x, y, radius=RADIUS)
    for a, e in zip(approx, exact):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())
    # eps = radius / ||v||: the product is linear in v
    scaled = finite_difference_hvp(net, [w.detach() for w in weights], [3.0 * d for d in v], x, y, radius=RADIUS)
    torch.testing.assert_close(scaled[0], 3.0 * approx[0])
    # the net's own weights are untouched
    assert all(torch.equal(w, w0) for w, w0 in zip(net.weight_parameters(), weights))


def exact_unrolled_gradient(searcher, train, val):
    """d/d alpha of L_val(w - eta * (momentum * buffer + grad_w L_train(w, alpha) + wd * w), alpha) by
    autograd, at the searcher's current learning rate eta."""
    net, cfg = searcher.net, searcher.config
    arch, weights = net.arch_parameters(), net.weight_parameters()
    buffers = [searcher.w_optimizer.state[w]["momentum_buffer"] for w in weights]
    g_train = torch.autograd.grad(F.cross_entropy(net(train[0]), train[1]), weights, create_graph=True)
    names = [n for n, _ in net.named_parameters() if "alphas" not in n]
    unrolled = {name: w - searcher.lr * (cfg.momentum * m + g + cfg.weight_decay * w)
                for name, w, g, m in zip(names, weights, g_train, buffers)}
    val_loss = F.cross_entropy(torch.func.functional_call(net, unrolled, (val[0],)), val[1])
    return torch.autograd.grad(val_loss, arch)


def test_second_order_gradient_matches_exact_unrolled_gradient():
    net = tiny_net(torch.float64)
    # a weight decay and a momentum buffer large enough for the tolerance to see both in the unrolled
    # step; four epochs with a floor of 0, so that a later epoch's rate differs from the first's
    cfg = config(order=2, unrolled_radius=RADIUS, weight_decay=0.1, epochs=4, lr_min=0.0)
    searcher = Searcher(net, cfg)
    searcher.weight_step(batch(dtype=torch.float64, seed=3))  # fills SGD's momentum buffers
    train, val = batch(dtype=torch.float64, seed=1), batch(dtype=torch.float64, seed=2)
    grads, _ = searcher.arch_gradient(val, train)
    exact = exact_unrolled_gradient(searcher, train, val)
    for a, e in zip(grads, exact):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3 * e.abs().max().item())
    # the first-order gradient differs: the test can tell the two apart
    first = Searcher(tiny_net(torch.float64), config(order=1))
    first.net.load_state_dict(net.state_dict())
    g1, _ = first.arch_gradient(val)
    assert not torch.allclose(g1[0], exact[0], rtol=1e-3)

    # Not only the first call: after a step (the unrolled copy of the net exists), with the
    # architecture moved away from the copy's and a later epoch's learning rate.
    searcher.step(batch(dtype=torch.float64, seed=4), batch(dtype=torch.float64, seed=5))
    with torch.no_grad():
        net.alphas_normal.add_(0.5 * torch.randn_like(net.alphas_normal))
    searcher.set_epoch(2)
    assert searcher.lr != cfg.lr
    grads, _ = searcher.arch_gradient(val, train)
    for a, e in zip(grads, exact_unrolled_gradient(searcher, train, val)):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3 * e.abs().max().item())


def test_second_order_copy_normalises_with_the_nets_running_statistics():
    """The unrolled copy is built once; an eval-mode step must still normalise with the net's running
    statistics of the moment, which weight steps moved after the copy was made."""
    net = tiny_net(torch.float64)
    searcher = Searcher(net, config(order=2, unrolled_radius=RADIUS, weight_decay=0.1))
    searcher.step(batch(dtype=torch.float64, seed=3), batch(dtype=torch.float64, seed=4))  # builds the copy
    for seed in (5, 6):
        searcher.weight_step(batch(dtype=torch.float64, seed=seed))
    net.eval()
    train, val = batch(dtype=torch.float64, seed=1), batch(dtype=torch.float64, seed=2)
    grads, _ = searcher.arch_gradient(val, train)
    for a, e in zip(grads, exact_unrolled_gradient(searcher, train, val)):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3 * e.abs().max().item())


def test_the_inner_robustness_term_enters_the_weight_step():
    """``inner_gamma``: the weights minimise L_train - inner_gamma * R (one plain SGD step checked)."""
    rc = RobustnessConfig(kind="jacobian", gamma=0.1, inner_gamma=0.5, estimator="exact", eps=0.1)
    net = tiny_net(torch.float64)
    searcher = Searcher(net, config(robustness=rc, momentum=0.0, weight_decay=0.0, grad_clip=1e9))
    x, y = batch(dtype=torch.float64, seed=1)
    before = [w.detach().clone() for w in searcher.weights]
    with capture_batch_stats() as stats:
        loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss - 0.5 * dsrna.robustness.robustness_term(net, x, y, rc, stats), searcher.weights)
    metrics = searcher.weight_step((x, y))
    # the logged training loss stays the cross-entropy: R is logged on its own
    torch.testing.assert_close(metrics["train_loss"], loss.detach(), rtol=1e-12, atol=0)
    for w, w0, g in zip(searcher.weights, before, grads):
        torch.testing.assert_close(w.detach(), w0 - searcher.lr * g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_step_updates_architecture_and_weights(order):
    net = tiny_net()
    searcher = Searcher(net, config(order=order))
    before_alpha = [a.detach().clone() for a in net.arch_parameters()]
    before_w = net.classifier.weight.detach().clone()
    metrics = searcher.step(batch(seed=1), batch(seed=2))
    assert set(metrics) == {"train_loss", "train_correct", "train_count", "val_loss", "val_correct", "val_count", "robustness",
                            "robustness_cb", "robustness_jacobian"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    assert all(not torch.equal(a, b) for a, b in zip(net.arch_parameters(), before_alpha))
    assert not torch.equal(net.classifier.weight, before_w)
    assert all(a.grad is None for a in net.arch_parameters())  # no stale architecture gradient
    if order == 2:
        shadow = searcher._shadow
        searcher.step(batch(seed=3), batch(seed=4))
        assert searcher._shadow is shadow  # one unrolled copy for the whole run


@pytest.mark.parametrize("order", [1, 2])
def test_two_layer_network_has_only_reduction_cells_and_still_steps(order):
    """With layers < 3 both cells reduce: the normal alphas get no gradient, and must not break the step."""
    net = SearchNetwork(C=4, num_classes=3, layers=2, in_channels=1)  # built directly: SearchConfig refuses it
    assert all(cell.reduction for cell in net.cells)
    normal, reduce = net.alphas_normal.detach().clone(), net.alphas_reduce.detach().clone()
    searcher = Searcher(net, config(order=order))
    grads, _ = searcher.arch_gradient(batch(seed=2), batch(seed=1))
    assert torch.equal(grads[net.arch_parameters().index(net.alphas_normal)], torch.zeros_like(normal))
    searcher.step(batch(seed=1), batch(seed=2))
    assert not torch.equal(net.alphas_reduce, reduce)
    # only Adam's (coupled) weight decay moves the unused normal alphas: at most one step of arch_lr
    assert torch.isfinite(net.alphas_normal).all()
    assert (net.alphas_normal - normal).abs().max() <= 3e-4 * 1.001


def test_weight_step_clips_and_leaves_architecture_alone():
    net = tiny_net()
    searcher = Searcher(net, config(grad_clip=1e-3, momentum=0.0, weight_decay=0.0))
    alpha = net.alphas_normal.detach().clone()
    before = [w.detach().clone() for w in net.weight_parameters()]
    searcher.weight_step(batch())
    assert torch.equal(net.alphas_normal, alpha) and net.alphas_normal.grad is None
    moved = torch.sqrt(sum(((w - b) ** 2).sum() for w, b in zip(net.weight_parameters(), before)))
    # the clipped gradient has norm 1e-3 (up to the 1e-6 that clip_grad_norm_ adds to the norm)
    assert moved.item() == pytest.approx(searcher.lr * 1e-3, rel=2e-3)


def test_learning_rate_schedule():
    cfg = config(epochs=10, lr=0.1, lr_min=0.0)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 5) == pytest.approx(0.05)
    warm = config(epochs=10, lr=0.5, lr_min=0.0, lr_warmup_epochs=5, lr_reference_batch=1024, batch_size=128)
    assert learning_rate(warm, 0, world_size=8) == pytest.approx(0.5 / 5)
    assert learning_rate(warm, 0, world_size=2) == pytest.approx(0.5 / 4 / 5)
    cosine = 0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 10))
    assert learning_rate(warm, 2, world_size=8) == pytest.approx(cosine * 3 / 5)  # (epoch + 1) / warm-up epochs
    # after the warm-up the plain cosine (epoch 5 of 10: half way)
    assert learning_rate(warm, 5, world_size=8) == pytest.approx(0.25)
    # lr_min scales with the global batch too: the cosine's end at a quarter of the reference batch
    floor = config(epochs=10, lr=0.4, lr_min=0.04, lr_reference_batch=1024, batch_size=128)
    assert learning_rate(floor, 10, world_size=2) == pytest.approx(0.04 / 4)


class _FakeMetric:
    """A differentiable stand-in for ``robustness_terms`` (one R_Jac term) that records how it is called."""

    def __init__(self):
        self.calls = []

    def __call__(self, net, x, y, cfg, bn_stats):
        self.calls.append((net, x.shape[0], len(bn_stats)))
        from dsrna.space import frozen_batch_stats

        with frozen_batch_stats(bn_stats):
            return {"jacobian": -net(x).pow(2).mean()}


@pytest.mark.parametrize("order", [1, 2])
def test_robustness_hook(monkeypatch, order):
    fake = _FakeMetric()
    monkeypatch.setattr(dsrna.robustness, "robustness_terms", fake)
    gamma = 0.5
    cfg = config(order=order, robustness=RobustnessConfig(kind="jacobian", gamma=gamma, robust_batch=2, warmup_epochs=1))
    net = tiny_net()
    searcher = Searcher(net, cfg)
    train, val = batch(seed=1), batch(seed=2)
    searcher.arch_gradient(val, train)
    assert fake.calls == []  # warm-up epoch: no robustness term
    searcher.set_epoch(1)
    grads, metrics = searcher.arch_gradient(val, train)
    (called_net, m, n_stats), = fake.calls
    assert m == 2 and n_stats > 0
    assert (called_net is net) == (order == 1)  # second order: R at the unrolled weights
    assert metrics["robustness"] < 0
    if order == 1:  # the architecture gradient is that of L_val - gamma * R
        from dsrna.space import capture_batch_stats

        with capture_batch_stats() as stats:
            val_loss = F.cross_entropy(net(val[0]), val[1])
        r = fake(net, val[0][:2], val[1][:2], cfg.robustness, stats)["jacobian"]
        expected = torch.autograd.grad(val_loss - gamma * r, net.arch_parameters())
        for a, e in zip(grads, expected):
            torch.testing.assert_close(a, e)
    else:  # R reaches the unrolled gradient: the same step without the term gives another gradient
        plain = Searcher(copy.deepcopy(net), config(order=order))
        plain.set_epoch(1)  # the same learning rate in the unrolled step
        plain, _ = plain.arch_gradient(val, train)
        assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads, plain))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_first_order_architecture_step_saves_nothing_for_the_weights():
    """The weights are constants of the architecture gradient: with them out of autograd, the step
    (here DSRNA-Jacobian's double backward) keeps less, and the gradient is the same."""
    cfg = config(robustness=RobustnessConfig(kind="jacobian", gamma=0.5, robust_batch=2, warmup_epochs=0))
    net = tiny_net(torch.float64)
    searcher = Searcher(net, cfg)
    val = batch(dtype=torch.float64, seed=2)
    grads = []
    lean = _saved_bytes(lambda: grads.append(searcher.arch_gradient(val)[0]))
    assert all(w.requires_grad for w in searcher.weights)

    def with_weights():
        loss = searcher._arch_objective(net, *val)[0]
        grads.append(torch.autograd.grad(loss, searcher.arch))

    assert lean < 0.9 * _saved_bytes(with_weights)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_cifar10_dsrna_cb_defaults_to_crown_symbolic_on_two_images(monkeypatch):
    fake = _FakeMetric()
    monkeypatch.setattr(dsrna.robustness, "robustness_terms", fake)
    cfg = config(dataset="cifar10", robustness=RobustnessConfig(kind="cb"))
    assert cfg.robustness.resolved_method() == "crown-symbolic"
    Searcher(tiny_net(), cfg).arch_gradient(batch(seed=2), batch(seed=1))
    (_, m, _), = fake.calls
    assert m == dsrna.robustness.SYMBOLIC_ROBUST_BATCH < 4  # of the 4 validation images


def test_robustness_none_never_calls_the_metric(monkeypatch):
    def boom(*args):
        raise AssertionError("robustness_terms called with --robustness none")

    monkeypatch.setattr(dsrna.robustness, "robustness_terms", boom)
    searcher = Searcher(tiny_net(), config(order=2))
    searcher.step(batch(seed=1), batch(seed=2))


def test_partial_channels_and_bf16_steps():
    net = tiny_net(partial_channels=2)
    dtypes = []
    net.stem[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    searcher = Searcher(net, config(amp="bf16"))
    metrics = searcher.step(batch(seed=1), batch(seed=2))
    assert dtypes and set(dtypes) == {torch.bfloat16}  # both steps ran under autocast
    assert torch.isfinite(metrics["train_loss"]) and torch.isfinite(metrics["val_loss"])
    assert searcher.net.betas_normal.grad is None and not torch.equal(searcher.net.betas_normal, torch.zeros(14))


# --- full runs ------------------------------------------------------------------------------------


def tiny_data(n_train=16, n_val=12, poison=None) -> SearchData:
    x, y = batch(n_train + n_val, seed=5)
    train = TensorDataset(x[:n_train], y[:n_train]) if poison is None else poison(x[:n_train], y[:n_train])
    return SearchData(train, TensorDataset(x[n_train:], y[n_train:]), num_classes=3, in_channels=1)


def count_search_steps(monkeypatch) -> list:
    """From now on, one entry per ``Searcher.step`` call: a resumed run must not start over (a
    deterministic run started over ends with the same weights and log)."""
    steps, real_step = [], Searcher.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Searcher, "step", counted)
    return steps


def test_resume_continues_exactly(tmp_path, monkeypatch):
    # 3 validation batches per pass and 2 steps per epoch: epoch 2 crosses a validation pass.
    cfg = dict(epochs=2, max_steps_per_epoch=2, deterministic=True, seed=3)
    full = run_search(config(out=str(tmp_path / "full"), **cfg), tiny_data())

    interrupted = []

    def interrupt(epoch, record):
        interrupted.append(record)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(config(out=str(tmp_path / "cut"), **cfg), tiny_data(), on_epoch_end=interrupt)
    # the checkpoint keeps the log: a lost or torn log.jsonl is rewritten whole (checked below)
    (tmp_path / "cut" / "log.jsonl").write_text("{torn line\n")
    steps = count_search_steps(monkeypatch)
    resumed = run_search(config(out=str(tmp_path / "cut"), resume=True, **cfg), tiny_data())

    assert len(steps) == 2  # epoch 2 only: a run started over would pass every comparison below too
    assert resumed.history[0] == interrupted[0]  # epoch 1's record as it was written, time included
    keys = ("train_loss", "val_loss", "train_acc", "val_acc", "genotype", "step")
    assert [{k: r[k] for k in keys} for r in resumed.history] == [{k: r[k] for k in keys} for r in full.history]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the files of every epoch
    out = tmp_path / "cut"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for field in ("train_loss", "val_loss", "train_acc", "val_acc", "robustness", "entropy_normal",
                  "entropy_reduce", "genotype", "images_per_s", "time_s"):
        assert field in records[-1]
    assert records[0]["entropy_normal"] <= math.log(8) + 1e-6
    assert json.loads((out / "genotype.json").read_text()) == records[-1]["genotype"]
    for picture in ("normal.png", "reduce.png", "alphas.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["alphas.png", "checkpoint.pt", "genotype.json", "log.jsonl", "normal.png", "reduce.png"])  # no temp files left

    # a different configuration, a fresh run over an old one, and a corrupt checkpoint are refused
    with pytest.raises(CheckpointError, match="different settings: layers=3 \\(now 4\\)"):
        run_search(config(out=str(out), resume=True, **{**cfg, "epochs": 2}, layers=4), tiny_data())
    with pytest.raises(CheckpointError, match="epochs=2 \\(now 3\\)"):  # another cosine schedule
        run_search(config(out=str(out), resume=True, **{**cfg, "epochs": 3}), tiny_data())
    with pytest.raises(CheckpointError) as error:  # only the differing robustness settings are named
        run_search(config(out=str(out), resume=True, **cfg, robustness=RobustnessConfig(kind="jacobian", gamma=0.5)),
                   tiny_data())
    assert "robustness.kind='none' (now 'jacobian')" in str(error.value)
    assert "robustness.gamma=0.01 (now 0.5)" in str(error.value) and "RobustnessConfig" not in str(error.value)
    with pytest.raises(DsrnaError, match="already holds a search run: pass --resume"):
        run_search(config(out=str(out), **cfg), tiny_data())
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a dsrna search checkpoint \\(not a torch file, or truncated"):
        run_search(config(out=str(out), resume=True, **cfg), tiny_data())
    with monkeypatch.context() as patch:  # what torch.load raises on some heads of a zip file
        patch.setattr(torch, "load", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(22, "Invalid argument")))
        with pytest.raises(CheckpointError, match="is not a dsrna search checkpoint \\(not a torch file, or truncated"):
            run_search(config(out=str(out), resume=True, **cfg), tiny_data())
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_search(config(out=str(tmp_path / "empty"), resume=True, **cfg), tiny_data())
    trained = tmp_path / "trained"  # --resume given the folder of a training run
    trained.mkdir()
    torch.save({"model": {}, "optimizer": {}, "epoch": 1}, trained / "checkpoint.pt")
    torch.save({"state_dict": {}}, trained / "model.pt")
    with pytest.raises(CheckpointError, match=f"cannot resume: {trained} holds a training run, not a search$"):
        run_search(config(out=str(trained), resume=True, **cfg), tiny_data())


class _PoisonAfterFirstEpoch(Dataset):
    """Finite images until ``poisoned`` is set, then NaN: the search must stop at the next sync."""

    def __init__(self, x, y):
        self.x, self.y, self.poisoned = x, y, False

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i] * float("nan") if self.poisoned else self.x[i]), self.y[i]


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = tiny_data(poison=_PoisonAfterFirstEpoch)

    def poison(epoch, record):
        data.train.poisoned = True

    with pytest.raises(DivergenceError, match=r"diverged in epoch 2 \(a loss became nan\); the last good checkpoint"):
        run_search(config(out=str(tmp_path), max_steps_per_epoch=2, epochs=3), data, on_epoch_end=poison)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_arch_start_epoch_freezes_architecture(tmp_path):
    frozen = []

    def record_optimizer_state(epoch, record):
        if epoch == 0:
            frozen.append(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["searcher"]["a_optimizer"]["state"])

    result = run_search(config(out=str(tmp_path), epochs=2, max_steps_per_epoch=2, arch_start_epoch=1), tiny_data(),
                        on_epoch_end=record_optimizer_state)
    assert result.history[0]["val_loss"] is None and result.history[1]["val_loss"] is not None
    assert frozen == [{}]
    # an architecture that would never be updated is refused, not searched in silence
    with pytest.raises(ValueError, match="arch_start_epoch"):
        config(epochs=2, arch_start_epoch=2)


def test_the_weight_optimiser_trains_at_the_scheduled_rate():
    """set_epoch puts the warm-up and cosine rate into SGD itself, not only into searcher.lr."""
    cfg = config(epochs=10, lr=0.5, lr_warmup_epochs=5, lr_reference_batch=16, batch_size=4)
    searcher = Searcher(tiny_net(), cfg)
    for epoch in (0, 3, 7):
        searcher.set_epoch(epoch)
        assert searcher.w_optimizer.param_groups[0]["lr"] == searcher.lr == learning_rate(cfg, epoch)


def test_steps_count_the_correct_predictions_of_their_batches():
    """train_correct / val_correct are the predictions the step's own forward passes got right (the
    logged accuracies are built from them)."""
    net = tiny_net()
    searcher = Searcher(net, config())
    train, val = batch(n=12, seed=3), batch(n=12, seed=4)
    for step, (x, y), key in ((searcher.arch_step, val, "val_correct"), (searcher.weight_step, train, "train_correct")):
        with torch.no_grad():  # train-mode BN on the same batch and parameters: the step's own logits
            right = int((net(x).argmax(1) == y).sum())
        assert 0 < right < 12  # a mix, so that counting the wrong ones, or none, would differ
        assert int(step(*((val, train) if key == "val_correct" else (train,)))[key]) == right


def test_the_architecture_optimiser_takes_its_settings():
    searcher = Searcher(tiny_net(), config(arch_lr=1e-2, arch_betas=(0.3, 0.9), arch_weight_decay=2e-3))
    group = searcher.a_optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-2, (0.3, 0.9), 2e-3)


def test_a_step_before_the_architecture_starts_leaves_it_alone():
    searcher = Searcher(tiny_net(), config(epochs=3, arch_start_epoch=1))
    alphas = [a.detach().clone() for a in searcher.arch]
    metrics = searcher.step(batch(seed=1), batch(seed=2))
    assert "val_loss" not in metrics and all(torch.equal(a, b) for a, b in zip(searcher.arch, alphas))


def test_resume_refuses_another_schedule_or_precision():
    base = config(epochs=10)
    for change in (dict(lr_warmup_epochs=2), dict(lr_reference_batch=256), dict(amp="bf16"), dict(lr_min=0.002)):
        (key, _), = change.items()
        assert [d.split("=")[0] for d in base.differences(config(epochs=10, **change))] == [key]
    # what may change on resume is not named
    assert base.differences(config(epochs=10, num_workers=2, data_root="/x", log_every=5)) == []
    with pytest.raises(ValueError, match="lr_min <= lr"):
        config(lr=0.01, lr_min=0.02)


def test_the_pictures_show_each_cell(tmp_path, monkeypatch):
    import dsrna.plots as plots

    cells, tables = [], []
    monkeypatch.setattr(plots, "plot_cell", lambda genotype, reduction, path, title: cells.append((reduction, path.name)))
    monkeypatch.setattr(plots, "plot_alpha_heatmaps", lambda t, path, title: tables.append(t))
    result = run_search(config(out=str(tmp_path), epochs=1, max_steps_per_epoch=1), tiny_data())
    assert cells == [(False, "normal.png"), (True, "reduce.png")]
    (table,) = tables
    normal, reduce = table["normal: softmax(alpha)"], table["reduce: softmax(alpha)"]
    assert not torch.equal(normal, reduce)
    logged = result.history[0]["alphas"]
    torch.testing.assert_close(normal, torch.tensor(logged["normal"]))
    torch.testing.assert_close(reduce, torch.tensor(logged["reduce"]))


def test_cli_search_on_mnist_mini(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--layers", "3", "--init-channels", "4", "--epochs", "1", "--batch-size", "4",
            "--max-steps-per-epoch", "2", "--out", str(out), "--no-progress", "--order", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    line = next(text for text in printed.splitlines() if text.startswith("genotype: "))
    assert Genotype.from_json(line.removeprefix("genotype: ")) == Genotype.from_json(out / "genotype.json")  # train takes it
    assert (out / "checkpoint.pt").is_file() and (out / "alphas.png").is_file()
    assert main(args) == 2  # refuses to overwrite
    assert "already holds a search" in capsys.readouterr().err


def test_cli_preset_and_flags():
    from dsrna.cli import build_parser
    from dsrna.commands.search import config_from_args

    args = build_parser("search").parse_args(["search", "--preset", "imagenet-pcdarts", "--epochs", "40",
                                              "--robustness", "cb", "--gamma", "0.1", "--robust-batch", "8",
                                              "--cb-dither", "5e-4"])
    cfg = config_from_args(args)
    assert cfg.robustness.cb_dither == 5e-4
    assert (cfg.dataset, cfg.stem, cfg.partial_channels, cfg.amp, cfg.arch_start_epoch) == ("imagenet", "imagenet", 2, "bf16", 35)
    assert cfg.epochs == 40 and cfg.subset_fractions == (0.1, 0.025) and cfg.augment and cfg.num_workers == 4
    assert (cfg.lr, cfg.lr_min, cfg.lr_reference_batch, cfg.lr_warmup_epochs, cfg.arch_lr, cfg.batch_size) == \
        (0.5, 0.0, 1024, 5, 6e-3, 128)  # PC-DARTS' ImageNet schedule
    assert (cfg.robustness.kind, cfg.robustness.gamma, cfg.robustness.robust_batch) == ("cb", 0.1, 8)
    plain = config_from_args(build_parser("search").parse_args(["search"]))
    assert plain.dataset == "mnist-mini" and plain.robustness.kind == "none" and plain.epochs == 50
    assert (plain.stem, plain.augment) == ("cifar", False)
    # ImageNet without the preset: its own stem (224x224 through the CIFAR stem runs every cell at full size)
    imagenet = config_from_args(build_parser("search").parse_args(["search", "--dataset", "imagenet", "--augment"]))
    assert (imagenet.stem, imagenet.augment) == ("imagenet", True)
    # a preset's switch can be turned off too (a run begun before the preset had it resumes)
    off = config_from_args(build_parser("search").parse_args(["search", "--preset", "imagenet-pcdarts", "--no-augment"]))
    assert off.augment is False
    # the protocol on another data set keeps that data set's stem (28-pixel images through a stride-8 stem)
    small = config_from_args(build_parser("search").parse_args(["search", "--preset", "imagenet-pcdarts", "--dataset",
                                                                "mnist-mini"]))
    assert (small.dataset, small.stem, small.partial_channels) == ("mnist-mini", "cifar", 2)


def test_search_halves_take_the_training_augmentation():
    from dsrna.search.loop import load_search_data

    for augment in (False, True):
        data = load_search_data(SearchConfig(dataset="mnist-mini", augment=augment))
        torch.manual_seed(0)
        draws = [data.train[0][0] for _ in range(4)] + [data.val[0][0] for _ in range(4)]
        assert all(torch.equal(d, draws[0]) for d in draws[:4]) != augment
        assert all(torch.equal(d, draws[4]) for d in draws[4:]) != augment


@pytest.mark.parametrize("flags,expected", [
    (["--partial-channels", "0"], "partial_channels must be >= 1"),
    (["--arch-start-epoch", "2"], "arch_start_epoch must be in [0, epochs=2)"),
    (["--robustness", "jacobian", "--warmup-epochs", "2"], "warmup_epochs (2) must be below epochs (2)"),
    (["--robustness", "jacobian", "--robust-batch", "100"], "robust_batch (100) is larger than the validation batch"),
    (["--robust-batch", "2"], "robustness robust_batch has no effect with kind 'none'"),
    (["--gamma", "5", "--eps", "0.3", "--warmup-epochs", "1"], "robustness gamma, eps, warmup_epochs have no effect"),
    (["--robustness", "jacobian", "--method", "ibp"],
     "robustness method has no effect with kind 'jacobian': drop it or choose kind cb or combined"),
    # ImageNet's R_CB runs crown-ibp, which has no error symbols (refused before the data is looked for)
    (["--dataset", "imagenet", "--robustness", "cb", "--error-symbols", "100"],
     "robustness error_symbols has no effect with method 'crown-ibp', the default on imagenet: drop it or choose"),
    (["--robustness", "cb", "--cb-dither", "1"], "R_CB's dither must be a number in [0, 1) (pixel units); got 1.0"),
    (["--robustness", "jacobian", "--cb-dither", "0"],
     "robustness cb_dither has no effect with kind 'jacobian': drop it or choose kind cb or combined"),
    (["--robustness", "combined", "--method", "ibp", "--error-symbols", "100"],
     "robustness error_symbols has no effect with method 'ibp': drop it or choose method crown-symbolic"),
    (["--layers", "2"], "layers must be >= 3, got 2: with fewer, every cell is a reduction cell"),
    (["--robustness", "cb", "--estimator", "exact"],
     "robustness estimator has no effect with kind 'cb': drop it or choose kind jacobian or combined"),
    (["--lr-min", "-1"], "0 <= lr_min <= lr"),
    (["--lr-reference-batch", "0"], "lr_reference_batch must be >= 1"),
    (["--lr-warmup-epochs", "-1"], "lr_warmup_epochs must be >= 0"),
    (["--device", "cuda:7"], "CUDA"),
    (["--arch-lr", "nan"], "arch_lr must be a finite number > 0"),
    # found before the folder is created: no empty run folder is left behind
    (["--dataset", "cifar10", "--data-root", "no-such-folder"], "CIFAR-10 not found"),
    (["--resume"], "cannot resume: no checkpoint at"),
    (["--robustness", "jacobian", "--order", "2", "--inner-gamma", "0.1"],
     "inner_gamma (R in the weight step) works with first-order search only"),
])
def test_cli_search_refuses_settings_it_would_ignore_or_crash_on(tmp_path, capsys, flags, expected):
    argv = ["search", "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and err.count("\n") == 0, err
    assert not (tmp_path / "run").exists()


def test_float64_search_keeps_its_losses_in_float64():
    """Only bf16 logits are raised to float32 for the loss: cast down, a float64 search's gradients
    carried float32 rounding (the second-order one stopped improving at 4e-8)."""
    net = tiny_net(torch.float64)
    val = batch(dtype=torch.float64, seed=2)
    grads, metrics = Searcher(net, config(order=1)).arch_gradient(val)
    assert metrics["val_loss"].dtype == torch.float64
    exact = torch.autograd.grad(F.cross_entropy(net(val[0]), val[1]), net.arch_parameters())
    for g, e in zip(grads, exact):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


def test_the_log_has_no_robustness_value_while_r_warms_up(tmp_path):
    """R is off in its warm-up epochs: None, not the 0 the steps return (0 is R_Jac's best value)."""
    cfg = config(out=str(tmp_path / "run"), epochs=2, robustness=RobustnessConfig(kind="jacobian", eps=0.1,
                                                                                  warmup_epochs=1))
    history = run_search(cfg, tiny_data()).history
    assert history[0]["robustness"] is None and history[1]["robustness"] < 0


def test_a_checkpointed_config_with_settings_of_an_unused_term_still_loads():
    """Runs saved before such settings were refused (--method with jacobian) can be resumed."""
    saved = config(robustness=RobustnessConfig(kind="jacobian")).to_dict()
    saved["robustness"]["method"] = "crown"
    assert SearchConfig.from_dict(saved).robustness.method is None
    # an error-symbol budget with a method other than crown-symbolic
    saved = config(robustness=RobustnessConfig(kind="cb", method="ibp")).to_dict()
    saved["robustness"]["error_symbols"] = 100
    assert SearchConfig.from_dict(saved).robustness.error_symbols == RobustnessConfig.error_symbols
    # ... and with it: kept
    saved["robustness"]["method"] = "crown-symbolic"
    assert SearchConfig.from_dict(saved).robustness.error_symbols == 100


def test_resume_compares_what_r_ran_with_not_its_defaults(tmp_path, monkeypatch):
    """A run that left R_CB's method and eps to the data set is not resumed with other ones after the
    defaults change (a dsrna upgrade): its checkpoint keeps what R ran with, and giving those values
    explicitly resumes it."""
    import dsrna.robustness.certified as certified
    from dsrna.search.checkpoint import load_checkpoint, save_checkpoint

    left_to_defaults = config(robustness=RobustnessConfig(kind="cb"))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, config=left_to_defaults, net=tiny_net(), searcher_state={}, epoch=1, step=2, data_state={},
                    world_size=1, history=[])
    assert load_checkpoint(path, left_to_defaults)["epoch"] == 1
    monkeypatch.setitem(certified._CB_DEFAULTS, ("mnist-mini", "linf"), ("crown-ibp", 0.003))
    with pytest.raises(CheckpointError, match=r"settings: robustness.robust_batch=2 \(now None\), robustness.method="
                                              r"'crown-symbolic' \(now 'crown-ibp'\), robustness.cb_eps=1e-06 \(now 0.003\)$"):
        load_checkpoint(path, left_to_defaults)
    explicit = config(robustness=RobustnessConfig(kind="cb", method="crown-symbolic", eps=1e-6, robust_batch=2))
    assert load_checkpoint(path, explicit)["epoch"] == 1
    with pytest.raises(CheckpointError, match=r"robustness.cb_eps=1e-06 \(now 1e-05\)$"):
        load_checkpoint(path, config(robustness=RobustnessConfig(kind="cb", method="crown-symbolic", eps=1e-5,
                                                                 robust_batch=2)))
    # what is recorded: R_CB's and R_Jac's budgets apart, and nothing without R
    combined = RobustnessConfig(kind="combined", dataset="cifar10", norm="l2")
    assert combined.in_effect() == dict(robust_batch=2, method="crown-symbolic", cb_eps=4.4e-5, jacobian_eps=0.02)
    assert RobustnessConfig(kind="jacobian", eps=0.1).in_effect() == dict(robust_batch=None, jacobian_eps=0.1)
    assert RobustnessConfig().in_effect() == {}


def test_a_run_saved_before_r_cb_dithered_resumes_without_dither():
    saved = config(robustness=RobustnessConfig(kind="cb", cb_dither=0.0)).to_dict()
    del saved["robustness"]["cb_dither"]
    assert SearchConfig.from_dict(saved).robustness.cb_dither == 0.0
    saved = config(robustness=RobustnessConfig(kind="jacobian")).to_dict()  # R_CB's setting does not apply
    del saved["robustness"]["cb_dither"]
    assert SearchConfig.from_dict(saved).robustness.cb_dither == RobustnessConfig.cb_dither


def test_a_parameter_gone_non_finite_stops_the_search_before_its_checkpoint(tmp_path, monkeypatch):
    """An architecture step whose R is finite but whose gradient is not (a vacuous bound's overflow)
    leaves every loss of the epoch finite and NaN alphas behind: the epoch's checkpoint must not keep them."""
    real_step, epochs = Searcher.step, []

    def last_step_poisons_alpha(self, *args, **kwargs):
        metrics = real_step(self, *args, **kwargs)
        epochs.append(self.epoch)
        if epochs.count(1) == 2:  # the second and last step of epoch 2
            with torch.no_grad():
                self.net.alphas_normal[0, 0] = float("nan")
        return metrics

    monkeypatch.setattr(Searcher, "step", last_step_poisons_alpha)
    with pytest.raises(DivergenceError, match=r"diverged in epoch 2 \(a weight or architecture parameter is no longer "
                                              r"finite\); the last good checkpoint .* is kept"):
        run_search(config(out=str(tmp_path), max_steps_per_epoch=2, epochs=3), tiny_data())
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and torch.isfinite(saved["model"]["alphas_normal"]).all()


def test_an_error_symbol_budget_follows_the_data_sets_default_method():
    """R_CB's default method is the searched data set's: crown-symbolic on CIFAR-10 reads the budget,
    whatever data set a RobustnessConfig made on its own was told."""
    robustness = RobustnessConfig(kind="cb", error_symbols=100)
    assert SearchConfig(dataset="cifar10", robustness=robustness).robustness.error_symbols == 100
    with pytest.raises(ValueError, match="'crown-ibp', the default on imagenet"):
        SearchConfig(dataset="imagenet", robustness=robustness)


def test_architecture_optimizer_follows_the_device_on_resume():
    """A GPU run's Adam is capturable (its steps live on the GPU); resumed on a CPU it must not be."""
    searcher = Searcher(tiny_net(), config())
    state = searcher.state_dict()
    state["a_optimizer"]["param_groups"][0]["capturable"] = True  # as a GPU run writes it
    searcher.load_state_dict(state)
    assert not searcher.a_optimizer.param_groups[0]["capturable"]
    searcher.step(batch(seed=1), batch(seed=2))


def test_a_cpu_runs_architecture_optimizer_resumes_on_a_gpu():
    """And back: a CPU run's step counts (Adam not capturable) must move to the GPU, or the first
    architecture step there fails. No GPU here: parameters on the 'meta' device stand in for it."""
    searcher = Searcher(tiny_net(), config())
    searcher.step(batch(seed=1), batch(seed=2))  # Adam has step counts now, on the CPU
    state = searcher.state_dict()
    on_gpu = SimpleNamespace(arch=[SimpleNamespace(is_cuda=True)], set_epoch=lambda epoch: None,
                             w_optimizer=SimpleNamespace(load_state_dict=lambda state: None),
                             a_optimizer=torch.optim.Adam([{"params": [torch.nn.Parameter(p.to("meta")) for p in g["params"]]}
                                                           for g in searcher.a_optimizer.param_groups], capturable=True))
    Searcher.load_state_dict(on_gpu, state)
    assert on_gpu.a_optimizer.param_groups[0]["capturable"]
    for param, entry in on_gpu.a_optimizer.state.items():
        assert entry["step"].device == param.device and entry["step"].dtype == torch.float32


def test_search_config_refuses_a_non_positive_grad_clip():
    for clip in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="grad_clip"):
            config(grad_clip=clip)


def test_search_checks_its_folder_before_any_step(tmp_path, monkeypatch):
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "model.pt").write_bytes(b"kept")
    with pytest.raises(CheckpointError, match="already holds a training run: choose another --out"):
        run_search(config(out=str(tmp_path / "trained"), epochs=1, max_steps_per_epoch=1), tiny_data())

    refuse_new_files(monkeypatch)
    steps = []
    monkeypatch.setattr(Searcher, "step", lambda *args: steps.append(1))
    with pytest.raises(CheckpointError, match="cannot write in .*read-only.*Permission denied"):
        run_search(config(out=str(tmp_path / "read-only"), epochs=1, max_steps_per_epoch=1), tiny_data())
    assert steps == []


def test_atomic_write_gives_the_umask_mode_and_leaves_no_temp_file(tmp_path):
    import os

    from dsrna.search.checkpoint import atomic_write, atomic_write_text

    before = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "public.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(before)
    assert (tmp_path / "public.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600

    def fail(temp):
        Path(temp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "public.txt", fail)
    assert (tmp_path / "public.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.txt", "public.txt"]


def test_rng_state_restores_every_generator():
    """torch's, numpy's and Python's: user transforms and samplers draw from all three."""
    import random

    import numpy as np

    from dsrna.search.checkpoint import rng_state, set_rng_state

    state = rng_state()

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.normal(), [random.random() for _ in range(3)]

    first = draws()
    set_rng_state(state)
    assert draws() == first


def test_an_unreadable_checkpoint_says_why(tmp_path, monkeypatch):
    from dsrna.search.checkpoint import load_torch_file

    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1}, path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(CheckpointError, match=r"checkpoint.pt is not a dsrna checkpoint \(Permission denied\)"):
        load_torch_file(path, "checkpoint")


@pytest.mark.parametrize("world", [1, 3, 4])
def test_resumable_sampler_continues_at_any_position_with_any_world_size(world):
    """A resumed run deals the rest of the interrupted pass exactly: no example twice, none skipped
    but the last partial round (at most world - 1), whatever the number of processes before."""
    from torch.utils.data import DistributedSampler

    from dsrna.search.loop import ResumableSampler

    data = list(range(40))
    samplers = [ResumableSampler(data, world, rank, seed=3) for rank in range(world)]
    for s in samplers:
        s.set_epoch(2)
    fresh = [DistributedSampler(data, world, rank, shuffle=True, seed=3, drop_last=True) for rank in range(world)]
    for s in fresh:
        s.set_epoch(2)
    assert [list(s) for s in samplers] == [list(s) for s in fresh]  # from the start: DistributedSampler's
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3 + 2)).tolist()
    for start in (0, 5, 18, 37, 39, 40):  # consumed counts of a run with another number of processes
        for s in samplers:
            s.start = start
        dealt = [list(s) for s in samplers]
        assert len({len(d) for d in dealt}) == 1 and len(dealt[0]) == len(samplers[0])
        taken = sorted(position for d in dealt for position in map(order.index, d))
        assert taken == list(range(start, start + world * len(dealt[0])))
        assert start + world * len(dealt[0]) > (40 // world) * world - world


def test_searcher_names_what_it_needs():
    with pytest.raises(TypeError, match="Searcher needs a dsrna.SearchNetwork .* got Linear"):
        Searcher(torch.nn.Linear(2, 2), SearchConfig())


def test_logged_robustness_is_the_mean_over_the_epochs_steps(monkeypatch, tmp_path):
    """A combined R logs its sum and, apart, its R_CB and R_Jac terms, each the mean over the epoch's steps."""
    values = iter([(0.1, -1.0), (0.2, -2.0), (0.6, -6.0)])

    def per_step(net, x, y, cfg, bn_stats):  # differentiable in alpha, one value per step whatever the batch
        cb, jacobian = next(values)
        return {"cb": net.alphas_normal.sum() * 0.0 + cb, "jacobian": net.alphas_normal.sum() * 0.0 + jacobian}

    monkeypatch.setattr(dsrna.robustness, "robustness_terms", per_step)
    cfg = config(epochs=1, max_steps_per_epoch=3, out=str(tmp_path / "run"),
                 robustness=RobustnessConfig(kind="combined", gamma=0.1, method="ibp"))
    record = run_search(cfg, tiny_data()).history[-1]
    assert record["robustness"] == pytest.approx(0.3 - 3.0)
    assert (record["robustness_cb"], record["robustness_jacobian"]) == (pytest.approx(0.3), pytest.approx(-3.0))


@pytest.mark.parametrize("kind, r_cb, warns", [("cb", -30.0, True), ("cb", -0.2, False), ("combined", -30.0, True),
                                               ("combined", -0.2, False)])
def test_a_vacuous_certified_bound_is_reported_once(monkeypatch, tmp_path, kind, r_cb, warns):
    """R_CB at -30 on the asinh scale means a margin bound near -5e12: the search says so, once a run;
    a combined R's R_Jac term (here -40) does not count."""
    def terms(net, x, y, cfg, bn_stats):
        zero = net.alphas_normal.sum() * 0.0
        return {"cb": zero + r_cb} | ({"jacobian": zero - 40.0} if kind == "combined" else {})

    monkeypatch.setattr(dsrna.robustness, "robustness_terms", terms)
    cfg = config(epochs=2, max_steps_per_epoch=1, out=str(tmp_path / "run"),
                 robustness=RobustnessConfig(kind=kind, gamma=0.1, method="crown-ibp", eps=0.01))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_search(cfg, tiny_data())
    vacuous = [str(w.message) for w in caught if "vacuous" in str(w.message)]
    if warns:
        (message,) = vacuous
        assert "epoch 1's mean R_CB is -30 on the asinh scale" in message and "crown-ibp at eps 0.01" in message
    else:
        assert vacuous == []


def test_a_nan_robustness_term_stops_the_search(monkeypatch, tmp_path):
    def nan_term(net, x, y, cfg, bn_stats):
        return {"jacobian": net.alphas_normal.sum() * 0.0 + float("nan")}

    monkeypatch.setattr(dsrna.robustness, "robustness_terms", nan_term)
    cfg = config(epochs=1, max_steps_per_epoch=2, out=str(tmp_path / "run"),
                 robustness=RobustnessConfig(kind="jacobian", gamma=0.1))
    with pytest.raises(DivergenceError, match="diverged in epoch 1"):
        run_search(cfg, tiny_data())


def test_each_epoch_sees_the_training_half_in_a_new_order(tmp_path, monkeypatch):
    seen = []
    real_step = Searcher.step

    def recording(self, train_batch, val_batch):
        seen.append((self.epoch, train_batch[0].flatten(1)[:, 0].tolist()))
        return real_step(self, train_batch, val_batch)

    monkeypatch.setattr(Searcher, "step", recording)
    run_search(config(out=str(tmp_path / "run"), epochs=2), tiny_data())
    orders = [[v for epoch, values in seen if epoch == e for v in values] for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) == 16  # every image once per epoch
    assert orders[0] != orders[1]


def test_every_logged_figure_of_an_epoch(tmp_path, monkeypatch):
    """Losses are means over the epoch's images, accuracies correct predictions over images, the rate
    images per second of that epoch alone, and the learning rate the one the epoch trained at."""
    steps, ends = [], []
    real_step = Searcher.step

    def recording(self, train_batch, val_batch):
        metrics = real_step(self, train_batch, val_batch)
        steps.append({k: float(v) for k, v in metrics.items()})
        return metrics

    monkeypatch.setattr(Searcher, "step", recording)
    cfg = config(out=str(tmp_path / "run"), epochs=2)
    history = run_search(cfg, tiny_data(), on_epoch_end=lambda epoch, record: ends.append(time.perf_counter())).history
    assert len(steps) == 8  # 16 training images in batches of 4, every batch the same size; 2 epochs
    for epoch, record in enumerate(history):
        mine = steps[4 * epoch:4 * epoch + 4]  # and 4 validation batches of 4 per epoch
        for key in ("train_loss", "val_loss"):
            assert record[key] == pytest.approx(sum(s[key] for s in mine) / len(mine), rel=1e-6)
        assert record["train_acc"] == pytest.approx(sum(s["train_correct"] for s in mine) / 16)
        assert record["val_acc"] == pytest.approx(sum(s["val_correct"] for s in mine) / 16)
        assert record["images_per_s"] * record["time_s"] == pytest.approx(16)
        assert record["lr"] == pytest.approx(learning_rate(cfg, epoch))
    assert history[1]["lr"] < history[0]["lr"]  # cosine over 2 epochs
    assert history[1]["time_s"] <= ends[1] - ends[0]  # the second epoch's own time, not the run's


def test_resume_restores_the_random_state(tmp_path, monkeypatch):
    """R_Jac's random rows come from torch's generator: an interrupted run resumes with the state the
    uninterrupted one had, so both end with the same weights."""
    cfg = dict(epochs=2, max_steps_per_epoch=2, deterministic=True, seed=3,
               robustness=RobustnessConfig(kind="jacobian", gamma=0.5, eps=0.1))
    run_search(config(out=str(tmp_path / "full"), **cfg), tiny_data())

    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(config(out=str(tmp_path / "cut"), **cfg), tiny_data(), on_epoch_end=interrupt)
    torch.manual_seed(12345)  # what ran in between does not matter
    steps = count_search_steps(monkeypatch)
    run_search(config(out=str(tmp_path / "cut"), resume=True, **cfg), tiny_data())
    assert len(steps) == 2  # epoch 2 only
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_search_leaves_the_callers_determinism_settings_as_they_were(tmp_path):
    """A search picks deterministic kernels or cuDNN's autotuning for itself; what runs after it in
    the process (compare's final training, the next test) keeps its own settings."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark)
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(not deterministic, warn_only=False)
            cudnn.deterministic, cudnn.benchmark = not deterministic, deterministic
            run_search(config(epochs=1, max_steps_per_epoch=1, deterministic=deterministic,
                              out=str(tmp_path / f"run-{deterministic}")), tiny_data())
            assert torch.are_deterministic_algorithms_enabled() is (not deterministic)
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert (cudnn.deterministic, cudnn.benchmark) == (not deterministic, deterministic)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2:]


def test_resume_with_another_batch_in_one_process_is_refused(tmp_path):
    cfg = dict(epochs=2, max_steps_per_epoch=1, out=str(tmp_path / "run"))

    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(config(**cfg), tiny_data(), on_epoch_end=interrupt)
    with pytest.raises(CheckpointError, match="batch_size=4 \\(now 8\\)"):
        run_search(config(**cfg, batch_size=8, resume=True), tiny_data())
    # A file of another kind (or version) at the checkpoint's place is named as such, not half-read.
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "format": "dsrna-search-checkpoint/0"}, path)
    with pytest.raises(CheckpointError, match="is not a dsrna search checkpoint \\(expected format dsrna-search-checkpoint/1\\)"):
        run_search(config(**cfg, resume=True), tiny_data())


def test_the_validation_stream_cycles_through_new_orders():
    from dsrna.data import make_loader
    from dsrna.search.loop import ResumableSampler, ValidationStream

    data = TensorDataset(torch.arange(12).float(), torch.arange(12))
    sampler = ResumableSampler(data, 1, 0, seed=0)
    stream = ValidationStream(make_loader(data, 4, sampler=sampler, drop_last=True), sampler, 1)
    first = torch.cat([next(stream)[1] for _ in range(3)])
    assert stream.state() == {"val_epoch": 0, "val_consumed": 12}
    second = torch.cat([next(stream)[1] for _ in range(3)])
    assert stream.state() == {"val_epoch": 1, "val_consumed": 12}
    assert sorted(second.tolist()) == list(range(12)) and not torch.equal(first, second)


def test_architecture_entropy_is_per_edge_in_nats():
    import math

    from dsrna.search.loop import architecture_entropy

    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1)
    with torch.no_grad():
        net.alphas_normal.zero_()  # uniform over the 8 candidates on every edge
        net.alphas_reduce.zero_()
        net.alphas_reduce[:, 3] = 100.0  # decided: one candidate per edge
    entropy = architecture_entropy(net)
    assert entropy["entropy_normal"] == pytest.approx(math.log(8)) and entropy["entropy_reduce"] == pytest.approx(0, abs=1e-6)



def test_atomic_writes_flush_the_file_then_the_folder(tmp_path, monkeypatch):
    """A crash right after the rename must find the data on disk: fsync(file), rename, fsync(folder)."""
    import os
    import stat

    from dsrna.search import checkpoint

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync",
                        lambda fd: events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))) or fsync(fd))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: events.append(("replace",)) or replace(a, b))
    checkpoint.atomic_write_text(tmp_path / "f.txt", "x")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


def test_a_validation_half_smaller_than_a_batch_is_a_data_error(tmp_path):
    from dsrna.errors import DataError

    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 2, (16,))
    data = SearchData(TensorDataset(x, y), TensorDataset(x[:3], y[:3]), 2, 1)
    with pytest.raises(DataError, match="larger than a half"):
        run_search(config(epochs=1, init_channels=2, out=str(tmp_path / "s"), device="cpu"), data)
