"""Splitting and batching."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset


def search_split(dataset: Dataset, portion: float = 0.5, seed: int = 0) -> tuple[Subset, Subset]:
    """The two disjoint halves of the bilevel search: ``floor(portion * n)`` items to fit the weights
    and the rest to fit the architecture, drawn by a seeded permutation (independent of the global RNG)."""
    if not 0.0 < portion < 1.0:
        raise ValueError(f"train portion must be strictly between 0 and 1, got {portion}")
    size = len(dataset)
    train_size = math.floor(round(portion * size, 6))  # 0.29 * 50000 is 14499.999... in floating point
    if train_size == 0 or train_size == size:
        raise ValueError(f"a train portion of {portion} leaves one half of the {size} search images empty")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[:train_size]), Subset(dataset, order[train_size:])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A ``DataLoader`` whose order depends only on ``seed`` (and the epoch, when iterated again).

    The seed drives the shuffle and the workers' random streams; with ``num_workers=0`` random
    augmentations draw from the global torch generator instead. Pass either ``shuffle`` or a
    ``sampler`` (e.g. a ``DistributedSampler``, which decides the order itself).
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler: the sampler decides the order")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
