"""Bad probe and predict input is one clear line (issue #10, items 13 and 14): head parameters are checked and
coerced before any work, empty group values and classes too rare for the folds are named, and a store with no
finished features gives `predict` nothing to do but say so."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from embedstore.cli.probe import _parse_params
from embedstore.errors import ConfigError
from embedstore.heads import ColumnsHead, LogRegHead, save_head
from embedstore.probe import ProbeConfig, load_data
from embedstore.store import FeatureStore

BASE = {"store": "stores/x.zarr", "features": "mobilenet_v2", "target": "dx"}
OPTS = ("-f", "mobilenet_v2", "-t", "dx", "-g", "lesion_id", "--folds", "2", "--n-boot", "20", "--no-report")


# ------------------------------------------------------------------------------------------ item 13: -p


@pytest.mark.parametrize("param, message", [
    ("logreg.c=1", "logreg has no parameter 'c' (did you mean C?); its parameters are: C, class_weight, max_iter"),
    ("logreg.C=abc", "logreg.C must be a number, not 'abc'"),
    ("lgbm.n_estimators=2.5", "lgbm.n_estimators must be a whole number, not '2.5'"),
    ("logreg.class_weight=heavy", "logreg.class_weight must be one of balanced, none, not 'heavy'"),
    ("logreg.norm=l3", "logreg.norm must be one of l2, standard, none"),
    ("lgbm.passthrough=age", "lgbm.passthrough is set by --metadata"),
    ("stack.n_splits=4", "stack.n_splits is set by --inner-folds"),
    ("logreg.C=-1", "logreg.C must be > 0, not -1"),
    ("logreg.pca=-5", "logreg.pca must be >= 1 (or 0 or none: off), not -5"),
    ("knn.k=0", "knn.k must be >= 1, not 0"),
    ("lgbm.subsample=1.5", "lgbm.subsample must be in (0, 1], not 1.5"),
])
def test_a_bad_head_parameter_is_one_line_before_any_work(param, message, ham_store, cli, tmp_path):
    code, _, err = cli("probe", ham_store, *OPTS, "--head", "logreg,lgbm,stack", "-p", param, "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_values_take_the_type_of_the_parameter():
    params = _parse_params(["logreg.class_weight=none", "logreg.C=1", "logreg.whiten=TRUE", "lgbm.pca=null",
                            "lgbm.n_estimators=50", "knn.k=7.0", "svm.class_weight=Balanced", "logreg.norm=none"])
    cfg = ProbeConfig.from_dict({**BASE, "params": params})
    assert cfg.params == {"logreg": {"class_weight": None, "C": 1.0, "whiten": True, "norm": "none"},
                          "lgbm": {"pca": None, "n_estimators": 50}, "knn": {"k": 7},
                          "svm": {"class_weight": "balanced"}}
    assert type(cfg.params["logreg"]["C"]) is float and type(cfg.params["knn"]["k"]) is int


def test_every_numeric_head_parameter_has_a_range():
    from embedstore.heads import HEADS
    from embedstore.heads.params import _OPTIONAL, _RANGES, head_parameters

    names = {n: v for head in [*HEADS, "stack"] for n, v in head_parameters(head).items()}
    numeric = {n for n, v in names.items() if n in _OPTIONAL or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    assert set(_RANGES) <= set(names)
    assert numeric - set(_RANGES) == {"n_jobs"}  # LightGBM takes any n_jobs (<= 0: its default thread count)


def test_ranges_keep_their_edges_and_none():
    assert ProbeConfig.from_dict({**BASE, "params": {
        "lgbm": {"subsample": 1, "num_leaves": 2, "min_child_samples": 0, "pca": "none", "undersample": 1},
        "logreg": {"pca": 0, "undersample": 0}, "mlp": {"alpha": 0}}}).params == {
        "lgbm": {"subsample": 1.0, "num_leaves": 2, "min_child_samples": 0, "pca": None, "undersample": 1.0},
        "logreg": {"pca": 0, "undersample": 0.0}, "mlp": {"alpha": 0.0}}
    for head, name, value, rule in [("lgbm", "subsample", 0, "in (0, 1]"), ("knn", "temperature", 0, "> 0"),
                                    ("lgbm", "undersample", 0.5, ">= 1 (or 0 or none: off)"),
                                    ("svm", "calibration_folds", 1, ">= 2"), ("stack", "meta_C", -0.5, "> 0"),
                                    ("mlp", "alpha", -1, ">= 0")]:
        with pytest.raises(ConfigError, match=rf"^{head}\.{name} must be {re.escape(rule)}, not {value}$"):
            ProbeConfig.from_dict({**BASE, "params": {head: {name: value}}})


def test_recipe_params_are_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"^logreg.C must be a number, not 'abc'$"):
        ProbeConfig.from_dict({**BASE, "params": {"logreg": {"C": "abc"}}})
    with pytest.raises(ConfigError, match="params of logreg must map parameter names to values"):
        ProbeConfig.from_dict({**BASE, "params": {"logreg": 0.5}})
    assert ProbeConfig.from_dict({**BASE, "params": {"logreg": {"C": "1e-2"}}}).params == {"logreg": {"C": 0.01}}


@pytest.mark.parametrize("options, message", [
    ({"metric": "pauc80"}, "unknown metric 'pauc80': choose from accuracy, balanced_accuracy, "),
    ({"metric": "f1", "positive": "mel"}, "unknown metric 'f1': choose from accuracy, "),
])
def test_an_unknown_tuning_metric_is_refused_by_the_config(options, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}") as refused:
        ProbeConfig.from_dict({**BASE, **options})
    assert "pauc_80" in str(refused.value)  # the binary metrics are named too
    assert ProbeConfig.from_dict({**BASE, "metric": "pauc_80"}).metric == "pauc_80"  # the target may be binary


def test_a_binary_metric_on_a_multiclass_target_is_one_line_before_any_model(ham_store, cli, tmp_path):
    code, _, err = cli("probe", ham_store, *OPTS, "--metric", "pauc_80", "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1, err
    assert "metric 'pauc_80' needs a binary target (give --positive); 'dx' has 7 classes" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ item 14


def _with_table(store: FeatureStore, edit) -> FeatureStore:
    store.__dict__["manifest"] = edit(store.manifest.copy())  # an in-memory edit: the fixture stays as it is
    return store


def test_empty_group_values_are_named_with_their_count(ham_store):
    def blank(table):
        table.loc[table.index[:7], "lesion_id"] = None
        return table
    cfg = ProbeConfig.from_dict({**BASE, "store": str(ham_store), "groups": "lesion_id"})
    with pytest.raises(ConfigError, match=r"^group column 'lesion_id' is empty in 7 of \d+ rows: fill it"):
        load_data(cfg, _with_table(FeatureStore.open(ham_store), blank))


def test_a_class_with_one_image_is_named(ham_store, cli, monkeypatch, tmp_path):
    def one_rare(table):
        table.loc[table.index[0], "dx"] = "rare"
        return table
    opened = FeatureStore.open
    monkeypatch.setattr(FeatureStore, "open", classmethod(lambda cls, path: _with_table(opened(path), one_rare)))
    code, _, err = cli("probe", ham_store, *OPTS, "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1, err
    assert "class 'rare' has 1 lesion_id group(s), fewer than the 2 folds" in err and "np." not in err


def test_predict_on_a_feature_set_without_finished_rows_is_one_line(ham_store, cli, tmp_path):
    store_path = tmp_path / "failed.zarr"
    shutil.copytree(ham_store, store_path)
    store = FeatureStore.open(store_path)
    key = store.resolve("mobilenet_v2")
    X, table = store.load(key)
    classes = sorted(set(table["dx"]))
    columns = [f"mobilenet_v2/{j}" for j in range(X.shape[1])]
    head = tmp_path / "head"
    head.mkdir()
    model = ColumnsHead(LogRegHead(), columns).fit(pd.DataFrame(X, columns=columns), np.searchsorted(classes, table["dx"]))
    save_head(model, head)
    info = store.info(key)
    (head / "model_card.json").write_text(json.dumps({
        "features": [{"key": key, "name": info.name, "encoder": info.encoder, "given_as": "mobilenet_v2"}],
        "classes": classes, "metadata": [], "target": "dx", "positive_class": None,
    }))
    status = zarr.open_group(str(store_path / "features" / key), mode="r+")["status"]
    status[:] = 2  # every image failed, as after a run with the wrong --images
    code, _, err = cli("predict", head, store_path, "--out", tmp_path / "pred.csv")
    assert code == 2 and err.count("\n") == 1 and "no finished rows of mobilenet_v2" in err, err
    assert not (tmp_path / "pred.csv").exists()
