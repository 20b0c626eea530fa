"""``embedstore query``: the nearest lesions to new photos (or to images already in the store).

The question a clinician asks about a follow-up photo: which known lesion is this? Images
already in the store use their stored features; image files are embedded with the encoder
the feature set was extracted with (for a projected feature set: the parent's encoder, then
the saved projection head). Both are searched in the feature set's saved FAISS index, which
is built on first use and rebuilt whenever it cannot serve the store's rows (they changed, or
the index files are damaged or mismatched): an index is a cache. Where those files live is
:mod:`embedstore.layout`'s to say.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.atomic import clean_stale
from embedstore.errors import ConfigError, StoreError
from embedstore.layout import index_file, index_sidecar, projection_head_folder
from embedstore.match.index import FeatureIndex, Rows
from embedstore.match.projection import ProjectionHead
from embedstore.progress import progress_bar


def load_index(store, key: str, kind: str = "auto", rebuild: bool = False,
               progress: bool = False) -> tuple[FeatureIndex, pd.DataFrame, Rows]:
    """The saved index of feature set ``key``, the manifest rows it covers (row ``i`` of the index is row ``i``
    of the table) and their features as :class:`Rows` (read from the store when asked).

    The index is a cache: it is built and saved when missing or asked to, and rebuilt whenever the
    saved one cannot serve these rows (damaged, of another feature set, built on other rows). It is built
    from the store a block of rows at a time (:meth:`FeatureIndex.build_from`), never from all rows in
    memory; an ``ivfpq`` index re-ranks its candidates with their vectors read back from the store.
    With ``progress``, a bar counts the rows added.
    """
    fs, store_rows = store.usable_rows(key)
    manifest = store.manifest
    # every row usable (the rule at scale): a shallow copy of the manifest, not a deep one (1.2 GB at 10M rows)
    table = (manifest.copy(deep=False) if len(store_rows) == len(manifest)
             else manifest.iloc[store_rows].reset_index(drop=True))
    rows = Rows.of_feature_set(fs, store_rows)
    ids = _RowKeys(table)
    path = index_file(store.path, key)
    if path.exists() and not rebuild:
        try:
            index = FeatureIndex.load(path, key=key, exact=rows.read)
            index.check(key, ids)
            return index, table, rows
        except StoreError:
            pass  # whatever is wrong with a cache, the cure is to rebuild it
    with progress_bar(f"index {fs.attrs.get('name', key)}: adding rows", rows.n, enabled=progress,
                      unit="rows") as advance:
        index = FeatureIndex.build_from(rows, ids, key=key, kind=kind, advance=advance)
    for leftover in (path, index_sidecar(path)):
        clean_stale(leftover)
    index.save(path)
    return index, table, rows


class _RowKeys:
    """The ``(id, image sha256)`` of each row of ``table``, iterated afresh each time (an index's row identity:
    :func:`embedstore.match.index.ids_digest`), without a list of 10 million tuples."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self):
        return zip(self.table["id"], self.table["sha256"])


def embed_files(store, key: str, files: list[Path], device: str = "auto") -> np.ndarray:
    """Features of image files in the space of feature set ``key`` (encoder, then head if derived)."""
    from embedstore.extraction import embed_images, encoder_for

    attrs = store.info(key).attrs
    parent = attrs.get("derived_from")
    encoder, enc_attrs = encoder_for(store, parent or key)
    X = embed_images(encoder, [str(f) for f in files], device=device, tta=bool(enc_attrs.get("tta", False)))
    if parent:
        folder = projection_head_folder(store.path, key)
        if not (folder / "projection.json").exists():
            raise StoreError(
                f"feature set {attrs.get('name')} was projected by a head that is not saved at {folder}; "
                "rerun the embedstore match run that wrote it"
            )
        X = ProjectionHead.load(folder).transform(X)
    return X


def require_column(table: pd.DataFrame, column: str, purpose: str) -> None:
    """Raise :class:`ConfigError` listing the store's columns unless ``table`` has ``column``."""
    if column not in table.columns:
        choices = ", ".join(c for c in table.columns if not c.startswith("_") and c != "sha256")
        raise ConfigError(f"the store has no column {column!r} to {purpose}; choose --groups from: {choices}")


def query(store, items: list[str], features: str, top_k: int = 5, groups: str | None = None,
          kind: str = "auto", rebuild: bool = False, device: str = "auto", show: tuple[str, ...] = (),
          progress: bool = False) -> pd.DataFrame:
    """Top-``k`` nearest groups (e.g. lesions) for each query item, by the best image similarity.

    ``items`` are ids in the store or paths of image files. Returns one row per (query, rank):
    ``query, rank, group, similarity, image`` and the group's size ``n_images``, then the store
    columns named in ``show`` (e.g. a diagnosis) of the image found. ``groups`` names the column
    whose values are ranked (it must exist); with ``groups=None`` (the default), and for images
    without a group value, single images are ranked. With ``progress``, building the index shows a bar.
    """
    for column in ([groups] if groups is not None else []) + list(show):
        require_column(store.manifest, column, "rank by" if column == groups else "show")
    key = store.resolve(features)
    index, table, rows = load_index(store, key, kind=kind, rebuild=rebuild, progress=progress)
    ids = table["id"].astype(str).to_numpy()
    row_of = pd.Series(np.arange(len(ids)), index=ids)
    known = [str(i) for i in items if str(i) in row_of.index]
    files = [Path(i) for i in items if str(i) not in row_of.index]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StoreError(f"{missing[0]!r} is neither an image id in {store.path} nor an image file")
    vectors = {}
    if known:  # the rows the index was just checked against, each read once
        at, where = np.unique(row_of[known].to_numpy(), return_inverse=True)
        vectors = dict(zip(known, rows.read(at)[where]))
    if files:
        for f, v in zip(files, embed_files(store, key, files, device=device)):
            vectors[str(f)] = v
    use_groups = groups is not None
    group_of = np.where(table[groups].notna(), table[groups].astype(str), ids) if use_groups else ids
    sizes = pd.Series(group_of).value_counts()
    Q = np.stack([vectors[str(i)] for i in items])
    depth = min(len(ids), max(top_k * 20, 50) if use_groups else top_k + 1)
    sims, rows = index.search(Q, depth)
    out = []
    for item, s, r in zip(items, sims, rows):
        ok = (r >= 0) & (ids[np.maximum(r, 0)] != str(item))  # never answer an image with itself
        hits = pd.DataFrame({"group": group_of[r[ok]], "similarity": s[ok], "image": ids[r[ok]]})
        best = hits.drop_duplicates("group").head(top_k)  # rows are sorted by similarity already
        for rank, h in enumerate(best.itertuples(index=False), start=1):
            out.append({"query": str(item), "rank": rank, "group": h.group, "similarity": float(h.similarity),
                        "image": h.image, "n_images": int(sizes[h.group])})
    result = pd.DataFrame(out, columns=["query", "rank", "group", "similarity", "image", "n_images"])
    by_id = table.set_index(table["id"].astype(str))
    for column in show:
        result[column] = by_id.loc[result["image"], column].to_numpy()
    return result
