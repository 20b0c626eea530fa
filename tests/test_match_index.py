"""FAISS index and candidate pairs on real MobileNetV2 features of HAM10000 images."""

import numpy as np
import pytest

from embedstore.errors import StoreError
from embedstore.layout import index_file
from embedstore.match.index import FeatureIndex, exact_index, gpu_available, normalise, search_index
from embedstore.match.pairs import build_pairs, candidate_pairs, knn_graph
from embedstore.store import FeatureStore


@pytest.fixture(scope="module")
def features(ham_store):
    store = FeatureStore.open(ham_store)
    key = store.resolve("mobilenet_v2")
    X, table = store.load(key)
    return key, X, table["id"].to_numpy()


def test_exact_index_agrees_with_numpy_brute_force(features):
    key, X, ids = features
    index = FeatureIndex.build(X, ids, key=key)
    sims, rows = index.search(X[:50], 10)
    Z = normalise(X)
    dense = Z[:50] @ Z.T
    expected = np.sort(dense, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(sims, expected, atol=1e-4)
    assert (rows[:, 0] == np.arange(50)).all()  # every image is its own nearest neighbour


def test_search_of_prepared_vectors_is_the_feature_index_search(features):
    """The kNN head searches prepared unit vectors with search_index over exact_index: the FeatureIndex path."""
    key, X, ids = features
    Z = normalise(X)
    sims, rows = search_index(exact_index(Z), Z[:40], 7, batch=16)  # several batches, one answer
    expected = FeatureIndex.build(X, ids, key=key, kind="flat", use_gpu=False).search(X[:40], 7)
    np.testing.assert_array_equal(rows, expected[1])
    np.testing.assert_allclose(sims, expected[0], atol=1e-6)
    sims, rows = search_index(exact_index(Z[:5]), Z[:2], 8)  # more neighbours asked than rows
    assert (rows[:, 5:] == -1).all() and np.isneginf(sims[:, 5:]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indices_find_most_exact_neighbours(features, kind):
    key, X, ids = features
    exact = FeatureIndex.build(X, ids, key=key, kind="flat").search(X, 10)[1]
    approx = FeatureIndex.build(X, ids, key=key, kind=kind, nlist=16, nprobe=8).search(X, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall > 0.9


def test_saved_index_refuses_another_feature_set(features, tmp_path):
    key, X, ids = features
    path = index_file(tmp_path / "s.zarr", key)
    assert path.parent == tmp_path / "s.zarr.index"
    FeatureIndex.build(X, ids, key=key).save(path)
    loaded = FeatureIndex.load(path, key=key)
    np.testing.assert_allclose(loaded.search(X[:5], 3)[0], FeatureIndex.build(X, ids, key=key).search(X[:5], 3)[0])
    with pytest.raises(StoreError, match=f"built on feature set {key}, not other"):
        FeatureIndex.load(path, key="other")
    with pytest.raises(StoreError, match="other rows"):
        loaded.check(key, ids[::-1])
    with pytest.raises(StoreError, match="width"):
        loaded.search(X[:2, :100], 3)


@pytest.mark.skipif(not gpu_available(), reason="needs faiss built with GPU support and a visible GPU")
def test_gpu_index_matches_cpu(features):
    key, X, ids = features
    cpu = FeatureIndex.build(X, ids, key=key, use_gpu=False).search(X[:20], 5)[0]
    gpu = FeatureIndex.build(X, ids, key=key, use_gpu=True).search(X[:20], 5)[0]
    np.testing.assert_allclose(cpu, gpu, atol=1e-3)


def test_candidate_pairs_are_the_dense_pairs_above_the_floor(features):
    _, X, _ = features
    n = len(X)
    pairs, _ = build_pairs(X, k=n - 1, min_sim=0.5, centre=True)
    Z = normalise(X, X.mean(axis=0))
    dense = Z @ Z.T
    i, j = np.triu_indices(n, k=1)
    above = dense[i, j] >= 0.5
    assert set(zip(pairs.i.tolist(), pairs.j.tolist())) == set(zip(i[above].tolist(), j[above].tolist()))
    np.testing.assert_allclose(pairs.sim, dense[pairs.i, pairs.j], atol=1e-4)
    assert (pairs.i < pairs.j).all()


def test_knn_graph_drops_self_matches_and_exact_duplicates_keep_one_neighbour(features):
    key, X, ids = features
    Xd = np.vstack([X[:20], X[:1]])  # row 20 duplicates row 0
    index = FeatureIndex.build(Xd, np.arange(21).astype(str), key=key)
    sims, rows = knn_graph(index, Xd, 5)
    assert rows.shape == (21, 5)
    assert not (rows == np.arange(21)[:, None]).any()
    assert 20 in rows[0] and 0 in rows[20]
    pairs = candidate_pairs(sims, rows)
    assert len(set(zip(pairs.i, pairs.j))) == len(pairs.i)
