"""Final training: a genotype's network trained from scratch with the DARTS evaluation recipe.

The recipe (Liu et al. 2019, METHOD.md §1): SGD (lr 0.025, momentum 0.9, weight decay 3e-4) with a
cosine schedule to 0, cutout 16, drop path 0.2 ramped linearly over the epochs, an auxiliary head
weighted 0.4, gradient clipping at 5, batch 96, 600 epochs on CIFAR-10. :data:`PRESETS` fills the
settings a user leaves unset per data set; every one of them is a flag of ``dsrna train``.

A run folder holds ``checkpoint.pt`` (written atomically after every epoch: model, optimizer,
scheduler, RNG states, epoch, history; ``--resume`` continues from it bit-for-bit on the same
device), ``log.jsonl`` (one line per epoch), and at the end ``model.pt`` (weights, genotype and the
architecture settings, enough for :func:`load_model` to rebuild the network from the file alone),
``metrics.json`` and the HTML report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna import backend
from dsrna.data import dataset_info, get_dataset, make_loader
from dsrna.errors import CheckpointError, DivergenceError, changed_settings, check_finite, first_line
from dsrna.evaluation.common import atomic_save, evaluation_loader, pick_device, write_json
from dsrna.search.checkpoint import FORMAT as SEARCH_FORMAT
from dsrna.search.checkpoint import (atomic_write_text, check_writable, load_state_checked, load_torch_file,
                                     refuse_existing_run, rng_state, set_rng_state)
from dsrna.search.cuda_graph import StepGraphs, check_cuda_graphs
from dsrna.space import Genotype, Network, count_parameters

# Settings left as None in TrainConfig take these per-data-set values ([choice] where the paper is
# silent: MNIST-family epochs and no cutout on digits; mnist-mini is sized to train in minutes on a CPU).
_DARTS = dict(batch_size=96, layers=20, init_channels=36, lr=0.025, lr_schedule="cosine", stem="cifar",
              label_smoothing=0.0, weight_decay=3e-4, drop_path_prob=0.2)
PRESETS = {
    "cifar10": dict(_DARTS, epochs=600, cutout=16),
    "mnist": dict(_DARTS, epochs=100, cutout=0),
    "fashion-mnist": dict(_DARTS, epochs=100, cutout=0),
    "mnist-mini": dict(_DARTS, epochs=5, batch_size=64, layers=5, init_channels=8, cutout=0),
    # DARTS' mobile ImageNet setting (its train_imagenet.py): 14 cells, C=48, stride-8 stem, lr 0.1
    # decayed by 0.97 per epoch, weight decay 3e-5, label smoothing 0.1, no drop path.
    "imagenet": dict(epochs=250, batch_size=128, layers=14, init_channels=48, cutout=0, lr=0.1,
                     lr_schedule="exponential", stem="imagenet", label_smoothing=0.1, weight_decay=3e-5,
                     drop_path_prob=0.0),
}
AMP_CHOICES = ("none", "bf16")
# cosine: annealed to 0 over the epochs (DARTS on CIFAR-10); exponential: times 0.97 per epoch (on ImageNet).
LR_SCHEDULES = ("cosine", "exponential")
EXPONENTIAL_LR_DECAY = 0.97


@dataclass
class TrainConfig:
    """Every setting of ``dsrna train``. ``None`` means "the data set's preset" (:data:`PRESETS`)."""

    genotype: str = "DARTS_V2"  # a built-in name, a genotype.json path, or JSON text
    dataset: str = "mnist-mini"
    data_root: str | None = None
    out: str = "runs/train"
    epochs: int | None = None
    batch_size: int | None = None
    layers: int | None = None
    init_channels: int | None = None
    cutout: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    stem: str | None = None
    label_smoothing: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    grad_clip: float = 5.0
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float | None = None
    amp: str = "none"
    cuda_graph: bool = False  # replay each train step from a CUDA graph (one GPU)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 50
    max_steps_per_epoch: int | None = None  # cap for quick runs; None = the whole training set
    eval_limit: int | None = None  # evaluate on N test images (common.evaluation_loader); None = all
    resume: bool = False
    progress: bool = True
    report: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with the preset filled in and every value checked."""
        if self.dataset not in PRESETS:
            raise ValueError(f"unknown data set {self.dataset!r}; choose one of {', '.join(PRESETS)}")
        filled = dataclasses.replace(self)
        for key, value in PRESETS[self.dataset].items():
            if getattr(filled, key) is None:
                setattr(filled, key, value)
        if filled.amp not in AMP_CHOICES:
            raise ValueError(f"unknown --amp {filled.amp!r}; choose one of {', '.join(AMP_CHOICES)}")
        if filled.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown --lr-schedule {filled.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        for key in ("epochs", "batch_size", "layers", "init_channels"):
            if getattr(filled, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(filled, key)}")
        if filled.eval_limit is not None and filled.eval_limit < 1:
            raise ValueError(f"--eval-limit must be >= 1, got {filled.eval_limit}")
        check_finite("--lr", filled.lr, positive=True)
        check_finite("--momentum", filled.momentum)
        check_finite("--weight-decay", filled.weight_decay)
        image_size = dataset_info(filled.dataset).image_size
        if not 0 <= filled.cutout < image_size:
            raise ValueError(f"--cutout must be in [0, {image_size}) for {filled.dataset}'s {image_size}-pixel images "
                             f"(a larger square blanks every image), got {filled.cutout}")
        if filled.auxiliary and filled.layers < 3:
            raise ValueError("the auxiliary head sits after the second reduction cell: "
                             "use --layers >= 3 or --no-auxiliary")
        if filled.auxiliary and filled.batch_size < 2:
            raise ValueError("the auxiliary head's batch norm needs 2 or more images per batch (its map is 1x1): "
                             "use --batch-size >= 2 or --no-auxiliary")
        if not 0 <= filled.drop_path_prob < 1:
            raise ValueError(f"drop_path_prob must be in [0, 1), got {filled.drop_path_prob}")
        if not 0 <= filled.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {filled.label_smoothing}")
        check_finite("grad_clip", filled.grad_clip, positive=True)  # a negative norm would flip every gradient
        check_finite("auxiliary_weight", filled.auxiliary_weight)
        if not 0 <= filled.seed < 2**32:  # what numpy's and torch's generators take
            raise ValueError(f"--seed must be in 0..2**32 - 1, got {filled.seed}")
        if filled.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {filled.log_every}")
        if filled.max_steps_per_epoch is not None and filled.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1, got {filled.max_steps_per_epoch}")
        Genotype.from_json(filled.genotype)  # fail early, with the genotype's own one-line message
        return filled


@dataclass
class TrainResult:
    out: Path
    model_path: Path
    metrics: dict


def build_model(genotype: Genotype, model_config: dict) -> Network:
    """The network described by ``model_config`` (the ``model_config`` entry of ``model.pt``)."""
    return Network(genotype, C=model_config["init_channels"], num_classes=model_config["num_classes"],
                   layers=model_config["layers"], in_channels=model_config["in_channels"],
                   auxiliary=model_config["auxiliary"], stem=model_config["stem"],
                   mean=model_config["mean"], std=model_config["std"])


def model_file(path: str | Path) -> Path:
    """``path``, or the ``model.pt`` inside it when it is a run folder."""
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Network, dict]:
    """Rebuild a trained network from ``model.pt`` alone; returns ``(model in eval mode, metadata)``.

    The metadata holds ``genotype``, ``model_config``, ``dataset``, ``train_config`` and ``metrics``.
    """
    path = model_file(path)
    blob = load_torch_file(path, "model file")
    if isinstance(blob, dict) and blob.get("format") == SEARCH_FORMAT:
        raise CheckpointError(f"{path} is a search checkpoint, not a trained model: train its genotype.json with "
                              f"dsrna train, then evaluate that run's model.pt")
    if isinstance(blob, dict) and "optimizer" in blob and "genotype" not in blob:
        raise CheckpointError(f"{path} is a training checkpoint: evaluate the model.pt beside it")
    try:
        genotype = Genotype.from_dict(blob["genotype"])
        model = build_model(genotype, blob["model_config"])
    except KeyError as exc:  # str(KeyError('mean')) is just 'mean'
        raise CheckpointError(f"{path} is not a dsrna model file (it has no {exc.args[0]!r} entry)") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path} is not a dsrna model file ({first_line(exc)})") from None
    state = blob.get("state_dict")
    if isinstance(state, dict):  # the training-only auxiliary head of an older ImageNet model had one more BN
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith("auxiliary_head.")}
    load_state_checked(model, state, path, "model file")
    model.drop_path_prob = 0.0
    return model.to(device).eval(), {k: v for k, v in blob.items() if k != "state_dict"}


def _datasets(config: TrainConfig):
    info = dataset_info(config.dataset)
    train_set = get_dataset(config.dataset, root=config.data_root, train=True, augment=True, cutout=config.cutout)
    test = evaluation_loader(config.dataset, config.data_root, config.eval_limit, 2 * config.batch_size,
                             config.num_workers)
    return info, train_set, test


def evaluate(model: nn.Module, loader, device, amp: str = "none") -> tuple[float, float]:
    """``(mean loss, accuracy)`` of the model in eval mode on a loader."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    with torch.no_grad(), _autocast(device, amp):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            count += y.numel()
    model.train(was_training)
    return total_loss.item() / max(count, 1), correct.item() / max(count, 1)


def _autocast(device: torch.device, amp: str):
    # No weight-cast cache: each weight is used once per pass, and a CUDA graph capture forbids it.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16", cache_enabled=False)


def train(config: TrainConfig) -> TrainResult:
    """Train the configured network; see the module docstring for what the run folder receives."""
    config = config.resolved()
    device = pick_device(config.device)
    with backend.device_scope(device):  # its RNG state is the one the checkpoint keeps (cuda:1 ...)
        return _train(config, device)


def _train(config: TrainConfig, device: torch.device) -> TrainResult:
    graphs = None
    if config.cuda_graph:
        check_cuda_graphs(device)
        graphs = StepGraphs()
    out = Path(config.out)
    if not config.resume:
        refuse_existing_run(out, "training")
    genotype = Genotype.from_json(config.genotype)
    info, train_set, eval_loader = _datasets(config)
    check_writable(out)  # after the data: a missing data root leaves no empty folder behind
    model_config = dict(init_channels=config.init_channels, layers=config.layers, num_classes=info.num_classes,
                        in_channels=info.in_channels, auxiliary=config.auxiliary, stem=config.stem,
                        mean=list(map(float, info.mean)), std=list(map(float, info.std)))

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(genotype, model_config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, EXPONENTIAL_LR_DECAY)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    start_epoch, history = 0, []
    checkpoint_path = out / "checkpoint.pt"
    if config.resume:
        start_epoch, history = _resume(checkpoint_path, _identity(config, genotype), model, optimizer, scheduler)
    write_json(dataclasses.asdict(config), out / "config.json")
    atomic_write_text(out / "genotype.json", genotype.to_json() + "\n")

    # A last batch of one image would give the auxiliary head's batch norm one value per channel
    # (an error at the end of the first epoch): that image waits for the next epoch's shuffle.
    drop_last = config.auxiliary and len(train_set) % config.batch_size == 1
    steps_per_epoch = len(train_set) // config.batch_size if drop_last else math.ceil(len(train_set) / config.batch_size)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    progress = _progress_bar(config, steps_per_epoch, start_epoch)
    for epoch in range(start_epoch, config.epochs):
        model.drop_path_prob = config.drop_path_prob * epoch / config.epochs
        # The data order depends on (seed, epoch) only, so a resumed run sees the same batches.
        loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed * 100003 + epoch,
                             num_workers=config.num_workers, drop_last=drop_last)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
        record = _train_epoch(model, loader, optimizer, criterion, config, device, steps_per_epoch, progress, epoch,
                              graphs, checkpoint_path)
        scheduler.step()
        test_loss, test_acc = evaluate(model, eval_loader, device, config.amp)
        record.update(epoch=epoch + 1, test_loss=test_loss, test_acc=test_acc, lr=lr, drop_path_prob=model.drop_path_prob)
        history.append(record)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(), "epoch": epoch + 1,
                     "history": history, "config": _identity(config, genotype)}, checkpoint_path)
        # Rewritten whole from the history the checkpoint holds: a resumed run's log has no gaps or repeats.
        atomic_write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        if progress is not None:
            progress.set_postfix(epoch=epoch + 1, test_acc=f"{test_acc:.4f}")
    if progress is not None:
        progress.close()

    metrics = dict(dataset=config.dataset, epochs=config.epochs, parameters=count_parameters(model),
                   test_acc=history[-1]["test_acc"] if history else None,
                   test_loss=history[-1]["test_loss"] if history else None,
                   train_time_s=sum(r["time_s"] for r in history), device=str(device))
    model_path = out / "model.pt"
    atomic_save({"state_dict": model.state_dict(), "genotype": genotype.to_dict(), "model_config": model_config,
                 "dataset": config.dataset, "train_config": dataclasses.asdict(config), "metrics": metrics}, model_path)
    write_json(metrics, out / "metrics.json")
    if config.report:
        from dsrna.evaluation.report import write_report
        write_report(out)
    return TrainResult(out, model_path, metrics)


def _identity(config: TrainConfig, genotype: Genotype) -> dict:
    """The settings a resumed run must share with the original (the rest may change, e.g. device).

    The genotype is its contents, not the argument naming it: an edited genotype.json is another
    architecture, and the same file by another path is the same one."""
    keys = ("dataset", "epochs", "batch_size", "layers", "init_channels", "cutout", "lr", "lr_schedule", "stem",
            "label_smoothing", "momentum", "weight_decay", "auxiliary", "auxiliary_weight", "drop_path_prob", "seed",
            "max_steps_per_epoch")
    return {"genotype": genotype.to_dict(), **{k: getattr(config, k) for k in keys}}


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "history", "config")


def _resume(path: Path, identity: dict, model, optimizer, scheduler) -> tuple[int, list]:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = load_torch_file(path, "training checkpoint")
    if isinstance(state, dict) and state.get("format") == SEARCH_FORMAT:
        raise CheckpointError(f"{path} is a search checkpoint, not a training one: continue it with dsrna search --resume")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(_CHECKPOINT_KEYS)
    if missing or not isinstance(state["config"], dict):
        what = f"no {', '.join(missing)}" if missing else "its config is not a table"
        raise CheckpointError(f"{path} is not a dsrna training checkpoint ({what})")
    saved = {"lr_schedule": "cosine", **state["config"]}  # written before the setting existed: cosine
    differing = changed_settings(saved, identity)
    if differing:
        raise CheckpointError(f"cannot resume {path}: it was written with different settings: {', '.join(differing)}")
    load_state_checked(model, state["model"], path, "training checkpoint")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return int(state["epoch"]), list(state["history"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} holds an unusable optimizer, scheduler or RNG state ({first_line(exc)})") from None


def _progress_bar(config: TrainConfig, steps_per_epoch: int, start_epoch: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, unit="step",
                desc="train", dynamic_ncols=True)


def _train_epoch(model, loader, optimizer, criterion, config, device, steps_per_epoch, progress, epoch,
                 graphs: StepGraphs | None, checkpoint_path: Path) -> dict:
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count, start = 0, time.perf_counter()

    def train_step(x, y):
        with _autocast(device, config.amp):
            out = model(x)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            loss = criterion(logits.float(), y)
            if aux is not None:
                loss = loss + config.auxiliary_weight * criterion(aux.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        return {"loss": loss.detach(), "correct": (logits.detach().argmax(1) == y).sum()}

    for step, (x, y) in enumerate(loader):
        if step == steps_per_epoch:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # A graph serves one epoch: the learning rate and the drop-path rate change between epochs.
        m = train_step(x, y) if graphs is None else graphs.run("train_step", train_step, (x, y), epoch, model.parameters)
        total_loss += m["loss"] * y.numel()
        correct += m["correct"]
        count += y.numel()
        if (step + 1) % config.log_every == 0:  # the only host synchronisation inside the epoch
            _check_finite(total_loss, epoch, step, checkpoint_path)
            if progress is not None:
                progress.set_postfix(epoch=epoch + 1, loss=f"{total_loss.item() / count:.4f}")
        if progress is not None:
            progress.update(1)
    _check_finite(total_loss, epoch, None, checkpoint_path)
    elapsed = time.perf_counter() - start
    return dict(train_loss=total_loss.item() / max(count, 1), train_acc=correct.item() / max(count, 1),
                time_s=elapsed, images_per_s=count / max(elapsed, 1e-9))


def _check_finite(total_loss: torch.Tensor, epoch: int, step: int | None, checkpoint_path: Path) -> None:
    if not torch.isfinite(total_loss):
        where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        # --resume keeps --lr (it shapes the schedule) but not --grad-clip or --amp
        if checkpoint_path.exists():
            advice = (f"the last good checkpoint {checkpoint_path} is kept: --resume with a lower --grad-clip or "
                      "--amp none, or start again with a lower --lr in another --out")
        else:
            advice = "no checkpoint was written: start again with a lower --lr or --grad-clip, or --amp none"
        raise DivergenceError(f"training diverged (loss is NaN or infinite at {where}); {advice}")
