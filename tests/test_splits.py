"""Group-aware splits on the real HAM10000 table: no lesion on both sides, seeded, clear errors."""

import numpy as np
import pytest

from embedstore.errors import ConfigError
from embedstore.splits import check_disjoint, column_split, group_holdout, group_kfold


@pytest.fixture(scope="module")
def ham_table(ham_meta):
    """The full HAM10000 table (10,015 images of 7,470 lesions)."""
    return ham_meta


def test_no_lesion_on_both_sides_of_any_fold(ham_table):
    y, g = ham_table["dx"].to_numpy(), ham_table["lesion_id"].to_numpy()
    folds = group_kfold(y, g, n_splits=5, seed=0)
    assert len(folds) == 5
    test_rows = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(test_rows), np.arange(len(y)))  # every row tested exactly once
    for train, test in folds:
        assert not set(g[train]) & set(g[test])
        check_disjoint(g, train, test)  # must not raise
        # Stratified: melanoma share of each test fold stays near the overall share.
        assert abs(np.mean(y[test] == "mel") - np.mean(y == "mel")) < 0.03


def test_folds_are_reproducible_and_seed_dependent(ham_subset):
    y, g = ham_subset["dx"].to_numpy(), ham_subset["lesion_id"].to_numpy()
    a, b = group_kfold(y, g, seed=0), group_kfold(y, g, seed=0)
    c = group_kfold(y, g, seed=1)
    assert all(np.array_equal(x[1], z[1]) for x, z in zip(a, b))
    assert not all(np.array_equal(x[1], z[1]) for x, z in zip(a, c))


def test_holdout_is_grouped_and_about_the_requested_size(ham_table):
    y, g = ham_table["dx"].to_numpy(), ham_table["lesion_id"].to_numpy()
    train, test = group_holdout(y, g, test_size=0.2, seed=0)
    assert 0.17 < len(test) / len(y) < 0.23
    assert not set(g[train]) & set(g[test])


def test_check_disjoint_catches_a_leaking_split(ham_table):
    g = ham_table["lesion_id"].to_numpy()
    rows = np.arange(len(g))
    with pytest.raises(ConfigError, match="both train and test"):
        check_disjoint(g, rows[::2], rows[1::2])  # consecutive rows share lesions


def test_column_split_reads_official_values():
    train, test = column_split(["Training", "test", "train", "Test"])
    assert list(train) == [0, 2] and list(test) == [1, 3]
    with pytest.raises(ConfigError, match="neither train nor test"):
        column_split(["train", "maybe"])
    with pytest.raises(ConfigError, match="one side"):
        column_split(["train", "train"])


def test_too_few_groups_or_a_class_missing_from_a_fold():
    with pytest.raises(ConfigError, match="groups for 5 folds"):
        group_kfold([0, 1, 0, 1], ["a", "a", "b", "b"], n_splits=5)
    y = np.array([0] * 40 + [1] * 3)
    g = np.array([f"n{i}" for i in range(40)] + ["p", "p", "p"])  # all positives in one lesion
    with pytest.raises(ConfigError, match="no rows of class"):
        group_kfold(y, g, n_splits=5)
