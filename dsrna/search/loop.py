"""The full search run: data, the epoch loop, logs, checkpoints, pictures and resumption.

Output folder (``config.out``), rewritten atomically after every epoch on rank 0:
``checkpoint.pt``, ``log.jsonl`` (one JSON line per epoch), ``genotype.json``, ``normal.png``,
``reduce.png`` and ``alphas.png``.

Data order is a pure function of (seed, epoch) for the weights half and of (seed, validation
pass, position) for the architecture half, whose iterator persists across steps and epochs and
cycles when exhausted. The checkpoint records the validation pass and the number of examples
consumed in it (over all ranks), so a resumed run, even with a different number of processes,
continues where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm

from dsrna import backend
from dsrna.errors import CheckpointError, DataError, DivergenceError, DsrnaError
from dsrna.robustness import RobustnessConfig
from dsrna.robustness.certified import VACUOUS_BOUND, shows_vacuous_bound
from dsrna.search import distributed
from dsrna.search.checkpoint import (atomic_write_text, check_writable, load_checkpoint, load_state_checked,
                                     refuse_existing_run, save_checkpoint, set_rng_state)
from dsrna.search.config import SearchConfig
from dsrna.search.cuda_graph import GraphedSearcher
from dsrna.search.searcher import Searcher
from dsrna.space import Genotype, SearchNetwork


@dataclass
class SearchData:
    """The two halves of the search data and what the super-network needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


@dataclass
class SearchResult:
    genotype: Genotype
    out: Path
    history: list[dict] = field(default_factory=list)


def load_search_data(config: SearchConfig) -> SearchData:
    """The named data set split for the search: ``train_portion`` of the training set for the
    weights and the rest for the architecture, or, with ``subset_fractions=(a, b)``, disjoint
    class-balanced draws of fractions a and b (PC-DARTS on ImageNet)."""
    from dsrna.data import class_balanced_split, dataset_info, get_dataset, search_split

    info = dataset_info(config.dataset)
    full = get_dataset(config.dataset, config.data_root, train=True, augment=config.augment)
    if config.subset_fractions is None:
        train, val = search_split(full, config.train_portion, config.seed)
    else:
        train, val = class_balanced_split(full, config.subset_fractions, config.seed)
    return SearchData(train, val, info.num_classes, info.in_channels, info.mean, info.std)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled, last partial round dropped) that can start at any position
    ``start`` of the epoch's global order, for resumption with any number of processes: the ranks
    deal the rest of the order as DistributedSampler deals all of it (rank r takes r, r + W, ...),
    dropping the last partial round so that every rank takes as many."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        # DistributedSampler's order: a permutation seeded with seed + epoch, cut to total_size
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[self.start:self.total_size][self.rank::self.num_replicas][:len(self)].tolist())

    def __len__(self):  # 0 where a run with more examples per pass stopped past this one's end
        return max(0, self.total_size - self.start) // self.num_replicas


class ValidationStream:
    """The architecture half as an endless stream of batches: one iterator per pass over the data,
    never rebuilt per step. ``consumed`` counts the examples taken in the current pass over all ranks."""

    def __init__(self, loader, sampler: ResumableSampler, world_size: int, epoch: int = 0, consumed: int = 0):
        self.loader, self.sampler, self.world_size = loader, sampler, world_size
        self.epoch, self.consumed = epoch, consumed
        self._iterator = None

    def _open(self, start: int):
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = start
        self._iterator = iter(self.loader)

    def __next__(self):
        if self._iterator is None:
            self._open(self.consumed)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._open(0)
            batch = next(self._iterator)
        self.consumed += batch[1].shape[0] * self.world_size
        return batch

    def state(self) -> dict:
        return {"val_epoch": self.epoch, "val_consumed": self.consumed}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _determinism(enabled: bool):
    """Deterministic kernels (or cuDNN's autotuning) for the search; the caller's settings after it,
    so that what runs next in the process (compare's training, a test) is not changed by a search."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        # cuBLAS needs a fixed workspace to be reproducible; must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic kernel warns instead of stopping a long search.
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def architecture_entropy(net: SearchNetwork) -> dict[str, float]:
    """Mean entropy (nats) of softmax(alpha) over the edges: log(8) at the start, 0 when decided."""
    out = {}
    with torch.no_grad():
        for reduction, name in ((False, "entropy_normal"), (True, "entropy_reduce")):
            w, _ = net.edge_weights(reduction)
            out[name] = float(-(w * torch.log(w.clamp_min(1e-12))).sum(-1).mean())
    return out


def _write_pictures(net: SearchNetwork, genotype: Genotype, out: Path, epoch: int) -> None:
    from dsrna.plots import plot_alpha_heatmaps, plot_cell

    plot_cell(genotype, False, out / "normal.png", f"normal cell, epoch {epoch}")
    plot_cell(genotype, True, out / "reduce.png", f"reduction cell, epoch {epoch}")
    with torch.no_grad():
        tables = {"normal: softmax(alpha)": net.edge_weights(False)[0], "reduce: softmax(alpha)": net.edge_weights(True)[0]}
    plot_alpha_heatmaps(tables, out / "alphas.png", f"epoch {epoch}")


def run_search(config: SearchConfig, data: SearchData | None = None,
               on_epoch_end: Callable[[int, dict], None] | None = None) -> SearchResult:
    """Run (or, with ``config.resume``, continue) a search; see the module docstring for the files.

    ``data`` replaces the named data set (custom data); ``on_epoch_end(epoch, record)`` is called on
    every rank after each epoch's files are written. Under torchrun the process group is set up here.
    """
    created_group = distributed.init_from_env()
    try:
        device = _search_device(config)
        with _determinism(config.deterministic), backend.device_scope(device):
            return _run(config, device, data, on_epoch_end)
    except Exception as exc:
        # A collective broken by a peer that died (out of memory, killed) says nothing useful in
        # its traceback: one line here, the cause is in the failed process's own message.
        if distributed.is_distributed() and not isinstance(exc, DsrnaError) and distributed.is_peer_loss(exc):
            raise distributed.peer_loss_error(exc) from exc
        raise
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _search_device(config: SearchConfig) -> torch.device:
    """``auto``: this process's device (its ``LOCAL_RANK``'s GPU under torchrun, else the first GPU,
    else the CPU); under torchrun ``cpu`` or ``cuda`` where it is that device's kind."""
    if config.device == "auto":
        return distributed.default_device()
    if distributed.is_distributed():
        own = distributed.default_device()
        if config.device == own.type:
            return own
        hint = ", or hide the GPUs (CUDA_VISIBLE_DEVICES=) for gloo on the CPU" if config.device == "cpu" else ""
        raise ValueError(f"--device {config.device} under torchrun: each process runs on its own device, here {own} "
                         f"(NCCL drives the LOCAL_RANK's GPU, gloo the CPU): drop --device{hint}")
    from dsrna.evaluation.common import pick_device  # here: dsrna.evaluation imports this package

    return pick_device(config.device)


def _run(config: SearchConfig, device: torch.device, data: SearchData | None, on_epoch_end) -> SearchResult:
    rank, world = distributed.rank(), distributed.world_size()
    out = Path(config.out)
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"

    # Under torchrun every rank sets up on its own (no collective before the Searcher), and a
    # failure on one rank (data or --out missing on one node, a checkpoint there and not here)
    # stops all of them with one line each instead of leaving the others waiting.
    with distributed.fail_together():
        if not config.resume:
            refuse_existing_run(out, "search")

        # Every rank draws the same stream: the same initial weights and alphas (DDP and the explicit
        # broadcast make sure anyway) and the same random choices of the robustness estimators.
        _seed_everything(config.seed)
        data = data if data is not None else load_search_data(config)
        net = SearchNetwork(C=config.init_channels, num_classes=data.num_classes, layers=config.layers,
                            in_channels=data.in_channels, partial_channels=config.partial_channels,
                            backend=config.backend, mean=data.mean, std=data.std, stem=config.stem).to(device)

        from dsrna.data import make_loader

        train_sampler = ResumableSampler(data.train, world, rank, seed=config.seed)
        val_sampler = ResumableSampler(data.val, world, rank, seed=config.seed + 1)
        train_loader = make_loader(data.train, config.batch_size, seed=config.seed, num_workers=config.num_workers,
                                   drop_last=True, sampler=train_sampler)
        val_loader = make_loader(data.val, config.batch_size, seed=config.seed + 1, num_workers=config.num_workers,
                                 drop_last=True, sampler=val_sampler)
        steps_per_epoch = len(train_sampler) // config.batch_size
        if config.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
        if steps_per_epoch == 0 or len(val_sampler) < config.batch_size:
            raise DataError(f"batch size {config.batch_size} x {world} process(es) is larger than a half of the search "
                            f"data ({len(data.train)} / {len(data.val)} images)")
        # Read onto the CPU: the RNG states must stay CPU byte tensors (torch.set_rng_state), and the
        # model and optimiser states are copied onto the parameters' device as they are loaded.
        payload = load_checkpoint(checkpoint_path, config, map_location="cpu") if config.resume else None
        # The only writer: an unwritable --out fails now, not after the first epoch; after the data and
        # the checkpoint, so a wrong --data-root or --resume leaves no empty folder behind.
        if rank == 0:
            check_writable(out)

    net.train()
    searcher = Searcher(net, config)
    start_epoch, step, val_state = 0, 0, {"val_epoch": 0, "val_consumed": 0}
    history: list[dict] = []
    if payload is not None:
        with distributed.fail_together():
            load_state_checked(net, payload.get("model"), checkpoint_path, "search checkpoint")
            try:
                searcher.load_state_dict(payload["searcher"])
                start_epoch, step, val_state = int(payload["epoch"]), int(payload["step"]), payload["data"]
                set_rng_state(payload["rng"])
                # the checkpoint's own copy of the log: log.jsonl, lost or torn, is rewritten from it
                history = list(payload["history"])
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"checkpoint {checkpoint_path} does not fit this super-network ({first})") from None
    stepper = searcher  # what runs the steps; the searcher keeps the schedule and the checkpoints
    if config.cuda_graph:
        try:
            stepper = GraphedSearcher(searcher)
        except ValueError as exc:
            raise DsrnaError(f"--cuda-graph: {exc}") from None
    val_stream = ValidationStream(val_loader, val_sampler, world, val_state["val_epoch"], val_state["val_consumed"])
    genotype = net.genotype()

    warned_vacuous = False  # once a run is enough
    progress = tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, unit="step",
                    desc="search", dynamic_ncols=True, disable=rank != 0 or not config.progress)
    try:
        for epoch in range(start_epoch, config.epochs):
            searcher.set_epoch(epoch)
            train_sampler.set_epoch(epoch)
            # train loss, train correct, train count, val loss, val correct, val count, R, steps with R,
            # and R's terms R_CB and R_Jac
            sums = torch.zeros(10, dtype=torch.float64, device=device)
            # R is off during its warm-up: the epoch logs None then, not the 0 the steps return
            with_r = torch.full((), float(searcher.robustness_active), device=device)
            started = time.perf_counter()
            batches = iter(train_loader)
            for i in range(steps_per_epoch):
                x, y = (t.to(device, non_blocking=True) for t in next(batches))
                if searcher.arch_active:
                    xv, yv = (t.to(device, non_blocking=True) for t in next(val_stream))
                    m = stepper.step((x, y), (xv, yv))
                    sums[3:10] += torch.stack([m["val_loss"] * m["val_count"], m["val_correct"], m["val_count"],
                                               m["robustness"], with_r, m["robustness_cb"], m["robustness_jacobian"]]).double()
                else:
                    m = stepper.weight_step((x, y))
                sums[0:3] += torch.stack([m["train_loss"] * m["train_count"], m["train_correct"], m["train_count"]]).double()
                step += 1
                progress.update()
                if step % config.log_every == 0:  # the only host synchronisation inside an epoch
                    # summed over ranks, so that all of them agree on a divergence and stop together
                    seen = distributed.all_reduce_sum_(sums.clone()).tolist()
                    _check_finite(seen, epoch, checkpoint_path)
                    progress.set_postfix(train_loss=f"{seen[0] / max(seen[2], 1):.3f}",
                                         val_loss=f"{seen[3] / max(seen[5], 1):.3f}" if seen[5] else "-")
            elapsed = time.perf_counter() - started
            distributed.all_reduce_sum_(sums)
            totals = sums.tolist()
            _check_finite(totals, epoch, checkpoint_path)
            # A finite R with a non-finite gradient (a vacuous bound's overflow) passes the losses of
            # its own step but updates the architecture to NaN: never checkpoint such a network.
            # (Every rank holds the same parameters, so all stop together.)
            if not torch.stack([p.isfinite().all() for p in net.parameters()]).all():
                _diverged(epoch, checkpoint_path, "a weight or architecture parameter is no longer finite")
            genotype = net.genotype()

            def mean(total: int, count: int) -> float | None:  # None: nothing counted (no architecture step, R off)
                return totals[total] / totals[count] if totals[count] else None

            record = {
                "epoch": epoch + 1,
                "step": step,
                "lr": searcher.lr,
                "train_loss": mean(0, 2),
                "train_acc": mean(1, 2),
                "val_loss": mean(3, 5),
                "val_acc": mean(4, 5),
                "robustness": mean(6, 7),
                # a combined R's terms apart
                **({"robustness_cb": mean(8, 7), "robustness_jacobian": mean(9, 7)}
                   if config.robustness.kind == "combined" else {}),
                **architecture_entropy(net),
                "genotype": genotype.to_dict(),
                # softmax(alpha) per epoch, so the report can draw the heatmaps over the run
                "alphas": {kind: net.edge_weights(kind == "reduce")[0].detach().cpu().tolist()
                           for kind in ("normal", "reduce")},
                "images_per_s": totals[2] / elapsed,
                "time_s": elapsed,
                "world_size": world,
            }
            history.append(record)
            if rank == 0 and not warned_vacuous:
                warned_vacuous = _warn_if_vacuous(record, config.robustness)
            # the other ranks wait here for rank 0's files: a full disk or an unwritable --out stops them all
            with distributed.fail_together():
                if rank == 0:
                    out.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))
                    atomic_write_text(out / "genotype.json", genotype.to_json() + "\n")
                    _write_pictures(net, genotype, out, epoch + 1)
                    save_checkpoint(checkpoint_path, config=config, net=net, searcher_state=searcher.state_dict(),
                                    epoch=epoch + 1, step=step, data_state=val_stream.state(), world_size=world,
                                    history=history)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    finally:
        progress.close()
    return SearchResult(genotype=genotype, out=out, history=history)


def _warn_if_vacuous(record: dict, robustness: RobustnessConfig) -> bool:
    """Warn when the epoch's R_CB shows a vacuous certified bound; returns whether it warned."""
    r = record.get("robustness_cb" if robustness.kind == "combined" else "robustness")
    if not robustness.uses_certified or r is None or not shows_vacuous_bound(r, robustness.cb_scale):
        return False
    warnings.warn(f"R_CB's certified bounds are vacuous: epoch {record['epoch']}'s mean R_CB is {r:.4g} on the "
                  f"{robustness.cb_scale} scale, so some robust image's margin bound is below -{VACUOUS_BOUND:,.0f}. With "
                  f"{robustness.resolved_method()} at eps {robustness.resolved_eps(certified=True):g} R_CB is finite but "
                  "does not measure robustness (docs/bounds.md, \"R_CB in the search\"): crown-symbolic at a small "
                  "eps is tight where the input is small (the CIFAR-10, MNIST and Fashion-MNIST defaults), and "
                  "--robustness jacobian works everywhere", RuntimeWarning, stacklevel=2)
    return True


def _check_finite(sums: list[float], epoch: int, checkpoint_path: Path) -> None:
    bad = next((v for v in (sums[0], sums[3], sums[6]) if not math.isfinite(v)), None)
    if bad is not None:
        _diverged(epoch, checkpoint_path, f"a loss became {bad}")


def _diverged(epoch: int, checkpoint_path: Path, what: str) -> None:
    kept = f"the last good checkpoint {checkpoint_path} is kept" if checkpoint_path.exists() else "no checkpoint was written"
    raise DivergenceError(f"the search diverged in epoch {epoch + 1} ({what}); {kept}; "
                          "try a smaller --gamma or learning rate")
