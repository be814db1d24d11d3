"""The native extension ``dsrna._C``, loaded once.

Importing it registers the ``torch.ops.dsrna.*`` kernels (CPU, and CUDA when built with a CUDA
toolkit). It is optional: when it is missing (a pure-Python install, ``DSRNA_NO_EXT=1``) or broken
(built against another torch or Python), :data:`C` is None and :data:`LOAD_ERROR` says why. No
warning is raised here: :mod:`dsrna.backend` warns once, with this reason, when ``auto`` has to
fall back, and raises it when the native backend is requested explicitly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

REBUILD_HINT = "rebuild with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"


def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("dsrna._C"), None
    except Exception as exc:  # ImportError, or an undefined symbol / ABI mismatch
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


# The module, or None; and why it is None.
C, LOAD_ERROR = _load()


def built_with_cuda() -> bool:
    """Whether the loaded extension holds the CUDA kernels."""
    return C is not None and bool(C.built_with_cuda())


def built_with_openmp() -> bool:
    """Whether the loaded extension's CPU kernels run on torch's threads (else on one; an extension
    built before this check existed has none and counts as without)."""
    return C is not None and bool(getattr(C, "built_with_openmp", lambda: False)())


__all__ = ["C", "LOAD_ERROR", "REBUILD_HINT", "built_with_cuda", "built_with_openmp"]
