"""The 2-D map of feature rows (embedstore.maps) on real HAM10000 features: sample, seeding, meaning, bounds."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import NearestNeighbors

from embedstore.maps import feature_map, map_rows
from embedstore.store import FeatureStore

SAMPLE = 150


@pytest.fixture(scope="module")
def ham_features(ham_store):
    """MobileNetV2 features of the ~400-image HAM10000 subset, their dx labels and ids."""
    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    return X, table["dx"].to_numpy(dtype=object), table["id"].to_numpy()


@pytest.fixture(scope="module")
def ham_map(ham_features) -> pd.DataFrame:
    X, labels, ids = ham_features
    return feature_map(X, labels, ids, max_rows=SAMPLE, seed=0)


def same_label_neighbour_rate(xy: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Share of each point's ``k`` nearest neighbours in ``xy`` that carry its label."""
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy)
    return float((labels[neighbours[:, 1:]] == labels[:, None]).mean())


def test_the_map_has_one_row_per_sampled_id(ham_features, ham_map):
    X, labels, ids = ham_features
    rows = map_rows(labels, SAMPLE, seed=0)
    assert list(ham_map.columns) == ["id", "x", "y", "label"]
    assert list(ham_map["id"]) == list(ids[rows]) and ham_map["id"].is_unique
    assert list(ham_map["label"]) == list(labels[rows])
    assert np.isfinite(ham_map[["x", "y"]].to_numpy()).all()


def test_the_sample_is_stratified_and_the_same_for_the_same_seed(ham_features):
    _, labels, _ = ham_features
    rows = map_rows(labels, SAMPLE, seed=0)
    assert len(rows) == SAMPLE and np.array_equal(rows, np.unique(rows))
    assert np.array_equal(rows, map_rows(labels, SAMPLE, seed=0))
    assert not np.array_equal(rows, map_rows(labels, SAMPLE, seed=1))
    shares = pd.Series(labels).value_counts(normalize=True)
    counts = pd.Series(labels[rows]).value_counts().reindex(shares.index, fill_value=0)
    assert (np.abs(counts - SAMPLE * shares) <= 1).all()  # every class in proportion, to one row
    assert np.array_equal(map_rows(labels, len(labels), seed=0), np.arange(len(labels)))  # small enough: all rows


def test_one_seed_gives_the_same_coordinates_at_any_thread_count(ham_features, ham_map):
    X, labels, ids = ham_features
    for n_jobs in (1, 2):
        again = feature_map(X, labels, ids, max_rows=SAMPLE, seed=0, n_jobs=n_jobs)
        assert np.array_equal(again[["x", "y"]].to_numpy(), ham_map[["x", "y"]].to_numpy())
    other = feature_map(X, labels, ids, max_rows=SAMPLE, seed=1)
    assert not np.array_equal(other[["x", "y"]].to_numpy(), ham_map[["x", "y"]].to_numpy())


def test_a_frame_maps_as_its_feature_columns_do(ham_features, ham_map):
    """The probe passes its whole input frame and names the feature columns; metadata columns stay out."""
    X, labels, ids = ham_features
    frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])]).assign(age=50.0)
    framed = feature_map(frame, labels, ids, max_rows=SAMPLE, seed=0, columns=list(frame.columns[:-1]))
    assert np.array_equal(framed[["x", "y"]].to_numpy(), ham_map[["x", "y"]].to_numpy())


def test_neighbours_in_the_map_share_a_class_more_often_than_chance(ham_map):
    xy, labels = ham_map[["x", "y"]].to_numpy(), ham_map["label"].to_numpy()
    rng = np.random.default_rng(0)
    shuffled = [same_label_neighbour_rate(xy, rng.permutation(labels)) for _ in range(20)]
    assert same_label_neighbour_rate(xy, labels) > max(shuffled)


def test_a_map_of_400000_rows_reads_only_its_sample():
    """At ISIC 2024 scale the map copies the sampled rows only, never the whole feature matrix.

    The frame is laid out as the probe's input is (two feature sets side by side, then a metadata column), where
    selecting the feature columns of every row would copy them all.
    """
    rng = np.random.default_rng(0)
    n, dim = 400_000, 96
    blocks = [pd.DataFrame(rng.standard_normal((n, dim), dtype=np.float32), columns=[f"{name}/{j}" for j in range(dim)])
              for name in ("a", "b")]
    frame = pd.concat(blocks, axis=1).assign(sex=pd.Categorical(rng.choice(["female", "male"], size=n)))
    features = [c for c in frame.columns if c != "sex"]
    labels = rng.choice(np.array(["benign", "malignant"], dtype=object), size=n, p=[0.99, 0.01])
    ids = np.arange(n).astype(str)
    feature_map(frame.iloc[:300], labels[:300], ids[:300], max_rows=200, seed=0, columns=features)  # imports
    tracemalloc.start()
    try:
        result = feature_map(frame, labels, ids, max_rows=200, seed=0, columns=features)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result) == 200 and result["id"].is_unique
    assert peak < frame[features].memory_usage(deep=False).sum() / 4
