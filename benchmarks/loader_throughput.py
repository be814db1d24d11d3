"""Images per second that the ImageNet loader delivers, by number of loader workers.

The ImageNet search must not wait on JPEG decoding and augmentation: compare these rates with the
search iteration's images per second per GPU (the ``search-imagenet`` row of ``dsrna bench``), per
process. It reads a real ImageNet-layout folder (``--data-root``), or writes ``--synthetic`` JPEGs of
ImageNet's typical size (about 500x375 pixels and 110 KB each) to a temporary folder.

    PYTHONPATH=. python benchmarks/loader_throughput.py --synthetic 1024 --workers 1,2 --batch 64

Prints a Markdown table; ``--jsonl FILE`` also appends one JSON row per worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsrna.data import get_dataset, make_loader

IMAGENET_SIZE = (500, 375)  # the most common ImageNet training image size (width, height)


def write_synthetic_imagenet(root: Path, images: int, classes: int = 4, seed: int = 0) -> None:
    """``root/{train,val}/class_k/*.JPEG``: smooth colour fields with noise, so that JPEG files come
    out about as large (and as slow to decode) as ImageNet photographs, not as flat colour blocks."""
    rng = np.random.default_rng(seed)
    width, height = IMAGENET_SIZE
    for split, count in (("train", images), ("val", classes)):
        for k in range(count):
            folder = root / split / f"class_{k % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.uniform(0, 255, size=(height // 25 + 1, width // 25 + 1, 3))
            smooth = np.kron(coarse, np.ones((25, 25, 1)))[:height, :width]
            pixels = np.clip(smooth + rng.normal(0, 16, size=smooth.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{k:06d}.JPEG", quality=90)


def measure(root: Path, workers: int, batch: int, batches: int) -> dict:
    """Images per second over ``batches`` batches after the first (which pays for starting workers)."""
    with warnings.catch_warnings():  # a synthetic folder has fewer than ImageNet's 1,000 classes
        warnings.simplefilter("ignore")
        dataset = get_dataset("imagenet", root, train=True, augment=True)
    loader = make_loader(dataset, batch, shuffle=True, num_workers=workers, drop_last=True)
    if len(loader) < batches + 1:
        raise SystemExit(f"{len(dataset)} images make {len(loader)} batches of {batch}; need {batches + 1}: "
                         "pass more --synthetic images or fewer --batches")
    timed = 0
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(stream)
        timed += images.shape[0]
    seconds = time.perf_counter() - start
    return dict(workers=workers, batch=batch, images=timed, seconds=round(seconds, 3),
                images_per_s=round(timed / seconds, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", type=Path, help="an ImageNet-layout folder (ROOT/train/CLASS/*.JPEG)")
    source.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic training JPEGs first")
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts (default 1,2,4,8)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per worker count (default 8)")
    parser.add_argument("--jsonl", type=Path, help="append the rows to this file")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root
        if root is None:
            root = Path(scratch)
            write_synthetic_imagenet(root, args.synthetic)
        torch.set_num_threads(1)  # the main process only collates; the workers do the work
        rows = [measure(root, w, args.batch, args.batches) for w in counts]

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads"
    source = f"{args.data_root}" if args.data_root else f"{args.synthetic} synthetic {IMAGENET_SIZE[0]}x{IMAGENET_SIZE[1]} JPEGs"
    print(f"ImageNet loader (RandomResizedCrop 224, flip, colour jitter), {source}; {machine}; torch {torch.__version__}\n")
    print("| workers | batch | images/s | images/s per worker |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['batch']} | {row['images_per_s']} | "
              f"{row['images_per_s'] / max(row['workers'], 1):.1f} |")
    if args.jsonl:
        with args.jsonl.open("a") as out:
            for row in rows:
                out.write(json.dumps(dict(row, source=source, machine=machine, torch=torch.__version__)) + "\n")


if __name__ == "__main__":
    main()
