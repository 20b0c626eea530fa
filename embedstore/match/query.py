"""``embedstore query``: the nearest lesions to new photos (or to images already in the store).

The question a clinician asks about a follow-up photo: which known lesion is this? Images
already in the store use their stored features; image files are embedded with the encoder
the feature set was extracted with (for a projected feature set: the parent's encoder, then
the saved projection head). Both are searched in the feature set's saved FAISS index, which
is built on first use and rebuilt when the store's rows have changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.errors import StoreError
from embedstore.match.index import FeatureIndex, index_path
from embedstore.match.projection import ProjectionHead


def head_path(store, key: str) -> Path:
    """Folder of the projection head that produced derived feature set ``key`` (beside the store)."""
    return index_path(store.path, key).with_suffix(".head")


def load_index(store, key: str, kind: str = "auto", rebuild: bool = False) -> tuple[FeatureIndex, np.ndarray, pd.DataFrame]:
    """The saved index of feature set ``key`` with the features and rows it covers.

    Builds and saves it when missing, asked to, or built on other rows than the store now
    holds; an index file that belongs to another feature set is refused.
    """
    X, table = store.load(key)
    ids = table["id"].astype(str).to_numpy()
    path = index_path(store.path, key)
    if path.exists() and not rebuild:
        index = FeatureIndex.load(path, key=key)
        try:
            index.check(key, ids)
            return index, X, table
        except StoreError:
            pass  # the store gained or lost rows since: the index is a cache, rebuild it
    index = FeatureIndex.build(X, ids, key=key, kind=kind)
    index.save(path)
    return index, X, table


def embed_files(store, key: str, files: list[Path], device: str = "auto") -> np.ndarray:
    """Features of image files in the space of feature set ``key`` (encoder, then head if derived)."""
    from embedstore.extraction import embed_images, encoder_for

    attrs = store.info(key).attrs
    parent = attrs.get("derived_from")
    encoder, enc_attrs = encoder_for(store, parent or key)
    X = embed_images(encoder, [str(f) for f in files], device=device, tta=bool(enc_attrs.get("tta", False)))
    if parent:
        folder = head_path(store, key)
        if not (folder / "projection.json").exists():
            raise StoreError(
                f"feature set {attrs.get('name')} was projected by a head that is not saved at {folder}; "
                "rerun the embedstore match run that wrote it"
            )
        X = ProjectionHead.load(folder).transform(X)
    return X


def query(store, items: list[str], features: str, top_k: int = 5, groups: str | None = "lesion_id",
          kind: str = "auto", rebuild: bool = False, device: str = "auto") -> pd.DataFrame:
    """Top-``k`` nearest groups (lesions) for each query item, by the best image similarity.

    ``items`` are ids in the store or paths of image files. Returns one row per (query, rank):
    ``query, rank, group, similarity, image`` plus the group's size and, when the store has
    a ``dx`` column, its diagnosis. With ``groups=None`` (or no such column) images are ranked.
    """
    key = store.resolve(features)
    index, X, table = load_index(store, key, kind=kind, rebuild=rebuild)
    ids = table["id"].astype(str).to_numpy()
    row_of = pd.Series(np.arange(len(ids)), index=ids)
    known = [str(i) for i in items if str(i) in row_of.index]
    files = [Path(i) for i in items if str(i) not in row_of.index]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StoreError(f"{missing[0]!r} is neither an image id in {store.path} nor an image file")
    vectors = {i: X[row_of[i]] for i in known}
    if files:
        for f, v in zip(files, embed_files(store, key, files, device=device)):
            vectors[str(f)] = v
    use_groups = groups is not None and groups in table.columns
    group_of = table[groups].astype(str).to_numpy() if use_groups else ids
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
    if "dx" in table.columns and len(result):
        result["dx"] = table.set_index(table["id"].astype(str)).loc[result["image"], "dx"].to_numpy()
    return result
