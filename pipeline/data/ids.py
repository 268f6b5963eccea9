"""The one rule for sample and request IDs, shared by the data contracts and the deletion manifest.

A sample ID the data accepts must be one a manifest can name, and the other way round: both boundaries call
``sample_id_problem`` / ``sample_ids_valid`` here. The patterns are written for JSON Schema (ECMA 262, where ``$``
ends the input), and applied in Python with ``fullmatch``: Python's ``$`` also matches before a final newline, so
``re.match`` would let ``'mnist-1\\n'`` into the data while no manifest could name it.
"""

from __future__ import annotations

import re
import unicodedata

import pandas as pd

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
SAMPLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,255}$"
SAMPLE_ID_MAX_LENGTH = 256
_SAMPLE_ID = re.compile(SAMPLE_ID_PATTERN)
_EXAMPLE_ID = "'mnist-00042'"


def sample_ids_valid(column: pd.Series) -> pd.Series:
    """Per value: whether it is a valid sample ID (vectorised, for the data contracts)."""
    return column.str.fullmatch(SAMPLE_ID_PATTERN, na=False).astype(bool)


def sample_id_problem(sample_id: object) -> str | None:
    """Why ``sample_id`` is not a valid sample ID, or ``None`` if it is.

    Public so that other boundaries (e.g. the data validation stage) can give the same specific messages.
    """
    if isinstance(sample_id, str) and _SAMPLE_ID.fullmatch(sample_id):
        return None  # the common case first: a million valid IDs must not pay for the diagnosis below
    if not isinstance(sample_id, str):
        return f"is {type(sample_id).__name__} {show(sample_id)}, not a string (quote it)"
    if not sample_id:
        return "is empty"
    if sample_id != sample_id.strip():
        return f"{show(sample_id)} has leading or trailing whitespace"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in sample_id):
        return f"{show(sample_id)} contains control or invisible characters"
    if "/" in sample_id or "\\" in sample_id or sample_id in (".", "..") or sample_id.startswith("~"):
        return f"{show(sample_id)} looks like a path; sample IDs are strings like {_EXAMPLE_ID}, not paths"
    if len(sample_id) > SAMPLE_ID_MAX_LENGTH:
        return f"{show(sample_id)} is {len(sample_id)} characters long (at most {SAMPLE_ID_MAX_LENGTH})"
    return f"{show(sample_id)} must start with a letter or digit and hold only letters, digits and ._:@+=-"




def show(value: object, limit: int = 60) -> str:
    """A printable, single-line, bounded rendering of a user value for error messages."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
