"""The :class:`FeatureStore` API: open or create a store, merge a source into its manifest, create, find, load,
derive and remove feature sets. The parts it stands on are modules of their own: :mod:`.manifest`,
:mod:`.freshness`, :mod:`.feature_set`, :mod:`.locks`, :mod:`.summary`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from embedstore import __version__, faults
from embedstore.atomic import clean_stale, remove_folder, rename_into_place, staging_path
from embedstore.clock import utc_now
from embedstore.columns import source_columns
from embedstore.errors import StoreError, first_line
from embedstore.store.disk import storage_errors
from embedstore.store.feature_set import DONE, DTYPES, FeatureSet, create_feature_set, unreadable_set
from embedstore.store.freshness import ImageCheck, stale_error
from embedstore.store.identity import digest, fingerprint
from embedstore.store.locks import metadata_lock, writer_lock
from embedstore.sources import Source
from embedstore.store.manifest import (ManifestUpdate, append_manifest, manifest_columns, manifest_rows, merge_manifest,
                                       planned_rows, read_manifest, recorded_images, write_manifest)
from embedstore.store.summary import FeatureSetInfo, StoreSummary, count_feature_set

FORMAT_VERSION = 1


class FeatureStore:
    """A zarr store of feature sets over one manifest of images.

    Open an existing store with :meth:`open`; :func:`embedstore.extract`
    creates one with :meth:`create_or_open`.
    """

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self.root = root
        self._images = ImageCheck(lambda: self.root.attrs["sources"])  # see changed_images

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        """Open an existing store; :class:`StoreError` if there is none at ``path``."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no feature store at {path} (extract features into it first)")
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
        """Open the store at ``path``, or create an empty one; refuse a path holding anything else.

        A new store is built whole under a hidden name and renamed into place (over an empty folder, if one is
        there), so processes started together on one new store (``extract --shard i/n``) never see it half-made:
        the first rename wins, the others open the store it made.
        """
        path = Path(path)
        if path.exists() and not (path / "zarr.json").is_file():
            if path.is_file() or any(path.iterdir()):
                raise StoreError(f"{path} exists and is not a feature store; choose another store path")
        if not (path / "zarr.json").is_file():
            with storage_errors(path, f"creating the store {path}"):
                path.parent.mkdir(parents=True, exist_ok=True)
                clean_stale(path)
                staging = staging_path(path)
                root = zarr.open_group(str(staging), mode="w-", zarr_format=3)
                root.attrs["embedstore"] = {"format": FORMAT_VERSION, "created_with": __version__, "created": utc_now()}
                root.attrs["sources"] = []
                root.require_group("features")
                try:
                    rename_into_place(staging, path)
                except OSError:
                    remove_folder(staging)
                    if not (path / "zarr.json").is_file():  # not another process's store: a real failure
                        raise
        return cls.open(path)

    # ---------------------------------------------------------------- manifest
    @cached_property
    def manifest(self) -> pd.DataFrame:
        """One row per image; row ``i`` is row ``i`` of every feature set (:func:`.manifest.read_manifest`)."""
        return read_manifest(self.path)

    @cached_property
    def _reserved(self) -> pd.DataFrame:
        """The manifest's own columns (ids, hashes, paths, stats), without the sources' metadata: what relating
        a source's images to the rows needs (a tenth of the whole manifest's memory at 401,059 rows)."""
        return read_manifest(self.path, reserved_only=True)

    def _held_or_own_columns(self) -> pd.DataFrame:
        """The whole manifest where this FeatureStore holds it already, else its own columns (:attr:`_reserved`):
        what counting rows or finding an image needs, without reading the sources' metadata."""
        return self.__dict__["manifest"] if "manifest" in self.__dict__ else self._reserved

    def _forget_manifest(self) -> None:
        """Drop what was read of the manifest: another process may have changed it, or this one did."""
        self.__dict__.pop("manifest", None)
        self.__dict__.pop("_reserved", None)

    def _source_index(self, desc: dict) -> int:
        sources = list(self.root.attrs.get("sources", []))
        if desc not in sources:
            sources.append(desc)
            self.root.attrs["sources"] = sources
        return sources.index(desc)

    def update_manifest(self, source: Source | pd.DataFrame, hashes: pd.DataFrame, source_desc: dict) -> ManifestUpdate:
        """Merge a source's table into the manifest: new images are appended, known ones updated in place.

        ``source`` is a :class:`~embedstore.sources.Source` or its table; ``hashes`` is
        :meth:`Source.content_hashes` of its images (sha256, size, mtime). Call it inside :meth:`preparing`. The
        manifest is replaced atomically (:func:`.manifest.write_manifest`). Images the same source had before and
        no longer lists are reported in :attr:`ManifestUpdate.removed` and kept, with their features.

        A source none of whose images the manifest holds (a first extraction) is appended a chunk of its table
        at a time (:func:`.manifest.append_manifest`); otherwise its table and the manifest are merged in memory
        (:func:`.manifest.merge_manifest`).
        """
        index = self._source_index(source_desc)
        if isinstance(source, Source):
            if not self._reserved["id"].isin(source.images["id"]).any():
                update = append_manifest(self.path, self._reserved, source.table_chunks(), hashes, index)
                if update is not None:
                    self._forget_manifest()
                    return update
        old = self.manifest
        merged, update = merge_manifest(old, source.table if isinstance(source, Source) else source, hashes, index)
        if not merged.equals(old):
            write_manifest(self.path, merged)
            self._forget_manifest()
        return update

    def planned_rows(self, ids: pd.Series) -> np.ndarray:
        """The store rows images ``ids`` will take (known ids keep theirs, new ones are appended), writing nothing."""
        return planned_rows(self._reserved, ids)

    # --------------------------------------------------------------- freshness
    def recorded_images(self, table: pd.DataFrame, source_desc: dict) -> pd.DataFrame | None:
        """What the manifest recorded of ``table``'s images (:func:`.manifest.recorded_images`); None when the
        store has never seen this source."""
        sources = list(self.root.attrs.get("sources", []))
        if source_desc not in sources:
            return None
        return recorded_images(self._reserved, sources.index(source_desc), table)

    def changed_images(self, rows: np.ndarray) -> np.ndarray:
        """Which of the manifest ``rows`` hold an image whose bytes differ from the sha256 the manifest recorded
        (:meth:`.freshness.ImageCheck.changed`). Rows found unchanged are remembered by this FeatureStore;
        open the store again to check again."""
        return self._images.changed(self.manifest, rows)

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
                raise unreadable_set(self.path, folder.name, "zarr.json", exc) from None
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
        """Counts of one feature set; ``verify`` also checks every chunk file, and then rows of corrupt chunks
        count as missing instead of failing the read."""
        return self._count(key_or_name, self.manifest, verify)

    def _count(self, key_or_name: str, manifest: pd.DataFrame, verify: bool) -> FeatureSetInfo:
        """:meth:`info` against ``manifest`` (the whole one, or its own columns only)."""
        return count_feature_set(self.feature_set(key_or_name), manifest["sha256"].to_numpy(),
                                 lambda rows: self._images.changed(manifest, rows), verify)

    def feature_sets(self, verify: bool = False) -> list[FeatureSetInfo]:
        return [self.info(key, verify) for key in sorted(self._groups())]

    def summary(self, verify: bool = True) -> StoreSummary:
        """The store at a glance (what ``embedstore ls`` prints); ``verify`` checks every chunk file.

        Reads only the manifest's own columns (not the sources' metadata) unless this FeatureStore holds it already."""
        manifest = self._held_or_own_columns()
        sets = [self._count(key, manifest, verify) for key in sorted(self._groups())]
        return StoreSummary(path=self.path, n_images=len(manifest), n_sources=len(self.root.attrs.get("sources", [])),
                            columns=source_columns(manifest_columns(self.path)), feature_sets=sets)

    def failures(self, key_or_name: str) -> pd.DataFrame:
        """The images feature set ``key_or_name`` could not be computed from: ``id`` and ``error`` (the reason),
        in row order. Rows of corrupt chunks are left out (they are pending until recomputed)."""
        fs = self.feature_set(key_or_name)
        manifest = self.manifest
        rows, errors = fs.failed_rows(min(fs.n_rows, len(manifest)))
        return pd.DataFrame({"id": manifest["id"].to_numpy()[rows], "error": np.asarray(errors, dtype=object)})

    def chunking(self, key: str) -> int | None:
        """The rows per chunk of feature set ``key`` (fixed when it was created); None if there is no such set."""
        groups = self._groups()
        return FeatureSet(groups[key]).rows_per_chunk if key in groups else None

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
                f"store this one under another feature-set name"
            )
        n = manifest_rows(self.path)
        with storage_errors(self.path, f"preparing feature set {name} in {self.path}"):
            if key not in groups:
                return FeatureSet(create_feature_set(self.root["features"], key, {
                    **attrs, "name": name, "key": key, "dim": dim, "dtype": dtype, "rows_per_chunk": rows_per_chunk,
                    "created": utc_now()}, n, max(1, rows_per_chunk)))
            fs = FeatureSet(groups[key])
            fs.resize(n)  # also finishes a growth that a kill interrupted
            return fs

    @contextmanager
    def preparing(self):
        """Serialise the short steps of concurrent writers that change shared metadata (manifest merge,
        feature-set creation and growth, run records); a full or read-only disk there is one line."""
        with metadata_lock(self.path):
            self._forget_manifest()  # another process may have changed it
            yield

    @contextmanager
    def lock(self, key: str, shard: tuple[int, int] = (0, 1)):
        """Hold the locks of writing shard ``(i, n)`` of feature set ``key`` (:func:`.locks.writer_lock`)."""
        with writer_lock(self.path, key, shard):
            yield

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
        changed). The rows are those of :meth:`usable_rows`.
        """
        fs, rows = self.usable_rows(features, ids=ids)
        manifest = self.manifest
        X = fs.read_rows(rows)  # damaged chunks raise StoreError: never garbage
        table = manifest.iloc[rows]
        if columns is not None:
            missing = [c for c in columns if c not in manifest.columns]
            if missing:
                raise StoreError(f"column {missing[0]!r} not in the manifest of {self.path}; it has: "
                                 f"{', '.join(c for c in manifest.columns if not c.startswith('_'))}")
            table = table[["id", *[c for c in columns if c != "id"]]]
        return np.asarray(X, dtype=np.float32), table.reset_index(drop=True)

    def usable_rows(self, features: str, *, ids=None) -> tuple[FeatureSet, np.ndarray]:
        """The feature set and the manifest rows :meth:`load` reads, without reading any features.

        Without ``ids``: every row whose features are final and fresh, in row order; with ``ids``: exactly
        those rows in that order (:class:`StoreError` if one has no features). Stale rows raise as in
        :meth:`load`. For readers that go through a set a block at a time (FAISS indices built from the
        store, :mod:`embedstore.match.index`), so the rows they use are the rows ``load`` would return.
        """
        fs = self.feature_set(features)
        manifest = self.manifest
        done, fresh = fs.done_and_fresh(manifest["sha256"].array)
        stale = done & ~fresh
        if stale.any():
            raise stale_error(self.path, fs.attrs, manifest["id"].to_numpy()[stale])
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
            raise stale_error(self.path, fs.attrs, manifest["id"].to_numpy()[rows[changed]])
        return fs, rows

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
        """The image of ``image_id``, re-read from its source (for thumbnails; heads never need it).

        Finds it in the manifest's own columns, unless the whole manifest is held already: a report written at
        the end of a probe at 401,059 rows would otherwise read the sources' metadata too (about 400 MB more,
        the probe's peak)."""
        from PIL import Image

        manifest = self._held_or_own_columns()
        hit = np.flatnonzero(manifest["id"].to_numpy() == str(image_id))
        if not len(hit):
            raise StoreError(f"no image {image_id!r} in {self.path}")
        row = manifest.iloc[int(hit[0])]
        data = self._images.source(int(row["_source"])).read_bytes(row["_path"])
        return Image.open(io.BytesIO(data)).convert("RGB")
