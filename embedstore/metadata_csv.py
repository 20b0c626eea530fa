"""A source's CSV of one row per image, read in chunks with the column types a whole-file read gives.

Read whole by pandas, ISIC 2024's 401,059-row metadata CSV (44 columns) takes about 600 MB as a frame and
nearly 800 MB while it is parsed. Extraction needs only its ids and paths (:meth:`MetadataCsv.text_columns`), and
the manifest merge can take the rest a chunk at a time (:meth:`MetadataCsv.chunks`), so that memory stays flat in
the number of images. Reading in chunks alone would change the table: pandas infers each chunk's column types on
its own (a column empty in one chunk is float there and text in the next). So a first pass collects every
chunk's types and unifies them as a whole-file read does (integer and float: float; any other mix: text), and
a second pass reads each chunk with those types. A CSV of one chunk is read once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.columns import RESERVED_COLUMNS
from embedstore.errors import SourceError

#: Rows parsed at a time (a few tens of MB of a 44-column table).
CHUNK_ROWS = 32_768


class MetadataCsv:
    """The CSV ``csv`` whose column ``id_col`` names each image (and ``path_col``, if given, its file).

    Every read checks what building a source's table checks: the file parses, has rows, has the id and path
    columns, and uses none of embedstore's reserved column names (:data:`embedstore.columns.RESERVED_COLUMNS`).
    """

    def __init__(self, csv: Path, id_col: str, path_col: str | None = None) -> None:
        self.csv, self.id_col, self.path_col = Path(csv), id_col, path_col
        self._dtypes: dict | None = None

    def columns(self) -> list[str]:
        """The header's column names, checked."""
        columns = self._header()
        for col in (self.id_col, self.path_col):
            if col is not None and col not in columns:
                shown = ", ".join(map(str, columns[:12])) + (", ..." if len(columns) > 12 else "")
                raise SourceError(f"column {col!r} not in {self.csv.name}; its columns are: {shown}")
        clash = [c for c in RESERVED_COLUMNS if c in columns and c != self.id_col]
        if clash:
            raise SourceError(f"{self.csv.name} has columns reserved by embedstore: {', '.join(clash)}; rename them")
        return columns

    def text_columns(self, names: list[str]) -> pd.DataFrame:
        """Columns ``names`` of every row, as text (NaN where empty)."""
        self.columns()
        frames = list(self._frames(usecols=names, dtype=str))
        if not sum(map(len, frames)):
            raise SourceError(f"{self.csv.name} has a header but no rows: no images to extract")
        return pd.concat(frames, ignore_index=True)[names]

    def chunks(self) -> Iterator[pd.DataFrame]:
        """Every column, :data:`CHUNK_ROWS` rows at a time, each chunk typed as a whole-file read types it."""
        self.columns()
        if self._dtypes is None:
            dtypes, first, n = {}, None, 0
            for n, chunk in enumerate(self._frames(dtype={self.id_col: str}), start=1):
                first = chunk if n == 1 else None
                for col, dtype in chunk.dtypes.items():
                    dtypes[col] = _unified(dtypes.get(col, dtype), dtype)
            if n == 0:
                raise SourceError(f"{self.csv.name} has a header but no rows: no images to extract")
            if n == 1:  # one chunk: its own types are the whole file's
                yield first
                return
            self._dtypes = dtypes
        typed = {col: str if dtype.kind == "O" else dtype for col, dtype in self._dtypes.items()}
        yield from self._frames(dtype=typed)

    def _header(self) -> list[str]:
        try:
            return list(pd.read_csv(self.csv, nrows=0).columns)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise SourceError(f"cannot read {self.csv} as CSV: {exc}") from None

    def _frames(self, **options) -> Iterator[pd.DataFrame]:
        """The file's chunks as pandas reads them with ``options``; a file that does not parse is one line."""
        try:
            with pd.read_csv(self.csv, chunksize=CHUNK_ROWS, low_memory=False, **options) as reader:
                yield from reader
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise SourceError(f"cannot read {self.csv} as CSV: {exc}") from None


def _unified(a: np.dtype, b: np.dtype) -> np.dtype:
    """The type pandas gives a column read whole whose chunks have types ``a`` and ``b``."""
    if a == b:
        return a
    if a.kind in "iuf" and b.kind in "iuf":  # (text is pandas' str type, or object: kind "O" both)
        return np.dtype(float)
    return np.dtype(object)
