"""Whether the images behind a store's rows are still the ones their features were computed from.

A row is *fresh* when its status is done, its ``sha256`` equals the manifest's, and the image on disk still has
that hash: rows of images that changed since extraction are *stale*, and :meth:`FeatureStore.load` refuses them
rather than return them silently. The manifest records each image's size and mtime beside its hash, so
checking an unchanged image costs one ``stat`` and only changed ones are hashed again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.errors import SourceError, StoreError
from embedstore.sources import Source, source_from_dict, unchanged_since


class ImageCheck:
    """Finds the manifest rows whose image changed on disk, reopening each source once and remembering the rows
    found unchanged (so loading several feature sets checks each image once)."""

    def __init__(self, descriptions: Callable[[], list[dict]]) -> None:
        self._descriptions = descriptions  # the store's source descriptions, read when a source is first needed
        self._sources: dict[int, Source] = {}
        self._unchanged: tuple[pd.DataFrame, np.ndarray] | None = None

    def source(self, index: int) -> Source:
        """Source number ``index`` of the store, reopened once (SourceError if it cannot be)."""
        if index not in self._sources:
            self._sources[index] = source_from_dict(self._descriptions()[index])
        return self._sources[index]

    def changed(self, manifest: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
        """Which of the ``manifest`` ``rows`` hold an image whose bytes differ from the sha256 it recorded.

        Each image is stat'ed (one stat of the file for an HDF5 source); only those whose size or mtime differ
        from the recorded ones, or whose sha256 was not recorded, go on to :meth:`Source.content_hashes`,
        which stats them again and reads and hashes them (all of them for a manifest written before sizes
        and mtimes were recorded). An image that cannot be found or read, or whose source cannot be
        reopened (a store copied without its images), cannot be checked and counts as unchanged. What is
        remembered is forgotten when the manifest is another one.
        """
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
                source = self.source(int(index))
            except SourceError:
                unchanged[sel] = True  # cannot be checked
                continue
            recorded = manifest.iloc[sel].reset_index(drop=True)
            same = unchanged_since(source.stats(recorded["_path"]), recorded)  # no image read for these
            unchanged[sel[same]] = True
            sel, recorded = sel[~same], recorded[~same].reset_index(drop=True)
            if not len(sel):
                continue
            now = source.content_hashes(recorded["_path"], recorded=recorded)["sha256"].to_numpy()
            differs = (now != "") & (now != recorded["sha256"].to_numpy())
            changed[sel[differs]] = True
            unchanged[sel[~differs]] = True
        return changed[rows]


def stale_error(store: Path, attrs: dict, ids: np.ndarray) -> StoreError:
    """The one line refusing features of changed images: how many, the first, and how to refresh them."""
    return StoreError(
        f"{len(ids)} images changed since feature set {attrs.get('name')} was extracted "
        f"(first: {ids[0]}); extract again with encoder {attrs.get('encoder')} into {store} to refresh them"
    )
