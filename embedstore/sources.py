"""Image sources: where images and their table come from.

A source turns one of the layouts researchers keep their data in into the
same two things: a table (one row per image: ``id``, ``_path`` and the
source's own columns such as labels, groups and metadata) and a way to read
an image's encoded bytes by its ``_path``. Everything downstream works on
those; nothing else in embedstore knows about folders, CSVs or HDF5.

Layouts:

* :class:`CsvFolderSource` - a CSV plus a folder of images (HAM10000, ISIC 2016);
* :class:`Hdf5Source` - JPEG bytes in one HDF5 dataset per id plus a metadata
  CSV (the ISIC 2024 ``train-image.hdf5`` + ``train-metadata.csv`` layout),
  read lazily, never loaded whole;
* :class:`ClassFolderSource` - one sub-folder per class;
* :class:`FolderSource` - a plain folder of images, no table.

:func:`open_source` picks the layout from the path; :func:`source_from_dict`
reopens one from the description a store keeps.

Hostile files never hang a read or escape the image folder (:mod:`embedstore.images`):
only regular files are opened, and an image path that leads out of the image
folder, by ``..`` or through a symlink, is refused when the table is built.
The columns embedstore adds to a table are :data:`embedstore.columns.RESERVED_COLUMNS`.

:meth:`Source.content_hashes` records each image's size and mtime beside its
sha256 and, given what was recorded before, hashes only the images whose size
or mtime differ: checking 400,000 unchanged images costs 400,000 ``stat``
calls, not reading them.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from embedstore.columns import STAT_COLUMNS, UNKNOWN_STAT
from embedstore.errors import SourceError
from embedstore.images import IMAGE_SUFFIXES, escaping_paths, image_files, read_regular_file, regular_file_stat
from embedstore.metadata_csv import MetadataCsv

# An image modified this soon before its hash was taken may change again within the same mtime tick
# (coarse clocks, FAT's 2 s): its mtime is recorded as unknown so that it is hashed again next time.
_RACY_NS = 2_000_000_000

# Images hashed per round of the thread pool. ``Executor.map`` creates a future for every item before the first
# result: for 401,059 images that held 870 MB at once (and left the heap fragmented); a block holds a few MB.
_HASH_BLOCK = 4096


#: What a source holds for the process that reads its table (the driver), and a copy for a worker leaves out.
_DRIVER_STATE = ("_table", "_images", "_metadata")


class Source:
    """Base class: a table of images and a reader of their bytes."""

    kind: str = "abstract"

    def __init__(self) -> None:
        self._table: pd.DataFrame | None = None
        self._images: pd.DataFrame | None = None

    def __getstate__(self) -> dict:
        """What a decoding worker receives: the source without its tables, which only the driver needs
        (400,000 rows of metadata would otherwise be copied into every worker)."""
        state = {k: v for k, v in self.__dict__.items() if k not in _DRIVER_STATE}
        state["_table"] = state["_images"] = None  # (a metadata CSV's scan is made again with the images)
        return state

    def anchored(self) -> "Source":
        """This source with its file paths made absolute, for workers that start in another folder (Ray's)."""
        out = copy.copy(self)
        for name in _DRIVER_STATE:  # the driver's tables and scan (copying drops them, as for a worker)
            if name in vars(self):
                setattr(out, name, getattr(self, name))
        for name, value in vars(self).items():
            if isinstance(value, Path):
                setattr(out, name, value.absolute())
        return out

    @property
    def table(self) -> pd.DataFrame:
        """One row per image: ``id``, ``_path`` (what :meth:`read_bytes` takes), then the source's columns."""
        if self._table is None:
            self._table = self._build_table()
        return self._table

    @property
    def images(self) -> pd.DataFrame:
        """The ``id`` and ``_path`` columns of :attr:`table`, validated as the table is, without its other
        columns: all that extraction holds while it runs (a metadata CSV is read for them alone)."""
        if self._images is None:
            self._images = self._build_images()
        return self._images

    def table_chunks(self) -> Iterator[pd.DataFrame]:
        """:attr:`table` as consecutive pieces (index from 0 in each), for a reader that must not hold all of
        it: the manifest merge streams a 400,000-row metadata CSV through this."""
        yield self.table

    def __len__(self) -> int:
        return len(self.images)

    def _build_table(self) -> pd.DataFrame:
        raise NotImplementedError

    def _build_images(self) -> pd.DataFrame:
        return self.table[["id", "_path"]]

    def read_bytes(self, path: str) -> bytes:
        """The encoded image at ``path`` (a value of the ``_path`` column)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able description from which :func:`source_from_dict` reopens this source."""
        raise NotImplementedError

    def where(self, path: str) -> str:
        """Where the image at ``path`` is, for messages."""
        return path

    def stat(self, path: str) -> tuple[int, int] | None:
        """(size, mtime in ns) of what holds the image at ``path``, to tell whether it may have changed.

        None where not applicable or not available (a missing file): such an image is hashed every time.
        """
        return None

    def stats(self, paths: Sequence[str]) -> np.ndarray:
        """:meth:`stat` of each path as an int64 array ``[n, 2]`` (-1 where None)."""
        if not isinstance(paths, list):  # through numpy: iterating a pandas string column is 15x slower
            paths = np.asarray(paths, dtype=object).tolist()
        out = [self.stat(p) or (UNKNOWN_STAT, UNKNOWN_STAT) for p in paths]
        return np.asarray(out, dtype=np.int64).reshape(len(out), 2)

    def content_hashes(self, paths: Iterable[str] | None = None, recorded: pd.DataFrame | None = None,
                       progress=None) -> pd.DataFrame:
        """The ``sha256`` of each image's bytes ('' where it cannot be read) with its ``_size`` and ``_mtime_ns``.

        ``recorded`` (aligned with ``paths``: ``sha256``, ``_size``, ``_mtime_ns`` from an earlier call)
        lets an image whose size and mtime are unchanged keep its recorded sha256 without being read.
        The others are read on a few threads (file reads and hashlib both release the GIL).
        ``progress`` is called with the number of images done since the last call. An image modified
        less than 2 s before hashing began gets mtime -1, so the next call hashes it again.
        """
        # through numpy: iterating a pandas string column is 15x slower, 0.5 s at 400,000 rows
        paths = np.asarray(self.images["_path"] if paths is None else paths, dtype=object).tolist()
        started = time.time_ns()
        stats = self.stats(paths)
        sha = np.full(len(paths), "", dtype=object)
        if recorded is not None:
            same = unchanged_since(stats, recorded)
            sha[same] = recorded["sha256"].to_numpy()[same]
        todo = np.flatnonzero(sha == "")
        if progress is not None:
            progress(len(paths) - len(todo))

        def one(path: str) -> str:
            try:
                return hashlib.sha256(self.read_bytes(path)).hexdigest()
            except (OSError, KeyError, SourceError):
                return ""

        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(todo), _HASH_BLOCK):  # a block at a time: map() makes every future at once
                block = todo[start:start + _HASH_BLOCK]
                for i, digest in zip(block, pool.map(one, [paths[i] for i in block])):
                    sha[i] = digest
                    if progress is not None:
                        progress(1)
        stats[stats[:, 1] >= started - _RACY_NS, 1] = UNKNOWN_STAT
        return pd.DataFrame({"sha256": sha, STAT_COLUMNS[0]: stats[:, 0], STAT_COLUMNS[1]: stats[:, 1]})


def unchanged_since(stats: np.ndarray, recorded: pd.DataFrame) -> np.ndarray:
    """Which images still have the sha256 ``recorded`` for them without being read again: those whose holder's
    size and mtime now (``stats``, from :meth:`Source.stats`) are known and equal the recorded ones, and whose
    recorded sha256 is neither empty nor missing. ``recorded`` (``sha256`` and the stat columns) is aligned
    with ``stats``."""
    return ((stats >= 0).all(axis=1) & (stats == recorded[list(STAT_COLUMNS)].to_numpy()).all(axis=1)
            & (recorded["sha256"].fillna("") != "").to_numpy(dtype=bool))


def _check_ids(ids: pd.Series, where: str) -> None:
    if ids.isna().any():
        raise SourceError(f"{where}: {int(ids.isna().sum())} rows have an empty id")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise SourceError(
            f"{where}: {dup.nunique()} ids occur more than once (first: {dup.iloc[0]!r}); ids must be unique"
        )


def _normalise_table(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns become strings (NaN kept) so the table round-trips through parquet."""
    table = table.reset_index(drop=True)
    for col in table.columns:
        if table[col].dtype == object:
            mask = table[col].isna()
            table[col] = table[col].astype(str).where(~mask, None)
    return table


def _with_images(images: pd.DataFrame, chunks: Iterator[pd.DataFrame], id_col: str) -> Iterator[pd.DataFrame]:
    """The chunks of a metadata CSV as table chunks: ``id`` and ``_path`` (from ``images``, row for row) first,
    then the CSV's columns but ``id_col``."""
    start = 0
    for chunk in chunks:  # (MetadataCsv.chunks checks that each holds the ids of images' rows start:stop)
        table = chunk.drop(columns=[id_col]).reset_index(drop=True)
        stop = start + len(table)
        table.insert(0, "id", images["id"].array[start:stop])
        table.insert(1, "_path", images["_path"].array[start:stop])
        start = stop
        yield _normalise_table(table)


class _FileSource(Source):
    """Shared reading for sources whose images are files under a root folder."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"image folder not found: {self.root}")

    def _check_inside(self, paths: Iterable[str]) -> None:
        """Refuse image paths that lead out of the image folder, by ``..`` or through a symlink."""
        escaping = escaping_paths(self.root, paths)
        if escaping:
            raise SourceError(
                f"{len(escaping)} image paths escape the image folder {self.root} (first: {escaping[0]})"
            )

    def read_bytes(self, path: str) -> bytes:
        return read_regular_file(self.root / path)

    def where(self, path: str) -> str:
        return str(self.root / path)

    def stat(self, path: str) -> tuple[int, int] | None:
        return regular_file_stat(self.root / path)


class CsvFolderSource(_FileSource):
    """A CSV with one row per image and a folder that holds the images.

    The image of a row is ``path_col`` (relative to ``images``) when given,
    else ``template`` formatted with the id (default ``{id}.jpg``).
    """

    kind = "csv"

    def __init__(
        self,
        csv: str | Path,
        images: str | Path | None = None,
        id_col: str = "image_id",
        path_col: str | None = None,
        template: str = "{id}.jpg",
    ) -> None:
        self.csv = Path(csv)
        if not self.csv.is_file():
            raise SourceError(f"CSV not found: {self.csv}")
        super().__init__(images if images is not None else self.csv.parent)
        self.id_col, self.path_col, self.template = id_col, path_col, template

    def _build_images(self) -> pd.DataFrame:
        self._metadata = MetadataCsv(self.csv, self.id_col, self.path_col)
        df = self._metadata.scan()
        _check_ids(df[self.id_col], self.csv.name)
        ids = df[self.id_col].astype(str)
        if self.path_col is not None:
            paths = df[self.path_col].astype(str)
        else:
            try:
                paths = ids.map(lambda i: self.template.format(id=i))
            except (KeyError, IndexError, ValueError) as exc:
                raise SourceError(f"bad path template {self.template!r}: use {{id}} for the id ({exc})") from None
        self._check_inside(paths)
        return pd.DataFrame({"id": ids.values, "_path": paths.values})

    def table_chunks(self) -> Iterator[pd.DataFrame]:
        images = self.images  # (scans the CSV first)
        return _with_images(images, self._metadata.chunks(), self.id_col)

    def _build_table(self) -> pd.DataFrame:
        return pd.concat(list(self.table_chunks()), ignore_index=True)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "csv": str(self.csv.resolve()),
            "images": str(self.root.resolve()),
            "id_col": self.id_col,
            "path_col": self.path_col,
            "template": self.template,
        }


class Hdf5Source(Source):
    """Encoded images stored as one bytes dataset per id in an HDF5 file.

    The file is opened lazily in each process (h5py handles do not survive a
    fork) and only the asked-for dataset is read, so a 400k-image file is
    never loaded into memory.
    """

    kind = "hdf5"

    def __init__(self, h5: str | Path, metadata: str | Path | None = None, id_col: str = "isic_id") -> None:
        super().__init__()
        self.h5 = Path(h5)
        if not self.h5.is_file():
            raise SourceError(f"HDF5 file not found: {self.h5}")
        self.metadata = Path(metadata) if metadata is not None else None
        if self.metadata is not None and not self.metadata.is_file():
            raise SourceError(f"metadata CSV not found: {self.metadata}")
        self.id_col = id_col
        self._file = None
        self._pid = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_file"] = None
        return state

    def _handle(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.h5, "r")
            except OSError as exc:
                raise SourceError(f"cannot open {self.h5} as HDF5: {exc}") from None
            self._pid = os.getpid()
        return self._file

    def _build_images(self) -> pd.DataFrame:
        if self.metadata is None:
            keys = list(self._handle().keys())
            if not keys:
                raise SourceError(f"{self.h5} holds no datasets: no images to extract")
            return pd.DataFrame({"id": keys, "_path": keys})
        self._metadata = MetadataCsv(self.metadata, self.id_col)
        ids = self._metadata.scan()[self.id_col]
        _check_ids(ids, self.metadata.name)
        ids = ids.astype(str)
        return pd.DataFrame({"id": ids.values, "_path": ids.values})

    def table_chunks(self) -> Iterator[pd.DataFrame]:
        images = self.images  # (scans the CSV first)
        if self.metadata is None:
            return iter([images])
        return _with_images(images, self._metadata.chunks(), self.id_col)

    def _build_table(self) -> pd.DataFrame:
        return pd.concat(list(self.table_chunks()), ignore_index=True)

    def read_bytes(self, path: str) -> bytes:
        try:
            data = self._handle()[path][()]
        except KeyError:
            raise KeyError(f"no dataset {path!r} in {self.h5.name}") from None
        return data.tobytes() if isinstance(data, np.ndarray) else bytes(data)

    def where(self, path: str) -> str:
        return f"dataset {path!r} of {self.h5}"

    def stat(self, path: str) -> tuple[int, int] | None:
        """The HDF5 file's own size and mtime: any change to the file may have changed any image."""
        return regular_file_stat(self.h5)

    def stats(self, paths: Sequence[str]) -> np.ndarray:
        """One ``stat`` of the HDF5 file for all the images in it (the paths are only counted)."""
        return np.tile(np.asarray(self.stat("") or (UNKNOWN_STAT, UNKNOWN_STAT), dtype=np.int64), (len(paths), 1))

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "h5": str(self.h5.resolve()),
            "metadata": str(self.metadata.resolve()) if self.metadata else None,
            "id_col": self.id_col,
        }


class FolderSource(_FileSource):
    """A plain folder of images (searched recursively) with no table: ids are paths without suffix."""

    kind = "folder"

    def _build_table(self) -> pd.DataFrame:
        files = [p.relative_to(self.root) for p in image_files(self.root)]
        if not files:
            raise SourceError(f"no images found under {self.root}")
        ids = pd.Series([str(p.with_suffix("").as_posix()) for p in files])
        _check_ids(ids, str(self.root))
        self._check_inside(p.as_posix() for p in files)
        return pd.DataFrame({"id": ids, "_path": [p.as_posix() for p in files]})

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root.resolve())}


class ClassFolderSource(FolderSource):
    """``root/<class>/<image>``: a folder source whose first sub-folder names the ``label`` column."""

    kind = "class_folders"

    def _build_table(self) -> pd.DataFrame:
        table = super()._build_table()
        table["label"] = table["_path"].str.split("/").str[0]
        return table


def open_source(
    path: str | Path,
    *,
    images: str | Path | None = None,
    metadata: str | Path | None = None,
    id_col: str | None = None,
    path_col: str | None = None,
    template: str = "{id}.jpg",
) -> Source:
    """Open ``path`` as the source its form implies.

    * ``*.csv`` - a table plus the ``images`` folder (default: the CSV's folder);
    * ``*.h5`` / ``*.hdf5`` - encoded images by id, with an optional ``metadata`` CSV;
    * a folder whose images all sit in sub-folders - one class per sub-folder;
    * any other folder - a plain folder of images.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return CsvFolderSource(p, images=images, id_col=id_col or "image_id", path_col=path_col, template=template)
    if suffix in {".h5", ".hdf5"}:
        return Hdf5Source(p, metadata=metadata, id_col=id_col or "isic_id")
    if p.is_dir():
        top_level_images = [c for c in p.iterdir() if c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES]
        subdirs = [c for c in p.iterdir() if c.is_dir()]
        if subdirs and not top_level_images:
            return ClassFolderSource(p)
        return FolderSource(p)
    if not p.exists():
        raise SourceError(f"source not found: {p}")
    raise SourceError(f"cannot tell what kind of source {p} is: give a folder, a .csv or an .h5/.hdf5 file")


def source_from_dict(desc: dict) -> Source:
    """Reopen a source from :meth:`Source.describe` output (as stored in a feature store)."""
    kind = desc.get("kind")
    if kind == "csv":
        return CsvFolderSource(desc["csv"], desc["images"], desc["id_col"], desc["path_col"], desc["template"])
    if kind == "hdf5":
        return Hdf5Source(desc["h5"], desc["metadata"], desc["id_col"])
    if kind == "class_folders":
        return ClassFolderSource(desc["root"])
    if kind == "folder":
        return FolderSource(desc["root"])
    raise SourceError(f"unknown source kind {kind!r}")
