"""What a store holds, counted: per feature set, rows done, failed, stale and missing, bytes on disk and chunk
checks (what ``embedstore ls`` prints, and what a notebook can read the same way)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedstore.store.feature_set import DONE, FAILED, FeatureSet


@dataclass
class FeatureSetInfo:
    """The counts of one feature set over the manifest's rows."""

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
class StoreSummary:
    """A store at a glance: its images, the sources they came from, their columns, and every feature set."""

    path: Path
    n_images: int
    n_sources: int
    columns: list[str]  # the sources' own columns (labels, groups, metadata)
    feature_sets: list[FeatureSetInfo]


def count_feature_set(fs: FeatureSet, manifest_sha: np.ndarray, changed: Callable[[np.ndarray], np.ndarray],
                      verify: bool) -> FeatureSetInfo:
    """The counts of ``fs`` against the manifest's hashes; ``changed(rows)`` tells which images changed on disk.

    ``verify`` also checks every chunk file, and then rows of corrupt chunks count as missing instead of
    failing the read.
    """
    attrs = fs.attrs
    n = min(fs.n_rows, len(manifest_sha))
    corrupt = fs.corrupt_chunks() if verify else None
    status = fs.read_intact("status", n, corrupt or [])
    same = fs.read_intact("sha256", n, corrupt or []) == manifest_sha[:n]
    done = status == DONE
    same[done & same] = ~changed(np.flatnonzero(done & same))  # edited on disk since: stale
    n_done, n_failed = int((done & same).sum()), int(((status == FAILED) & same).sum())
    stored = sum(f.stat().st_size for f in fs.path.rglob("*") if f.is_file())
    rpc = fs.rows_per_chunk
    return FeatureSetInfo(
        key=fs.key, name=attrs.get("name", fs.key), encoder=attrs.get("encoder", "?"),
        dim=int(fs.emb.shape[1]), dtype=str(fs.emb.dtype), n_rows=len(manifest_sha),
        n_done=n_done, n_failed=n_failed, n_stale=int((done & ~same).sum()),
        n_missing=len(manifest_sha) - n_done - n_failed,
        nbytes_stored=stored, attrs=attrs, checksums=fs.has_checksums,
        n_corrupt_chunks=None if corrupt is None else len(corrupt),
        corrupt_rows=(corrupt[0] * rpc, min(fs.n_rows, (corrupt[-1] + 1) * rpc) - 1) if corrupt else None,
    )
