"""Small helpers shared by the evaluation modules: device choice, atomic writes, the test loader."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Subset

from dsrna.search.checkpoint import atomic_write, atomic_write_text


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an explicit CUDA device without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: an interrupted run never leaves a torn file."""
    atomic_write(path, lambda temp: torch.save(obj, temp))


def write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def evaluation_loader(dataset: str, root: str | None = None, limit: int | None = None, batch_size: int = 128,
                num_workers: int = 0) -> DataLoader:
    """The first ``limit`` images of a data set's test split (all when None), in a fixed order."""
    from dsrna.data import get_dataset, make_loader

    test_set = get_dataset(dataset, root=root, train=False)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        test_set = Subset(test_set, range(min(limit, len(test_set))))
    return make_loader(test_set, batch_size, shuffle=False, num_workers=num_workers)


def parse_floats(text: str, name: str) -> list[float]:
    """``"0.1,0.2"`` -> ``[0.1, 0.2]``; each value must be >= 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v >= 0 for v in values):
        raise ValueError(f"{name}: expected one or more numbers >= 0, got {text!r}")
    return values


@contextlib.contextmanager
def evaluation_pass(model: torch.nn.Module, loader, device: torch.device, desc: str,
                    progress: bool) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The loader's batches moved to ``device``, with ``model`` in eval mode (its mode is restored
    afterwards, also on error) and, with ``progress``, a bar counting images."""
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(loader.dataset), unit="img", desc=desc, dynamic_ncols=True)

    def batches():
        for x, y in loader:
            yield x.to(device), y.to(device)
            if bar is not None:
                bar.update(y.numel())

    try:
        yield batches()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
