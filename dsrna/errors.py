"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with status 2."""


class DsrnaError(Exception):
    """Base class: bad input, missing data, corrupt checkpoint, diverged run. The message is the whole story."""


class DataError(DsrnaError):
    """A data set root is missing or not in the expected layout."""


class CheckpointError(DsrnaError):
    """A checkpoint is corrupt, truncated, or belongs to a different configuration."""


class DivergenceError(DsrnaError):
    """A loss became NaN or infinite."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
