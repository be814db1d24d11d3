"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with status 2."""

import math


class DsrnaError(Exception):
    """Base class: bad input, missing data, corrupt checkpoint, diverged run. The message is the whole story."""


class DataError(DsrnaError):
    """A data set root is missing or not in the expected layout."""


class CheckpointError(DsrnaError):
    """A checkpoint is corrupt, truncated, or belongs to a different configuration."""


class DivergenceError(DsrnaError):
    """A loss became NaN or infinite."""


def changed_settings(before: dict, now: dict) -> list[str]:
    """``name=old (now new)`` for each setting of ``now`` that differs from ``before``, for messages
    that refuse to mix two runs: a table on both sides by its own differing entries
    (``robustness.gamma=0.01 (now 0.5)``), a change too long to read (a genotype) by its name alone."""
    found = []
    for key, value in now.items():
        old = before.get(key)
        if old == value:
            continue
        if isinstance(value, dict) and isinstance(old, dict):
            found += [f"{key}.{change}" for change in changed_settings(old, value)]
        else:
            shown = f"{key}={old!r} (now {value!r})"
            found.append(shown if len(shown) <= 100 else key)
    return found


def check_finite(name: str, value: float, positive: bool = False) -> None:
    """Refuse a setting that is not a finite number ``> 0`` (``positive``) or ``>= 0``: NaN passes
    every comparison test and an infinite one never ends, so both are named in one line."""
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors.
    An error raised in a ``DataLoader`` worker comes back as "Caught X in DataLoader worker process 0."
    and the worker's traceback: its message is the traceback's last line, without the type's name."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        name, colon, message = lines[-1].partition(": ")
        return message if colon and " " not in name else lines[-1]
    return lines[0]
