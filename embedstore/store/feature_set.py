"""One feature set: its zarr arrays (``emb``, ``sha256``, ``error``, ``status``), the only code that writes them,
and the checks that find and repair damaged chunks.

All arrays of a set share the row chunking, so processes writing disjoint chunk-aligned row blocks never touch
the same file: that is what sharded extraction (and any distributed engine) relies on. Integrity: every chunk of
a set created by this version ends in a crc32c (zarr's codec; older sets have none and are read as before), and
every chunk is written even when it holds only fill values. A damaged chunk is refused on read
(:class:`StoreError` naming its rows), counted by :meth:`FeatureStore.info`, and deleted in every array and
recomputed by the next extraction (:meth:`FeatureSet.repair_chunks`). Growing a set resizes its arrays one by
one, status last; a kill in between leaves them at different lengths, which :attr:`FeatureSet.n_rows` (the
shortest) tolerates and the next writer finishes.
"""

from __future__ import annotations

from pathlib import Path

import google_crc32c  # zarr's own dependency, the checksum of its crc32c codec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from embedstore import faults
from embedstore.atomic import clean_stale, rename_into_place, staging_path
from embedstore.errors import StoreError, first_line
from embedstore.parallel import in_order, usable_cores

PENDING, DONE, FAILED = 0, 1, 2
DTYPES = ("float16", "float32")
#: The arrays of a feature set, in the order they are grown and written: ``status`` last, because it commits rows.
ARRAYS = ("emb", "sha256", "error", "status")


def unreadable_set(store: Path, key: str, what: str, exc: Exception) -> StoreError:
    """The one line for a feature set whose zarr metadata cannot be read: delete it, extract again."""
    reason = first_line(exc)
    return StoreError(f"feature set {key} of {store} has unreadable metadata ({what}: {reason}); delete the folder "
                      f"{store / 'features' / key} and extract again to recompute it")


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
                raise unreadable_set(self.store_path, self.key, f"array {name}", exc) from None
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
        if rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            return self.read("emb", slice(int(rows[0]), int(rows[-1]) + 1))  # one contiguous read
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

    def done_and_fresh(self, manifest_sha, block_chunks: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks over manifest rows: features done, and done from the current image (fresh).

        ``manifest_sha`` is the manifest's sha256 column (an array or a pandas string array). The stored hashes
        are compared ``block_chunks`` chunks at a time, so only a block of hash strings is held at once (at 10
        million rows the whole column as Python strings would take over a gigabyte).
        """
        n = min(self.n_rows, len(manifest_sha))
        done = np.zeros(len(manifest_sha), dtype=bool)
        done[:n] = self.read("status", slice(0, n)) == DONE
        fresh = done.copy()
        block = self.rows_per_chunk * block_chunks
        for start in range(0, n, block):
            stop = min(n, start + block)
            fresh[start:stop] &= self.read("sha256", slice(start, stop)) == np.asarray(manifest_sha[start:stop],
                                                                                       dtype=object)
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
            fix = (f"derive it again from feature set {self.attrs['derived_from']} (the projection that made it) "
                   f"to recompute them")
        elif self.has_checksums:
            fix = f"extract again with encoder {self.attrs.get('encoder')} into {self.store_path} to recompute them"
        else:
            fix = f"this set has no checksums: delete {self.path} and extract again to recompute it"
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
        chunks = self.chunks_of() if chunks is None else chunks

        def corrupt(c: int) -> bool:
            ok = {name: _crc_ok(self._chunk_file(name, c)) for name in ARRAYS}
            return False in ok.values() or (ok["status"] is True and None in ok.values())

        # crc32c releases the GIL: the cores check chunks side by side (3x faster on 2 cores, BENCHMARKS.md)
        return [c for c, bad in zip(chunks, list(in_order(corrupt, chunks, usable_cores()))) if bad]

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

    def failed_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows among the first ``n`` whose image could not be read, and why; rows of corrupt chunks count
        as pending, so a damaged set still lists what it can."""
        rows = np.flatnonzero(self.read_intact("status", n, self.corrupt_chunks() or []) == FAILED)
        return rows, self.read("error", rows) if len(rows) else np.array([], dtype=object)


def create_feature_set(features: zarr.Group, key: str, attrs: dict, n: int, chunks: int) -> zarr.Group:
    """The group and arrays of a new feature set ``key`` in the ``features`` group; every array ends in a crc32c
    of each chunk.

    They are built under a hidden name (which readers skip) and renamed into place whole, so a kill
    while creating leaves no half-made set; the next creation removes the hidden leftover.
    """
    final = Path(str(features.store.root)) / features.path / key
    clean_stale(final)
    staging = staging_path(final)
    grp = features.create_group(staging.name, attributes=attrs)
    emb_codec = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=np.dtype(attrs["dtype"]).itemsize)
    grp.create_array("emb", shape=(n, attrs["dim"]), dtype=attrs["dtype"], chunks=(chunks, attrs["dim"]),
                     fill_value=0, compressors=[emb_codec, Crc32cCodec()], dimension_names=("image", "feature"))
    grp.create_array("status", shape=(n,), dtype="uint8", chunks=(chunks,), fill_value=PENDING,
                     compressors=[ZstdCodec(level=0), Crc32cCodec()], dimension_names=("image",))
    for arr in ("sha256", "error"):
        grp.create_array(arr, shape=(n,), dtype=str, chunks=(chunks,),
                         compressors=[ZstdCodec(level=0), Crc32cCodec()], dimension_names=("image",))
    rename_into_place(staging, final)
    return features[key]

