"""Readers for the on-disk formats that are not read through torchvision.

CIFAR-10's python batches and the classic ``mnist.pkl.gz`` are pickles. Unpickling can run arbitrary
code, so they are read with an unpickler that only resolves the few numpy names needed to rebuild
arrays; anything else in the file is refused.
"""

from __future__ import annotations

import io
import pickle
from typing import BinaryIO

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),  # pickles written by numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"),  # pickles written by numpy 2.x
    ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles; it only encodes a string
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def load_array_pickle(file: BinaryIO | bytes):
    """Unpickle plain containers of numpy arrays (Python 2 pickles included, strings as latin-1)."""
    if isinstance(file, bytes):
        file = io.BytesIO(file)
    return _ArrayOnlyUnpickler(file, encoding="latin1").load()
