"""Per-store normalisation (``--normalize per-store``): each store's features re-centred and re-scaled on its own
statistics before a head sees them.

Frozen features of two clinics' images differ by a shift and a scale per dimension (camera, light, framing) that a
head standardised on the training store's statistics carries into its decisions. Standardising each store on the
mean and standard deviation of all of its own rows of the feature set (every row with final features, labelled or
not: no label is read) removes that shift, at the price of assuming each store's case mix is alike. The training
store is standardised the same way, so the head learns on the scale it will be applied at; ``predict`` applies the
target store's own statistics (:func:`embedstore.probe.data.feature_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedstore.errors import ConfigError
from embedstore.store import FeatureStore, digest

BLOCK_ROWS = 65_536  # rows read at a time for the statistics: a block of features, never the whole set twice
MIN_STD = 1e-6  # a dimension constant in the store is only re-centred


@dataclass(frozen=True)
class StoreStatistics:
    """Mean and standard deviation per dimension of every row of one feature set in one store (``n`` rows)."""

    mean: np.ndarray
    std: np.ndarray
    n: int

    def apply(self, X: np.ndarray) -> None:
        """Standardise ``X`` (float32, rows of this set) in place."""
        X -= self.mean
        X /= self.std

    def digest(self) -> str:
        """A short hash of the statistics, so a tuning study over them is reused only with the same ones."""
        return digest(np.concatenate([self.mean, self.std]))


def statistics_of(store: FeatureStore, keys: dict[str, str], normalize: str) -> dict[str, StoreStatistics] | None:
    """Each named feature set's statistics in ``store`` under ``--normalize per-store``; None under ``train``."""
    return {name: store_statistics(store, key) for name, key in keys.items()} if normalize == "per-store" else None


def store_statistics(store: FeatureStore, key: str) -> StoreStatistics:
    """The statistics of feature set ``key`` over all of ``store``'s rows with final features, read in blocks and
    summed in float64."""
    manifest = store.manifest
    _, fresh = store.feature_set(key).done_and_fresh(manifest["sha256"].to_numpy())
    ids = manifest["id"].to_numpy()[fresh]  # stale rows are refused by the loads below, as everywhere
    total = total_sq = None
    for start in range(0, len(ids), BLOCK_ROWS):
        X, _ = store.load(key, ids=ids[start:start + BLOCK_ROWS])
        X = X.astype(np.float64)
        total = X.sum(0) if total is None else total + X.sum(0)
        total_sq = (X * X).sum(0) if total_sq is None else total_sq + (X * X).sum(0)
    n = len(ids)
    if n < 2:
        raise ConfigError(f"--normalize per-store needs the statistics of a store's rows; {store.path} has {n} row(s) "
                          f"of {key}")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return StoreStatistics(mean.astype(np.float32), np.where(std < MIN_STD, 1.0, std).astype(np.float32), n)
