"""Tuning studies shared by several worker processes, on a real PostgreSQL server and on a journal file.

The server is Debian's PostgreSQL, started by the tests in a temporary folder (``tools/postgres_server.py``;
``make test`` installs the package). The features are real: MobileNetV2 embeddings of HAM10000 images.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from embedstore.atomic import pid_alive
from embedstore.errors import ConfigError, EmbedstoreError
from embedstore.heads import KNNHead
from embedstore.metrics import metric_functions
from embedstore.splits import group_kfold
from embedstore.store import FeatureStore
from embedstore.studies import open_storage
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
    _, study = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 12, url, "killed", workers=3,
                    sampler="random")  # no pruning: worker 2's first trial reaches its commit
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
    monkeypatch.setattr(studies, "GRACE_SECONDS", 8)
    tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 2, url, "beat", workers=2)
    storage = studies.open_storage(url, shared=True)
    study = optuna.load_study(study_name="beat", storage=storage)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's word that this trial beats no heartbeat
        lost = study.ask({"k": optuna.distributions.IntDistribution(5, 100, log=True)})
    lost.set_user_attr("owner", "another-machine:4242")
    storage.record_heartbeat(lost._trial_id)  # one beat, then silence: the machine was lost mid-trial
    time.sleep(studies.GRACE_SECONDS + 0.5)
    # 2 finished + the lost one = 3 claimed: nothing is left to claim, so only the wait for the lost trial,
    # which checks the heartbeats, can free it
    _, study = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 3, url, "beat", workers=2)
    assert study.trials[lost.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retried) == 1 and retried[0].params["k"] == lost.params["k"]
    assert len(study.get_trials(states=FINISHED)) == 3


def test_with_the_random_sampler_three_workers_find_what_one_finds(postgres, ham, tmp_path):
    X, y, folds = ham
    alone, one = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 9, f"sqlite:///{tmp_path / 'one.db'}", "one",
                      seed=3, sampler="random")  # one worker, one trial after another: the sequential loop
    shared, three = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 9, postgres.database("random_sampler"),
                         "three", seed=3, sampler="random", workers=3)
    trials = {tuple(sorted(t.params.items())): t.value for t in one.trials}
    assert {tuple(sorted(t.params.items())): t.value for t in three.trials} == trials
    assert max(trials.values()) == max(t.value for t in three.trials)
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


def test_a_worker_killed_while_claiming_leaves_no_trial_running(ham, tmp_path, monkeypatch):
    X, y, folds = ham
    monkeypatch.setenv("EMBEDSTORE_FAULT", "trial-claimed:1@1")  # worker 1 dies holding the lock, trial unnamed
    _, study = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 8, str(tmp_path / "s.journal"), "claimed",
                    workers=3)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 1 and "owner" not in failed[0].user_attrs
    assert [t.system_attrs.get("failed_trial") for t in study.trials].count(failed[0].number) == 1
    assert len(study.get_trials(states=FINISHED)) == 8 and _states(study).get("RUNNING", 0) == 0


def test_a_spawned_workers_error_stops_every_worker_in_one_line(ham, tmp_path):
    X, y, folds = ham

    def undefined_in_worker_1(y_true, proba, pred):  # the metric fails in one worker only
        return float("nan") if os.environ.get("EMBEDSTORE_WORKER") == "1" else balanced_accuracy(y_true, proba, pred)

    with pytest.raises(ConfigError) as error:
        tune(SlowKNN(), "knn", X, y, folds, undefined_in_worker_1, 40, str(tmp_path / "s.journal"), "nan",
             workers=3, sampler="random")
    assert str(error.value).startswith("tuning worker 1: trial ") and "scored no number" in str(error.value)
    assert "\n" not in str(error.value)
    assert multiprocessing.active_children() == []


def test_a_running_trial_under_this_process_pid_is_a_killed_runs(ham, tmp_path):
    """A container restarted after a kill gets its old host name and pids back: the old run's RUNNING trial names
    this very process, which computes no trial while it checks, so the trial is stale and runs again."""
    X, y, folds = ham
    journal = str(tmp_path / "s.journal")
    tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 1, journal, "restarted", workers=2, sampler="random")
    study = optuna.load_study(study_name="restarted", storage=open_storage(journal))
    old = study.ask({"k": optuna.distributions.IntDistribution(5, 100, log=True)})
    old.set_user_attr("owner", f"{socket.gethostname()}:{os.getpid()}")
    _, study = tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 2, journal, "restarted", workers=2,
                    sampler="random")
    assert study.trials[old.number].state == optuna.trial.TrialState.FAIL
    assert [t.system_attrs.get("failed_trial") for t in study.trials].count(old.number) == 1
    assert len(study.get_trials(states=FINISHED)) == 2


class BrokenKNN(KNNHead):
    """A head whose every fit fails, as a head given impossible parameters would."""

    def fit(self, X, y, sample_weight=None):
        raise ValueError("this head cannot be fitted")


def test_a_trial_that_raises_stops_the_tuning_instead_of_being_claimed_again(ham, tmp_path):
    X, y, folds = ham
    with pytest.raises(EmbedstoreError, match="this head cannot be fitted"):
        tune(BrokenKNN(), "knn", X, y, folds, balanced_accuracy, 20, str(tmp_path / "s.journal"), "broken", workers=2)
    study = optuna.load_study(study_name="broken", storage=open_storage(str(tmp_path / "s.journal")))
    assert len(study.trials) <= 3  # each worker stopped at its first failed trial (one more may have been asked)
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


def test_a_killed_probe_takes_its_tuning_workers_with_it(ham_store, tmp_path):
    """SIGKILL of the first worker (the probe itself): the spawned workers die too, claiming nothing more."""
    script = tmp_path / "tune_forever.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_tune_workers import SlowKNN, balanced_accuracy
import numpy as np
from embedstore.splits import group_kfold
from embedstore.store import FeatureStore
from embedstore.studies import open_storage
from embedstore.tune import tune
if __name__ == "__main__":  # spawned workers import the main module again, as with any multiprocessing spawn
    X, table = FeatureStore.open({str(ham_store)!r}).load("mobilenet_v2")
    y = np.unique(table["dx"], return_inverse=True)[1]
    folds = group_kfold(y, table["lesion_id"].to_numpy(), n_splits=3, seed=0)
    tune(SlowKNN(), "knn", X, y, folds, balanced_accuracy, 1000, {str(tmp_path / "s.journal")!r}, "forever",
         workers=3)
""")
    probe = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, children = time.monotonic() + 120, []
        while len(children) < 2 and time.monotonic() < deadline and probe.poll() is None:
            time.sleep(0.5)
            listed = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(probe.pid)], capture_output=True,
                                    text=True)
            children = [int(line.split()[0]) for line in listed.stdout.splitlines() if "spawn_main" in line]
        assert len(children) == 2, probe.stderr.read() if probe.poll() is not None else children
        time.sleep(3)  # they are claiming trials by now
    finally:
        probe.kill()
        probe.wait()
    time.sleep(2)
    assert not any(pid_alive(pid) for pid in children)
