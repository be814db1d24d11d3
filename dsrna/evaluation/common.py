"""Small helpers shared by the evaluation modules: device choice, atomic writes, the test loader."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from dsrna.attacks import EvalMode
from dsrna.errors import DataError
from dsrna.search.checkpoint import atomic_write, atomic_write_text, check_writable


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an explicit CUDA device without CUDA is a user error.

    Every command that takes ``--device`` calls this before any work, so a typo fails at once."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: an interrupted run never leaves a torn file."""
    atomic_write(path, lambda temp: torch.save(obj, temp))


def write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def evaluation_loader(dataset: str, root: str | None = None, limit: int | None = None, batch_size: int = 128,
                num_workers: int = 0) -> DataLoader:
    """``limit`` images of a data set's test split (all when None), in a fixed order: the first ones,
    or, where the split is sorted by class (ImageNet's val folders), evenly spaced ones, so that every
    class counts alike (the first 1,000 ImageNet images are 20 of its 1,000 classes)."""
    from dsrna.data import dataset_targets, get_dataset, make_loader

    test_set = get_dataset(dataset, root=root, train=False)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        size = len(test_set)
        targets = dataset_targets(test_set) if hasattr(test_set, "targets") else None
        if limit < size and targets is not None and bool((targets[1:] >= targets[:-1]).all()):
            test_set = Subset(test_set, [i * size // limit for i in range(limit)])
        else:
            test_set = Subset(test_set, range(min(limit, size)))
    return make_loader(test_set, batch_size, shuffle=False, num_workers=num_workers)


def parse_floats(text: str, name: str) -> list[float]:
    """``"0.1,0.2"`` -> ``[0.1, 0.2]``; each value must be finite and >= 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(f"{name}: expected one or more finite numbers >= 0, got {text!r}")
    return values


def check_model_fits_dataset(meta: dict, dataset: str) -> None:
    """Refuse to evaluate a model on a data set of another shape: its first convolution would fail
    (channels), or its labels would index past the classifier (classes)."""
    from dsrna.data import dataset_info

    info, model_config = dataset_info(dataset), meta["model_config"]
    for what, expected, given in (("input channels", model_config["in_channels"], info.in_channels),
                                  ("classes", model_config["num_classes"], info.num_classes)):
        if expected != given:
            raise DataError(f"the model expects {expected} {what} but the data set {dataset} has {given}: "
                            f"pass the --dataset it was trained on ({meta.get('dataset')})")


def add_evaluation_arguments(parser, verb: str, norms: Sequence[str], batch_size: int, outputs: str) -> None:
    """The flags that ``dsrna attack`` and ``dsrna certify`` share, i.e. what :func:`prepare_evaluation`
    reads (plus ``--norm`` and ``--no-progress``)."""
    parser.add_argument("model", help="model.pt written by dsrna train, or its run folder")
    parser.add_argument("--norm", default="linf", choices=norms)
    parser.add_argument("--dataset", help="default: the data set the model was trained on")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--limit", type=int,
                        help=f"{verb} N test images only: the first N (ImageNet: N evenly spaced, every class alike)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help=f"folder for {outputs} (default: the model's folder)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def prepare_evaluation(args) -> tuple[torch.device, torch.nn.Module, dict, DataLoader, Path]:
    """What ``dsrna attack`` and ``dsrna certify`` need, every input checked before the long work:
    ``(device, model, model.pt metadata, test loader, output folder)``."""
    from dsrna.evaluation.train import load_model, model_file

    device = pick_device(args.device)
    path = model_file(args.model)
    model, meta = load_model(path, device)
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise DataError(f"{path} does not record the data set it was trained on: pass --dataset")
    check_model_fits_dataset(meta, dataset)
    out = Path(args.out) if args.out else path.parent
    check_writable(out)
    loader = evaluation_loader(dataset, args.data_root, args.limit, args.batch_size)
    return device, model, meta, loader, out


def result_name(kind: str, norm: str, what: str | Sequence[str]) -> str:
    """The stem of an evaluation's files, e.g. ``attack_linf_fgsm-pgd`` or ``certify_l2_crown``: one
    set per norm and attacks (or bound method), so that another evaluation keeps this one's results."""
    return "_".join([kind, norm, what if isinstance(what, str) else "-".join(what)])


@contextlib.contextmanager
def evaluation_pass(model: torch.nn.Module, loader, device: torch.device, desc: str,
                    progress: bool) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The loader's batches moved to ``device``, with ``model`` in eval mode (each module's own mode
    is restored afterwards, also on error) and, with ``progress``, a bar counting images. A loader
    without images is an error at the end of the batches, not a result over nothing."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(loader.dataset), unit="img", desc=desc, dynamic_ncols=True)

    def batches():
        empty = True
        for x, y in loader:
            empty = False
            yield x.to(device), y.to(device)
            if bar is not None:
                bar.update(y.numel())
        if empty:
            raise ValueError("no test images: the loader is empty")

    try:
        with EvalMode(model):
            yield batches()
    finally:
        if bar is not None:
            bar.close()
