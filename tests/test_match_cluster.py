"""Grouping methods on real MobileNetV2 features, against dense reference implementations."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score

from embedstore.match.cluster import Grouper
from embedstore.match.index import normalise
from embedstore.match.pairs import build_pairs
from embedstore.store import FeatureStore


@pytest.fixture(scope="module")
def multi(ham_store):
    """Features of the images of multi-image lesions, normalised as the match run does."""
    store = FeatureStore.open(ham_store)
    X, table = store.load("mobilenet_v2")
    sizes = table["lesion_id"].map(table["lesion_id"].value_counts())
    keep = (sizes >= 2).to_numpy()
    X, groups = X[keep], table["lesion_id"].to_numpy()[keep]
    pairs, _ = build_pairs(X, k=len(X) - 1, min_sim=-1.0)
    return normalise(X), groups, pairs


def same_partition(a, b):
    return adjusted_rand_score(a, b) == pytest.approx(1.0)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_threshold_graph_equals_dense_connected_components(multi, threshold):
    Z, _, pairs = multi
    dense = (Z @ Z.T) >= threshold
    expected = connected_components(dense, directed=False)[1]
    assert same_partition(Grouper("threshold", pairs).labels(threshold), expected)


@pytest.mark.parametrize("eps,min_samples", [(0.3, 3), (0.5, 4)])
def test_dbscan_equals_sklearn_on_dense_cosine_distances(multi, eps, min_samples):
    Z, _, pairs = multi
    dense = np.clip(1.0 - Z @ Z.T, 0.0, None)
    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)
    got = Grouper("dbscan", pairs, min_samples=min_samples).labels(eps)
    clustered = expected >= 0
    assert same_partition(got[clustered], expected[clustered])
    assert len(np.unique(got[~clustered])) == (~clustered).sum()  # noise: one cluster each


def test_dbscan_with_two_samples_is_the_threshold_graph(multi):
    Z, _, pairs = multi
    assert same_partition(Grouper("dbscan", pairs).labels(0.25), Grouper("threshold", pairs).labels(0.75))


@pytest.mark.parametrize("threshold", [0.6, 0.8])
def test_average_linkage_equals_scipy_on_the_full_graph(multi, threshold):
    Z, _, pairs = multi
    expected = fcluster(linkage(Z, method="average", metric="cosine"), t=1.0 - threshold, criterion="distance")
    got = Grouper("agglomerative", pairs, Z).labels(threshold)
    assert same_partition(got, expected)


def test_higher_threshold_never_merges_more(multi):
    Z, groups, pairs = multi
    grouper = Grouper("threshold", pairs)
    counts = [len(np.unique(grouper.labels(t))) for t in (0.5, 0.7, 0.9, 0.99)]
    assert counts == sorted(counts)
    assert counts[-1] <= len(groups)
