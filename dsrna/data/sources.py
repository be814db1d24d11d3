"""One reader per data set: the shipped MNIST subset, and the torchvision on-disk layouts of MNIST,
Fashion-MNIST, CIFAR-10 and ImageNet. Nothing is downloaded. A missing or malformed folder raises
:class:`~dsrna.errors.DataError` with one line naming the expected layout and how to get the files.

The small data sets are held in memory as uint8 tensors (:class:`ImageArrayDataset`); ImageNet stays
on disk as a torchvision ``ImageFolder``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from dsrna.data.formats import load_array_pickle
from dsrna.errors import DataError

Transform = Callable[[torch.Tensor], torch.Tensor] | None

MNIST_MINI_PATH = Path(__file__).with_name("mnist_mini.npz")
# Printed by tools/make_mnist_mini.py, which writes the file reproducibly.
MNIST_MINI_SHA256 = "ba2c56750fcad8029f7b38e8ec5bdcae0fdc4d535bcfda49083c5747af44a30c"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ImageArrayDataset(Dataset):
    """In-memory images: uint8 ``images [N, C, H, W]`` and int64 ``targets [N]``. An item is
    ``(float [C, H, W] in [0, 1] after the optional tensor transform, int label)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes, transform: Transform = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _check_labels(labels: torch.Tensor, count: int, num_classes: int, where: str) -> None:
    if count == 0:
        raise DataError(f"{where}: no images")
    if labels.numel() != count:
        raise DataError(f"{where}: {count} images but {labels.numel()} labels")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}")


# --- the shipped MNIST subset ---------------------------------------------------------------------


@functools.cache
def _mnist_mini_arrays() -> dict[str, np.ndarray]:
    try:
        payload = MNIST_MINI_PATH.read_bytes()
    except OSError as exc:
        raise DataError(f"the shipped MNIST subset {MNIST_MINI_PATH} cannot be read ({exc.strerror}); reinstall dsrna") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != MNIST_MINI_SHA256:
        raise DataError(f"the shipped MNIST subset {MNIST_MINI_PATH} is corrupted (sha256 {digest[:16]}..., "
                        f"expected {MNIST_MINI_SHA256[:16]}...); reinstall dsrna or rebuild it with tools/make_mnist_mini.py")
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def read_mnist_mini(train: bool, transform: Transform) -> ImageArrayDataset:
    """4,000 training / 1,000 test MNIST images, 10% / 10% per class (see tools/make_mnist_mini.py)."""
    arrays = _mnist_mini_arrays()
    split = "train" if train else "test"
    images = torch.tensor(arrays[f"{split}_images"]).unsqueeze(1)  # a copy: the cached arrays stay intact
    labels = torch.tensor(arrays[f"{split}_labels"], dtype=torch.long)
    return ImageArrayDataset(images, labels, tv_datasets.MNIST.classes, transform)


# --- MNIST and Fashion-MNIST (torchvision layout: ROOT/<Name>/raw/<idx files>) ----------------------

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _mnist_how_to_get(tv_class: type, root: Path) -> str:
    source = {"MNIST": "the MNIST distribution",
              "FashionMNIST": "github.com/zalandoresearch/fashion-mnist (Debian: package dataset-fashion-mnist)"}
    return (f"get them with torchvision.datasets.{tv_class.__name__}('{root}', download=True) on a machine with "
            f"network, or gunzip the four files of {source[tv_class.__name__]} there")


def _missing(folder: Path, names: tuple[str, ...]) -> str:
    if not folder.is_dir():
        return "no such folder"
    return "missing: " + ", ".join(name for name in names if not (folder / name).is_file())


def read_mnist_family(tv_class: type, root: Path, train: bool, transform: Transform) -> ImageArrayDataset:
    """``torchvision.datasets.MNIST`` or ``FashionMNIST`` read with ``download=False``."""
    folder = tv_class.__name__
    raw = root / folder / "raw"
    if not all((raw / name).is_file() for name in IDX_FILES):
        raise DataError(f"{folder} not found: expected the uncompressed IDX files {', '.join(IDX_FILES)} in {raw} "
                        f"({_missing(raw, IDX_FILES)}); {_mnist_how_to_get(tv_class, root)}")
    try:
        dataset = tv_class(str(root), train=train, download=False)
        images, labels = dataset.data, dataset.targets
    except Exception as exc:  # torchvision asserts, or raises TypeError/RuntimeError, on malformed IDX files
        raise DataError(f"{raw}: malformed IDX files ({_reason(exc)}); "
                        f"{_mnist_how_to_get(tv_class, root)}") from exc
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{raw}: expected uint8 28x28 images, found {images.dtype} {tuple(images.shape)}")
    _check_labels(labels, images.shape[0], 10, str(raw))
    return ImageArrayDataset(images.unsqueeze(1), labels, tv_class.classes, transform)


# --- CIFAR-10 (ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch}) -----------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)


def _cifar10_how_to_get(root: Path) -> str:
    return f"download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it in {root}"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # torchvision's CIFAR10 would also check the md5 of every batch and unpickle without restriction;
    # reading the batches here keeps to the same layout with an array-only unpickler.
    try:
        with open(path, "rb") as file:
            batch = load_array_pickle(file)
        images = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({_reason(exc)}); "
                        f"{_cifar10_how_to_get(path.parent.parent)}") from exc
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 data of shape [N, 3072], found {images.dtype} {images.shape}")
    # Per batch: in the concatenation, one batch's extra label would shift every later image's.
    _check_labels(torch.from_numpy(labels), images.shape[0], 10, str(path))
    return images.reshape(-1, 3, 32, 32), labels  # rows are the red, green, blue planes, row-major


def read_cifar10(root: Path, train: bool, transform: Transform) -> ImageArrayDataset:
    folder = root / CIFAR10_FOLDER
    expected = CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES
    if not all((folder / name).is_file() for name in expected):
        raise DataError(f"CIFAR-10 not found: expected the python batches {', '.join(expected)} in {folder} "
                        f"({_missing(folder, expected)}); {_cifar10_how_to_get(root)}")
    parts = [_read_cifar_batch(folder / name) for name in (CIFAR10_TRAIN_BATCHES if train else CIFAR10_TEST_BATCHES)]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageArrayDataset(images, labels, CIFAR10_CLASSES, transform)


# --- ImageNet (ImageFolder: ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG) ------------------------

IMAGENET_CLASSES = 1000
_IMAGENET_LAYOUT = "ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG"
_IMAGENET_HOW_TO_GET = ("get ILSVRC2012 from https://image-net.org and sort the validation images into "
                        "the same class folders as train")


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def _load_image(path: str):
    """torchvision's image loader, naming the file it cannot read (a truncated download, an empty
    file, a stray non-image) instead of failing hours into a run with "Truncated File Read"."""
    try:
        return tv_datasets.folder.default_loader(path)
    except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for broken files
        raise DataError(f"{path}: not a readable image ({_reason(exc)})") from exc


def read_imagenet(root: Path, train: bool, transform: Transform) -> Dataset:
    splits = {name: root / name for name in ("train", "val")}
    for name, folder in splits.items():
        if not folder.is_dir():
            raise DataError(f"ImageNet not found: {folder} is not a folder; expected {_IMAGENET_LAYOUT} "
                            f"with ROOT={root}; {_IMAGENET_HOW_TO_GET}")
    classes = {name: _class_folders(folder) for name, folder in splits.items()}
    if not classes["train"]:
        raise DataError(f"{splits['train']} has no class folders; expected {_IMAGENET_LAYOUT}; {_IMAGENET_HOW_TO_GET}")
    found = len(classes["train"])
    if found > IMAGENET_CLASSES:  # labels past the classifier's 1000 outputs crash the loss
        raise DataError(f"{splits['train']} has {found} class folders; ImageNet has {IMAGENET_CLASSES} (is a stray "
                        f"folder, e.g. {classes['train'][-1]}, among them?)")
    if found < IMAGENET_CLASSES:
        warnings.warn(f"{splits['train']} has {found} class folders, not ImageNet's {IMAGENET_CLASSES}: the models "
                      f"keep {IMAGENET_CLASSES} outputs, of which the last {IMAGENET_CLASSES - found} never get a label")
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DataError(f"{splits['train']} and {splits['val']} have different class folders "
                        f"({len(only)} differ, e.g. {only[0]}), so their labels would not match; {_IMAGENET_HOW_TO_GET}")
    try:
        return tv_datasets.ImageFolder(str(splits["train" if train else "val"]), transform=transform,
                                       loader=_load_image)
    except FileNotFoundError as exc:  # a class folder without any image file
        raise DataError(f"{exc}; expected {_IMAGENET_LAYOUT}") from exc
