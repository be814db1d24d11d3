"""Final training: run-folder contents, model.pt rebuilds the network alone, resume is exact,
divergence keeps the last good checkpoint, bad input is one clear line."""

import json

import pytest
import torch

from dsrna.errors import CheckpointError, DivergenceError
from dsrna.evaluation.train import TrainConfig, evaluate, load_model, train

TINY = dict(dataset="mnist-mini", layers=3, init_channels=4, batch_size=16, epochs=2, max_steps_per_epoch=2,
            eval_limit=32, progress=False, report=False)


def _interrupt_second_evaluation(monkeypatch):
    """Make the run stop during epoch 2, after epoch 1's checkpoint was written."""
    import dsrna.evaluation.train as module

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
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
    assert log[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to zero at the end
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "epoch"} <= set(checkpoint) and checkpoint["epoch"] == 2

    # model.pt alone rebuilds the network, in eval mode, with the reported accuracy.
    model, meta = load_model(result.model_path)
    assert not model.training and meta["dataset"] == "mnist-mini"
    from dsrna.evaluation.common import evaluation_loader

    _, acc = evaluate(model, evaluation_loader("mnist-mini", limit=32), torch.device("cpu"))
    assert acc == pytest.approx(result.metrics["test_acc"]) == pytest.approx(log[-1]["test_acc"])
    assert result.metrics["parameters"] > 0


def test_resume_continues_exactly(tmp_path, monkeypatch):
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **TINY))
    with monkeypatch.context() as patch:
        _interrupt_second_evaluation(patch)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "split"), **TINY))
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(ValueError, match="--resume"):
        train(TrainConfig(out=str(tmp_path / "split"), **TINY))
    resumed = train(TrainConfig(out=str(tmp_path / "split"), resume=True, **TINY))
    a = torch.load(whole.model_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="layers"):
        train(TrainConfig(out=str(tmp_path / "split"), resume=True, **{**TINY, "layers": 4}))


def test_divergence_raises_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = []

    def poisoned(input, target, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) > 4:  # epoch 1 = 2 steps x (main + auxiliary loss); epoch 2 goes NaN
                return real(input, target, *args, **kwargs) * float("nan")
        return real(input, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(DivergenceError, match="epoch 2"):
        train(TrainConfig(out=str(tmp_path), **TINY))
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_bf16_autocast_trains(tmp_path):
    result = train(TrainConfig(out=str(tmp_path), amp="bf16", **{**TINY, "epochs": 1, "max_steps_per_epoch": 1}))
    assert result.metrics["test_acc"] is not None


def test_bad_input_is_one_line(tmp_path, capsys):
    from dsrna.cli import main

    bad = tmp_path / "genotype.json"
    bad.write_text(json.dumps({"normal": [["conv_9x9", 0]] * 8, "normal_concat": [2, 3, 4, 5],
                               "reduce": [["max_pool_3x3", 0]] * 8, "reduce_concat": [2, 3, 4, 5]}))
    for argv, expected in (([str(bad)], "conv_9x9"), (["NOT_A_GENOTYPE"], "NOT_A_GENOTYPE"),
                           (["--layers", "0"], "layers"), (["--cuda-graph", "--device", "cpu"], "CUDA device")):
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

