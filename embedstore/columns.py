"""The columns embedstore itself puts in every manifest: one definition for the sources (which refuse a table
that uses these names) and the store (which writes, checks and hides them).

A manifest's columns are the reserved ones, in this order, then the source's own columns (labels, groups,
metadata). It is its own module, not part of :mod:`embedstore.store`, because the store reopens sources and
sources need these names: neither can import the other at the top.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Size and mtime (ns) of the image file when its sha256 was taken; -1 (:data:`UNKNOWN_STAT`): unknown.
STAT_COLUMNS = ("_size", "_mtime_ns")
UNKNOWN_STAT = -1
_TEXT_COLUMNS = ("id", "sha256", "_path")
_INT_COLUMNS = ("_source", *STAT_COLUMNS)
#: Every column embedstore writes, in manifest order: id, content hash, where the image is, which source, stats.
RESERVED_COLUMNS = (*_TEXT_COLUMNS, *_INT_COLUMNS)


def empty_manifest() -> pd.DataFrame:
    """A manifest with no images: the reserved columns with their types."""
    return pd.DataFrame({c: pd.Series(dtype=object if c in _TEXT_COLUMNS else np.int64) for c in RESERVED_COLUMNS})


def source_columns(columns) -> list[str]:
    """The columns a source brought (labels, groups, metadata), in order: not reserved, not hidden (``_``)."""
    return [c for c in columns if c not in RESERVED_COLUMNS and not c.startswith("_")]
