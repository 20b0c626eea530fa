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
      .locks/                      flock files: prepare (metadata steps), <key>.set, <key>.shard-i-of-n, <key>.n<n>,
                                   <key>.writers; <key>.ray-token (a Ray extraction's driver, removed at its end)

Row ``i`` of every feature set is row ``i`` of the manifest; rows are only ever appended, so a row number never
changes meaning. zarr's local store writes every file through a temporary name and a rename, so a killed
process never leaves a torn chunk or metadata file behind.

The package, one module per job:

* :mod:`.store` - :class:`FeatureStore`, the API (open, create, load, derive, remove);
* :mod:`.manifest` - the manifest: read, merge a source's table, replace atomically;
* :mod:`.freshness` - which rows are stale because their image changed on disk;
* :mod:`.feature_set` - one feature set's arrays, chunk checksums and their repair;
* :mod:`.locks` - the writer locks; :mod:`.disk` - a full or read-only disk as one line;
* :mod:`.summary` - counts per feature set; :mod:`.identity` - :func:`fingerprint` and :func:`digest`.

Every name below is importable as ``from embedstore.store import X``.
"""

from embedstore.store.disk import storage_errors
from embedstore.store.feature_set import ARRAYS, DONE, DTYPES, FAILED, PENDING, FeatureSet
from embedstore.store.identity import digest, fingerprint
from embedstore.store.manifest import MANIFEST_FILE, ManifestUpdate
from embedstore.store.store import FORMAT_VERSION, FeatureStore
from embedstore.store.summary import FeatureSetInfo, StoreSummary

__all__ = [
    "ARRAYS", "DONE", "DTYPES", "FAILED", "FORMAT_VERSION", "MANIFEST_FILE", "PENDING", "FeatureSet",
    "FeatureSetInfo", "FeatureStore", "ManifestUpdate", "StoreSummary", "digest", "fingerprint", "storage_errors",
]
