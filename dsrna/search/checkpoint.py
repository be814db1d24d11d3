"""Search checkpoints: written atomically, read with ``weights_only=True``, checked against the run.

A checkpoint holds only tensors, numbers, strings, lists and dicts (the config as JSON text, the
RNG states as tensors), so loading it never unpickles code.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsrna.errors import CheckpointError
from dsrna.search.config import SearchConfig

FORMAT = "dsrna-search-checkpoint/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(temp_path)`` then move the file into place, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text))


def rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss"]))


def save_checkpoint(path: Path, *, config: SearchConfig, net: torch.nn.Module, searcher_state: dict,
                    epoch: int, step: int, data_state: dict, world_size: int) -> None:
    """``epoch`` is the number of finished epochs (the epoch a resumed run starts with)."""
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
    }
    atomic_write(path, lambda temp: torch.save(payload, temp))


def load_checkpoint(path: Path, config: SearchConfig, map_location: torch.device | str = "cpu") -> dict:
    """The checkpoint at ``path``, or ``CheckpointError`` if it is missing, corrupt, or was written
    by a run whose numbers-changing settings differ from ``config``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dsrna search checkpoint (expected format {FORMAT})")
    try:
        saved = SearchConfig.from_dict(json.loads(payload["config"]))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} holds an unreadable config ({exc})") from None
    differing = config.differences(saved)
    if differing:
        shown = ", ".join(f"{k}={getattr(saved, k)!r} (now {getattr(config, k)!r})" for k in differing[:3])
        raise CheckpointError(f"cannot resume {path}: it belongs to a run with different settings: {shown}")
    return payload
