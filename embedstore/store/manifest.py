"""The manifest: one row per image (``manifest.parquet`` in the store), row ``i`` being row ``i`` of every
feature set. Reading it, merging a source's table into it, and replacing it atomically.

Rows are only ever appended, so a row number never changes meaning. The manifest records each image's sha256
with the size and mtime its file had when hashed (:data:`embedstore.columns.STAT_COLUMNS`), so that checking
an unchanged image later costs one ``stat``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore import faults
from embedstore.atomic import clean_stale, write_file
from embedstore.columns import RESERVED_COLUMNS, STAT_COLUMNS, UNKNOWN_STAT, empty_manifest
from embedstore.errors import StoreError, first_line
from embedstore.metadata_csv import CHUNK_ROWS

MANIFEST_FILE = "manifest.parquet"


@dataclass
class ManifestUpdate:
    """How a source's images relate to the store's rows after :meth:`FeatureStore.update_manifest`."""

    rows: np.ndarray  # the store row of each source image, in source order
    new: list[str]
    changed: list[str]
    removed: list[str]  # ids this source had before and no longer has (kept in the store)


def read_manifest(store: Path, reserved_only: bool = False) -> pd.DataFrame:
    """The manifest of the store at ``store`` (empty when no image was added yet); one line if it is damaged.

    ``reserved_only`` reads embedstore's own columns only (ids, hashes, paths, stats: what counting a store's
    rows needs), not the source's labels and metadata: 0.07 s against 0.6 s for 401,059 rows with 44 metadata
    columns. A manifest written before image sizes and mtimes were recorded gets them as -1 (unknown): its
    images are hashed again whenever they are checked, until the next extraction records them.
    """
    file = store / MANIFEST_FILE
    if not file.is_file():
        return empty_manifest()
    try:
        columns = [c for c in manifest_columns(store) if c in RESERVED_COLUMNS] if reserved_only else None
        manifest = pd.read_parquet(file, columns=columns)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is damage on disk, not a bug
        raise _damaged(store, first_line(exc)) from None
    # decoding leaves about 0.8x the manifest's size cached in Arrow's memory pool (1 GB at 10 million rows,
    # held by the process until it ends): give it back
    pa.default_memory_pool().release_unused()
    lacking = [c for c in RESERVED_COLUMNS if c not in STAT_COLUMNS and c not in manifest.columns]
    if lacking:
        raise StoreError(f"the manifest of {store} ({MANIFEST_FILE}) lacks the column(s) "
                         f"{', '.join(lacking)} (it is not an embedstore manifest, or is damaged): {_FIX}")
    if STAT_COLUMNS[0] not in manifest:
        at = manifest.columns.get_loc("_source") + 1
        for i, col in enumerate(STAT_COLUMNS):
            manifest.insert(at + i, col, np.int64(UNKNOWN_STAT))
    return manifest


def manifest_columns(store: Path) -> list[str]:
    """The manifest's column names, from its parquet schema (no row is read); [] before any image was added."""
    file = store / MANIFEST_FILE
    return pq.read_schema(file).names if file.is_file() else list(empty_manifest().columns)


def manifest_rows(store: Path) -> int:
    """The manifest's number of rows, from its parquet footer (no row is read); 0 before any image was added."""
    file = store / MANIFEST_FILE
    try:
        return pq.ParquetFile(file).metadata.num_rows if file.is_file() else 0
    except Exception as exc:  # noqa: BLE001 - as read_manifest: damage on disk
        raise _damaged(store, first_line(exc)) from None


_FIX = ("the features cannot be matched to their images without it; restore it from a backup, or extract into a new "
        "store")


def _damaged(store: Path, reason: str) -> StoreError:
    return StoreError(f"the manifest of {store} ({MANIFEST_FILE}) is damaged ({reason}): {_FIX}")


def planned_rows(manifest: pd.DataFrame, ids: pd.Series) -> np.ndarray:
    """The rows images ``ids`` will take in ``manifest`` (known ids keep theirs, new ones are appended)."""
    pos = pd.Index(manifest["id"]).get_indexer(pd.Index(ids.astype(str)))
    new = pos < 0
    return np.where(new, len(manifest) + np.cumsum(new) - 1, pos).astype(np.int64)


def merge_manifest(old: pd.DataFrame, table: pd.DataFrame, hashes: pd.DataFrame,
                   source: int) -> tuple[pd.DataFrame, ManifestUpdate]:
    """``old`` with the table of source number ``source`` merged in (new images appended, known ones updated
    in place), and how the table's images relate to the merged rows.

    ``hashes`` is :meth:`Source.content_hashes` of the table's images (sha256, size, mtime). Images the same
    source had before and no longer lists are reported in :attr:`ManifestUpdate.removed` and kept.
    """
    incoming = _with_reserved(table, hashes, 0, source)
    pos = pd.Index(old["id"]).get_indexer(incoming["id"])
    is_new = pos < 0
    known = ~is_new
    changed_mask = np.zeros(len(incoming), dtype=bool)
    changed_mask[known] = old["sha256"].to_numpy()[pos[known]] != incoming["sha256"].to_numpy()[known]
    removed = old.loc[(old["_source"] == source) & ~old["id"].isin(incoming["id"]), "id"].tolist()

    merged = old.copy()
    for col in incoming.columns:
        values = merged[col].to_numpy(dtype=object, copy=True) if col in merged else np.full(len(merged), None, object)
        values[pos[known]] = incoming[col].astype(object).to_numpy()[known]
        merged[col] = pd.Series(values, index=merged.index).infer_objects()
    merged = pd.concat([merged, incoming[is_new]], ignore_index=True)
    for col in ("_source", *STAT_COLUMNS):
        merged[col] = merged[col].astype(np.int64)
    return merged, ManifestUpdate(
        rows=planned_rows(old, incoming["id"]),
        new=incoming.loc[is_new, "id"].tolist(),
        changed=incoming.loc[changed_mask, "id"].tolist(),
        removed=removed,
    )


def append_manifest(store: Path, known: pd.DataFrame, chunks: Iterable[pd.DataFrame], hashes: pd.DataFrame,
                    source: int) -> ManifestUpdate | None:
    """Append a table none of whose ids the manifest holds, chunk by chunk, as :func:`merge_manifest` would
    merge it, without holding the table or the manifest's own columns: the memory of a first extraction stays
    flat in its number of images. None (nothing written) where the manifest cannot be appended to as it is:
    a column typed differently in the manifest and the table (``string`` and ``large_string`` count as one
    text type), a column of a pandas extension type, or a manifest from before the stat columns.

    ``known`` is the manifest's reserved columns (:func:`read_manifest` with ``reserved_only``), ``chunks`` the
    table in pieces (:meth:`embedstore.sources.Source.table_chunks`), ``hashes`` aligned with the whole table.
    The manifest is replaced atomically (:func:`write_manifest`'s way).
    """
    file = store / MANIFEST_FILE
    old_schema = pq.read_schema(file) if file.is_file() else _arrow_schema(empty_manifest())
    if any(col not in old_schema.names for col in RESERVED_COLUMNS):
        return None
    chunks = iter(chunks)
    first = next(chunks, None)
    new_schema = None if first is None else _arrow_schema(_with_reserved(first, hashes, 0, source))
    if new_schema is None:  # no table, or a column of no plain type (a pandas extension type): merged in memory
        return None
    types = {f.name: f.type for f in old_schema}
    for field in new_schema:
        old = types.setdefault(field.name, field.type)
        if old == pa.null():  # a column the manifest holds no value of (written null-typed) takes the table's type
            types[field.name] = field.type
        elif old != field.type and not (_is_text(old) and _is_text(field.type)):  # text stays the manifest's text
            return None
    schema = pa.schema(list(types.items()))
    ids: list[str] = []

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            if file.is_file():
                for batch in _old_batches(store, file):
                    writer.write_table(_conformed(pa.Table.from_batches([batch]), schema))
            start = 0
            for chunk in itertools.chain([first], chunks):
                table = _with_reserved(chunk, hashes, start, source)
                ids.extend(table["id"].tolist())
                writer.write_table(_conformed(pa.Table.from_pandas(table, schema=_arrow_schema(table),
                                                                   preserve_index=False), schema))
                start += len(table)
        faults.point("manifest-replace")

    _replace(file, write)
    removed = known.loc[known["_source"] == source, "id"].tolist()  # no id of the table is known: all of them left
    return ManifestUpdate(rows=np.arange(len(known), len(known) + len(ids), dtype=np.int64), new=ids, changed=[],
                          removed=removed)


def _old_batches(store: Path, file: Path):
    """The manifest's rows, a batch at a time; damage in its sources' columns (read only here) is one line. Only
    the reads are guarded: a write that fails (a full disk) is reported as what it is, by the caller."""
    batches = pq.ParquetFile(file).iter_batches(batch_size=CHUNK_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as exc:
            raise _damaged(store, first_line(exc)) from None
        if batch is None:
            return
        yield batch


def _with_reserved(chunk: pd.DataFrame, hashes: pd.DataFrame, start: int, source: int) -> pd.DataFrame:
    """Table ``chunk`` (rows ``start..`` of the table) with the reserved columns from ``hashes`` and ``source``
    inserted in manifest order (a new frame sharing ``chunk``'s columns; ``chunk`` is left as it is)."""
    out = chunk.copy(deep=False)
    part = hashes.iloc[start:start + len(chunk)]
    added = {"sha256": part["sha256"].to_numpy(dtype=object), "_source": np.full(len(chunk), source, np.int64),
             **{col: part[col].to_numpy(dtype=np.int64) for col in STAT_COLUMNS}}
    for col, values in added.items():
        out.insert(RESERVED_COLUMNS.index(col), col, values)
    return out


def _arrow_schema(frame: pd.DataFrame) -> pa.Schema | None:
    """The parquet types of a table's columns from their pandas types alone, so that every chunk gets the same
    schema whatever values it happens to hold (a chunk with no value is not null-typed): numbers and booleans as
    they are, text (pandas' ``str``, or object as the sources' tables hold it) as ``large_string``. None where a
    column has another type (a category, a nullable integer: pandas extension types)."""
    fields = []
    for col, dtype in frame.dtypes.items():
        if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
            fields.append((col, pa.from_numpy_dtype(dtype)))
        elif dtype == object or isinstance(dtype, pd.StringDtype):
            fields.append((col, pa.large_string()))
        else:
            return None
    return pa.schema(fields)


def _is_text(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order and types, null where ``table`` lacks one."""
    return pa.table([table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                     for f in schema], schema=schema)


def write_manifest(store: Path, manifest: pd.DataFrame) -> None:
    """Replace the manifest atomically (:func:`embedstore.atomic.write_file`): readers and a kill see the
    old one or the new one. What killed writers left beside it is removed first; the caller holds the store's
    metadata lock, so no other writer is mid-write and an older embedstore's ``.manifest.parquet.<pid>.tmp``
    is a leftover too.
    """
    def write(tmp: Path) -> None:
        manifest.to_parquet(tmp, index=False)
        faults.point("manifest-replace")

    _replace(store / MANIFEST_FILE, write)


def _replace(target: Path, write) -> None:
    """Replace the manifest ``target`` by what ``write(tmp)`` writes, atomically, leftovers of killed writers
    removed first (see :func:`write_manifest`)."""
    clean_stale(target)
    for leftover in target.parent.glob(f".{MANIFEST_FILE}.*.tmp"):
        leftover.unlink(missing_ok=True)
    write_file(target, write)


def recorded_images(manifest: pd.DataFrame, source: int, table: pd.DataFrame) -> pd.DataFrame:
    """What ``manifest`` recorded of ``table``'s images (``sha256``, ``_size``, ``_mtime_ns``), aligned with it,
    so that :meth:`Source.content_hashes` reads only the images whose size or mtime changed.

    Rows the manifest does not hold from source number ``source`` at the same path get '' and -1 (hashed).
    """
    pos = pd.Index(manifest["id"]).get_indexer(table["id"])
    known = pos >= 0
    known[known] = ((manifest["_source"].to_numpy()[pos[known]] == source)
                    & (manifest["_path"].to_numpy()[pos[known]] == table["_path"].to_numpy()[known]))
    out = {"sha256": np.full(len(table), "", dtype=object)}
    out.update({col: np.full(len(table), UNKNOWN_STAT, dtype=np.int64) for col in STAT_COLUMNS})
    for col, values in out.items():
        values[known] = manifest[col].to_numpy()[pos[known]]
    return pd.DataFrame(out)
