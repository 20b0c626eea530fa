"""`embedstore probe` and `embedstore predict` end to end on the real HAM10000 subset store."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from embedstore.cli import app
from embedstore.errors import ConfigError
from embedstore.heads import load_head
from embedstore.probe import ProbeConfig, load_data, run_probe
from embedstore.runs import Run
from embedstore.store import FeatureStore

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output, result.exception


@pytest.fixture(scope="module")
def plain_run(ham_store, tmp_path_factory):
    """A plain logreg probe (C=0.1, converged to 1e-6) written through the CLI, shared by the tests that read its folder."""
    out = tmp_path_factory.mktemp("runs") / "plain"
    code, output, exc = _cli("probe", ham_store, "--features", "mobilenet_v2", "--target", "dx", "--groups",
                             "lesion_id", "--head", "logreg", "--param", "logreg.C=0.1", "-p", "logreg.tol=1e-6",
                             "--n-boot", "200",
                             "--no-report", "--out", out)
    assert code == 0, (output, exc)
    assert "mobilenet_v2 × logreg: balanced_accuracy" in output
    return out


def test_run_folder_has_the_documented_format(plain_run, ham_store):
    run = json.loads((plain_run / "run.json").read_text())
    assert run["format"] == 1 and run["kind"] == "probe" and run["head"] == "logreg"
    assert run["features"] == [FeatureStore.open(ham_store).resolve("mobilenet_v2")]
    assert run["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    metrics = json.loads((plain_run / "metrics.json").read_text())
    assert metrics["headline"][0] == "balanced_accuracy"
    ba = metrics["metrics"]["balanced_accuracy"]
    assert ba["ci_low"] < ba["value"] < ba["ci_high"]
    folds = pd.read_csv(plain_run / "folds.csv")
    assert list(folds.columns[:3]) == ["fold", "n_train", "n_test"] and len(folds) == 5
    emb = pd.read_parquet(plain_run / "embedding_2d.parquet")
    assert list(emb.columns) == ["id", "x", "y", "label"]
    config = yaml.safe_load((plain_run / "config.yaml").read_text())
    assert config["params"] == {"logreg": {"C": 0.1, "tol": 1e-6}} and config["groups"] == "lesion_id"
    card = json.loads((plain_run / "head" / "model_card.json").read_text())
    assert card["features"][0]["key"] == run["features"][0] and card["classes"] == run["classes"]
    assert "Model card" in (plain_run / "head" / "MODEL_CARD.md").read_text()


def test_oof_predictions_are_grouped_and_match_plain_sklearn(plain_run, ham_store):
    pred = pd.read_parquet(plain_run / "predictions.parquet")
    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    assert set(pred["split"]) == {"oof"} and sorted(pred["id"]) == sorted(table["id"])
    merged = pred.merge(table, on="id")
    assert (merged["y_true"] == merged["dx"]).all()
    assert merged.groupby("lesion_id")["fold"].nunique().max() == 1  # every lesion sits in one fold only
    # The same protocol written directly in scikit-learn, converged, gives the same probabilities (up to the
    # float32 rounding of embedstore's products).
    y, groups = table["dx"].to_numpy(), table["lesion_id"].to_numpy()
    ref = np.zeros((len(y), 7))
    with threadpool_limits(limits=1, user_api="blas"):
        for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, tol=1e-8, max_iter=10000)).fit(X[tr], y[tr])
            ref[te] = model.predict_proba(X[te])
    ours = pred.set_index("id").loc[table["id"], [f"p_{c}" for c in sorted(set(y))]].to_numpy()
    assert np.abs(ours - ref).max() < 3e-2 and np.abs(ours - ref).mean() < 1e-3
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.97
    metrics = json.loads((plain_run / "metrics.json").read_text())["metrics"]
    assert metrics["balanced_accuracy"]["value"] == pytest.approx(
        balanced_accuracy_score(y, np.array(sorted(set(y)))[ours.argmax(1)]))


def test_balanced_decision_moves_only_the_predicted_classes(plain_run, ham_store, tmp_path):
    out = tmp_path / "balanced"
    code, output, exc = _cli("probe", ham_store, "--features", "mobilenet_v2", "--target", "dx", "--groups",
                             "lesion_id", "--head", "logreg", "--param", "logreg.C=0.1", "-p", "logreg.tol=1e-6", "--decision", "balanced",
                             "--n-boot", "200", "--no-report", "--out", out)
    assert code == 0, (output, exc)
    plain, ours = (pd.read_parquet(run / "predictions.parquet").set_index("id") for run in (plain_run, out))
    ours = ours.loc[plain.index]
    probs = [c for c in plain.columns if c.startswith("p_")]
    assert np.allclose(ours[probs].to_numpy(), plain[probs].to_numpy())  # the same probabilities
    # Each fold's predictions divide the probabilities by the class frequencies of that fold's training rows.
    for fold, rows in ours.groupby("fold"):
        prior = ours.loc[ours["fold"] != fold, "y_true"].value_counts(normalize=True)
        expected = (rows[probs] / prior.loc[[c[2:] for c in probs]].to_numpy()).to_numpy().argmax(1)
        assert (rows["y_pred"].to_numpy() == np.array([c[2:] for c in probs])[expected]).all()
    assert (ours["y_pred"] != plain["y_pred"]).sum() > 5  # ... which moves some held-out predictions
    a, b = (json.loads((run / "metrics.json").read_text())["metrics"] for run in (plain_run, out))
    assert b["roc_auc"] == a["roc_auc"]
    assert b["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(ours["y_true"], ours["y_pred"]))
    assert json.loads((out / "head" / "model_card.json").read_text())["decision"] == "balanced"
    pred = tmp_path / "pred.csv"  # the saved head applies the same rule, with the prior of all its training rows
    assert _cli("predict", out / "head", ham_store, "--out", pred)[0] == 0
    pred = pd.read_csv(pred)
    prior = pred["y_true"].value_counts(normalize=True).loc[[c[2:] for c in probs]].to_numpy()
    expected = np.array([c[2:] for c in probs])[(pred[probs].to_numpy() / prior).argmax(1)]
    assert (pred["y_pred"].to_numpy() == expected).all()


def test_predict_applies_the_saved_head_and_refuses_other_fingerprints(plain_run, ham_store, tmp_path):
    out = tmp_path / "pred.csv"
    code, output, _ = _cli("predict", plain_run / "head", ham_store, "--out", out)
    assert code == 0, output
    pred = pd.read_csv(out)
    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    model = load_head(plain_run / "head")
    frame = pd.DataFrame(X, columns=[f"mobilenet_v2/{j}" for j in range(X.shape[1])])
    assert np.allclose(pred[[c for c in pred if c.startswith("p_")]].to_numpy(), model.predict_proba(frame), atol=1e-6)
    assert (pred["y_true"] == table["dx"]).all()
    # A store without that feature set (same images, other features) is refused in one line.
    other = tmp_path / "other.zarr"
    shutil.copytree(ham_store, other)
    shutil.rmtree(other / "features" / FeatureStore.open(ham_store).resolve("mobilenet_v2"))
    code, _, exc = _cli("predict", plain_run / "head", other, "--out", tmp_path / "x.csv")
    assert code != 0 and "fingerprint" in str(exc)
    assert not (tmp_path / "x.csv").exists()


def test_predict_writes_predictions_csv_by_default(plain_run, ham_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output, exc = _cli("predict", plain_run / "head", ham_store)
    assert code == 0 and output.strip().endswith("-> predictions.csv"), (output, exc)
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == len(pd.read_parquet(plain_run / "predictions.parquet"))


def test_comparison_of_feature_sets_and_heads_exports_latex(ham_store, tmp_path):
    cfg = ProbeConfig.from_dict({"store": str(ham_store), "features": "mobilenet_v2,efficientnet_lite0",
                                 "target": "dx", "groups": "lesion_id", "heads": "logreg,knn", "folds": 3,
                                 "n_boot": 100, "tsne_max": 200, "report": False, "out": str(tmp_path / "cmp")})
    run = run_probe(cfg)
    assert isinstance(run, Run) and run.path == tmp_path / "cmp" and run.record.models == tuple(run.metrics.models)
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert len(table) == 4 and {"features", "model", "balanced_accuracy", "balanced_accuracy_ci_low",
                                "roc_auc_ci_high"} <= set(table.columns)
    best = table.loc[table["balanced_accuracy"].idxmax()]
    assert best["balanced_accuracy_best"] and table["balanced_accuracy_best"].sum() == 1
    assert run.metrics.model == f"{best['features']} × {best['model']}"
    assert run.metrics.model == json.loads((tmp_path / "cmp" / "metrics.json").read_text())["model"]
    estimate = run.metrics.models[run.metrics.model]["balanced_accuracy"]
    assert (estimate.value, estimate.ci_low, estimate.ci_high) == tuple(
        best[["balanced_accuracy", "balanced_accuracy_ci_low", "balanced_accuracy_ci_high"]])
    tex = (tmp_path / "cmp" / "comparison.tex").read_text()
    assert tex.count(r"\\") == 5 and r"\toprule" in tex and r"mobilenet\_v2 & knn &" in tex


def test_the_run_folders_config_reruns_the_run_and_param_adds_to_its_params(plain_run, ham_store, tmp_path):
    out = tmp_path / "rerun"
    code, output, exc = _cli("probe", "-c", plain_run / "config.yaml", "-p", "logreg.max_iter=1000", "--out", out)
    assert code == 0, (output, exc)
    assert yaml.safe_load((out / "config.yaml").read_text())["params"] == {"logreg": {"C": 0.1, "tol": 1e-6, "max_iter": 1000}}
    first, again = (json.loads((run / "metrics.json").read_text()) for run in (plain_run, out))
    assert again == first  # max_iter=1000 is the default: the same run, to the last digit


def test_config_file_with_cli_override_and_a_nested_tuned_stack(ham_store, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({
        "store": str(ham_store), "features": ["mobilenet_v2+efficientnet_lite0"], "target": "dx",
        "groups": "lesion_id", "heads": ["logreg"], "stack_heads": ["knn"], "stack_joint": ["lgbm"],
        "metadata": ["age", "sex", "localization"], "folds": 3, "inner_folds": 2, "n_boot": 100,
        "tsne_max": 200, "report": False, "params": {"lgbm": {"n_estimators": 30, "pca": 8}},
    }))
    out = tmp_path / "stack"
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    code, output, exc = _cli("probe", "--config", config, "--head", "stack", "--trials", "2", "--storage", storage,
                             "--out", out)
    assert code == 0, (output, exc)
    run = json.loads((out / "run.json").read_text())
    assert run["head"] == "stack" and run["study"]["storage"] == storage
    assert yaml.safe_load((out / "config.yaml").read_text())["stack_folds"] == "inner"  # tuned: the default, resolved
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert any("(in " in name for name in models) and len(models) == 4  # the stack beside its three bases
    import optuna

    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    # One study per tuned base per outer fold (nested), plus the final ones on all training rows.
    assert sum(n.endswith(":fold0") for n in names) == 3 and sum(n.endswith(":final") for n in names) == 3


@pytest.mark.parametrize("given, expected", [
    ({"heads": ["stack"]}, "outer"),  # untuned, 5 folds: the folds' stacks share their base models
    ({"heads": ["stack"], "trials": 3}, "inner"),  # tuned bases differ per fold: nothing to share
    ({"heads": ["stack"], "folds": 2}, "inner"),  # with two folds each outer fold has one other
    ({"heads": ["logreg"]}, None),  # no stack, nothing to choose
    ({"heads": ["stack"], "trials": 3, "stack_folds": "outer"}, "outer"),  # as given
])
def test_a_stacks_inner_folds_default_to_the_outer_folds_where_they_share_models(given, expected):
    cfg = ProbeConfig.from_dict({"store": "s.zarr", "features": "a+b", "target": "dx", "folds": 5, **given})
    assert cfg.stack_folds == expected


def test_holdout_scores_test_rows_only(ham_store, tmp_path):
    cfg = ProbeConfig.from_dict({"store": str(ham_store), "features": "mobilenet_v2", "target": "dx",
                                 "positive": "mel", "groups": "lesion_id", "heads": "knn", "holdout": 0.25,
                                 "folds": 3, "n_boot": 100, "tsne_max": 200, "report": False,
                                 "out": str(tmp_path / "hold")})
    run_probe(cfg)
    pred = pd.read_parquet(tmp_path / "hold" / "predictions.parquet")
    metrics = json.loads((tmp_path / "hold" / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test" and metrics["n"] == (pred["split"] == "test").sum()
    assert 0.0 <= metrics["metrics"]["pauc_80"]["value"] <= 0.2
    _, table = FeatureStore.open(ham_store).load("mobilenet_v2", columns=["lesion_id"])
    lesion = pred.merge(table, on="id").groupby("split")["lesion_id"].apply(set)
    assert not lesion["oof"] & lesion["test"]


@pytest.mark.parametrize("args, message", [
    (["--target", "diagnosis"], "target column 'diagnosis' is not in the store"),
    (["--groups", "patient"], "group column 'patient' is not in the store"),
    (["--features", "dinov2_vitb14"], "no feature set 'dinov2_vitb14'"),
    (["--positive", "df", "--folds", "40"], "has no rows of class"),
    (["--head", "stack", "--stack-folds", "nested"], "unknown stack_folds 'nested'"),
    (["--head", "stack", "--stack-folds", "outer", "--folds", "2"], "needs --folds 3 or more"),
])
def test_bad_input_is_one_clear_line(ham_store, tmp_path, args, message):
    base = {"--features": "mobilenet_v2", "--target": "dx", "--groups": "lesion_id"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    code, _, exc = _cli("probe", ham_store, *flat, "--no-report", "--out", tmp_path / "bad")
    assert code != 0 and message in str(exc) and "\n" not in str(exc)
    assert not (tmp_path / "bad").exists()


def test_a_single_class_target_is_refused(ham_store):
    store = FeatureStore.open(ham_store)
    store.__dict__["manifest"] = store.manifest.assign(dx="nv")  # an in-memory table with one class
    cfg = ProbeConfig.from_dict({"store": str(ham_store), "features": "mobilenet_v2", "target": "dx"})
    with pytest.raises(ConfigError, match="single class"):
        load_data(cfg, store)


def test_tuned_fold_models_are_fitted_together_each_with_its_own_c(ham_store, tmp_path):
    """A tuned logistic probe fits every fold's model and the final one at once, each with the C its own nested
    study chose, at the head's tolerance; each is the model that C gives alone on its fold."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    events = []
    cfg = ProbeConfig.from_dict({"store": str(ham_store), "features": ["mobilenet_v2"], "target": "dx",
                                 "groups": "lesion_id", "heads": ["logreg"], "folds": 3, "inner_folds": 2,
                                 "trials": 4, "n_boot": 50, "tsne_max": 100, "report": False, "storage": storage,
                                 "params": {"logreg": {"class_weight": "balanced"}}, "out": str(tmp_path / "tuned")})
    run = run_probe(cfg, progress=lambda event, message: events.append((event, message)))
    assert ("fit", "mobilenet_v2 × logreg: fitted 4 models together") in events
    studies = {s.study_name.rsplit(":", 1)[-1]: optuna.load_study(study_name=s.study_name, storage=storage)
               for s in optuna.get_all_study_summaries(storage)}
    chosen = {scope: study.best_params["C"] for scope, study in studies.items()}
    assert set(chosen) == {"fold0", "fold1", "fold2", "final"}  # one study per outer fold, one for the final head
    head = load_head(run.path / "head")
    inner = head.estimator_.head_ if hasattr(head, "estimator_") else head.head_
    assert inner.C == chosen["final"] and inner.tol == 1e-5
    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    y = table["dx"].to_numpy()
    pred = pd.read_parquet(run.path / "predictions.parquet").set_index("id").loc[table["id"]]
    from embedstore.heads import LogRegHead

    for k in range(3):
        test = np.flatnonzero(pred["fold"].to_numpy() == k)
        train = np.setdiff1d(np.arange(len(y)), test)
        alone = LogRegHead(C=chosen[f"fold{k}"], class_weight="balanced").fit(X[train], y[train])
        ours = pred.iloc[test][[f"p_{c}" for c in alone.classes_]].to_numpy()
        assert np.abs(ours - alone.predict_proba(X[test])).max() < 2e-3


def test_fit_each_fits_a_logistic_head_with_each_models_c_and_lightgbm_side_by_side(ham_store):
    """fit_each: logistic models differing only in C are fitted at once, each as alone with its C; identical
    LightGBM models are fitted side by side (they have no C); models differing otherwise are left to fit alone."""
    from embedstore.heads import BalancedDecision, ColumnsHead, LGBMHead, LogRegHead
    from embedstore.probe.models import fit_each

    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    columns = [f"x{j}" for j in range(X.shape[1])]
    frame = pd.DataFrame(X, columns=columns)
    y = table["dx"].to_numpy()
    row_sets = [np.arange(len(y))[k::3] for k in range(3)]
    models = [BalancedDecision(ColumnsHead(LogRegHead(C=C, class_weight="balanced"), columns)) for C in (0.003, 0.03, 0.3)]
    for model, rows, fitted in zip(models, row_sets, fit_each(models, frame, y, row_sets)):
        alone = model.fit(frame.iloc[rows], y[rows])
        assert fitted.estimator_.head_.C == model.estimator.head.C
        assert np.abs(fitted.predict_proba(frame) - alone.predict_proba(frame)).max() < 2e-3
    lgbm = [ColumnsHead(LGBMHead(n_estimators=20, pca=8), columns) for _ in row_sets]
    for model, rows, fitted in zip(lgbm, row_sets, fit_each(lgbm, frame, y, row_sets)):
        assert np.array_equal(fitted.predict_proba(frame), model.fit(frame.iloc[rows], y[rows]).predict_proba(frame))
    mixed = [BalancedDecision(ColumnsHead(LogRegHead(C=0.1, class_weight=w), columns)) for w in (None, "balanced", None)]
    assert fit_each(mixed, frame, y, row_sets) is None
