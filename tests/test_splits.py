"""Group-aware splits on the real HAM10000 table: no lesion on both sides, seeded, clear errors; official split
columns (train/valid/test) in a probe run: a validation split is never scored as test."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

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


@pytest.mark.parametrize("target, n_splits, seed", [("dx", 5, 0), ("dx", 3, 7), ("melanoma", 5, 1)])
def test_folds_are_scikit_learns_stratified_group_kfold(ham_table, target, n_splits, seed):
    """The fast splitter assigns every row to the fold scikit-learn's StratifiedGroupKFold(shuffle=True) does,
    so results computed on its folds did not change when it replaced scikit-learn's (7-class and binary)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = ham_table["dx"].to_numpy()
    y = (y == "mel").astype(int) if target == "melanoma" else y
    g = ham_table["lesion_id"].to_numpy()
    ours = group_kfold(y, g, n_splits=n_splits, seed=seed)
    reference = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(y, y, g)
    for (train, test), (ref_train, ref_test) in zip(ours, reference, strict=True):
        assert np.array_equal(test, np.sort(ref_test))
        assert np.array_equal(train, np.sort(ref_train))


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
    split = column_split(["Training", "test", "train", "Test", 0, 1.0, True])
    assert list(split.train) == [0, 2, 4] and list(split.test) == [1, 3, 5, 6] and not len(split.valid)
    with pytest.raises(ConfigError, match="one side|no row on the train or on the test side"):
        column_split(["train", "train"])


@pytest.mark.parametrize("word", ["val", "valid", "Validation", "dev"])
def test_a_validation_split_is_never_the_test_side(word):
    split = column_split(["train", word, "test", "train"])
    assert list(split.valid) == [1] and list(split.test) == [2] and list(split.train) == [0, 3]


def test_values_that_are_no_split_are_listed_and_refused_unless_mapped():
    with pytest.raises(ConfigError, match=r"\['excluded', 'maybe'\] that are not train, valid or test: .*--split-map"):
        column_split(["train", "maybe", "test", "excluded"])
    split = column_split(["train", "maybe", "test", "Excluded", "valid"],
                         {"maybe": "train", "excluded": "drop", "valid": "test"})
    assert list(split.train) == [0, 1] and list(split.test) == [2, 4] and list(split.dropped) == [3]
    with pytest.raises(ConfigError, match="one of train, test, valid, drop"):
        column_split(["train", "test"], {"test": "score"})
    with pytest.raises(ConfigError, match=r"names \['tset'\], which the split column does not have"):
        column_split(["train", "test"], {"tset": "drop"})


def test_too_few_groups_or_a_class_missing_from_a_fold():
    with pytest.raises(ConfigError, match="groups for 5 folds"):
        group_kfold([0, 1, 0, 1], ["a", "a", "b", "b"], n_splits=5)
    y = np.array([0] * 40 + [1] * 3)
    g = np.array([f"n{i}" for i in range(40)] + ["p", "p", "p"])  # all positives in one lesion
    with pytest.raises(ConfigError, match=r"no rows of class\(es\) 1:"):  # a plain code, never np.int64(1)
        group_kfold(y, g, n_splits=5)
    with pytest.raises(ConfigError, match=r"no rows of class\(es\) 'mel':"):  # named, as the probe passes them
        group_kfold(y, g, n_splits=5, class_names=["nv", "mel"])


# ------------------------------------------------------------------ official split columns in a probe run


@pytest.fixture(scope="module")
def split_store(ham_store, ham_root, ham_subset, tmp_path_factory):
    """A copy of the subset store whose table has a Derm7pt-style ``split`` column (train/valid/test, whole
    lesions, ~60/20/20 of each class's lesions) and a ``release`` column (train/test/excluded)."""
    from embedstore import extract, open_source

    folder = tmp_path_factory.mktemp("split")
    table = ham_subset.copy()
    lesions = table.drop_duplicates("lesion_id").sort_values(["dx", "lesion_id"])
    side = {lesion: ["test", "valid", "train", "train", "train"][k % 5]
            for _, grp in lesions.groupby("dx") for k, lesion in enumerate(grp["lesion_id"])}
    table["split"] = table["lesion_id"].map(side)
    table["release"] = table["split"].replace({"valid": "excluded"})
    table.to_csv(folder / "subset.csv", index=False)
    store = folder / "ham.zarr"
    shutil.copytree(ham_store, store)
    extract(open_source(folder / "subset.csv", images=ham_root / "images", id_col="image_id"), "mobilenet_v2", store,
            progress=False)  # features are up to date: this only merges the new columns into the table
    return store, table.set_index("image_id")


def _probe(store, out, **options):
    from embedstore.probe import ProbeConfig, run_probe

    cfg = {"store": str(store), "features": "mobilenet_v2", "target": "dx", "positive": "mel", "groups": "lesion_id",
           "split_column": "split", "folds": 2, "inner_folds": 2, "n_boot": 20, "tsne_max": 60, "report": False,
           "storage": f"sqlite:///{out.parent / 'studies.db'}", "out": str(out), **options}
    with threadpool_limits(limits=1, user_api="blas"):
        run_probe(ProbeConfig.from_dict(cfg))
    return (pd.read_parquet(out / "predictions.parquet"), json.loads((out / "run.json").read_text()),
            json.loads((out / "head" / "model_card.json").read_text()))


def test_validation_rows_choose_the_hyperparameters_and_are_never_scored(split_store, tmp_path):
    store, table = split_store
    pred, run, card = _probe(store, tmp_path / "tuned", trials=2)
    side = table.loc[pred["id"], "split"].to_numpy()
    assert set(side[pred["split"].to_numpy() == "test"]) == {"test"}  # the test rows, all of them, and only them
    assert (pred["split"] == "test").sum() == (table["split"] == "test").sum()
    assert "valid" not in set(side)  # validation rows are neither test nor OOF predictions
    n = table["split"].value_counts()
    assert run["split"]["n_valid"] == n["valid"] and run["split"]["validation"].startswith("chose")
    assert card["trained_on"]["n_rows"] == n["train"] + n["valid"]  # refitted on train + validation
    import optuna

    final = optuna.load_study(study_name=run["study"]["name"], storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert all(set(t.user_attrs) == {"owner", "fold_0"} for t in final.trials)  # one fold: train -> validation


def test_without_tuning_validation_rows_are_left_out_unless_mapped_to_training(split_store, tmp_path):
    store, table = split_store
    pred, run, card = _probe(store, tmp_path / "plain")
    assert "valid" not in set(table.loc[pred["id"], "split"]) and run["split"]["validation"].startswith("left out")
    assert card["trained_on"]["n_rows"] == (table["split"] == "train").sum()
    pred, run, card = _probe(store, tmp_path / "folded", split_map={"valid": "train"})
    oof = table.loc[pred.loc[pred["split"] == "oof", "id"], "split"]
    assert set(oof) == {"train", "valid"} and run["split"]["validation"] is None
    assert card["trained_on"]["n_rows"] == table["split"].isin(["train", "valid"]).sum()


def test_an_unknown_split_value_is_refused_unless_mapped(split_store, cli, tmp_path):
    store, table = split_store
    args = ("probe", store, "-f", "mobilenet_v2", "-t", "dx", "--positive", "mel", "-g", "lesion_id", "--folds", "2",
            "--split-column", "release", "--n-boot", "20", "--no-report")
    code, out, err = cli(*args, "--out", tmp_path / "refused")
    assert code == 2 and "['excluded']" in err and "--split-map excluded=drop" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()
    code, out, err = cli(*args, "--split-map", "excluded=drop", "--out", tmp_path / "dropped")
    assert code == 0, err
    pred = pd.read_parquet(tmp_path / "dropped" / "predictions.parquet")
    assert "excluded" not in set(table.loc[pred["id"], "release"])
    run = json.loads((tmp_path / "dropped" / "run.json").read_text())
    assert run["split"]["n_dropped"] == (table["release"] == "excluded").sum()
