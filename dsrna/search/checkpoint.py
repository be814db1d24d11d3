"""Search checkpoints: written atomically, read with ``weights_only=True``, checked against the run.

A checkpoint holds only tensors, numbers, strings, lists and dicts (the config as JSON text, the
RNG states as tensors), so loading it never unpickles code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsrna.errors import CheckpointError
from dsrna.search import distributed
from dsrna.search.config import SearchConfig

FORMAT = "dsrna-search-checkpoint/1"


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory (Windows cannot).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(temp_path)`` then move the file into place, so readers never see half a file,
    and a crash right after the rename never leaves an empty one (the data is flushed to disk first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; the result should have the mode a plain open() would give.
        os.chmod(temp, 0o666 & ~_umask())
        os.close(fd)
        fd = None
        write(temp)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text))


def check_writable(folder: Path, hint: str = "choose another --out") -> None:
    """Create ``folder`` and make sure files can be written in it, before any long work whose
    results would otherwise be lost at the end."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a folder: {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dsrna-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"cannot write in {folder} ({exc.strerror or type(exc).__name__}): {hint}") from None


# Files that tell which command filled a run folder, most specific first.
_RUN_MARKERS = (
    ("comparison", ("compare_config.json", "compare.json")),
    ("search", ("alphas.png", "normal.png", "reduce.png")),
    ("training", ("model.pt", "checkpoint.pt")),
)


def run_kind(folder: Path) -> str | None:
    """``"comparison"``, ``"search"`` or ``"training"``: the kind of run ``folder`` holds (None: none)."""
    folder = Path(folder)
    for kind, markers in _RUN_MARKERS:
        if any((folder / name).exists() for name in markers):
            return kind
    return None


def refuse_existing_run(folder: Path, own_kind: str) -> None:
    """A new run must not overwrite another run's files: refuse a folder that already holds one
    (a run of ``own_kind`` can be continued with --resume instead)."""
    kind = run_kind(folder)
    if kind is not None:
        hint = "pass --resume to continue it or " if kind == own_kind else ""
        raise CheckpointError(f"{folder} already holds a {kind} run: {hint}choose another --out")


def load_torch_file(path: Path, what: str, map_location: torch.device | str = "cpu"):
    """``torch.load(path, weights_only=True)``, or a one-line ``CheckpointError`` naming the file.

    PyTorch's own message for a file that is not plain data suggests ``weights_only=False``, which
    would run code from the file: it is never passed on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    damaged = _damaged_member(path)
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: the checksum of its entry {damaged} does not match its data")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if isinstance(exc, PermissionError):  # other OSErrors ("Invalid argument") come from a torn zip
            reason = exc.strerror or type(exc).__name__
        elif "Unsupported global" in str(exc):
            reason = "it holds objects other than tensors and plain data"
        else:
            reason = "not a torch file, or truncated"
        raise CheckpointError(f"{path} is not a dsrna {what} ({reason})") from None


def _damaged_member(path: Path) -> str | None:
    """The first entry of the torch (zip) file at ``path`` whose data does not match its CRC-32, or None.
    ``torch.load`` does not check them, so flipped bytes in a tensor would load as other weights; a
    file that is not a zip archive is left to ``torch.load`` to refuse."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, EOFError):
        return None


def load_state_checked(module: torch.nn.Module, state_dict, path: Path, what: str) -> None:
    """``module.load_state_dict(state_dict)``, or one line naming a few missing/unexpected keys
    (PyTorch's message lists every key, one per line)."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} is not a dsrna {what} (its weights are a {type(state_dict).__name__})")
    expected, given = set(module.state_dict()), set(state_dict)
    problems = []
    for label, keys in (("missing", sorted(expected - given)), ("unexpected", sorted(given - expected))):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{label} {', '.join(keys[:3])}{more}")
    if not problems:
        not_finite = [key for key, value in state_dict.items()
                      if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
        if not_finite:
            more = f" and {len(not_finite) - 1} more" if len(not_finite) > 1 else ""
            raise CheckpointError(f"{path} holds NaN or infinite weights ({not_finite[0]}{more}): "
                                  "the run it comes from diverged, or the file was edited")
        try:
            module.load_state_dict(state_dict)
            return
        except (RuntimeError, TypeError, ValueError) as exc:
            # e.g. a shape mismatch: the first detail line names the parameter
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            problems.append(lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__))
    raise CheckpointError(f"{path} does not fit this network: {'; '.join(problems)}")


def rng_state() -> dict[str, Any]:
    """Every generator a run draws from; of CUDA's, the current device's (the run's: each process of
    a torchrun job has its own, all seeded and advanced alike)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if len(state["cuda"]) == 1 and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    elif state["cuda"] and torch.cuda.is_available():  # written before: every device's, in order
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss"]))


def save_checkpoint(path: Path, *, config: SearchConfig, net: torch.nn.Module, searcher_state: dict,
                    epoch: int, step: int, data_state: dict, world_size: int, history: list[dict]) -> None:
    """``epoch`` is the number of finished epochs (the epoch a resumed run starts with); ``history``
    their log records (plain data), which a resumed run continues."""
    payload = {
        "format": FORMAT,
        "config": json.dumps(config.to_dict()),
        "epoch": epoch,
        "step": step,
        "world_size": world_size,
        "model": net.state_dict(),  # includes the architecture parameters
        "searcher": searcher_state,  # both optimisers; the learning rate is a function of the epoch
        "rng": rng_state(),
        "data": data_state,
        "history": history,
        "robustness_in_effect": config.robustness.in_effect(),
    }
    atomic_write(path, lambda temp: torch.save(payload, temp))


def load_checkpoint(path: Path, config: SearchConfig, map_location: torch.device | str = "cpu") -> dict:
    """The checkpoint at ``path``, or ``CheckpointError`` if it is missing, corrupt, or was written
    by a run whose numbers-changing settings differ from ``config``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {path}")
    payload = load_torch_file(path, "search checkpoint", map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        kind = run_kind(path.parent)
        if kind not in (None, "search"):
            raise CheckpointError(f"cannot resume: {path.parent} holds a {kind} run, not a search")
        raise CheckpointError(f"{path} is not a dsrna search checkpoint (expected format {FORMAT})")
    try:
        saved = SearchConfig.from_dict(json.loads(payload["config"]))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} holds an unreadable config ({exc})") from None
    if saved.batch_size * payload.get("world_size", 1) == config.batch_size * distributed.world_size():
        # the same global batch over another number of processes (2 x 64 -> 4 x 32)
        saved = dataclasses.replace(saved, batch_size=config.batch_size)
    differing = config.differences(saved, payload.get("robustness_in_effect"))  # older checkpoints lack it
    if differing:
        raise CheckpointError(f"cannot resume {path}: it belongs to a run with different settings: "
                              f"{', '.join(differing[:3])}")
    return payload
