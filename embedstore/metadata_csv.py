"""A source's CSV of one row per image, read in chunks with the column types a whole-file read gives.

Read whole by pandas, ISIC 2024's 401,059-row metadata CSV (44 columns) takes about 600 MB as a frame and
nearly 800 MB while it is parsed. Extraction needs only its ids and paths, and the manifest merge can take the
rest a chunk at a time, so that memory stays flat in the number of images. Reading in chunks alone would change
the table: pandas infers each chunk's column types on its own (a column empty in one chunk is float there and text
in the next). So a first pass (:meth:`MetadataCsv.scan`) parses every row, keeps the id and path columns, and
unifies each chunk's types as a whole-file read does (integer and float: float; any other mix: text); the second
(:meth:`MetadataCsv.chunks`) reads each chunk with those types.
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

    :meth:`scan` checks what building a source's table checks (the file parses, has rows, has the id and path
    columns, and uses none of embedstore's reserved names, :data:`embedstore.columns.RESERVED_COLUMNS`) before
    anything is written; :meth:`chunks` then reads the rows again, each chunk checked to hold the ids scanned.
    """

    def __init__(self, csv: Path, id_col: str, path_col: str | None = None) -> None:
        self.csv, self.id_col, self.path_col = Path(csv), id_col, path_col
        self._dtypes: dict | None = None
        self._scanned: pd.DataFrame | None = None  # the id and path columns of the scan

    def scan(self) -> pd.DataFrame:
        """Every row's id and path columns (as text, NaN where empty), from a parse of the whole file that also
        fixes each column's type for :meth:`chunks`."""
        self._check_header()
        named = [self.id_col, *([self.path_col] if self.path_col not in (None, self.id_col) else [])]
        text = {col: str for col in named}
        dtypes, kept = {}, []
        for chunk in self._frames(dtype=text):
            kept.append(chunk[named])
            for col, dtype in chunk.dtypes.items():
                dtypes[col] = _unified(dtypes.get(col, dtype), dtype)
        if not sum(map(len, kept)):
            raise SourceError(f"{self.csv.name} has a header but no rows: no images to extract")
        self._dtypes = {col: str if dtype.kind == "O" else dtype for col, dtype in dtypes.items()} | text
        self._scanned = pd.concat(kept, ignore_index=True)
        return self._scanned

    def chunks(self) -> Iterator[pd.DataFrame]:
        """Every column, :data:`CHUNK_ROWS` rows at a time, each chunk typed as a whole-file read types it (the
        id and path columns as text). A file edited since :meth:`scan` (other ids, paths or columns, or values
        the scanned types no longer hold) is refused in one line."""
        if self._dtypes is None:
            self.scan()
        named, start = list(self._scanned.columns), 0
        frames = self._frames(dtype=self._dtypes)
        while True:
            try:
                chunk = next(frames, None)
            except (ValueError, OSError) as exc:  # a value of another type than the scan's (or the file gone)
                raise self._changed() from exc
            if chunk is None:
                break
            stop = start + len(chunk)
            scanned = self._scanned.iloc[start:stop].reset_index(drop=True)
            if (list(chunk.columns) != list(self._dtypes) or stop > len(self._scanned)
                    or not chunk[named].reset_index(drop=True).equals(scanned)):
                raise self._changed()
            start = stop
            yield chunk
        if start != len(self._scanned):
            raise self._changed()

    def _check_header(self) -> None:
        try:
            columns = list(pd.read_csv(self.csv, nrows=0).columns)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise SourceError(f"cannot read {self.csv} as CSV: {exc}") from None
        for col in (self.id_col, self.path_col):
            if col is not None and col not in columns:
                shown = ", ".join(map(str, columns[:12])) + (", ..." if len(columns) > 12 else "")
                raise SourceError(f"column {col!r} not in {self.csv.name}; its columns are: {shown}")
        clash = [c for c in RESERVED_COLUMNS if c in columns and c != self.id_col]
        if clash:
            raise SourceError(f"{self.csv.name} has columns reserved by embedstore: {', '.join(clash)}; rename them")

    def _changed(self) -> SourceError:
        return SourceError(f"{self.csv} changed while it was read (its rows differ from those hashed); run again")

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
