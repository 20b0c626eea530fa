"""A 2-D map of feature rows: the one place embedstore draws one (the probe's ``embedding_2d.parquet``).

The map is a picture of the features for the report, so it must cost little and stay bounded at any store size:
:func:`map_rows` picks at most ``max_rows`` rows, stratified by label (the same rows for the same seed), and
:func:`feature_map` reads only those rows, reduces them to 50 dimensions with PCA fitted on the sample, and embeds
them with openTSNE, seeded (the same seed gives the same map), initialised from the PCA and with perplexity 30
(less for samples too small for it), as scikit-learn's t-SNE did before it. It is several times faster:

- openTSNE's learning rate (N/12 while exaggerated, then N; Belkina et al. 2019) converges in fewer steps than
  scikit-learn's 1,000: on 3,000 HAM10000 rows the map's measures (same-class share among each point's 10
  nearest neighbours, share of its 10 nearest neighbours in PCA space kept in the map) stop changing after about
  100 exaggerated and 150 plain iterations, so it runs 125 + 250 (benchmarks/bench_maps.py prints both measures
  for both maps);
- exact nearest neighbours, faster than approximate ones at the sizes a bounded map has, and the same whatever
  the thread count;
- the gradient method openTSNE picks for the size: Barnes-Hut below 10,000 points (at 3,000 it took half the time
  of FFT-accelerated interpolation), FFT above.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PCA_DIMS = 50
PERPLEXITY = 30.0
EXAGGERATED_ITERATIONS = 125
ITERATIONS = 250


def map_rows(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Sorted positions of the rows to map: all of them, or ``max_rows`` drawn stratified by label.

    Stratification needs two rows of every label; when a label has one, the sample is drawn without it.
    """
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    if len(rows) <= max_rows:
        return rows
    strat = labels if pd.Series(labels).value_counts().min() >= 2 else None
    rows, _ = train_test_split(rows, train_size=max_rows, stratify=strat, random_state=seed)
    return np.sort(rows)


def feature_map(X: np.ndarray | pd.DataFrame, labels: np.ndarray, ids: np.ndarray, max_rows: int, seed: int,
                columns: list[str] | None = None, n_jobs: int = 1) -> pd.DataFrame:
    """``id, x, y, label``: a t-SNE map of at most ``max_rows`` rows of ``X`` (stratified by label).

    ``X`` is an array or a DataFrame (then ``columns`` picks the features, all by default); only the sampled
    rows are read. ``n_jobs`` threads (the probe gives it ``blas_threads``, or the cores it may run on): on
    5,000 HAM10000 rows, two threads took 6.6 s against 12.5 s for one on this project's 2-core machine; one and
    two threads draw the same map. (An earlier measurement, two threads 1.7 times slower, was taken while
    scipy's idle OpenBLAS threads spun on the same cores: see
    :func:`embedstore.heads.logistic._scipy_blas_single_threaded`.)
    """
    rows = map_rows(labels, max_rows, seed)
    if isinstance(X, pd.DataFrame):
        sample = X.iloc[rows] if columns is None else X.iloc[rows][columns]
    else:
        sample = X[rows]
    # C order: a frame's rows come out column-major, and PCA on another layout rounds differently, which
    # t-SNE magnifies; one layout keeps the promise of one map per seed whatever the caller holds.
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    xy = _tsne(sample, seed, n_jobs)
    return pd.DataFrame({"id": ids[rows], "x": xy[:, 0], "y": xy[:, 1], "label": labels[rows]})


def _tsne(Z: np.ndarray, seed: int, n_jobs: int) -> np.ndarray:
    """``[n, 2]`` openTSNE coordinates of the rows of ``Z`` after PCA to at most 50 dimensions."""
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    Z = PCA(n_components=min(PCA_DIMS, *Z.shape), random_state=seed).fit_transform(Z)
    tsne = TSNE(n_components=2, perplexity=min(PERPLEXITY, (len(Z) - 1) / 3), initialization="pca",
                early_exaggeration_iter=EXAGGERATED_ITERATIONS, n_iter=ITERATIONS, neighbors="exact", n_jobs=n_jobs,
                random_state=seed)
    return np.asarray(tsne.fit(Z))
