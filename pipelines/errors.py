"""Errors a user can cause. The CLI prints their message as one line and exits non-zero (no traceback)."""
import os
import sys


class SigmaError(Exception):
    """Base class: bad input, bad data, bad checkpoint. The message is shown to the user as is, and the command
    exits with `exit_code`."""
    exit_code = 1


class DataError(SigmaError):
    """A data set that cannot be used: missing or empty folder, unknown spec, impossible sizes."""


class CheckpointError(SigmaError):
    """A weight or run folder that cannot be loaded: wrong kind, mismatched shapes, corrupt file."""


# Notes and warnings ("note: ...", "warning: ...") for stderr, from the first process only under torchrun (every rank
# reads the same folder and options). Under the CLI they are held back until the command's work begins
# (`release_notes`, e.g. when training starts) or it ends well, and dropped if it fails first, so a bad input still
# shows one `error:` line alone; called from Python, they print at once.
_held: list[str] | None = None
_printed: set[str] = set()  # for `once`: what this process has shown (a dropped note was not shown)


def say(message: str, once: bool = False) -> None:
    """`once`: not again in this process once shown (e.g. a data folder's warnings: each split loads it)."""
    if (once and message in _printed) or int(os.environ.get("RANK", "0")) != 0:
        return
    if _held is None:
        _show(message)
    elif message not in _held:
        _held.append(message)


def _show(message: str) -> None:
    _printed.add(message)
    print(message, file=sys.stderr)


def holding_notes() -> bool:
    return _held is not None


def hold_notes() -> None:
    global _held
    _held = []


def release_notes() -> None:
    """Print the held notes; later ones print at once."""
    global _held
    held, _held = _held, None
    for message in held or ():
        _show(message)


def drop_notes() -> None:
    global _held
    _held = None
