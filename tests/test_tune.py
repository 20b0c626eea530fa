"""Optuna tuning on real HAM10000 features: per-fold reports, pruning, resumable sqlite studies."""

import socket
import subprocess

import numpy as np
import optuna
import pytest
from sklearn.metrics import balanced_accuracy_score
from threadpoolctl import threadpool_limits

from embedstore.errors import ConfigError
from embedstore.heads import HEADS, KNNHead, LogRegHead, make_head
from embedstore.layout import study_storage
from embedstore.metrics import metric_functions
from embedstore.splits import group_kfold
from embedstore.store import FeatureStore
from embedstore.tune import PATH_TOL, SEARCH_SPACES, cv_score, path_values, study_problem, tune, tune_many


balanced_accuracy = metric_functions(7)["balanced_accuracy"]  # f(y_true, proba, y_pred), as the probe tunes


@pytest.fixture(scope="module")
def ham(ham_store):
    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    y = np.unique(table["dx"], return_inverse=True)[1]
    folds = group_kfold(y, table["lesion_id"].to_numpy(), n_splits=3, seed=0)
    with threadpool_limits(limits=1, user_api="blas"):
        yield X, y, folds


def test_every_head_has_a_search_space_its_head_accepts():
    study = optuna.create_study()
    for name in HEADS:
        params = SEARCH_SPACES[name](study.ask())
        head = make_head(name, **params)
        assert {k: head.get_params()[k] for k in params} == params


def test_study_records_fold_scores_and_resumes_from_sqlite(ham, tmp_path):
    X, y, folds = ham
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    best, study = tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 4, storage, "knn-test", seed=0)
    assert len(study.trials) == 4
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:  # the value is the mean of the per-fold scores kept as user attributes
        assert t.value == pytest.approx(np.mean([t.user_attrs[f"fold_{k}"] for k in range(3)]))
    assert set(best) == {"k", "temperature", "class_weight"}
    first = [t.params for t in study.trials]
    # Rerunning asks for 6 in all: the stored 4 are kept and only 2 run (an interrupted study resumes).
    _, again = tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 6, storage, "knn-test", seed=0)
    assert len(again.trials) == 6
    assert [t.params for t in again.trials[:4]] == first
    # A finished study runs nothing more.
    _, same = tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 6, storage, "knn-test", seed=0)
    assert len(same.trials) == 6


def test_a_bad_trial_is_pruned_after_its_first_fold(ham):
    X, y, folds = ham
    # A pruner that prunes any running mean below 2.0 (so every trial) shows where cv_score stops.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        cv_score(KNNHead(), X, y, folds, balanced_accuracy, trial)
    assert list(trial.user_attrs) == ["fold_0"]  # only one fold was paid for
    assert cv_score(KNNHead(), X, y, folds, balanced_accuracy) == pytest.approx(
        np.mean([balanced_accuracy_score(y[te], KNNHead().fit(X[tr], y[tr]).predict(X[te])) for tr, te in folds])
    )


def test_fixed_parameters_stay_out_of_the_search(ham, tmp_path):
    X, y, folds = ham
    best, study = tune(KNNHead(k=7), "knn", X, y, folds, balanced_accuracy, 2, f"sqlite:///{tmp_path / 's.db'}",
                       "fixed", fixed=frozenset({"k"}))
    assert "k" not in best


def test_the_default_storage_sits_beside_the_store_and_bad_urls_are_one_line(tmp_path):
    assert study_storage(tmp_path / "ham.zarr") == f"sqlite:///{tmp_path / 'ham.optuna.db'}"
    with pytest.raises(ConfigError, match="cannot open Optuna storage"):
        tune(KNNHead(), "knn", np.zeros((4, 2)), np.array([0, 1, 0, 1]), [], balanced_accuracy, 1, "nosuchdb://x", "s")


def test_a_study_killed_mid_trial_resumes_to_the_uninterrupted_result(ham, tmp_path):
    X, y, folds = ham
    args = (X, y, folds, balanced_accuracy)
    _, whole = tune(KNNHead(), "knn", *args, 5, f"sqlite:///{tmp_path / 'whole.db'}", "s", seed=3)
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    first_two, _ = tune(KNNHead(), "knn", *args, 2, storage, "s", seed=3)
    # A process that died in the middle of trial 2: the trial stays RUNNING under the dead process's pid.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stuck = optuna.load_study(study_name="s", storage=storage).ask()
    stuck.set_user_attr("owner", f"{socket.gethostname()}:{dead.pid}")
    _, resumed = tune(KNNHead(), "knn", *args, 5, storage, "s", seed=3)
    states = [t.state for t in resumed.trials]
    assert states[2] == optuna.trial.TrialState.FAIL and states.count(optuna.trial.TrialState.FAIL) == 1
    finished = [t for t in resumed.trials if t.state != optuna.trial.TrialState.FAIL]
    assert [(t.params, t.value) for t in finished] == [(t.params, t.value) for t in whole.trials]
    assert resumed.best_params == whole.best_params
    # Asking for fewer trials than stored answers the best of the first ones, as before the study grew.
    assert tune(KNNHead(), "knn", *args, 2, storage, "s", seed=3)[0] == first_two


def test_a_stored_study_of_another_problem_is_refused(ham, tmp_path):
    X, y, folds = ham
    storage = f"sqlite:///{tmp_path / 's.db'}"
    problem = study_problem("knn", y, folds, 0, frozenset(), features=["mobilenet_v2"])
    tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 1, storage, "s", problem=problem)
    tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 1, storage, "s", problem=problem)  # the same: reused
    other = study_problem("knn", y, folds[:2], 0, frozenset(), features=["mobilenet_v2"])
    with pytest.raises(ConfigError, match="'s' in .* was tuned for another problem"):
        tune(KNNHead(), "knn", X, y, folds[:2], balanced_accuracy, 1, storage, "s", problem=other)
    tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 1, storage, "legacy")  # no fingerprint, as before
    with pytest.raises(ConfigError, match="unknown problem"):
        tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 1, storage, "legacy", problem=problem)


def test_logreg_sweeps_a_warm_started_path_of_c_stored_as_trials(ham, tmp_path):
    X, y, folds = ham
    storage = f"sqlite:///{tmp_path / 's.db'}"
    head = LogRegHead()
    best, study = tune(head, "logreg", X, y, folds, balanced_accuracy, 4, storage, "path", seed=0)
    # 4 values of C for each class-weight choice, log-spaced over the search space's range, in grid order
    Cs = path_values("logreg", 4)
    assert Cs[0] == pytest.approx(1e-4) and Cs[-1] == pytest.approx(1e2) and len(study.trials) == 8
    assert [t.params["C"] for t in study.trials] == pytest.approx([*Cs, *Cs])
    # each trial scores what separate fits of its C, at the path's tolerance, score on the same folds
    for t in study.trials[1:3]:
        separate = cv_score(LogRegHead(**t.params, tol=PATH_TOL), X, y, folds, balanced_accuracy)
        assert t.value == pytest.approx(separate, abs=0.02)
        assert t.value == pytest.approx(np.mean([t.user_attrs[f"fold_{k}"] for k in range(3)]))
    top = max(study.trials, key=lambda t: t.value)
    assert best == top.params
    # a finished path runs nothing more; a fixed class weight leaves one path
    assert len(tune(head, "logreg", X, y, folds, balanced_accuracy, 4, storage, "path")[1].trials) == 8
    best, fixed = tune(LogRegHead(class_weight="balanced"), "logreg", X, y, folds, balanced_accuracy, 3, storage, "cw",
                       fixed=frozenset({"class_weight"}))
    assert len(fixed.trials) == 3 and set(best) == {"C"}


def test_studies_tuned_together_fit_their_paths_at_once_and_match_studies_tuned_alone(ham, tmp_path, monkeypatch):
    """tune_many: the nested studies of three outer folds sweep their C paths in one fit over all their inner
    folds; each study gets the trials, and the C, that tuning it alone gives (to the path's tolerance); a
    finished study is reused and fits nothing."""
    X, y, outer = ham
    groups = np.arange(len(y)) // 3  # neighbouring rows together: any grouping serves the comparison
    fold_sets = [[(train[a], train[b]) for a, b in group_kfold(y[train], groups[train], 3, 0)] for train, _ in outer]
    auc = metric_functions(7)["roc_auc"]  # a continuous score: fits equal to the tolerance score alike
    fixed = frozenset({"class_weight"})
    head = LogRegHead(class_weight="balanced")
    calls = []
    fit_paths = LogRegHead.fit_paths
    monkeypatch.setattr(LogRegHead, "fit_paths", lambda self, X, y, row_sets, *args:
                        calls.append(len(row_sets)) or fit_paths(self, X, y, row_sets, *args))
    storage = f"sqlite:///{tmp_path / 'together.db'}"
    names = [f"fold{k}" for k in range(3)]
    together = tune_many(head, "logreg", X, y, fold_sets, auc, 5, storage, names, [None] * 3, fixed=fixed)
    assert calls == [9]  # three studies' three inner folds, in one call
    alone = [tune(head, "logreg", X, y, folds, auc, 5, f"sqlite:///{tmp_path / 'alone.db'}", name, fixed=fixed)
             for folds, name in zip(fold_sets, names)]
    assert calls == [9, 3, 3, 3]
    for (best, study), (best_alone, study_alone) in zip(together, alone):
        assert best == best_alone
        assert [t.params for t in study.trials] == [t.params for t in study_alone.trials]
        assert [t.value for t in study.trials] == pytest.approx([t.value for t in study_alone.trials], abs=2e-3)
    again = tune_many(head, "logreg", X, y, fold_sets, auc, 5, storage, names, [None] * 3, fixed=fixed)
    assert calls == [9, 3, 3, 3] and [b for b, _ in again] == [b for b, _ in together]
    with pytest.raises(ValueError, match="3 fold sets, 2 study names"):
        tune_many(head, "logreg", X, y, fold_sets, auc, 5, storage, names[:2], [None] * 3, fixed=fixed)


def test_the_path_screens_c_at_its_own_tolerance_and_records_it(ham, tmp_path, monkeypatch):
    """The path's fits run at PATH_TOL, which is part of the study's identity; a tol the user fixed is kept."""
    X, y, folds = ham
    problem = study_problem("logreg", y, folds, 0, frozenset(), n_trials=3)
    assert problem["search"] == {"path": "C", "values": 3, "tol": PATH_TOL}
    tolerances = []
    fit_paths = LogRegHead.fit_paths
    monkeypatch.setattr(LogRegHead, "fit_paths",
                        lambda self, *args, **kw: tolerances.append(self.tol) or fit_paths(self, *args, **kw))
    head = LogRegHead(class_weight="balanced")
    tune(head, "logreg", X, y, folds, balanced_accuracy, 3, f"sqlite:///{tmp_path / 's.db'}", "screen",
         fixed=frozenset({"class_weight"}), problem=problem)
    assert tolerances == [PATH_TOL]
    fixed = frozenset({"class_weight", "tol"})
    assert "tol" not in study_problem("logreg", y, folds, 0, fixed, n_trials=3)["search"]
    tune(LogRegHead(class_weight="balanced", tol=1e-3), "logreg", X, y, folds, balanced_accuracy, 3,
         f"sqlite:///{tmp_path / 's.db'}", "own", fixed=fixed)
    assert tolerances == [PATH_TOL, 1e-3]
