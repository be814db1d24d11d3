"""The named data sets: what each one is (:class:`DatasetInfo`) and how to get it (:func:`get_dataset`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from dsrna.data import sources
from dsrna.data.transforms import Cutout, imagenet_pipeline, small_image_augmentation
from dsrna.errors import DataError

DATA_ROOT_ENV = "DSRNA_DATA_ROOT"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts a model needs: its input shape, class count and the normalisation it applies
    inside (``mean``/``std`` per channel, of the training images in [0, 1])."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_MNIST_STATS = dict(mean=(0.1307,), std=(0.3081,))
_INFO = {
    info.name: info
    for info in (
        DatasetInfo("mnist-mini", 10, 1, 28, **_MNIST_STATS),  # a sample of MNIST: the same statistics
        DatasetInfo("mnist", 10, 1, 28, **_MNIST_STATS),
        DatasetInfo("fashion-mnist", 10, 1, 28, mean=(0.2860,), std=(0.3530,)),
        DatasetInfo("cifar10", 10, 3, 32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
        DatasetInfo("imagenet", sources.IMAGENET_CLASSES, 3, 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    )
}

DATASETS: tuple[str, ...] = tuple(_INFO)
DEFAULT_DATASET = "mnist-mini"


def dataset_info(name: str) -> DatasetInfo:
    try:
        return _INFO[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None


def data_root(root: str | os.PathLike | None) -> Path:
    """The folder holding the on-disk data sets: ``root``, else ``$DSRNA_DATA_ROOT``, else ``./data``."""
    return Path(root if root is not None else os.environ.get(DATA_ROOT_ENV, "data")).expanduser()


def get_dataset(
    name: str = DEFAULT_DATASET,
    root: str | os.PathLike | None = None,
    train: bool = True,
    augment: bool = False,
    subset_fraction: float | None = None,
    seed: int = 0,
    cutout: int = 0,
) -> Dataset:
    """A data set of ``(float image [C, H, W] in [0, 1], int label)``.

    ``train`` picks the training or the test split (ImageNet: ``train``/``val``). ``augment`` adds the
    usual training augmentation (CIFAR-10: crop with padding 4 and flips; MNIST family: crop with
    padding 2; ImageNet: RandomResizedCrop 224, flips and colour jitter instead of resize 256 + centre crop 224) and
    ``cutout`` a :class:`Cutout` of that length filled with the data set's mean colour; both apply to
    training data only. ``subset_fraction`` keeps that fraction of every class, drawn with ``seed``
    (PC-DARTS searches ImageNet on 10% + 2.5% of the training images). ``root`` is ignored by
    ``mnist-mini``, which ships with the package.
    """
    info = dataset_info(name)
    if (augment or cutout) and not train:
        raise ValueError("augmentation and cutout apply to training data only (train=True)")
    if cutout < 0:
        raise ValueError(f"cutout length must be >= 0, got {cutout}")

    if name == "imagenet":
        steps = [imagenet_pipeline(augment)]
    else:
        steps = small_image_augmentation("cifar" if name == "cifar10" else "mnist", info.image_size) if augment else []
    if cutout:
        steps.append(Cutout(cutout, fill=info.mean))
    transform = (steps[0] if len(steps) == 1 else T.Compose(steps)) if steps else None

    if name == "mnist-mini":
        dataset = sources.read_mnist_mini(train, transform)
    elif name == "mnist":
        dataset = sources.read_mnist_family(tv_datasets.MNIST, data_root(root), train, transform)
    elif name == "fashion-mnist":
        dataset = sources.read_mnist_family(tv_datasets.FashionMNIST, data_root(root), train, transform)
    elif name == "cifar10":
        dataset = sources.read_cifar10(data_root(root), train, transform)
    else:
        dataset = sources.read_imagenet(data_root(root), train, transform)

    if subset_fraction is not None:
        dataset = class_balanced_subset(dataset, subset_fraction, seed)
    return dataset


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The labels of every item, read without loading any image (also through ``Subset``)."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets, dtype=torch.long)
    raise TypeError(f"{type(dataset).__name__} exposes no `targets`")


def class_balanced_subset(dataset: Dataset, fraction: float, seed: int = 0) -> Subset:
    """``round(fraction * n_c)`` items (at least one) of every class c, drawn with ``seed``, in the
    data set's order."""
    return class_balanced_split(dataset, (fraction,), seed)[0]


def class_balanced_split(dataset: Dataset, fractions: Sequence[float], seed: int = 0) -> tuple[Subset, ...]:
    """Disjoint subsets holding ``round(f * n_c)`` items (at least one) of every class c for each
    fraction f, drawn with ``seed``, each in the data set's order. PC-DARTS searches ImageNet on
    ``fractions=(0.1, 0.025)`` of the training set: weights on the first, architecture on the second."""
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
        raise ValueError(f"subset fractions must be in (0, 1] and sum to at most 1, got {tuple(fractions)}")
    targets = dataset_targets(dataset)
    generator = torch.Generator().manual_seed(seed)
    kept: list[list[torch.Tensor]] = [[] for _ in fractions]
    for label in torch.unique(targets).tolist():
        members = torch.nonzero(targets == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        counts = [max(1, round(f * members.numel())) for f in fractions]
        if sum(counts) > members.numel():
            raise ValueError(f"class {label} has {members.numel()} items, too few for subsets of {counts}")
        start = 0
        for chosen, count in zip(kept, counts):
            chosen.append(members[start:start + count])
            start += count
    return tuple(Subset(dataset, torch.sort(torch.cat(chosen)).values.tolist()) for chosen in kept)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset`` and ``--data-root``, the same on every subcommand that reads data."""
    parser.add_argument("--dataset", choices=DATASETS, default=DEFAULT_DATASET,
                        help=f"data set (default: {DEFAULT_DATASET}, shipped with the package)")
    parser.add_argument("--data-root", metavar="DIR", default=None,
                        help=f"folder with the torchvision-layout data sets (default: ${DATA_ROOT_ENV} or ./data)")
