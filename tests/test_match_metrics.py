"""Pairwise and retrieval metrics of matching, against direct enumeration of every pair."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from embedstore.metrics import (
    pair_counts_by_group,
    pairwise_prf,
    recall_at_k,
    retrieval_average_precision,
)


def enumerate_prf(groups, clusters):
    iu = np.triu_indices(len(groups), k=1)
    same_g = (groups[:, None] == groups[None, :])[iu]
    same_c = (clusters[:, None] == clusters[None, :])[iu]
    tp = (same_g & same_c).sum()
    return tp / same_c.sum(), tp / same_g.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_prf_equals_pair_enumeration(seed):
    rng = np.random.default_rng(seed)
    groups = rng.choice([f"L{i}" for i in range(60)], 300)
    clusters = np.where(rng.random(300) < 0.7, groups, rng.choice(["a", "b", "c"], 300))
    precision, recall = enumerate_prf(groups, clusters)
    got = pairwise_prf(groups, clusters)
    assert got["precision"] == pytest.approx(precision)
    assert got["recall"] == pytest.approx(recall)
    assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_pair_counts_by_group_sum_to_totals():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 40, 200)
    clusters = rng.integers(0, 30, 200)
    tp, positive, predicted = pair_counts_by_group(groups, clusters)
    iu = np.triu_indices(200, k=1)
    same_g = (groups[:, None] == groups[None, :])[iu]
    same_c = (clusters[:, None] == clusters[None, :])[iu]
    assert tp.sum() == (same_g & same_c).sum()
    assert positive.sum() == same_g.sum()
    assert predicted.sum() == pytest.approx(same_c.sum())


def test_perfect_and_singleton_groupings():
    groups = np.array([0, 0, 1, 1, 1, 2])
    assert pairwise_prf(groups, groups) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert pairwise_prf(groups, np.arange(6))["recall"] == 0.0


def test_retrieval_metrics_match_sklearn_average_precision():
    rng = np.random.default_rng(4)
    n_gallery = 30
    for _ in range(20):
        relevant = rng.random(n_gallery) < 0.15
        relevant[rng.integers(n_gallery)] = True
        scores = rng.random(n_gallery)
        hits = relevant[np.argsort(-scores)][None, :]
        ap = retrieval_average_precision(hits, [relevant.sum()])[0]
        assert ap == pytest.approx(average_precision_score(relevant, scores))
        assert recall_at_k(hits, 1)[0] == float(relevant[np.argmax(scores)])
        assert recall_at_k(hits, n_gallery)[0] == 1.0


def test_truncated_ranking_counts_unretrieved_relevant_items_as_missed():
    hits = np.array([[True, False, False]])
    assert retrieval_average_precision(hits, [2])[0] == pytest.approx(0.5)
    assert np.isnan(retrieval_average_precision(np.zeros((1, 3), bool), [0])[0])
