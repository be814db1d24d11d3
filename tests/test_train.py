"""Final training: run-folder contents, model.pt rebuilds the network alone, resume is exact,
divergence keeps the last good checkpoint, bad input is one clear line."""

import json
import re

import pytest
import torch
from conftest import refuse_new_files

from dsrna.errors import CheckpointError, DivergenceError
from dsrna.evaluation.train import TrainConfig, evaluate, load_model, train

TINY = dict(dataset="mnist-mini", layers=3, init_channels=4, batch_size=16, epochs=2, max_steps_per_epoch=2,
            eval_limit=32, progress=False, report=False)


def count_epochs(monkeypatch) -> list:
    """From now on, one entry per trained epoch: a resumed run must not start over (a deterministic
    run started over ends with the same weights, log and learning rates)."""
    import dsrna.evaluation.train as module

    epochs, real_epoch = [], module._train_epoch

    def counted(*args, **kwargs):
        epochs.append(1)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(module, "_train_epoch", counted)
    return epochs


def _interrupt_at_evaluation(monkeypatch, at=2):
    """A KeyboardInterrupt at the ``at``-th end-of-epoch evaluation (after the checkpoint of epoch at-1)."""
    import dsrna.evaluation.train as module

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(module, "evaluate", flaky)


def test_train_writes_a_complete_run_folder(tmp_path):
    result = train(TrainConfig(out=str(tmp_path), **TINY))
    for name in ("checkpoint.pt", "log.jsonl", "model.pt", "metrics.json", "config.json", "genotype.json"):
        assert (tmp_path / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["drop_path_prob"] == pytest.approx(0.1)  # ramped linearly: 0.2 * epoch / epochs
    # the rate each epoch trained at: cosine from 0.025 towards 0 over 2 epochs
    assert [r["lr"] for r in log] == pytest.approx([0.025, 0.0125])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "epoch"} <= set(checkpoint) and checkpoint["epoch"] == 2
    group = checkpoint["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["initial_lr"]) == (0.9, 3e-4, 0.025)  # DARTS' SGD

    # model.pt alone rebuilds the network, in eval mode, with the reported accuracy.
    model, meta = load_model(result.model_path)
    assert not model.training and meta["dataset"] == "mnist-mini"
    from dsrna.evaluation.common import evaluation_loader

    _, acc = evaluate(model, evaluation_loader("mnist-mini", limit=32), torch.device("cpu"))
    assert acc == pytest.approx(result.metrics["test_acc"]) == pytest.approx(log[-1]["test_acc"])
    assert result.metrics["parameters"] > 0


@pytest.mark.parametrize("lr_schedule", ["cosine", "exponential"])
def test_resume_continues_exactly(tmp_path, monkeypatch, lr_schedule):
    settings = {**TINY, "lr_schedule": lr_schedule}
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **settings))
    with monkeypatch.context() as patch:
        _interrupt_at_evaluation(patch)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "split"), **settings))
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(CheckpointError, match="already holds a training run: pass --resume"):
        train(TrainConfig(out=str(tmp_path / "split"), **settings))
    epochs = count_epochs(monkeypatch)
    resumed = train(TrainConfig(out=str(tmp_path / "split"), resume=True, **settings))
    assert len(epochs) == 1  # epoch 2 of 2
    a = torch.load(whole.model_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="layers"):
        train(TrainConfig(out=str(tmp_path / "split"), resume=True, **{**settings, "layers": 4}))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_divergence_raises_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, poison):
    real = torch.nn.functional.cross_entropy
    calls = []

    def poisoned(input, target, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) > 6:  # 2 steps x (main + auxiliary loss) per epoch: the last step of epoch 2
                return real(input, target, *args, **kwargs) * poison
        return real(input, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(DivergenceError, match="epoch 2.*checkpoint .* is kept: --resume with a lower --grad-clip"):
        train(TrainConfig(out=str(tmp_path), **TINY))
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_imagenet_preset_is_darts_mobile_recipe():
    config = TrainConfig(dataset="imagenet").resolved()
    assert (config.lr, config.lr_schedule, config.weight_decay, config.drop_path_prob, config.label_smoothing) == \
        (0.1, "exponential", 3e-5, 0.0, 0.1)
    assert (TrainConfig().resolved().weight_decay, TrainConfig(weight_decay=0.0).resolved().weight_decay) == (3e-4, 0.0)


def test_small_image_presets_are_the_darts_cifar10_recipe():
    darts = dict(batch_size=96, layers=20, init_channels=36, lr=0.025, lr_schedule="cosine", weight_decay=3e-4,
                 drop_path_prob=0.2, label_smoothing=0.0, stem="cifar")
    for dataset, extra in (("cifar10", dict(epochs=600, cutout=16)), ("mnist", dict(epochs=100, cutout=0)),
                           ("fashion-mnist", dict(epochs=100, cutout=0))):
        config = TrainConfig(dataset=dataset).resolved()
        assert {key: getattr(config, key) for key in {**darts, **extra}} == {**darts, **extra}, dataset
    assert (TrainConfig().resolved().momentum, TrainConfig().resolved().grad_clip) == (0.9, 5.0)


def test_a_last_batch_of_one_image_is_left_out_and_the_exponential_schedule_logs_each_epochs_rate(tmp_path, monkeypatch):
    """The auxiliary head's batch norm cannot train on one image: of 5 images in batches of 2, the
    fifth waits for the next epoch's shuffle (it crashed the first epoch's end)."""
    from torch.utils.data import Subset

    from dsrna.evaluation import train as module

    datasets = module._datasets
    monkeypatch.setattr(module, "_datasets", lambda config: (lambda info, train_set, test: (
        info, Subset(train_set, range(5)), test))(*datasets(config)))
    settings = {**TINY, "batch_size": 2, "max_steps_per_epoch": None, "lr_schedule": "exponential"}
    train(TrainConfig(out=str(tmp_path), **settings))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([0.025, 0.025 * 0.97])


def test_bf16_autocast_trains(tmp_path, monkeypatch):
    import dsrna.evaluation.train as module

    seen, build = [], module.build_model

    def spied(*args):
        model = build(*args)
        model.register_forward_hook(lambda m, inputs, output: seen.append(
            (torch.is_autocast_enabled("cpu"), output[0].dtype if isinstance(output, tuple) else output.dtype)))
        return model

    monkeypatch.setattr(module, "build_model", spied)
    result = train(TrainConfig(out=str(tmp_path), amp="bf16", **{**TINY, "epochs": 1, "max_steps_per_epoch": 1}))
    assert result.metrics["test_acc"] is not None
    assert seen and all(seen_one == (True, torch.bfloat16) for seen_one in seen)  # the train step and evaluation


def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    import dsrna.evaluation.train as module
    from dsrna.cli import main

    def not_refused(*args):  # each input below must be refused before the network is built
        raise AssertionError("the bad input reached the training")

    monkeypatch.setattr(module, "build_model", not_refused)

    bad = tmp_path / "genotype.json"
    bad.write_text(json.dumps({"normal": [["conv_9x9", 0]] * 8, "normal_concat": [2, 3, 4, 5],
                               "reduce": [["max_pool_3x3", 0]] * 8, "reduce_concat": [2, 3, 4, 5]}))
    for argv, expected in (([str(bad)], "conv_9x9"), (["NOT_A_GENOTYPE"], "NOT_A_GENOTYPE"),
                           (["--layers", "0"], "layers"), (["--cuda-graph", "--device", "cpu"], "CUDA device"),
                           (["--grad-clip", "-1"], "grad_clip"), (["--grad-clip", "0"], "grad_clip"),
                           (["--max-steps-per-epoch", "0"], "max_steps_per_epoch"),
                           (["--auxiliary-weight", "-0.5"], "auxiliary_weight"),
                           (["--label-smoothing", "1"], "label_smoothing"),
                           (["--label-smoothing", "-0.1"], "label_smoothing"),
                           (["--drop-path-prob", "1"], "drop_path_prob must be in [0, 1)"),
                           (["--device", "bogus"], "--device 'bogus' is not a device"),
                           (["--lr", "nan"], "--lr"), (["--momentum", "-1"], "--momentum"),
                           (["--weight-decay", "inf"], "--weight-decay"), (["--eval-limit", "0"], "--eval-limit"),
                           (["--cutout", "28"], "--cutout must be in [0, 28)"),
                           (["--log-every", "0"], "--log-every must be >= 1"),
                           (["--seed", "-1"], "--seed must be in 0..2**32 - 1, got -1"),
                           (["--batch-size", "1"], "--batch-size >= 2 or --no-auxiliary")):
        assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--amp", "fp8"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "junk.pt")



def _interrupted_run(tmp_path, monkeypatch, **settings):
    """A run folder whose run stopped after epoch 1's checkpoint."""
    with monkeypatch.context() as patch:
        _interrupt_at_evaluation(patch)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**{**TINY, **settings}))


def test_older_files_still_load(tmp_path, monkeypatch):
    """A checkpoint written before lr_schedule existed resumes as cosine; an ImageNet model whose
    auxiliary head had one more batch norm (training only) still loads for evaluation."""
    _interrupted_run(tmp_path, monkeypatch, out=str(tmp_path))
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["lr_schedule"]
    torch.save(state, path)
    train(TrainConfig(**{**TINY, "out": str(tmp_path), "resume": True}))

    from dsrna import DARTS_V2, Network

    model_config = dict(init_channels=4, layers=3, num_classes=10, in_channels=3, auxiliary=True, stem="imagenet",
                        mean=None, std=None)
    net = Network(DARTS_V2, C=4, num_classes=10, layers=3, in_channels=3, auxiliary=True, stem="imagenet")
    weights = {**net.state_dict(), "auxiliary_head.features.6.weight": torch.ones(768),
               "auxiliary_head.features.6.bias": torch.zeros(768)}
    torch.save({"state_dict": weights, "genotype": DARTS_V2.to_dict(), "model_config": model_config,
                "dataset": "imagenet"}, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[0].auxiliary_head is not None


def test_resume_compares_the_genotype_contents_not_how_it_is_named(tmp_path, monkeypatch):
    from dsrna.space.genotype import DARTS_V2

    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.json").write_text(DARTS_V2.to_json())
    _interrupted_run(tmp_path, monkeypatch, genotype="g.json", out="run")
    # An edited file is another architecture: the weights in the checkpoint do not belong to it.
    (tmp_path / "g.json").write_text(DARTS_V2.to_json().replace("max_pool_3x3", "avg_pool_3x3"))
    with pytest.raises(CheckpointError, match=r"different settings: genotype\.reduce$"):  # named, not printed whole
        train(TrainConfig(genotype="g.json", out="run", resume=True, **TINY))
    # The same contents by another path, or as JSON text, are the same architecture.
    (tmp_path / "g.json").write_text(DARTS_V2.to_json())
    result = train(TrainConfig(genotype=str(tmp_path / "g.json"), out="run", resume=True, **TINY))
    assert result.metrics["epochs"] == 2


def test_resume_of_a_foreign_or_damaged_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from dsrna.cli import main
    from dsrna.search.checkpoint import FORMAT

    run = tmp_path / "run"
    _interrupted_run(tmp_path, monkeypatch, out=str(run))
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    model_keys = list(good["model"])
    damaged = {
        "search checkpoint": ({"format": FORMAT, "config": "{}", "model": {}}, "is a search checkpoint"),
        "config as text": ({**good, "config": "{}"}, "config is not a table"),
        "no optimizer": ({k: v for k, v in good.items() if k != "optimizer"}, "no optimizer"),
        "renamed weights": ({**good, "model": {"x" + k: v for k, v in good["model"].items()}},
                            f"missing {', '.join(sorted(model_keys)[:3])} and {len(model_keys) - 3} more; unexpected x"),
        "bad optimizer": ({**good, "optimizer": "sgd"}, "unusable optimizer"),
    }
    argv = ["train", "--layers", "3", "--init-channels", "4", "--batch-size", "16", "--epochs", "2",
            "--max-steps-per-epoch", "2", "--eval-limit", "32", "--no-progress", "--out", str(run), "--resume"]
    for name, (payload, expected) in damaged.items():
        torch.save(payload, run / "checkpoint.pt")
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("dsrna train: error: ") and str(run / "checkpoint.pt") in err, (name, err)
        assert expected in err and err.count("\n") == 0, (name, err)
    (run / "checkpoint.pt").write_bytes(b"\x80\x02 random bytes")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a dsrna training checkpoint (not a torch file" in err and "weights_only" not in err, err


def test_a_folder_of_another_run_is_refused_by_its_kind(tmp_path, capsys):
    from dsrna.cli import main

    for kind, files in (("comparison", ("compare_config.json", "report.html")), ("search", ("alphas.png", "log.jsonl"))):
        folder = tmp_path / kind
        folder.mkdir()
        for name in files:
            (folder / name).write_text("kept")
        assert main(["train", "--out", str(folder), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"already holds a {kind} run: choose another --out"), err
        assert all((folder / name).read_text() == "kept" for name in files)


def test_divergence_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda *args, **kwargs: real(*args, **kwargs) * float("nan"))
    with pytest.raises(DivergenceError, match="epoch 1.*no checkpoint was written: start again") as error:
        train(TrainConfig(out=str(tmp_path), **TINY))
    assert "--resume" not in str(error.value)
    # nothing of the failed run blocks starting again in the same folder
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    train(TrainConfig(out=str(tmp_path), **{**TINY, "epochs": 1, "max_steps_per_epoch": 1}))


def test_model_files_that_are_not_ours_are_named_without_torch_advice(tmp_path):
    import numpy as np

    from dsrna import DARTS_V2

    torch.save({"state_dict": np.float64(1.0)}, tmp_path / "numpy.pt")  # loadable only by unpickling code
    for name, reason in (("numpy.pt", "holds objects other than tensors"), ("junk.pt", "not a torch file")):
        if name == "junk.pt":
            (tmp_path / name).write_bytes(bytes(range(256)))
        with pytest.raises(CheckpointError) as error:
            load_model(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name} is not a dsrna model file") and reason in message
        assert "weights_only" not in message and "\x1b" not in message and "\n" not in message
    torch.save({"genotype": DARTS_V2.to_dict(), "model_config": {"C": 4}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial.pt is not a dsrna model file \(it has no '\w+' entry\)"):
        load_model(tmp_path / "partial.pt")


def test_checkpoints_given_as_models_say_which_file_to_use(tmp_path):
    from dsrna.search.checkpoint import FORMAT

    torch.save({"format": FORMAT, "model": {}}, tmp_path / "search.pt")
    torch.save({"model": {}, "optimizer": {}, "epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is a search checkpoint, not a trained model: train its genotype.json"):
        load_model(tmp_path / "search.pt")
    with pytest.raises(CheckpointError, match="is a training checkpoint: evaluate the model.pt beside it"):
        load_model(tmp_path / "checkpoint.pt")


def _untrained_model_file(path):
    """A model.pt as dsrna train writes it, of an untrained 3-cell DARTS_V2 network (MNIST-sized)."""
    from dsrna import DARTS_V2
    from dsrna.evaluation.train import build_model

    config = dict(init_channels=4, layers=3, num_classes=10, in_channels=1, auxiliary=False, stem="cifar",
                  mean=[0.5], std=[0.25])
    model = build_model(DARTS_V2, config)
    torch.save({"state_dict": model.state_dict(), "genotype": DARTS_V2.to_dict(), "model_config": config,
                "dataset": "mnist-mini"}, path)
    return model


def test_a_run_folder_stands_for_its_model_file(tmp_path):
    saved = _untrained_model_file(tmp_path / "model.pt")
    model, meta = load_model(tmp_path)
    assert meta["dataset"] == "mnist-mini"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


def test_damaged_bytes_inside_a_model_file_are_refused(tmp_path):
    """torch.load does not check the zip's checksums: a flipped byte in a tensor would load as another
    weight. The loader checks them first."""
    import struct
    import zipfile

    path = tmp_path / "model.pt"
    _untrained_model_file(path)
    with zipfile.ZipFile(path) as archive:  # the largest tensor's bytes: past its local header
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.pt is damaged: the checksum of its entry \S+ does not match"):
        load_model(path)


def test_non_finite_weights_are_refused_with_their_name(tmp_path):
    path = tmp_path / "model.pt"
    _untrained_model_file(path)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["stem.0.weight"][0, 0, 0, 0] = float("nan")
    blob["state_dict"]["classifier.bias"][0] = float("inf")
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite weights \(stem.0.weight and 1 more\): the run"):
        load_model(path)


def test_a_training_step_computes_what_the_recipe_says(tmp_path, monkeypatch):
    """One step, spied: cross-entropy with the configured label smoothing on the logits plus
    auxiliary_weight times it on the auxiliary logits, the gradient clipped to grad_clip, and the
    logged loss that step's loss (a mean over images, not over steps)."""
    import torch.nn as nn

    import dsrna.evaluation.train as train_module

    losses, clips = [], []

    class SpyLoss(nn.CrossEntropyLoss):
        def forward(self, logits, target):
            value = super().forward(logits, target)
            losses.append((self.label_smoothing, value.item()))
            return value

    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(train_module.nn, "CrossEntropyLoss", SpyLoss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clips.append(max_norm) or real_clip(params, max_norm))
    config = TrainConfig(out=str(tmp_path / "run"), **{**TINY, "epochs": 1, "max_steps_per_epoch": 1},
                         label_smoothing=0.1, auxiliary=True, auxiliary_weight=0.3, grad_clip=2.5, momentum=0.5,
                         weight_decay=1e-3)
    monkeypatch.setattr(train_module, "evaluate", lambda *args: (0.0, 0.0))  # only the step's own losses
    result = train(config)
    (smoothing, main), (_, aux) = losses
    assert smoothing == 0.1 and clips == [2.5]
    log = json.loads((result.out / "log.jsonl").read_text())
    assert log["train_loss"] == pytest.approx(main + 0.3 * aux, rel=1e-5) and log["train_loss"] > 1.0
    group = torch.load(result.out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.5, 1e-3)


def test_steps_per_epoch_take_the_last_partial_batch(tmp_path, monkeypatch):
    import dsrna.evaluation.train as train_module

    steps = []
    real = train_module.make_loader
    monkeypatch.setattr(train_module, "make_loader", lambda *args, **kwargs: steps.append(kwargs) or real(*args, **kwargs))
    subset = torch.utils.data.Subset(train_module.get_dataset("mnist-mini"), range(5))
    monkeypatch.setattr(train_module, "_datasets", lambda config: (
        train_module.dataset_info(config.dataset), subset,
        train_module.evaluation_loader(config.dataset, None, 4, 4)))
    config = TrainConfig(out=str(tmp_path / "run"), **{**TINY, "batch_size": 3, "max_steps_per_epoch": None,
                                                       "epochs": 2}, auxiliary=False)
    result = train(config)
    log = [json.loads(line) for line in (result.out / "log.jsonl").read_text().splitlines()]
    # 5 images in batches of 3: two steps, all five images, every epoch; a new order per epoch
    assert [r["images_per_s"] * r["time_s"] for r in log] == pytest.approx([5, 5])
    assert len({kwargs["seed"] for kwargs in steps}) == 2 and not steps[0]["drop_last"]


def test_the_run_reports_its_last_epochs_test_metrics(tmp_path, monkeypatch):
    import dsrna.evaluation.train as train_module

    epochs = iter([(1.0, 0.5), (2.0, 0.25)])  # the last epoch is the worse one: last, not best
    monkeypatch.setattr(train_module, "evaluate", lambda *args: next(epochs))
    result = train(TrainConfig(out=str(tmp_path / "run"), **TINY))
    assert (result.metrics["test_loss"], result.metrics["test_acc"]) == (2.0, 0.25)


def test_evaluate_counts_images_not_batches():
    from torch.utils.data import DataLoader, TensorDataset

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.randn(7, 1, 2, 2), torch.randint(0, 2, (7,))
    with torch.no_grad():
        logits = model(x)
    loss, acc = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=3), torch.device("cpu"))
    assert acc == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_a_model_file_with_foreign_weights_is_refused(tmp_path):
    """Only an older auxiliary head's extra batch norm is skipped; any other unknown weight means
    another architecture."""
    result = train(TrainConfig(out=str(tmp_path / "run"), **{**TINY, "epochs": 1, "max_steps_per_epoch": 1}))
    blob = torch.load(result.model_path, weights_only=True)
    blob["state_dict"]["cells.99.weight"] = torch.zeros(1)
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="unexpected cells.99.weight"):
        load_model(tmp_path / "edited.pt")


# --- resume: what a resumed run must restore (each found untested by a mutation audit) ---------------

def test_resume_restores_the_learning_rate_schedule_and_the_earlier_epochs(tmp_path, monkeypatch):
    settings = {**TINY, "epochs": 3}
    train(TrainConfig(out=str(tmp_path / "whole"), **settings))
    with monkeypatch.context() as patch:
        _interrupt_at_evaluation(patch)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "split"), **settings))
    epochs = count_epochs(monkeypatch)
    result = train(TrainConfig(out=str(tmp_path / "split"), resume=True, **settings))
    assert len(epochs) == 2  # epochs 2 and 3 of 3

    def log(run):
        return [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert [r["epoch"] for r in log("split")] == [1, 2, 3]
    assert [r["lr"] for r in log("split")] == pytest.approx([r["lr"] for r in log("whole")])  # cosine, 3 epochs
    assert result.metrics["train_time_s"] == pytest.approx(sum(r["time_s"] for r in log("split")))
    with pytest.raises(CheckpointError, match="max_steps_per_epoch"):  # another step cap is another run
        train(TrainConfig(out=str(tmp_path / "split"), resume=True, **{**settings, "max_steps_per_epoch": 1}))


# --- found untested by the second mutation audit of training and checkpoints -------------------------

def test_a_checkpoint_write_that_fails_halfway_keeps_the_previous_one(tmp_path, monkeypatch):
    """The checkpoint goes through a temporary file: torch.save dying halfway through epoch 2's write
    (disk full, a kill) leaves epoch 1's checkpoint whole, and the run resumes from it."""
    import dsrna.evaluation.common as common

    real_save, saves = torch.save, []

    def dies_halfway(obj, target, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # epoch 2's checkpoint
            with open(target, "wb") as file:
                file.write(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(common.torch, "save", dies_halfway)
        with pytest.raises(OSError, match="No space left"):
            train(TrainConfig(out=str(tmp_path), **TINY))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    epochs = count_epochs(monkeypatch)
    assert train(TrainConfig(out=str(tmp_path), resume=True, **TINY)).metrics["epochs"] == 2 and len(epochs) == 1


def test_an_unwritable_folder_is_refused_before_training(tmp_path, monkeypatch):
    refuse_new_files(monkeypatch)
    epochs = count_epochs(monkeypatch)
    with pytest.raises(CheckpointError, match="cannot write in .*read-only.*Permission denied"):
        train(TrainConfig(out=str(tmp_path / "read-only"), **TINY))
    assert epochs == []


@pytest.mark.parametrize("change", [dict(weight_decay=1e-3), dict(cutout=4), dict(momentum=0.5), dict(lr=0.1),
                                    dict(label_smoothing=0.1), dict(seed=1), dict(auxiliary_weight=0.2),
                                    dict(drop_path_prob=0.1), dict(lr_schedule="exponential"),
                                    dict(max_steps_per_epoch=None)])
def test_resume_refuses_every_setting_that_changes_the_numbers(tmp_path, monkeypatch, change):
    _interrupted_run(tmp_path, monkeypatch, out=str(tmp_path / "run"))
    (key, value), = change.items()
    before = TrainConfig(**TINY).resolved()
    epochs = count_epochs(monkeypatch)
    with pytest.raises(CheckpointError, match=re.escape(f"different settings: {key}={getattr(before, key)!r} "
                                                        f"(now {value!r})") + "$"):
        train(TrainConfig(**{**TINY, "out": str(tmp_path / "run"), "resume": True, **change}))
    assert epochs == []


def test_changed_settings_names_each_difference():
    from dsrna.errors import changed_settings

    assert changed_settings({"a": None, "b": 2}, {"a": 1, "b": 2, "c": 3}) == ["a=None (now 1)", "c=None (now 3)"]
    assert changed_settings({"r": {"gamma": 0.01, "eps": 1}}, {"r": {"gamma": 0.5, "eps": 1}}) == ["r.gamma=0.01 (now 0.5)"]
    assert changed_settings({"genotype": {"normal": "x" * 200}}, {"genotype": "y" * 200}) == ["genotype"]


def test_the_train_command_passes_every_flag_and_reports_a_percentage(tmp_path, monkeypatch, capsys):
    """`dsrna train` builds the TrainConfig its flags say (defaults included) and prints accuracy in %."""
    import dataclasses

    import dsrna.evaluation.train as module
    from dsrna.cli import main

    given = []
    monkeypatch.setattr(module, "train", lambda config: given.append(config) or module.TrainResult(
        tmp_path, tmp_path / "model.pt", {"test_acc": 0.5, "parameters": 1_500_000}))
    assert main(["train", "--out", str(tmp_path), "--data-root", "/data", "--no-progress"]) == 0
    expected = dataclasses.replace(TrainConfig(), out=str(tmp_path), data_root="/data", progress=False)
    assert dataclasses.asdict(given[0]) == dataclasses.asdict(expected)
    assert "test accuracy 50.00%, 1.500M parameters" in capsys.readouterr().out
    main(["train", "--out", str(tmp_path), "--no-auxiliary", "--eval-limit", "7", "--grad-clip", "1.5"])
    assert (given[1].auxiliary, given[1].eval_limit, given[1].grad_clip) == (False, 7, 1.5)
