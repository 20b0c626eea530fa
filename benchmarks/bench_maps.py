"""The probe's 2-D map: embedstore.maps (openTSNE) against the scikit-learn t-SNE the probe ran before it.

    python benchmarks/bench_maps.py [--rows 3000] [--threads 1,2]

On the full HAM10000 store (MobileNetV2 features, 10,015 rows, labels dx), in one process, for each thread
count: the previous map (a stratified sample of ``--rows`` rows, PCA to 50 dimensions, scikit-learn's
Barnes-Hut t-SNE with PCA initialisation and perplexity 30, seed 0; its OpenMP threads limited to the count)
and :func:`embedstore.maps.feature_map` with ``n_jobs`` = the count, each including the sampling and the PCA.
Prints wall and CPU seconds (the machine may be shared), checks that both map the same ids, gives two measures
of what each map shows: the share of same-class points among every point's 10 nearest neighbours in the map
(classes gathering; beside the share expected by chance) and the share of every point's 10 nearest neighbours
in the 50-dimensional PCA space that are among its 10 nearest in the map (neighbourhoods kept), and says
whether the new map is the same at every thread count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM_STORE, timed  # noqa: E402

from embedstore.maps import feature_map  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402


def previous_map(X: np.ndarray, labels: np.ndarray, ids: np.ndarray, max_rows: int, seed: int) -> pd.DataFrame:
    """The probe's map until embedstore.maps: scikit-learn PCA then Barnes-Hut t-SNE (1,000 iterations)."""
    from sklearn.manifold import TSNE
    from sklearn.model_selection import train_test_split

    rows, _ = train_test_split(np.arange(len(X)), train_size=max_rows, stratify=labels, random_state=seed)
    rows = np.sort(rows)
    Z = PCA(n_components=min(50, len(rows), X.shape[1]), random_state=seed).fit_transform(X[rows])
    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(rows) - 1) / 3), random_state=seed).fit_transform(Z)
    return pd.DataFrame({"id": ids[rows], "x": xy[:, 0], "y": xy[:, 1], "label": labels[rows]})


def nearest(points: np.ndarray, k: int = 10) -> np.ndarray:
    """``[n, k]``: every point's ``k`` nearest other points."""
    return NearestNeighbors(n_neighbors=k).fit(points).kneighbors(return_distance=False)


def measures(frame: pd.DataFrame, space_neighbours: np.ndarray) -> str:
    """The map's same-class share and neighbourhoods-kept share among 10 nearest neighbours."""
    labels, near = frame["label"].to_numpy(), nearest(frame[["x", "y"]].to_numpy())
    same = (labels[near] == labels[:, None]).mean()
    kept = np.mean([len(np.intersect1d(a, b)) for a, b in zip(near, space_neighbours)]) / near.shape[1]
    return f"same-class {same:.3f}, kept {kept:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows mapped (the probe's tsne_max)")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    args = parser.parse_args()
    X, table = FeatureStore.open(HAM_STORE).load("mobilenet_v2")
    labels, ids = table["dx"].to_numpy(dtype=object), table["id"].to_numpy()
    chance = float((pd.Series(labels).value_counts(normalize=True) ** 2).sum())
    print(f"{len(X)} rows x {X.shape[1]} dims, {args.rows} mapped; "
          f"same-class share of 10 neighbours by chance {chance:.3f}")
    first = None
    for threads in map(int, args.threads.split(",")):
        with threadpool_limits(limits=threads, user_api="openmp"):
            old, old_wall, old_cpu = timed(lambda: previous_map(X, labels, ids, args.rows, seed=0))
        new, new_wall, new_cpu = timed(lambda: feature_map(X, labels, ids, args.rows, seed=0, n_jobs=threads))
        assert list(old["id"]) == list(new["id"]), "the two maps sampled different rows"
        rows = pd.Index(ids).get_indexer(new["id"])
        space = nearest(PCA(n_components=50, random_state=0).fit_transform(X[rows]))
        print(f"{threads} thread(s): scikit-learn {old_wall:.1f} s ({old_cpu:.1f} CPU-s; {measures(old, space)}), "
              f"embedstore.maps {new_wall:.1f} s ({new_cpu:.1f} CPU-s; {measures(new, space)}): "
              f"{old_wall / new_wall:.1f}x the speed")
        first = new if first is None else first
        same = new[["x", "y"]].equals(first[["x", "y"]])
        print(f"  embedstore.maps coordinates the same as with the first thread count: {same}")


if __name__ == "__main__":
    main()
