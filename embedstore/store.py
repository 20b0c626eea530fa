"""The feature store: frozen embeddings in zarr v3, keyed by what produced them.

Layout (see README, "The store layout")::

    ham10000.zarr/                 zarr group; attrs: embedstore format, sources
      manifest.parquet             one row per image: id, sha256, _path, _source, _size, _mtime_ns,
                                   the source's columns
      features/<key>/              one feature set; attrs: name, encoder config, weights hash, provenance
        emb     [N, D] float16     chunks (rows_per_chunk, D), blosc-zstd with byte shuffle, then crc32c
        status  [N] uint8          0 pending, 1 done, 2 failed; written last, so it commits a row
        sha256  [N] str            content hash of the image each row was computed from
        error   [N] str            why a row failed ('' otherwise)
      .locks/                      flock files: prepare (metadata steps), <key>.set, <key>.shard-i-of-n, <key>.n<n>

Row ``i`` of every feature set is row ``i`` of the manifest; rows are only
ever appended, so a row number never changes meaning. A row is *fresh* when
its status is done and its ``sha256`` equals the manifest's, and the image
on disk still has that hash: rows of images that changed since extraction are
*stale*, and :meth:`FeatureStore.load` refuses them rather than return them
silently. The manifest records each image's size and mtime beside its hash,
so checking an unchanged image costs one ``stat`` and only changed ones are
hashed again.

All arrays of a feature set share the row chunking, so processes writing
disjoint chunk-aligned row blocks never touch the same file: that is what
``embedstore extract --shard i/n`` (and any distributed engine) relies on.
zarr's local store writes every file through a temporary name and a rename,
so a killed process never leaves a torn chunk or metadata file behind.

Integrity: every chunk of a set created by this version ends in a crc32c
(zarr's codec; older sets have none and are read as before), and every chunk
is written even when it holds only fill values. A damaged chunk is refused on
read (:class:`StoreError` naming its rows), counted by ``embedstore ls``, and
deleted in every array and recomputed by the next ``extract``
(:meth:`FeatureSet.repair_chunks`). Growing a set resizes its arrays one by one,
status last; a kill in between leaves them at different lengths, which
:attr:`FeatureSet.n_rows` (the shortest) tolerates and the next writer finishes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import google_crc32c  # zarr's own dependency, the checksum of its crc32c codec
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from embedstore import __version__, faults
from embedstore.atomic import clean_stale, remove_folder, staging_path, write_file
from embedstore.errors import SourceError, StoreError, first_line
from embedstore.sources import RESERVED_COLUMNS, STAT_COLUMNS, UNKNOWN_STAT, source_from_dict

FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
DTYPES = ("float16", "float32")
MANIFEST_FILE = "manifest.parquet"
_HOLDER_BYTES = 200  # what a lock file says about its holder


def fingerprint(config: dict) -> str:
    """A short, stable key for a feature-set configuration (canonical JSON, sha256, 16 hex digits)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digest(values) -> str:
    """A short sha256 (16 hex digits) of a sequence's values in order: row ids, labels, row indices, features."""
    a = np.asarray(values)
    if a.dtype == object:
        a = a.astype(str)
    elif a.dtype.kind in "iub":
        a = a.astype(np.int64)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def utc_now() -> str:
    """The current UTC time as ISO 8601 (seconds), for provenance attributes."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class FeatureSetInfo:
    """What ``embedstore ls`` shows of one feature set."""

    key: str
    name: str
    encoder: str
    dim: int
    dtype: str
    n_rows: int
    n_done: int
    n_failed: int
    n_stale: int
    n_missing: int  # manifest rows with no features yet (new images, or never extracted)
    nbytes_stored: int
    attrs: dict = field(repr=False, default_factory=dict)
    checksums: bool = False  # chunks carry a crc32c (sets written before it have none)
    n_corrupt_chunks: int | None = None  # chunks failing their check; None when not verified
    corrupt_rows: tuple[int, int] | None = None  # first and last row of the corrupt chunks


@dataclass
class ManifestUpdate:
    """How a source's images relate to the store's rows after :meth:`FeatureStore.update_manifest`."""

    rows: np.ndarray  # the store row of each source image, in source order
    new: list[str]
    changed: list[str]
    removed: list[str]  # ids this source had before and no longer has (kept in the store)


#: The arrays of a feature set, in the order they are grown and written: ``status`` last, because it commits rows.
ARRAYS = ("emb", "sha256", "error", "status")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextmanager
def storage_errors(path: Path, doing: str, kept: Callable[[], str] | None = None):
    """Turn what the disk under ``path`` can refuse while ``doing`` (full, read-only) into one :class:`StoreError`.

    ``kept`` says what survived a full disk (e.g. "412 rows are final and kept"); other OSErrors pass through.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            saved = kept() if kept else "nothing was lost"
            raise StoreError(f"disk full while {doing}: {saved}; free space and rerun the same command "
                             f"to resume") from None
        if exc.errno in _NOT_WRITABLE:
            raise StoreError(f"feature store {path} is not writable ({exc.strerror}: {exc.filename or path}); "
                             f"make it writable or pass another --store") from None
        raise


def _unreadable_set(store: Path, key: str, what: str, exc: Exception) -> StoreError:
    reason = first_line(exc)
    return StoreError(f"feature set {key} of {store} has unreadable metadata ({what}: {reason}); delete the folder "
                      f"{store / 'features' / key} and rerun `embedstore extract` to recompute it")


def _crc_ok(file: Path) -> bool | None:
    """Whether a chunk file's trailing crc32c matches its bytes (read, not decompressed); None when it is absent."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return None
    return len(data) > 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


class FeatureSet:
    """The zarr arrays of one feature set, and the only code that writes them.

    Arrays of sets created by this version end in zarr's crc32c codec, so a flipped or truncated chunk is found
    by :meth:`corrupt_chunks` without decompressing and is refused on read; every chunk is written even when it
    holds only fill values, so a missing chunk file beside a written status chunk is corruption too.
    """

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.key = group.basename
        self.store_path = Path(str(group.store.root))
        self.path = self.store_path / group.path
        arrays = {}
        for name in ARRAYS:
            try:
                arrays[name] = group[name].with_config({"write_empty_chunks": True})
            except Exception as exc:  # noqa: BLE001 - a missing or corrupt zarr.json is damage on disk
                raise _unreadable_set(self.store_path, self.key, f"array {name}", exc) from None
        self.emb, self.sha256, self.error, self.status = (arrays[n] for n in ARRAYS)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_rows(self) -> int:
        """Rows present in every array (a growth killed half-way leaves some arrays longer; they are ignored)."""
        return min(int(self._array(name).shape[0]) for name in ARRAYS)

    @property
    def rows_per_chunk(self) -> int:
        return int(self.status.chunks[0])

    @property
    def has_checksums(self) -> bool:
        """True when every array ends in the crc32c codec (sets written before it have none)."""
        return all(any(isinstance(c, Crc32cCodec) for c in self._array(n).metadata.codecs) for n in ARRAYS)

    def _array(self, name: str) -> zarr.Array:
        return getattr(self, name)

    def resize(self, n_rows: int) -> None:
        """Grow every array shorter than ``n_rows`` (new rows are pending), status last.

        A kill between two arrays leaves them at different lengths; :attr:`n_rows` reads the shortest, and
        the next call (by the next writer) grows the rest: a half-done growth is repaired, never fatal.
        """
        for name in ARRAYS:
            arr = self._array(name)
            if arr.shape[0] < n_rows:
                arr.resize((n_rows, *arr.shape[1:]))
                if name != "status":
                    faults.point("resize")

    def write_rows(self, rows: np.ndarray, emb: np.ndarray | None, sha: list[str], error: list[str], status: np.ndarray) -> None:
        """Write a block of rows; the status goes last, so a row is final only once its data is on disk.

        Rows that were final before (extracted from an older version of their image, or failed on it) are
        first set back to pending: a kill while their new data is written leaves them pending, never final
        with old status and new hash over features that are neither the old ones nor the new ones.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            rewritten = rows[self.read("status", rows) != PENDING]
            if len(rewritten):
                self.status.set_orthogonal_selection(rewritten, np.full(len(rewritten), PENDING, dtype=np.uint8))
        if emb is not None and len(rows):
            self.emb.set_orthogonal_selection((rows, slice(None)), emb.astype(self.emb.dtype, copy=False))
        self.sha256.set_orthogonal_selection(rows, np.asarray(sha, dtype=str))
        self.error.set_orthogonal_selection(rows, np.asarray(error, dtype=str))
        faults.point("status-write")
        self.status.set_orthogonal_selection(rows, np.asarray(status, dtype=np.uint8))

    # ------------------------------------------------------------- reading
    def read(self, name: str, rows: np.ndarray | slice) -> np.ndarray:
        """Rows of one array (a slice, or row numbers); a chunk that cannot be decoded raises :class:`StoreError`."""
        arr = self._array(name)
        try:
            if isinstance(rows, slice):
                return arr[rows]
            return arr.get_orthogonal_selection(np.asarray(rows, dtype=np.int64))
        except Exception as exc:  # noqa: BLE001 - a checksum or codec error is damage on disk, never a bug here
            raise self._damaged(exc) from None

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored features of ``rows`` (in that order), refusing damaged chunks: never garbage.

        For checksummed sets every chunk read must also exist (a deleted chunk would read as zeros).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.zeros((0, self.emb.shape[1]), dtype=self.emb.dtype)
        if self.has_checksums:
            missing = [c for c in np.unique(rows // self.rows_per_chunk) if not self._chunk_file("emb", c).is_file()]
            if missing:
                raise self._damaged(FileNotFoundError(f"chunk file {self._chunk_file('emb', missing[0])} is missing"))
        if rows[0] == 0 and rows[-1] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            return self.read("emb", slice(0, len(rows)))  # one contiguous read
        return self.read("emb", rows)

    def read_intact(self, name: str, n: int, corrupt: list[int]) -> np.ndarray:
        """The first ``n`` rows of one array, with the rows of ``corrupt`` chunks read as pending (fill values)."""
        if not corrupt:
            return self.read(name, slice(0, n))
        arr = self._array(name)
        out = np.full(n, arr.fill_value, dtype=arr.dtype if arr.dtype.kind != "T" else object)
        rpc = self.rows_per_chunk
        for c in range(-(-n // rpc)):
            if c not in corrupt:
                out[c * rpc:min(n, (c + 1) * rpc)] = self.read(name, slice(c * rpc, min(n, (c + 1) * rpc)))
        return out

    def done_and_fresh(self, manifest_sha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks over manifest rows: features done, and done from the current image (fresh)."""
        n = min(self.n_rows, len(manifest_sha))
        done = np.zeros(len(manifest_sha), dtype=bool)
        done[:n] = self.read("status", slice(0, n)) == DONE
        fresh = done.copy()
        fresh[:n] &= self.read("sha256", slice(0, n)) == manifest_sha[:n]
        return done, fresh

    def _damaged(self, exc: Exception) -> StoreError:
        """The one line for a read that hit damaged chunks: which rows, and how to get them back."""
        name = self.attrs.get("name", self.key)
        corrupt = self.corrupt_chunks() or []
        rpc = self.rows_per_chunk
        where = (f"rows {corrupt[0] * rpc}-{min(self.n_rows, (corrupt[-1] + 1) * rpc) - 1} ({len(corrupt)} corrupt "
                 f"chunk(s))" if corrupt else "its chunks")
        reason = "checksum mismatch, truncated or missing file" if corrupt else \
            first_line(exc, 160)
        if "derived_from" in self.attrs:
            fix = "rerun the command that derived it (embedstore match --projection) to recompute them"
        elif self.has_checksums:
            fix = (f"rerun `embedstore extract` with encoder {self.attrs.get('encoder')} on {self.store_path} "
                   f"to recompute them")
        else:
            fix = f"this set has no checksums: delete {self.path} and rerun `embedstore extract` to recompute it"
        return StoreError(f"feature set {name} of {self.store_path}: {where} cannot be read ({reason}); {fix}")

    # ------------------------------------------------------------- integrity
    def _chunk_file(self, name: str, chunk: int) -> Path:
        arr = self._array(name)
        return self.path / name / arr.metadata.encode_chunk_key((int(chunk),) + (0,) * (arr.ndim - 1))

    def chunks_of(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """The row chunks of this set that ``shard`` (i, n) owns: every n-th, from the i-th."""
        index, count = shard
        return [c for c in range(-(-self.n_rows // self.rows_per_chunk)) if c % count == index]

    def corrupt_chunks(self, chunks: list[int] | None = None) -> list[int] | None:
        """Row chunks (of ``chunks``, default all) whose files fail their crc32c, are truncated, or are missing
        beside a written status chunk; None for a set without checksums. Reads the files, decompresses nothing."""
        if not self.has_checksums:
            return None
        bad = []
        for c in self.chunks_of() if chunks is None else chunks:
            ok = {name: _crc_ok(self._chunk_file(name, c)) for name in ARRAYS}
            if False in ok.values() or (ok["status"] and None in ok.values()):
                bad.append(c)
        return bad

    def repair_chunks(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Delete the files of every corrupt chunk of ``shard`` in all arrays (status first), so its rows become
        pending and the running extraction recomputes them; returns the chunks removed."""
        corrupt = self.corrupt_chunks(self.chunks_of(shard)) or []
        for c in corrupt:
            for name in ("status", *ARRAYS[:-1]):
                self._chunk_file(name, c).unlink(missing_ok=True)
        return corrupt

    def n_final(self) -> int:
        """Rows whose status is final (done or failed), for what a failed write kept."""
        return int((self.read("status", slice(0, self.n_rows)) != PENDING).sum())


class FeatureStore:
    """A zarr store of feature sets over one manifest of images.

    Open an existing store with :meth:`open`; :func:`embedstore.extract`
    creates one with :meth:`create_or_open`.
    """

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self.root = root
        self._sources: dict[int, object] = {}
        self._unchanged: tuple[pd.DataFrame, np.ndarray] | None = None  # see changed_images

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        """Open an existing store; :class:`StoreError` if there is none at ``path``."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no feature store at {path} (run `embedstore extract ... --store {path}` first)")
        try:
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
        except Exception as exc:  # noqa: BLE001 - unreadable metadata is the user's broken input
            reason = first_line(exc)
            raise StoreError(f"{path} is not a readable zarr v3 store (its metadata {path / 'zarr.json'} is damaged: "
                             f"{reason}); restore it from a backup, or extract into a new store") from None
        meta = root.attrs.get("embedstore")
        if not isinstance(meta, dict):
            raise StoreError(f"{path} is a zarr store but not an embedstore feature store")
        if meta.get("format", 0) > FORMAT_VERSION:
            raise StoreError(
                f"{path} was written by a newer embedstore (store format {meta.get('format')}, "
                f"this version reads {FORMAT_VERSION}); upgrade embedstore"
            )
        return cls(path, root)

    @classmethod
    def create_or_open(cls, path: str | Path) -> "FeatureStore":
        """Open the store at ``path``, or create an empty one; refuse a path holding anything else."""
        path = Path(path)
        if path.exists() and not (path / "zarr.json").is_file():
            if path.is_file() or any(path.iterdir()):
                raise StoreError(f"{path} exists and is not a feature store; choose another --store path")
        if not (path / "zarr.json").is_file():
            with storage_errors(path, f"creating the store {path}"):
                path.parent.mkdir(parents=True, exist_ok=True)
                root = zarr.open_group(str(path), mode="a", zarr_format=3)
                root.attrs["embedstore"] = {"format": FORMAT_VERSION, "created_with": __version__, "created": utc_now()}
                root.attrs["sources"] = []
                root.require_group("features")
        return cls.open(path)

    # ---------------------------------------------------------------- manifest
    @cached_property
    def manifest(self) -> pd.DataFrame:
        """One row per image; row ``i`` is row ``i`` of every feature set.

        A manifest written before image sizes and mtimes were recorded gets them as -1 (unknown): its
        images are hashed again whenever they are checked, until the next extract records them.
        """
        file = self.path / MANIFEST_FILE
        if not file.is_file():
            return pd.DataFrame({c: pd.Series(dtype=object if c in ("id", "sha256", "_path") else np.int64)
                                 for c in RESERVED_COLUMNS})
        fix = ("the features cannot be matched to their images without it; restore it from a backup, or extract "
               "into a new store")
        try:
            manifest = pd.read_parquet(file)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is damage on disk, not a bug
            reason = first_line(exc)
            raise StoreError(f"the manifest of {self.path} ({MANIFEST_FILE}) is damaged ({reason}): {fix}") from None
        lacking = [c for c in RESERVED_COLUMNS if c not in STAT_COLUMNS and c not in manifest.columns]
        if lacking:
            raise StoreError(f"the manifest of {self.path} ({MANIFEST_FILE}) lacks the column(s) "
                             f"{', '.join(lacking)} (it is not an embedstore manifest, or is damaged): {fix}")
        if STAT_COLUMNS[0] not in manifest:
            at = manifest.columns.get_loc("_source") + 1
            for i, col in enumerate(STAT_COLUMNS):
                manifest.insert(at + i, col, np.int64(UNKNOWN_STAT))
        return manifest

    def _source_index(self, desc: dict) -> int:
        sources = list(self.root.attrs.get("sources", []))
        if desc not in sources:
            sources.append(desc)
            self.root.attrs["sources"] = sources
        return sources.index(desc)

    def update_manifest(self, table: pd.DataFrame, hashes: pd.DataFrame, source_desc: dict) -> ManifestUpdate:
        """Merge a source's table into the manifest: new images are appended, known ones updated in place.

        ``hashes`` is :meth:`Source.content_hashes` of the table's images (sha256, size, mtime). Call it
        inside :meth:`preparing`. The manifest is replaced atomically (see :meth:`_write_manifest`).
        Images the same source had before and no longer lists are reported in
        :attr:`ManifestUpdate.removed` and kept, with their features.
        """
        old = self.manifest
        src = self._source_index(source_desc)
        incoming = table.copy()
        incoming.insert(1, "sha256", hashes["sha256"].to_numpy(dtype=object))
        incoming.insert(3, "_source", np.full(len(incoming), src, dtype=np.int64))
        for i, col in enumerate(STAT_COLUMNS):
            incoming.insert(4 + i, col, hashes[col].to_numpy(dtype=np.int64))
        pos = pd.Index(old["id"]).get_indexer(incoming["id"])
        is_new = pos < 0
        known = ~is_new
        changed_mask = np.zeros(len(incoming), dtype=bool)
        changed_mask[known] = old["sha256"].to_numpy()[pos[known]] != incoming["sha256"].to_numpy()[known]
        removed = old.loc[(old["_source"] == src) & ~old["id"].isin(incoming["id"]), "id"].tolist()

        merged = old.copy()
        for col in incoming.columns:
            values = merged[col].to_numpy(dtype=object, copy=True) if col in merged else np.full(len(merged), None, object)
            values[pos[known]] = incoming[col].astype(object).to_numpy()[known]
            merged[col] = pd.Series(values, index=merged.index).infer_objects()
        merged = pd.concat([merged, incoming[is_new]], ignore_index=True)
        for col in ("_source", *STAT_COLUMNS):
            merged[col] = merged[col].astype(np.int64)
        rows = self.planned_rows(incoming["id"])
        if not merged.equals(old):
            self._write_manifest(merged)
        return ManifestUpdate(
            rows=rows,
            new=incoming.loc[is_new, "id"].tolist(),
            changed=incoming.loc[changed_mask, "id"].tolist(),
            removed=removed,
        )

    def _write_manifest(self, manifest: pd.DataFrame) -> None:
        """Replace the manifest atomically (:func:`embedstore.atomic.write_file`): readers and a kill see the
        old one or the new one. What killed writers left beside it is removed first; under :meth:`preparing`
        no other writer is mid-write, so an older embedstore's ``.manifest.parquet.<pid>.tmp`` is a leftover too.
        """
        target = self.path / MANIFEST_FILE
        clean_stale(target)
        for leftover in self.path.glob(f".{MANIFEST_FILE}.*.tmp"):
            leftover.unlink(missing_ok=True)

        def write(tmp: Path) -> None:
            manifest.to_parquet(tmp, index=False)
            faults.point("manifest-replace")

        write_file(target, write)
        self.__dict__.pop("manifest", None)

    # --------------------------------------------------------------- freshness
    def _source(self, index: int):
        """The source of the manifest rows whose ``_source`` is ``index``, reopened once (SourceError if it cannot be)."""
        if index not in self._sources:
            self._sources[index] = source_from_dict(self.root.attrs["sources"][index])
        return self._sources[index]

    def recorded_images(self, table: pd.DataFrame, source_desc: dict) -> pd.DataFrame | None:
        """What the manifest recorded of ``table``'s images (``sha256``, ``_size``, ``_mtime_ns``), aligned
        with it, so that :meth:`Source.content_hashes` reads only the images whose size or mtime changed.

        Rows the manifest does not hold from this source at the same path get '' and -1 (hashed); None
        when the store has never seen this source.
        """
        sources = list(self.root.attrs.get("sources", []))
        if source_desc not in sources:
            return None
        old = self.manifest
        pos = pd.Index(old["id"]).get_indexer(table["id"])
        known = pos >= 0
        known[known] = ((old["_source"].to_numpy()[pos[known]] == sources.index(source_desc))
                        & (old["_path"].to_numpy()[pos[known]] == table["_path"].to_numpy()[known]))
        out = {"sha256": np.full(len(table), "", dtype=object)}
        out.update({col: np.full(len(table), UNKNOWN_STAT, dtype=np.int64) for col in STAT_COLUMNS})
        for col, values in out.items():
            values[known] = old[col].to_numpy()[pos[known]]
        return pd.DataFrame(out)

    def changed_images(self, rows: np.ndarray) -> np.ndarray:
        """Which of the manifest ``rows`` hold an image whose bytes differ from the sha256 the manifest recorded.

        Each image is stat'ed; only those whose size or mtime differ from the recorded ones are read and
        hashed again (all of them for a manifest written before sizes and mtimes were recorded; one stat
        of the file for an HDF5 source). An image that cannot be found or read, or whose source cannot be
        reopened (a store copied without its images), cannot be checked and counts as unchanged. Rows
        found unchanged are remembered by this FeatureStore, so loading several feature sets checks each
        image once; open the store again to check again.
        """
        manifest = self.manifest
        rows = np.asarray(rows, dtype=np.int64)
        if self._unchanged is None or self._unchanged[0] is not manifest:
            self._unchanged = (manifest, np.zeros(len(manifest), dtype=bool))
        unchanged = self._unchanged[1]
        changed = np.zeros(len(manifest), dtype=bool)
        todo = rows[~unchanged[rows]]
        source_of = manifest["_source"].to_numpy()
        for index in np.unique(source_of[todo]):
            sel = todo[source_of[todo] == index]
            try:
                source = self._source(int(index))
            except SourceError:
                unchanged[sel] = True  # cannot be checked
                continue
            recorded = manifest.iloc[sel].reset_index(drop=True)
            now = source.content_hashes(recorded["_path"], recorded=recorded)["sha256"].to_numpy()
            differs = (now != "") & (now != recorded["sha256"].to_numpy())
            changed[sel[differs]] = True
            unchanged[sel[~differs]] = True
        return changed[rows]

    def _stale_error(self, fs: FeatureSet, ids: np.ndarray) -> StoreError:
        """The one line refusing features of changed images: how many, the first, and the command that refreshes them."""
        return StoreError(
            f"{len(ids)} images changed since feature set {fs.attrs.get('name')} was extracted "
            f"(first: {ids[0]}); rerun `embedstore extract` with encoder {fs.attrs.get('encoder')} on "
            f"{self.path} to refresh them"
        )

    # ------------------------------------------------------------ feature sets
    def _groups(self) -> dict[str, zarr.Group]:
        """Every feature set's group by key; a set whose ``zarr.json`` is damaged raises one line naming it."""
        try:
            features = self.root.require_group("features")
        except Exception as exc:  # noqa: BLE001 - a corrupt features/zarr.json is damage on disk
            reason = first_line(exc)
            meta = self.path / "features" / "zarr.json"
            raise StoreError(f"the group of all feature sets of {self.path} has unreadable metadata ({meta}: "
                             f"{reason}); it holds no features: delete {meta} and rerun the command "
                             f"(it is recreated)") from None
        groups = {}
        for folder in sorted((self.path / "features").iterdir()):
            if folder.name.startswith(".") or not (folder / "zarr.json").is_file():
                continue
            try:
                groups[folder.name] = features[folder.name]
            except Exception as exc:  # noqa: BLE001 - a corrupt zarr.json is damage on disk
                raise _unreadable_set(self.path, folder.name, "zarr.json", exc) from None
        return groups

    def feature_set(self, key_or_name: str) -> FeatureSet:
        return FeatureSet(self._groups()[self.resolve(key_or_name)])

    def resolve(self, key_or_name: str) -> str:
        """The key of a feature set given its key, its name, its encoder (if unique) or a unique key prefix."""
        groups = self._groups()
        if key_or_name in groups:
            return key_or_name
        by_name = [k for k, g in groups.items() if g.attrs.get("name") == key_or_name]
        newest = max((groups[k].attrs.get("generation", 0) for k in by_name), default=0)
        by_name = [k for k in by_name if groups[k].attrs.get("generation", 0) == newest]  # see put_features
        if len(by_name) == 1:
            return by_name[0]
        by_encoder = [k for k, g in groups.items() if g.attrs.get("encoder") == key_or_name]
        if len(by_encoder) == 1:
            return by_encoder[0]
        by_prefix = [k for k in groups if len(key_or_name) >= 4 and k.startswith(key_or_name)]
        if len(by_prefix) == 1:
            return by_prefix[0]
        choices = ", ".join(f"{g.attrs.get('name')} ({k})" for k, g in sorted(groups.items())) or "none yet"
        if len(by_encoder) > 1:
            raise StoreError(f"{key_or_name!r} names several feature sets in {self.path}; pick one by name or key: {choices}")
        raise StoreError(f"no feature set {key_or_name!r} in {self.path}; it has: {choices}")

    def info(self, key_or_name: str, verify: bool = False) -> FeatureSetInfo:
        """Counts of one feature set; ``verify`` also checks every chunk file (``ls``), and then rows of
        corrupt chunks count as missing instead of failing the read."""
        fs = self.feature_set(key_or_name)
        attrs = fs.attrs
        man_sha = self.manifest["sha256"].to_numpy()
        n = min(fs.n_rows, len(man_sha))
        corrupt = fs.corrupt_chunks() if verify else None
        status = fs.read_intact("status", n, corrupt or [])
        same = fs.read_intact("sha256", n, corrupt or []) == man_sha[:n]
        done = status == DONE
        same[done & same] = ~self.changed_images(np.flatnonzero(done & same))  # edited on disk since: stale
        stored = sum(f.stat().st_size for f in (self.path / "features" / fs.key).rglob("*") if f.is_file())
        rpc = fs.rows_per_chunk
        return FeatureSetInfo(
            key=fs.key, name=attrs.get("name", fs.key), encoder=attrs.get("encoder", "?"),
            dim=int(fs.emb.shape[1]), dtype=str(fs.emb.dtype), n_rows=len(man_sha),
            n_done=int((done & same).sum()), n_failed=int(((status == FAILED) & same).sum()),
            n_stale=int((done & ~same).sum()), n_missing=int(len(man_sha) - (done & same).sum() - ((status == FAILED) & same).sum()),
            nbytes_stored=stored, attrs=attrs, checksums=fs.has_checksums,
            n_corrupt_chunks=None if corrupt is None else len(corrupt),
            corrupt_rows=(corrupt[0] * rpc, min(fs.n_rows, (corrupt[-1] + 1) * rpc) - 1) if corrupt else None,
        )

    def feature_sets(self, verify: bool = False) -> list[FeatureSetInfo]:
        return [self.info(key, verify) for key in sorted(self._groups())]

    def chunking(self, key: str) -> int | None:
        """The rows per chunk of feature set ``key`` (fixed when it was created); None if there is no such set."""
        groups = self._groups()
        return FeatureSet(groups[key]).rows_per_chunk if key in groups else None

    def planned_rows(self, ids: pd.Series) -> np.ndarray:
        """The store rows images ``ids`` will take (known ids keep theirs, new ones are appended), writing nothing."""
        pos = pd.Index(self.manifest["id"]).get_indexer(pd.Index(ids.astype(str)))
        new = pos < 0
        return np.where(new, len(self.manifest) + np.cumsum(new) - 1, pos).astype(np.int64)

    def require_feature_set(self, key: str, name: str, attrs: dict, dim: int, dtype: str, rows_per_chunk: int) -> FeatureSet:
        """The feature set ``key``, created if absent, grown to the manifest's length."""
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        groups = self._groups()
        clash = [k for k, g in groups.items() if g.attrs.get("name") == name and k != key]
        if clash:
            other = groups[clash[0]].attrs
            raise StoreError(
                f"feature set name {name!r} in {self.path} already holds another configuration "
                f"(encoder {other.get('encoder')}, weights {other.get('weights')}, key {clash[0]}); "
                f"pass --name to store this one under a new name"
            )
        n = len(self.manifest)
        with storage_errors(self.path, f"preparing feature set {name} in {self.path}"):
            if key not in groups:
                return FeatureSet(self._create_feature_set(key, {**attrs, "name": name, "key": key, "dim": dim,
                                                                 "dtype": dtype, "rows_per_chunk": rows_per_chunk,
                                                                 "created": utc_now()}, n, max(1, rows_per_chunk)))
            fs = FeatureSet(groups[key])
            fs.resize(n)  # also finishes a growth that a kill interrupted
            return fs

    def _create_feature_set(self, key: str, attrs: dict, n: int, chunks: int) -> zarr.Group:
        """The group and arrays of a new feature set; every array ends in a crc32c of each chunk.

        They are built under a hidden name (which readers skip) and renamed into place whole, so a kill
        while creating leaves no half-made set; the next creation removes the hidden leftover.
        """
        final = self.path / "features" / key
        clean_stale(final)
        staging = staging_path(final)
        grp = self.root["features"].create_group(staging.name, attributes=attrs)
        emb_codec = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=np.dtype(attrs["dtype"]).itemsize)
        grp.create_array("emb", shape=(n, attrs["dim"]), dtype=attrs["dtype"], chunks=(chunks, attrs["dim"]),
                         fill_value=0, compressors=[emb_codec, Crc32cCodec()], dimension_names=("image", "feature"))
        grp.create_array("status", shape=(n,), dtype="uint8", chunks=(chunks,), fill_value=PENDING,
                         compressors=[ZstdCodec(level=0), Crc32cCodec()], dimension_names=("image",))
        for arr in ("sha256", "error"):
            grp.create_array(arr, shape=(n,), dtype=str, chunks=(chunks,),
                             compressors=[ZstdCodec(level=0), Crc32cCodec()], dimension_names=("image",))
        os.rename(staging, final)
        return self.root["features"][key]

    @contextmanager
    def preparing(self):
        """Serialise the short steps of concurrent writers that change shared metadata (manifest merge,
        feature-set creation and growth, run records); a full or read-only disk there is one line."""
        with storage_errors(self.path, f"updating {self.path}"):
            (self.path / ".locks").mkdir(exist_ok=True)
            with open(self.path / ".locks" / "prepare", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)  # blocking: the step takes a moment
                self.__dict__.pop("manifest", None)  # another process may have changed it
                yield

    @contextmanager
    def lock(self, key: str, shard: tuple[int, int] = (0, 1)):
        """Hold the locks of writing shard ``(i, n)`` of feature set ``key`` (released when the process dies).

        An unsharded run (n = 1) holds ``<key>.set`` exclusively. A shard holds it shared, its own
        ``<key>.shard-i-of-n`` exclusively and ``<key>.n<n>`` shared, then refuses if any ``<key>.n<m>``
        (m != n) is held: of two runs with different n starting together both may refuse, never both run.
        """
        index, count = shard
        me = f"embedstore extract{f' --shard {index}/{count}' if count > 1 else ''} (pid {os.getpid()})"
        with ExitStack() as held:
            with storage_errors(self.path, f"locking feature set {key}"):
                (self.path / ".locks").mkdir(exist_ok=True)
                held.enter_context(self._flock(key, "set", fcntl.LOCK_EX if count == 1 else fcntl.LOCK_SH, me))
                if count > 1:
                    held.enter_context(self._flock(key, f"shard-{index}-of-{count}", fcntl.LOCK_EX, me))
                    held.enter_context(self._flock(key, f"n{count}", fcntl.LOCK_SH, me, wait=True))
                    self._refuse_other_shard_counts(key, count)
            yield

    @contextmanager
    def _flock(self, key: str, part: str, mode: int, me: str, wait: bool = False):
        """flock ``.locks/<key>.<part>`` (``wait``: block, for locks only ever held exclusively for an instant)
        and note ``me`` in it; StoreError naming the holder when it is taken."""
        fd = os.open(self.path / ".locks" / f"{key}.{part}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StoreError(f"feature set {key} of {self.path} is being written by {self._holder(fd)}; "
                                 f"wait for it to finish") from None
            os.pwrite(fd, me.encode().ljust(_HOLDER_BYTES), 0)  # one write: concurrent holders never interleave
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        return os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace").strip() or "another process"

    def _refuse_other_shard_counts(self, key: str, count: int) -> None:
        """StoreError if shards of ``key`` with another shard count hold their ``<key>.n<m>`` lock."""
        for file in (self.path / ".locks").glob(f"{key}.n*"):
            other = file.name.rsplit(".n", 1)[1]
            if not other.isdigit() or int(other) == count:
                continue
            fd = os.open(file, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: released at close
            except BlockingIOError:
                raise StoreError(f"feature set {key} of {self.path} is being written by {self._holder(fd)}; the "
                                 f"shards of one run must share N: wait for it to finish, or use --shard I/{other}") from None
            finally:
                os.close(fd)

    def append_run(self, key: str, record: dict, keep: int = 20) -> None:
        """Add one extraction's provenance to a feature set's attributes (the last ``keep`` runs are kept).

        Re-read from disk under :meth:`preparing`, so concurrent shards each keep their record.
        """
        with self.preparing():
            group = zarr.open_group(self.root.store, path=f"features/{key}", mode="r+", zarr_format=3)
            group.attrs["runs"] = list(group.attrs.get("runs", []))[-(keep - 1):] + [record]

    # ---------------------------------------------------------------- reading
    def load(self, features: str, *, columns: list[str] | None = None, ids=None) -> tuple[np.ndarray, pd.DataFrame]:
        """Features as float32 and the manifest rows they belong to.

        Without ``ids``: every row whose features are final and fresh (failed
        and not-yet-extracted images are left out). With ``ids``: exactly those
        rows in that order. Rows of images that changed since extraction raise
        :class:`StoreError`, whatever is asked: features are never silently stale.
        Besides the manifest's hashes, the images of the returned rows are
        checked on disk (:meth:`changed_images`: a stat each, a hash where it
        changed).
        """
        fs = self.feature_set(features)
        manifest = self.manifest
        man_sha = manifest["sha256"].to_numpy()
        done, fresh = fs.done_and_fresh(man_sha)
        stale = done & ~fresh
        if stale.any():
            raise self._stale_error(fs, manifest["id"].to_numpy()[stale])
        if ids is None:
            rows = np.flatnonzero(fresh)
        else:
            rows = pd.Index(manifest["id"]).get_indexer(pd.Index([str(i) for i in ids]))
            bad = [str(i) for i, r in zip(ids, rows) if r < 0 or not fresh[r]]
            if bad:
                raise StoreError(
                    f"{len(bad)} of the asked ids have no features in {fs.attrs.get('name')} (first: {bad[0]!r}): "
                    f"not in the store, failed, or not extracted yet"
                )
        changed = self.changed_images(rows)
        if changed.any():
            raise self._stale_error(fs, manifest["id"].to_numpy()[rows[changed]])
        X = fs.read_rows(rows)  # damaged chunks raise StoreError: never garbage
        table = manifest.iloc[rows]
        if columns is not None:
            missing = [c for c in columns if c not in manifest.columns]
            if missing:
                raise StoreError(f"column {missing[0]!r} not in the manifest of {self.path}; it has: "
                                 f"{', '.join(c for c in manifest.columns if not c.startswith('_'))}")
            table = table[["id", *[c for c in columns if c != "id"]]]
        return np.asarray(X, dtype=np.float32), table.reset_index(drop=True)

    def put_features(self, name: str, X: np.ndarray, ids, *, parent: str, config: dict, overwrite: bool = False,
                     before_commit: Callable[[str], None] | None = None) -> str:
        """Store derived features (e.g. projected by a trained head) as a feature set named ``name``; returns its key.

        The key is a fingerprint of the parent feature set, ``config`` and the features themselves: the
        same result lands in the same place and is not written twice. A kill at any moment leaves the
        previous set of that name usable or the new one complete:

        1. the new set is written whole under a provisional name (``<name> (being written)``);
        2. ``before_commit(key)`` runs (e.g. to save the head that produced the features);
        3. the set takes ``name`` in one attribute write, one ``generation`` above the set it replaces
           (:meth:`resolve` serves the newest generation of a name, so both may exist for a moment);
        4. with ``overwrite``, the sets that held ``name`` before are removed (crash point
           ``projected-set-replace`` just before). Without it, a name held by other features is refused.

        Leftovers of a killed call (a provisional set, a replaced set not yet removed) go on the next call.
        """
        parent_key = self.resolve(parent)
        parent_attrs = self.feature_set(parent_key).attrs
        X = np.asarray(X, dtype=np.float32)
        _, table = self.load(parent_key, ids=ids)
        key = fingerprint({"parent": parent_key, "config": config, "dim": int(X.shape[1]),
                           "features": digest(X), "ids": digest(table["id"])})
        provisional = f"{name} (being written)"
        clean_stale(self.path)
        for k, g in self._groups().items():
            if g.attrs.get("name") == provisional:
                self.remove_feature_set(k)
        groups = self._groups()
        holders = [k for k, g in groups.items() if g.attrs.get("name") == name and k != key]
        if holders and not overwrite:
            raise StoreError(f"feature set name {name!r} in {self.path} already holds other features (key "
                             f"{holders[0]}); pass overwrite=True to replace them")
        if key in groups and groups[key].attrs.get("name") == name:
            if before_commit is not None:
                before_commit(key)  # the same features are stored already
        else:
            generation = 1 + max((groups[k].attrs.get("generation", 0) for k in holders), default=0)
            attrs = {"encoder": f"{parent_attrs.get('encoder')}+{config.get('kind', 'derived')}",
                     "derived_from": parent_key, "config": config, "weights": parent_attrs.get("weights"),
                     "generation": generation}
            fs = self.require_feature_set(key, provisional, attrs, int(X.shape[1]), "float32",
                                          parent_attrs.get("rows_per_chunk", 1024))
            rows = pd.Index(self.manifest["id"]).get_indexer(table["id"])
            order = np.argsort(rows)
            fs.write_rows(rows[order], X[order], table["sha256"].to_numpy()[order].tolist(),
                          [""] * len(rows), np.full(len(rows), DONE))
            if before_commit is not None:
                before_commit(key)
            fs.group.update_attributes({"name": name})
        faults.point("projected-set-replace")
        for k in holders:
            self.remove_feature_set(k)
        return key

    def remove_feature_set(self, key: str) -> None:
        """Delete feature set ``key``: it leaves ``features/`` in one rename, then its files are deleted."""
        remove_folder(self.path / "features" / key, beside=self.path)

    def open_image(self, image_id: str):
        """The image of ``image_id``, re-read from its source (for thumbnails; heads never need it)."""
        from PIL import Image

        manifest = self.manifest
        hit = np.flatnonzero(manifest["id"].to_numpy() == str(image_id))
        if not len(hit):
            raise StoreError(f"no image {image_id!r} in {self.path}")
        row = manifest.iloc[int(hit[0])]
        data = self._source(int(row["_source"])).read_bytes(row["_path"])
        return Image.open(io.BytesIO(data)).convert("RGB")
