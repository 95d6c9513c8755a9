"""Errors a user can cause. The CLI prints their message as one line and exits non-zero (no traceback)."""


class SigmaError(Exception):
    """Base class: bad input, bad data, bad checkpoint. The message is shown to the user as is."""


class DataError(SigmaError):
    """A data set that cannot be used: missing or empty folder, unknown spec, impossible sizes."""


class CheckpointError(SigmaError):
    """A weight or run folder that cannot be loaded: wrong kind, mismatched shapes, corrupt file."""
