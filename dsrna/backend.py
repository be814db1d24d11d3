"""The one dispatch point between the pure-PyTorch reference path and the fast paths.

Every fast op registers one implementation per backend under an op name::

    register("weighted_sum", "reference", weighted_sum_reference)
    register("weighted_sum", "native", weighted_sum_native, devices=("cpu", "cuda"))

and the library calls ``dispatch("weighted_sum", tensor, backend)(...)``. The backend is chosen, in
order of precedence, by the ``backend=`` argument of a model, the innermost ``use_backend`` context,
or ``set_backend``; ``"auto"`` picks the first usable backend in ``AUTO_ORDER`` for the tensor's device.
``reference`` is always usable and is the fallback: ops that a chosen backend does not implement run
on the reference path, while asking explicitly for a backend that cannot run on the device at all
(extension not built, no GPU, Triton on CPU without the interpreter) raises ``BackendUnavailable``
with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("reference", "triton", "native")
CHOICES = ("auto",) + BACKENDS

# Preference of `auto` per device type. Triton on CPU only runs under the (very slow) interpreter,
# so `auto` never picks it there; it remains selectable explicitly for tests.
AUTO_ORDER = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}

_registry: dict[str, dict[str, tuple[Callable, tuple[str, ...]]]] = {}
_state = threading.local()
_global_backend = os.environ.get("DSRNA_BACKEND", "auto")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on this device."""


def check_name(name: str) -> str:
    """``name`` if it is a backend choice (``auto`` or a backend), else a ``ValueError`` listing them."""
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    return name


def check_environment() -> None:
    """A ``ValueError`` if ``DSRNA_BACKEND`` is set to anything but a backend choice: the variable is read
    at import, and without this check a typo surfaces at the first op, after a command's setup."""
    name = os.environ.get("DSRNA_BACKEND")
    if name is not None and name not in CHOICES:
        raise ValueError(f"DSRNA_BACKEND={name!r} is not a backend; choose one of {', '.join(CHOICES)}")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``auto``, ``reference``, ``triton`` or ``native``)."""
    global _global_backend
    _global_backend = check_name(name)


def get_backend() -> str:
    """The backend in effect here: the innermost ``use_backend`` context, else the global default."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting a backend for the ops run inside it (thread-local)."""
    check_name(name)
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def register(op: str, backend: str, fn: Callable, devices: tuple[str, ...] = ("cpu", "cuda")) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` for the given device types."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _registry.setdefault(op, {})[backend] = (fn, tuple(devices))


# --- availability of the backends themselves ------------------------------------------------------


@functools.cache
def _native_status() -> tuple[bool, str]:
    from dsrna import _native

    if _native.C is None:
        return False, f"extension dsrna._C not importable ({_native.LOAD_ERROR}); {_native.REBUILD_HINT}"
    return True, "dsrna._C loaded"


def _native_has_cuda() -> bool:
    from dsrna import _native

    return _native.built_with_cuda()


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status(backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device_type`` ("cpu" or "cuda"), and why or why not."""
    if backend == "reference":
        return True, "pure PyTorch, always available"
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device visible"
    if backend == "native":
        ok, why = _native_status()
        if ok and device_type == "cuda" and not _native_has_cuda():
            return False, "dsrna._C was built without CUDA sources (no CUDA toolkit at build time, or DSRNA_NO_CUDA=1)"
        return ok, why
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return ok, why
        if device_type == "cpu" and not _triton_interpreted():
            return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1 (slow; for tests)"
        if device_type == "cuda" and _triton_interpreted():
            return False, "TRITON_INTERPRET=1 is set: Triton kernels run on the CPU only"
        return True, why + (" (interpreter)" if device_type == "cpu" else "")
    raise ValueError(f"unknown backend {backend!r}")


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """The backend that will run ``op`` on ``device`` given a requested backend (None: the current one)."""
    requested = check_name(backend if backend not in (None, "auto") else get_backend())
    device_type = torch.device(device).type
    impls = _registry.get(op, {})
    if "reference" not in impls:
        raise KeyError(f"op {op!r} has no reference implementation registered")
    if requested != "auto":
        # A backend that cannot run here at all is an error; one that merely lacks this op (no backend
        # implements every op) leaves the op on the reference path.
        ok, why = backend_status(requested, device_type)
        if not ok:
            raise BackendUnavailable(f"backend {requested!r} unavailable for {device_type}: {why}")
        if requested not in impls or device_type not in impls[requested][1]:
            return "reference"
        return requested
    for candidate in AUTO_ORDER.get(device_type, ("reference",)):
        if candidate in impls and device_type in impls[candidate][1]:
            ok, why = backend_status(candidate, device_type)
            if ok:
                return candidate
            if candidate != "reference":
                # One warning per cause: a missing extension makes the backend unusable on every device.
                _warn_once(candidate + why, f"dsrna: {candidate} backend unusable ({why}); using a slower path")
    return "reference"


def dispatch(op: str, device: torch.device | str, backend: str | None = None) -> Callable:
    """The implementation of ``op`` for ``device`` under the requested backend."""
    # Fast path for the reference backend, which is always usable: called once per op per forward,
    # so the full resolution (device parsing, availability checks) is overhead there.
    requested = backend if backend not in (None, "auto") else get_backend()
    if requested == "reference":
        impl = _registry.get(op, {}).get("reference")
        if impl is not None:
            return impl[0]
    return _registry[op][resolve(op, device, backend)][0]


def device_scope(device: torch.device | str) -> contextlib.AbstractContextManager:
    """``device`` as CUDA's current device inside the block; nothing for other devices. Triton
    launches, new CUDA streams and CUDA graph captures use the current device, not their tensors'."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def registered_ops() -> dict[str, tuple[str, ...]]:
    """Op name -> backends that have an implementation registered."""
    return {op: tuple(impls) for op, impls in sorted(_registry.items())}
