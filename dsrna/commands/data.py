"""``dsrna data``: check that a data set is where it should be and summarise it."""

from __future__ import annotations

import argparse

import torch

HELP = "check a data set's files and print its splits and class counts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsrna.data import add_dataset_arguments

    add_dataset_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dsrna.data import data_root, dataset_info, dataset_targets, get_dataset

    info = dataset_info(args.dataset)
    splits = {split: get_dataset(args.dataset, args.data_root, train=split == "train") for split in ("train", "test")}
    where = "shipped with dsrna" if args.dataset == "mnist-mini" else f"under {data_root(args.data_root)}"
    print(f"{info.name} ({where}): {info.num_classes} classes, {info.in_channels}x{info.image_size}x{info.image_size} "
          f"inputs, normalised inside the models with mean {info.mean} and std {info.std}")
    for split, dataset in splits.items():
        image, _ = dataset[0]  # decodes one image, so unreadable image files show up here
        counts = torch.bincount(dataset_targets(dataset))
        present = counts[counts > 0]
        print(f"  {split:5s} {len(dataset):>9,} images of shape {tuple(image.shape)} in {present.numel()} classes, "
              f"{int(present.min()):,} to {int(present.max()):,} per class")
    return 0
