"""The feature store: frozen embeddings in zarr v3, keyed by what produced them.

Layout (see README, "The store layout")::

    ham10000.zarr/                 zarr group; attrs: embedstore format, sources
      manifest.parquet             one row per image: id, sha256, _path, _source, the source's columns
      features/<key>/              one feature set; attrs: name, encoder config, weights hash, provenance
        emb     [N, D] float16     chunks (rows_per_chunk, D), blosc-zstd with byte shuffle
        status  [N] uint8          0 pending, 1 done, 2 failed; written last, so it commits a row
        sha256  [N] str            content hash of the image each row was computed from
        error   [N] str            why a row failed ('' otherwise)

Row ``i`` of every feature set is row ``i`` of the manifest; rows are only
ever appended, so a row number never changes meaning. A row is *fresh* when
its status is done and its ``sha256`` equals the manifest's: rows of images
that changed since extraction are *stale*, and :meth:`FeatureStore.load`
refuses them rather than return them silently.

All arrays of a feature set share the row chunking, so processes writing
disjoint chunk-aligned row blocks never touch the same file: that is what
``embedstore extract --shard i/n`` (and any distributed engine) relies on.
zarr's local store writes every file through a temporary name and a rename,
so a killed process never leaves a torn chunk or metadata file behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from embedstore import __version__
from embedstore.errors import StoreError
from embedstore.sources import source_from_dict

FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
DTYPES = ("float16", "float32")
MANIFEST_FILE = "manifest.parquet"
_BASE_COLUMNS = ("id", "sha256", "_path", "_source")


def fingerprint(config: dict) -> str:
    """A short, stable key for a feature-set configuration (canonical JSON, sha256, 16 hex digits)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


@dataclass
class ManifestUpdate:
    """How a source's images relate to the store's rows after :meth:`FeatureStore.update_manifest`."""

    rows: np.ndarray  # the store row of each source image, in source order
    new: list[str]
    changed: list[str]
    removed: list[str]  # ids this source had before and no longer has (kept in the store)


class FeatureSet:
    """The zarr arrays of one feature set, and the only code that writes them."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        self.key = group.basename
        self.emb = group["emb"]
        self.status = group["status"]
        self.sha256 = group["sha256"]
        self.error = group["error"]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_rows(self) -> int:
        return int(self.status.shape[0])

    @property
    def rows_per_chunk(self) -> int:
        return int(self.status.chunks[0])

    def resize(self, n_rows: int) -> None:
        """Grow every array to ``n_rows`` (new rows are pending)."""
        if n_rows > self.n_rows:
            self.emb.resize((n_rows, self.emb.shape[1]))
            for arr in (self.status, self.sha256, self.error):
                arr.resize((n_rows,))

    def write_rows(self, rows: np.ndarray, emb: np.ndarray | None, sha: list[str], error: list[str], status: np.ndarray) -> None:
        """Write a block of rows; the status goes last, so a row is final only once its data is on disk."""
        rows = np.asarray(rows, dtype=np.int64)
        if emb is not None and len(rows):
            self.emb.set_orthogonal_selection((rows, slice(None)), emb.astype(self.emb.dtype, copy=False))
        self.sha256.set_orthogonal_selection(rows, np.asarray(sha, dtype=str))
        self.error.set_orthogonal_selection(rows, np.asarray(error, dtype=str))
        self.status.set_orthogonal_selection(rows, np.asarray(status, dtype=np.uint8))

    def done_and_fresh(self, manifest_sha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks over manifest rows: features done, and done from the current image (fresh)."""
        n = min(self.n_rows, len(manifest_sha))
        done = np.zeros(len(manifest_sha), dtype=bool)
        done[:n] = self.status[:n] == DONE
        fresh = done.copy()
        fresh[:n] &= self.sha256[:n] == manifest_sha[:n]
        return done, fresh

    def append_run(self, record: dict, keep: int = 20) -> None:
        """Add one extraction's provenance to the attributes (the last ``keep`` runs are kept)."""
        runs = list(self.group.attrs.get("runs", []))[-(keep - 1):] + [record]
        self.group.attrs["runs"] = runs


class FeatureStore:
    """A zarr store of feature sets over one manifest of images.

    Open an existing store with :meth:`open`; :func:`embedstore.extract`
    creates one with :meth:`create_or_open`.
    """

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self.root = root
        self._sources: dict[int, object] = {}

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
            raise StoreError(f"{path} is not a readable zarr v3 store: {str(exc).splitlines()[0]}") from None
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
            path.parent.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(str(path), mode="a", zarr_format=3)
            root.attrs["embedstore"] = {"format": FORMAT_VERSION, "created_with": __version__, "created": utc_now()}
            root.attrs["sources"] = []
            root.require_group("features")
        return cls.open(path)

    # ---------------------------------------------------------------- manifest
    @cached_property
    def manifest(self) -> pd.DataFrame:
        """One row per image; row ``i`` is row ``i`` of every feature set."""
        file = self.path / MANIFEST_FILE
        if not file.is_file():
            return pd.DataFrame({c: pd.Series(dtype=object if c != "_source" else np.int64) for c in _BASE_COLUMNS})
        return pd.read_parquet(file)

    def _source_index(self, desc: dict) -> int:
        sources = list(self.root.attrs.get("sources", []))
        if desc not in sources:
            sources.append(desc)
            self.root.attrs["sources"] = sources
        return sources.index(desc)

    def update_manifest(self, table: pd.DataFrame, sha256: list[str], source_desc: dict) -> ManifestUpdate:
        """Merge a source's table into the manifest: new images are appended, known ones updated in place.

        The manifest is replaced atomically (written aside, then renamed).
        Images the same source had before and no longer lists are reported in
        :attr:`ManifestUpdate.removed` and kept, with their features.
        """
        old = self.manifest
        src = self._source_index(source_desc)
        incoming = table.copy()
        incoming.insert(1, "sha256", np.asarray(sha256, dtype=object))
        incoming.insert(3, "_source", np.full(len(incoming), src, dtype=np.int64))
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
        merged["_source"] = merged["_source"].astype(np.int64)
        rows = np.where(is_new, len(old) + np.cumsum(is_new) - 1, pos).astype(np.int64)
        if not merged.equals(old):
            self._write_manifest(merged)
        return ManifestUpdate(
            rows=rows,
            new=incoming.loc[is_new, "id"].tolist(),
            changed=incoming.loc[changed_mask, "id"].tolist(),
            removed=removed,
        )

    def _write_manifest(self, manifest: pd.DataFrame) -> None:
        tmp = self.path / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
        manifest.to_parquet(tmp, index=False)
        os.replace(tmp, self.path / MANIFEST_FILE)
        self.__dict__.pop("manifest", None)

    # ------------------------------------------------------------ feature sets
    def _groups(self) -> dict[str, zarr.Group]:
        features = self.root.require_group("features")
        return {name: grp for name, grp in features.groups()}

    def feature_set(self, key_or_name: str) -> FeatureSet:
        return FeatureSet(self._groups()[self.resolve(key_or_name)])

    def resolve(self, key_or_name: str) -> str:
        """The key of a feature set given its key, its name, its encoder (if unique) or a unique key prefix."""
        groups = self._groups()
        if key_or_name in groups:
            return key_or_name
        by_name = [k for k, g in groups.items() if g.attrs.get("name") == key_or_name]
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

    def info(self, key_or_name: str) -> FeatureSetInfo:
        fs = self.feature_set(key_or_name)
        attrs = fs.attrs
        man_sha = self.manifest["sha256"].to_numpy()
        n = min(fs.n_rows, len(man_sha))
        status = fs.status[:n]
        same = fs.sha256[:n] == man_sha[:n]
        done = status == DONE
        stored = sum(f.stat().st_size for f in (self.path / "features" / fs.key).rglob("*") if f.is_file())
        return FeatureSetInfo(
            key=fs.key, name=attrs.get("name", fs.key), encoder=attrs.get("encoder", "?"),
            dim=int(fs.emb.shape[1]), dtype=str(fs.emb.dtype), n_rows=len(man_sha),
            n_done=int((done & same).sum()), n_failed=int(((status == FAILED) & same).sum()),
            n_stale=int((done & ~same).sum()), n_missing=int(len(man_sha) - (done & same).sum() - ((status == FAILED) & same).sum()),
            nbytes_stored=stored, attrs=attrs,
        )

    def feature_sets(self) -> list[FeatureSetInfo]:
        return [self.info(key) for key in sorted(self._groups())]

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
        if key not in groups:
            grp = self.root["features"].create_group(
                key, attributes={**attrs, "name": name, "key": key, "dim": dim, "dtype": dtype,
                                 "rows_per_chunk": rows_per_chunk, "created": utc_now()})
            chunks = max(1, rows_per_chunk)
            itemsize = np.dtype(dtype).itemsize
            grp.create_array("emb", shape=(n, dim), dtype=dtype, chunks=(chunks, dim), fill_value=0,
                             compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize),
                             dimension_names=("image", "feature"))
            grp.create_array("status", shape=(n,), dtype="uint8", chunks=(chunks,), fill_value=PENDING,
                             dimension_names=("image",))
            for arr in ("sha256", "error"):
                grp.create_array(arr, shape=(n,), dtype=str, chunks=(chunks,), dimension_names=("image",))
            return FeatureSet(grp)
        fs = FeatureSet(groups[key])
        fs.resize(n)
        return fs

    @contextmanager
    def preparing(self):
        """Serialise the short set-up step of concurrent writers (manifest merge, feature-set creation)."""
        lock_dir = self.path / ".locks"
        lock_dir.mkdir(exist_ok=True)
        with open(lock_dir / "prepare", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # blocking: the step takes a moment
            self.__dict__.pop("manifest", None)  # another process may have changed it
            yield

    @contextmanager
    def lock(self, key: str, shard: str = "all"):
        """Hold an exclusive lock on writing ``shard`` of feature set ``key`` (released when the process dies)."""
        lock_dir = self.path / ".locks"
        lock_dir.mkdir(exist_ok=True)
        with open(lock_dir / f"{key}.{shard}", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise StoreError(
                    f"feature set {key} of {self.path} is being written by {holder}; wait for it to finish"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"embedstore extract (pid {os.getpid()})")
            fh.flush()
            yield

    # ---------------------------------------------------------------- reading
    def load(self, features: str, *, columns: list[str] | None = None, ids=None) -> tuple[np.ndarray, pd.DataFrame]:
        """Features as float32 and the manifest rows they belong to.

        Without ``ids``: every row whose features are final and fresh (failed
        and not-yet-extracted images are left out). With ``ids``: exactly those
        rows in that order. Rows of images that changed since extraction raise
        :class:`StoreError`, whatever is asked: features are never silently stale.
        """
        fs = self.feature_set(features)
        manifest = self.manifest
        man_sha = manifest["sha256"].to_numpy()
        done, fresh = fs.done_and_fresh(man_sha)
        stale = done & ~fresh
        if stale.any():
            raise StoreError(
                f"{int(stale.sum())} images changed since feature set {fs.attrs.get('name')} was extracted "
                f"(first: {manifest['id'].iloc[int(np.argmax(stale))]}); rerun `embedstore extract` with "
                f"encoder {fs.attrs.get('encoder')} on {self.path} to refresh them"
            )
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
        if len(rows) and rows[0] == 0 and rows[-1] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            X = fs.emb[: len(rows)]  # one contiguous read
        else:
            X = fs.emb.get_orthogonal_selection((rows, slice(None))) if len(rows) else np.zeros((0, fs.emb.shape[1]))
        table = manifest.iloc[rows]
        if columns is not None:
            missing = [c for c in columns if c not in manifest.columns]
            if missing:
                raise StoreError(f"column {missing[0]!r} not in the manifest of {self.path}; it has: "
                                 f"{', '.join(c for c in manifest.columns if not c.startswith('_'))}")
            table = table[["id", *[c for c in columns if c != "id"]]]
        return np.asarray(X, dtype=np.float32), table.reset_index(drop=True)

    def put_features(self, name: str, X: np.ndarray, ids, *, parent: str, config: dict, overwrite: bool = False) -> str:
        """Store derived features (e.g. projected by a trained head) as a new feature set; returns its key.

        The key is a fingerprint of the parent feature set and ``config``, so
        the same derivation lands in the same place. ``overwrite`` replaces a
        feature set of the same name with another configuration.
        """
        parent_key = self.resolve(parent)
        parent_attrs = self.feature_set(parent_key).attrs
        X = np.asarray(X, dtype=np.float32)
        key = fingerprint({"parent": parent_key, "config": config, "dim": int(X.shape[1])})
        if overwrite:
            for k, g in self._groups().items():
                if g.attrs.get("name") == name and k != key:
                    del self.root["features"][k]
        attrs = {"encoder": f"{parent_attrs.get('encoder')}+{config.get('kind', 'derived')}", "derived_from": parent_key,
                 "config": config, "weights": parent_attrs.get("weights")}
        fs = self.require_feature_set(key, name, attrs, int(X.shape[1]), "float32", parent_attrs.get("rows_per_chunk", 1024))
        _, table = self.load(parent_key, ids=ids)
        rows = pd.Index(self.manifest["id"]).get_indexer(table["id"])
        order = np.argsort(rows)
        fs.write_rows(rows[order], X[order], table["sha256"].to_numpy()[order].tolist(),
                      [""] * len(rows), np.full(len(rows), DONE))
        return key

    def open_image(self, image_id: str):
        """The image of ``image_id``, re-read from its source (for thumbnails; heads never need it)."""
        from PIL import Image

        manifest = self.manifest
        hit = np.flatnonzero(manifest["id"].to_numpy() == str(image_id))
        if not len(hit):
            raise StoreError(f"no image {image_id!r} in {self.path}")
        row = manifest.iloc[int(hit[0])]
        src_idx = int(row["_source"])
        if src_idx not in self._sources:
            self._sources[src_idx] = source_from_dict(self.root.attrs["sources"][src_idx])
        data = self._sources[src_idx].read_bytes(row["_path"])
        return Image.open(io.BytesIO(data)).convert("RGB")
