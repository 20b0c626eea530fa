"""Tuning studies shared by several worker processes, on a real PostgreSQL server and on a journal file.

The server is Debian's PostgreSQL, started by the tests in a temporary folder (``tools/postgres_server.py``;
``make test`` installs the package). The features are real: MobileNetV2 embeddings of HAM10000 images.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from embedstore.errors import ConfigError
from embedstore.heads import KNNHead
from embedstore.metrics import metric_functions
from embedstore.splits import group_kfold
from embedstore.store import FeatureStore
from embedstore.tune import tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from postgres_server import PostgresServer, binaries  # noqa: E402

balanced_accuracy = metric_functions(7)["balanced_accuracy"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(scope="module")
def postgres():
    if binaries() is None:
        pytest.fail("no PostgreSQL server programs: run tools/install_system_deps.sh (make test does)")
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def ham(ham_store):
    X, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    y = np.unique(table["dx"], return_inverse=True)[1]
    return X, y, group_kfold(y, table["lesion_id"].to_numpy(), n_splits=3, seed=0)


class SlowKNN(KNNHead):
    """The kNN head, a fifth of a second slower per fit: trials long enough that every worker, once started,
    finds some left (on 400 rows a trial otherwise ends before a new process has imported FAISS)."""

    def fit(self, X, y, sample_weight=None):
        time.sleep(0.2)
        return super().fit(X, y, sample_weight)


def _states(study) -> dict[str, int]:
    names = [t.state.name for t in study.get_trials(deepcopy=False)]
    return {name: names.count(name) for name in set(names)}


def _owners(study) -> set[str]:
    return {t.user_attrs["owner"] for t in study.get_trials(deepcopy=False, states=FINISHED)}


def test_three_workers_share_a_postgresql_study_and_finish_exactly_the_trials_asked(postgres, ham):
    X, y, folds = ham
    url = postgres.database("three_workers")
    best, study = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 12, url, "shared", workers=3)
    assert _states(study).get("RUNNING", 0) == _states(study).get("WAITING", 0) == 0
    assert len(study.get_trials(states=FINISHED)) == 12
    assert len(_owners(study)) == 3  # this process and two spawned ones each computed trials
    assert os.getpid() in {int(owner.rpartition(":")[2]) for owner in _owners(study)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert best == max(complete, key=lambda t: t.value).params


def test_a_worker_killed_mid_trial_has_its_trial_run_again(postgres, ham, monkeypatch):
    X, y, folds = ham
    url = postgres.database("killed_worker")
    monkeypatch.setenv("EMBEDSTORE_FAULT", "trial-commit:1@2")  # worker 2 dies with its first trial computed
    _, study = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 12, url, "killed", workers=3)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 1
    assert len(study.get_trials(states=FINISHED)) == 12
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].state in FINISHED
    assert retried[0].params == failed[0].params
    assert retried[0].user_attrs["owner"] != failed[0].user_attrs["owner"]


def test_a_silent_trial_of_another_machine_is_retried_after_the_heartbeat_grace(postgres, ham, monkeypatch):
    """A worker elsewhere whose pid cannot be checked: only the heartbeat tells that it is gone."""
    from embedstore import studies

    X, y, folds = ham
    url = postgres.database("heartbeat")
    monkeypatch.setattr(studies, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(studies, "GRACE_SECONDS", 2)
    tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 2, url, "beat", workers=2)
    storage = studies.open_storage(url, shared=True)
    study = optuna.load_study(study_name="beat", storage=storage)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's word that this trial beats no heartbeat
        lost = study.ask({"k": optuna.distributions.IntDistribution(5, 100, log=True)})
    lost.set_user_attr("owner", "another-machine:4242")
    storage.record_heartbeat(lost._trial_id)  # one beat, then silence: the machine was lost mid-trial
    time.sleep(studies.GRACE_SECONDS + 0.5)
    _, study = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 4, url, "beat", workers=2)
    assert study.trials[lost.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retried) == 1 and retried[0].params["k"] == lost.params["k"]
    assert len(study.get_trials(states=FINISHED)) == 4


def test_with_the_random_sampler_three_workers_find_what_one_finds(postgres, ham):
    X, y, folds = ham
    url = postgres.database("random_sampler")
    alone, one = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 9, url, "one", seed=3, sampler="random")
    shared, three = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 9, url, "three", seed=3, sampler="random",
                         workers=3)
    assert shared == alone
    trials = {tuple(sorted(t.params.items())): t.value for t in one.trials}
    assert {tuple(sorted(t.params.items())): t.value for t in three.trials} == trials
    assert len(_owners(three)) == 3


def test_a_probe_tunes_with_two_workers_on_a_journal_file_and_reports_it(ham_store, cli, tmp_path):
    journal = tmp_path / "studies.journal"
    code, out, err = cli("probe", ham_store, "--features", "mobilenet_v2", "--target", "dx", "--groups", "lesion_id",
                         "--head", "knn", "--folds", "3", "--inner-folds", "2", "--trials", "4", "--tune-workers", "2",
                         "--storage", journal, "--n-boot", "50", "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    studies = optuna.get_all_study_summaries(optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert len(studies) == 4  # one per outer fold and one for the final head
    assert all(s.n_trials == 4 for s in studies)
    code, out, err = cli("report", journal, "--out", tmp_path / "studies")
    assert code == 0, err
    page = (tmp_path / "studies" / "report.html").read_text()
    assert all(s.study_name in page for s in studies)


def test_a_trial_without_a_score_stops_every_worker_in_one_line(ham, tmp_path):
    X, y, folds = ham
    with pytest.raises(ConfigError, match="scored no number"):
        tune(SlowKNN(), "knn", X, y, folds, lambda *_: float("nan"), 6, str(tmp_path / "s.journal"), "nan",
             workers=3, sampler="random")
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("args, says", [
    (["--tune-workers", "0", "--trials", "2"], "--tune-workers must be 1 or more"),
    (["--tune-workers", "2"], "give --trials too"),
    (["--trials", "2", "--sampler", "grid"], "unknown sampler 'grid'"),
    (["--trials", "2", "--storage", "studies.db"], "neither a database URL"),
    (["--trials", "2", "--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open Optuna storage"),
])
def test_tuning_mistakes_are_one_line_with_exit_2_and_nothing_written(ham_store, cli, tmp_path, args, says):
    code, out, err = cli("probe", ham_store, "--features", "mobilenet_v2", "--target", "dx", "--groups", "lesion_id",
                         "--head", "knn", "--out", tmp_path / "run", *args)
    assert code == 2
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
