"""The error type of the training data code (a ``ValueError``: the CLI prints it as one line),
and the positive-integer check of the training helpers' arguments."""

from __future__ import annotations

__all__ = ["DataError", "check_positive_ints"]


class DataError(ValueError):
    """A problem with the user's data (missing file, bad JSON, missing field...)."""


def check_positive_ints(**values: object) -> None:
    """Refuse any of ``values`` that is not an ``int`` >= 1 (``bool`` included).

    Parameters
    ----------
    **values : object
        Argument name -> value, checked in order.

    Raises
    ------
    ValueError
        Naming the first argument that is not a positive int.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
