"""The error type of the training data code (a ``ValueError``: the CLI prints it as one line)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A problem with the user's data (missing file, bad JSON, missing field...)."""
