"""Projection heads trained on real MobileNetV2 features of multi-image HAM10000 lesions."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from embedstore.errors import ConfigError
from embedstore.match.index import normalise
from embedstore.match.projection import (
    ProjectionHead,
    contrastive_loss,
    info_nce_loss,
    lesion_batches,
    triplet_loss,
)
from embedstore.metrics import recall_at_k
from embedstore.store import FeatureStore


@pytest.fixture(scope="module")
def lesions(ham_store):
    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    sizes = table["lesion_id"].map(table["lesion_id"].value_counts())
    keep = (sizes >= 2).to_numpy()
    return X[keep], table["lesion_id"].to_numpy()[keep]


def recall_at_1(Z, groups):
    sims = Z @ Z.T
    np.fill_diagonal(sims, -np.inf)
    hits = groups[np.argsort(-sims, axis=1)] == groups[:, None]
    return recall_at_k(hits, 1).mean()


@pytest.mark.parametrize("loss", ["contrastive", "triplet", "infonce"])
def test_head_learns_lesion_identity_and_round_trips(lesions, loss, tmp_path):
    X, groups = lesions
    head = ProjectionHead(loss=loss, epochs=40, hidden_dim=256, out_dim=64, seed=0).fit(X, groups)
    Z = head.transform(X)
    assert Z.shape == (len(X), 64) and Z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, atol=1e-5)
    assert head.loss_curve_[-1] < head.loss_curve_[0]
    assert recall_at_1(Z, groups) > recall_at_1(normalise(X), groups)
    loaded = ProjectionHead.load(head.save(tmp_path / "head"))
    np.testing.assert_allclose(loaded.transform(X[:10]), Z[:10], atol=1e-6)


def test_head_is_reproducible_and_clonable(lesions):
    X, groups = lesions
    a = ProjectionHead(epochs=2, hidden_dim=64, out_dim=16, seed=3).fit(X, groups).transform(X[:5])
    b = clone(ProjectionHead(epochs=2, hidden_dim=64, out_dim=16, seed=3)).fit(X, groups).transform(X[:5])
    np.testing.assert_array_equal(a, b)


def test_head_refuses_groups_without_pairs(lesions):
    X, _ = lesions
    with pytest.raises(ConfigError, match="single image"):
        ProjectionHead(epochs=1).fit(X[:10], np.arange(10))


def test_losses_separate_right_from_wrong_embeddings():
    y = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]), dim=1)
    bad = good[[0, 2, 1, 3]]  # each lesion's images split across the two directions
    for loss in (contrastive_loss, triplet_loss, info_nce_loss):
        assert loss(good, y) < loss(bad, y)
    assert triplet_loss(good, y, margin=0.2) == 0.0


def test_batches_hold_two_or_more_images_of_each_lesion():
    groups = np.repeat(np.arange(50), [1, 2, 3, 5, 2] * 10)
    batches = lesion_batches(groups, lesions_per_batch=8, images_per_lesion=4, rng=np.random.default_rng(0))
    seen = np.concatenate(batches)
    assert len(np.unique(seen)) == len(seen)
    for rows in batches:
        counts = np.bincount(groups[rows])
        assert counts[counts > 0].min() >= 2 and counts.max() <= 4
    assert set(groups[seen]) == {g for g in range(50) if (groups == g).sum() >= 2}


def test_device_is_checked_like_extraction_s(lesions):
    """One resolve_device (embedstore.devices): a device no torch knows is refused in one line, as in extract."""
    X, groups = lesions
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        ProjectionHead(epochs=1, device="gpu0").fit(X, groups)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            ProjectionHead(epochs=1, device="cuda").fit(X, groups)
