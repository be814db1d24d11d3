"""Data sets for search and evaluation; every item is ``(float image [C, H, W] in [0, 1], int label)``.

``mnist-mini`` (a class-balanced real MNIST subset, 4,000 training and 1,000 test images) ships with
the package and is the default. ``mnist``, ``fashion-mnist`` and ``cifar10`` are read from
torchvision-layout folders and ``imagenet`` from an ImageFolder tree; nothing is downloaded.
"""

from dsrna.data.loading import make_loader, search_split
from dsrna.data.registry import (
    DATA_ROOT_ENV,
    DATASETS,
    DEFAULT_DATASET,
    DatasetInfo,
    add_dataset_arguments,
    class_balanced_split,
    class_balanced_subset,
    data_root,
    dataset_info,
    dataset_targets,
    get_dataset,
)
from dsrna.data.sources import ImageArrayDataset
from dsrna.data.transforms import Cutout

__all__ = [
    "DATA_ROOT_ENV", "DATASETS", "DEFAULT_DATASET", "Cutout", "DatasetInfo", "ImageArrayDataset",
    "add_dataset_arguments", "class_balanced_split", "class_balanced_subset", "data_root", "dataset_info", "dataset_targets",
    "get_dataset", "make_loader", "search_split",
]
