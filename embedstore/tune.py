"""Optuna studies for the heads: search spaces (declared here, in one place), pruning across folds, storage,
and the identity of a study.

A study maximises the mean of one metric over group folds. Each trial
reports its running mean after every fold, so the median pruner stops a bad
trial after a fold or two instead of paying for all of them; per-fold scores
are kept as trial user attributes. Studies live in an Optuna storage (by
default a sqlite file beside the feature store,
:func:`embedstore.layout.study_storage`); ``optuna-dashboard sqlite:///...`` shows them.

A study is reused only by exactly the same problem. :func:`study_problem` lists
everything that decides a trial's value (features, rows, labels, folds, seed,
head, search space, fixed parameters, metric, ...); its fingerprint
(:func:`embedstore.store.fingerprint`) is stored as the study's ``fingerprint``
user attribute, and :func:`tune` refuses a stored study of another fingerprint.

Resuming is deterministic: one worker runs trials one at a time, each sampled
by a sampler seeded by (seed, number of finished trials), so a trial's
parameters depend on the study's history only, never on how many processes it
took (a path search's values depend, to the path's tolerance, on whether its
study was fitted alone or with others: :func:`tune_many`). A trial left RUNNING
by a dead process (killed mid-trial) is marked FAIL when the study is resumed;
it neither counts nor shifts the seeds.

Several workers share a study with ``workers=N`` (``--tune-workers``): this
process and N - 1 spawned ones (and any started elsewhere on the same storage,
:mod:`embedstore.studies`) each claim the next trial under the study's claim
lock, compute it and store it, until the study holds exactly ``n_trials``.
A worker's trial is re-run when the worker dies: at once when it ran on this
machine (its pid is gone), after the heartbeat's grace period on an RDB
storage otherwise. With the random sampler, a trial's parameters are a
function of its place in the study, so N workers give the one worker's result;
with TPE they depend on which trials had finished when each was sampled, and
are not comparable trial for trial.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import closing, nullcontext, suppress

import cloudpickle
import numpy as np
import optuna
from sklearn.base import clone
from threadpoolctl import threadpool_limits

from embedstore import faults, parallel, studies
from embedstore.atomic import pid_alive
from embedstore.errors import ConfigError, EmbedstoreError, first_line
from embedstore.heads.base import fit_paths, predict_path, predict_rows, side_by_side
from embedstore.heads.decision import decide
from embedstore.parallel import in_order, usable_cores
from embedstore.store import digest, fingerprint
from embedstore.studies import (claim_lock, fail_silent_trials, is_server, lock_is_global, open_storage, requeue,
                                shown_url)

SpaceFn = Callable[[optuna.Trial], dict]

_WEIGHTS = ["balanced", None]

#: How a study samples a trial's parameters: name -> sampler of a seed. TPE learns from the finished trials and
#: prunes a trial whose running mean falls below the median of the others' (:func:`_pruner`); random draws each
#: trial's parameters, and computes its every fold, independently of the others.
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}

#: Each head's search space: trial -> head parameters. The one place to change what is tuned.
SEARCH_SPACES: dict[str, SpaceFn] = {
    "logreg": lambda t: {
        "C": t.suggest_float("C", 1e-4, 1e2, log=True),
        "class_weight": t.suggest_categorical("class_weight", _WEIGHTS),
    },
    "svm": lambda t: {
        "C": t.suggest_float("C", 1e-5, 1.0, log=True),
        "class_weight": t.suggest_categorical("class_weight", _WEIGHTS),
    },
    "knn": lambda t: {
        "k": t.suggest_int("k", 5, 100, log=True),
        "temperature": t.suggest_float("temperature", 0.01, 0.5, log=True),
        "class_weight": t.suggest_categorical("class_weight", _WEIGHTS),
    },
    "mlp": lambda t: {
        "hidden": t.suggest_categorical("hidden", [128, 256, 512]),
        "alpha": t.suggest_float("alpha", 1e-5, 1e-1, log=True),
        "learning_rate": t.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        "class_weight": t.suggest_categorical("class_weight", _WEIGHTS),
    },
    "lgbm": lambda t: {
        "n_estimators": t.suggest_int("n_estimators", 100, 600, step=50),
        "learning_rate": t.suggest_float("learning_rate", 0.01, 0.2, log=True),
        "num_leaves": t.suggest_int("num_leaves", 7, 63, log=True),
        "min_child_samples": t.suggest_int("min_child_samples", 5, 60, log=True),
        "subsample": t.suggest_float("subsample", 0.5, 1.0),
        "colsample_bytree": t.suggest_float("colsample_bytree", 0.2, 1.0),
        "reg_lambda": t.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
        "pca": t.suggest_categorical("pca", [32, 64, 128]),
        "class_weight": t.suggest_categorical("class_weight", _WEIGHTS),
    },
}


#: Heads whose search sweeps one parameter along a warm-started path (the inner folds fit the whole path at once,
#: :meth:`embedstore.heads.LogRegHead.fit_paths`) instead of sampling it: head -> that parameter. The path takes
#: ``n_trials`` values log-spaced over the parameter's range in :data:`SEARCH_SPACES`, for every combination of
#: the space's categorical parameters; every point is stored as a trial of the study.
PATH_PARAMETERS = {"logreg": "C"}

#: The solver tolerance (the head's ``tol``) of the path's fits: scikit-learn's default, looser than the head's
#: own 1e-5. A path's fits only rank the values of C; the model of the chosen C is then fitted at the head's own
#: tolerance by the caller. On HAM10000 (MobileNetV2, 20 values of C, balanced class weights) each of the
#: tuned probe's six studies chose the same C at 1e-4 as at 1e-5, in 840 evaluations per inner study against
#: 2,361; at 3e-4 and 1e-3 (355 evaluations) one of the six chose the neighbouring C (BENCHMARKS.md, issue
#: 12). It is part of a path study's identity. A ``tol`` the user fixed (``-p logreg.tol=...``) is kept instead.
PATH_TOL = 1e-4


def cv_score(head, X, y, folds, metric: Callable, trial: optuna.Trial | None = None) -> float:
    """Mean of ``metric(y_test, proba, y_pred)`` over ``folds`` (a function of
    :func:`embedstore.metrics.metric_functions`); with a trial, report after each fold and prune.

    The folds of a head that runs on one core (LightGBM) are fitted side by side on the usable cores and
    reported in fold order, so a trial's scores, and where it is pruned, are those of the folds run one by one.
    """

    def score(fold) -> float:
        train, test = fold
        fitted = fit_paths(head, X, y, [train])[0][0]  # a head takes its rows from X: no copy of their every column
        proba = predict_rows(fitted, X, test)
        return float(metric(y[test], proba, decide(fitted, proba)))

    scores = []
    with closing(in_order(score, folds, side_by_side(head))) as fold_scores:
        for k, value in enumerate(fold_scores):
            scores.append(value)
            if trial is not None:
                trial.set_user_attr(f"fold_{k}", value)
                trial.report(float(np.mean(scores)), step=k)
                if trial.should_prune():
                    raise optuna.TrialPruned()
    return float(np.mean(scores))


def search_space(space: str) -> dict[str, str]:
    """The distributions ``SEARCH_SPACES[space]`` searches, as Optuna's JSON (part of a study's identity)."""
    optuna.logging.set_verbosity(logging.WARNING)  # the throw-away in-memory study below need not announce itself
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    SEARCH_SPACES[space](trial)
    return {name: optuna.distributions.distribution_to_json(d) for name, d in sorted(trial.distributions.items())}


def study_problem(space: str, y, folds, seed: int, fixed, n_trials: int | None = None, sampler: str = "tpe",
                  **context) -> dict:
    """Everything that decides a trial's value, as plain JSON: the problem a study may be reused for.

    This module adds what :func:`tune` sees (search space, fixed parameter names, labels, folds, seed, and for a
    path search the number of path values ``n_trials``); ``context`` is what only the caller knows (feature
    fingerprints, row ids, target, metric, decision, ...). ``fingerprint(study_problem(...))`` is the study's identity.
    """
    search = {"path": PATH_PARAMETERS[space], "values": n_trials,
              **({} if "tol" in fixed else {"tol": PATH_TOL})} if searches_path(space, fixed) else {}
    return {
        "protocol": 2,  # TPE seeded per finished trial, median pruner over folds; 2: every PCA on one BLAS thread
        "space": space,
        "distributions": search_space(space),
        **({"search": search} if search else {}),
        **({"sampler": sampler} if sampler != "tpe" and not search else {}),  # TPE's studies keep their identity
        "fixed": sorted(fixed),
        "labels": digest(y),
        "folds": [[digest(train), digest(test)] for train, test in folds],
        "seed": seed,
        **context,
    }


def tune(
    head,
    space: str,
    X,
    y,
    folds,
    metric: Callable,
    n_trials: int,
    storage: str,
    study_name: str,
    seed: int = 0,
    prefix: str = "",
    fixed: frozenset = frozenset(),
    on_trial: Callable[[optuna.study.Study, optuna.trial.FrozenTrial], None] | None = None,
    problem: dict | None = None,
    workers: int = 1,
    sampler: str = "tpe",
) -> tuple[dict, optuna.Study]:
    """Search ``SEARCH_SPACES[space]`` for ``head`` (its other parameters stay) and return the best parameters.

    ``prefix`` addresses a nested estimator's parameters (e.g. ``"head__"``);
    parameters in ``fixed`` were set by the user and are left out of the search.
    ``problem`` (from :func:`study_problem`) is the study's identity: a stored study
    of that name made for another problem is refused.

    Runs only the trials the stored study still lacks (a finished study runs
    none), so an interrupted probe resumes where it stopped, with the same result;
    the best of the study's first ``n_trials`` finished trials is returned, so
    ``n_trials=3`` gives the same answer after a longer run of the study as before it.

    ``workers`` > 1, or a storage on a database server (which other machines may be tuning at once), computes
    the trials of a sampled search in that many processes sharing the study (see the module's docstring); a
    path search is swept by one process under the study's claim lock, and the others reuse its points.
    ``sampler`` names one of :data:`SAMPLERS`. The workers are spawned, so a script that calls this with
    ``workers`` > 1 needs Python's ``if __name__ == "__main__":`` guard, as any multiprocessing spawn does.
    """
    if space not in SEARCH_SPACES:
        raise ConfigError(f"no search space for head {space!r}: tunable heads are {', '.join(SEARCH_SPACES)}")
    shared = workers > 1 or is_server(storage)
    study = _open_study(storage, study_name, sampler, problem, shared)

    if searches_path(space, fixed):
        with claim_lock(storage, study_name) if shared else nullcontext():  # one machine sweeps; the others reuse
            _fail_stale_trials(study)
            _path_search([study], head, space, X, y, [folds], metric, n_trials, prefix, fixed, on_trial)
        return _best(study, n_trials * len(_grid_choices(space, fixed)), fixed), study

    def objective(trial: optuna.Trial) -> float:
        if not shared:
            trial.set_user_attr("owner", _owner())  # a rerun tells a dead owner's trial (shared: set at the claim)
        params = {f"{prefix}{k}": v for k, v in SEARCH_SPACES[space](trial).items() if k not in fixed}
        value = cv_score(clone(head).set_params(**params), X, y, folds, metric, trial)
        faults.point("trial-commit")
        return value

    if shared:
        _tune_together(study, objective, n_trials, storage, seed, sampler, workers, on_trial)
        return _best(study, n_trials, fixed), study
    _fail_stale_trials(study)
    while (n_done := len(_finished(study))) < n_trials:
        study.sampler = SAMPLERS[sampler](_trial_seed(seed, n_done))
        study.optimize(objective, n_trials=1, callbacks=[on_trial] if on_trial else None)
        _check_scored(study, study.trials[-1].number)
    return _best(study, n_trials, fixed), study


def tune_many(head, space: str, X, y, fold_sets: list, metric: Callable, n_trials: int, storage: str,
              study_names: list[str], problems: list[dict | None], seed: int = 0, prefix: str = "",
              fixed: frozenset = frozenset(), workers: int = 1,
              sampler: str = "tpe") -> list[tuple[dict, optuna.Study]]:
    """:func:`tune` of ``head`` on several problems at once: ``fold_sets[i]`` are the folds of study
    ``study_names[i]`` (identity ``problems[i]``), e.g. the nested studies of every outer fold and of the final
    head of one probe.

    A path search, run here alone (one worker, a local storage), fits every path its studies lack together, in one
    :func:`embedstore.heads.base.fit_paths` call over all their folds: the rows they share pass through the matrix
    products once per round of evaluations for all of them. On the six studies of a nested HAM10000 probe (20 values
    of C, 3 inner folds each) that took 34 s against 45 s one study after another, in the same number of
    evaluations. The fits share a preconditioner and the standardisation of all their rows, so a study's values
    equal those of its study tuned alone (:func:`tune`, or several workers) to the path's tolerance, not bit for bit,
    and nothing is stored until the fit of all of them ends (a killed run fits every unfinished study again). Any
    other search runs study by study, as :func:`tune` does. Returns each study's best parameters and the study.
    """
    if not len(fold_sets) == len(study_names) == len(problems):
        raise ValueError(f"{len(fold_sets)} fold sets, {len(study_names)} study names, {len(problems)} problems")
    if not searches_path(space, fixed) or workers > 1 or is_server(storage):
        return [tune(head, space, X, y, folds, metric, n_trials, storage, name, seed, prefix, fixed,
                     problem=problem, workers=workers, sampler=sampler)
                for folds, name, problem in zip(fold_sets, study_names, problems)]
    _check_sampler(sampler)
    opened = open_storage(storage)  # one connection for all the studies
    studies = [_open_study(storage, name, sampler, problem, opened=opened)
               for name, problem in zip(study_names, problems)]
    for study in studies:
        _fail_stale_trials(study)
    _path_search(studies, head, space, X, y, fold_sets, metric, n_trials, prefix, fixed, None)
    n_points = n_trials * len(_grid_choices(space, fixed))
    return [(_best(study, n_points, fixed), study) for study in studies]


def _check_scored(study: optuna.Study, number: int) -> None:
    """Refuse trial ``number``, just computed here, if it failed: its metric was not a number on these folds."""
    if study.trials[number].state == optuna.trial.TrialState.FAIL:
        raise ConfigError(f"trial {number} of study {study.study_name!r} scored no number (NaN or infinite): "
                          "the metric is undefined on these folds; choose another --metric")


_CLAIMED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)


def _tune_together(study, objective, n_trials: int, storage: str, seed: int, sampler: str, workers: int,
                   on_trial) -> None:
    """Compute the study's missing trials in this process and up to ``workers - 1`` new ones, all sharing ``study``,
    and return once it holds ``n_trials`` finished ones (some may be other machines').

    The workers are spawned, not forked: a fork would inherit this process's OpenMP state, and FAISS or LightGBM
    then hang in the child. The objective, with the features and folds it closes over, is sent to each worker by
    cloudpickle through a pipe, so each worker holds one copy of the features. Each worker, this one included,
    gets its share of the cores. A spawned worker's error is raised here in one line once this process's current
    trial is done; then, as on this process's own error or Ctrl-C, the spawned workers are stopped at once, and
    their unfinished trials run again in the next run.
    """
    spawned = max(0, min(workers, n_trials - len(_finished(study))) - 1)
    if not spawned:  # one worker on a server storage: this process claims alone, on the threads it has
        _claim_trials(study, objective, n_trials, storage, seed, sampler, on_trial)
        return
    cores = max(1, usable_cores() // (spawned + 1))
    context = multiprocessing.get_context("spawn")
    ready, stopping, errors = context.Semaphore(0), context.Event(), context.SimpleQueue()
    heartbeat = (studies.HEARTBEAT_SECONDS, studies.GRACE_SECONDS)
    children, pipes = [], []
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: Ctrl-C reaches this process alone
    try:
        for k in range(1, spawned + 1):
            receive, send = context.Pipe(duplex=False)
            children.append(context.Process(target=_worker, daemon=True, args=(
                k, os.getpid(), storage, study.study_name, receive, n_trials, seed, sampler, cores, heartbeat,
                ready, stopping, errors)))
            children[-1].start()
            pipes.append(send)
    finally:
        signal.signal(signal.SIGINT, interrupt)

    def stop() -> None:
        multiprocessing.active_children()  # reap dead workers: their pids go, and their trials are seen as stale
        if not errors.empty():
            k, kind, message = errors.get()
            raise (ConfigError if kind == "ConfigError" else EmbedstoreError)(f"tuning worker {k}: {message}")

    try:
        payload = cloudpickle.dumps(objective)
        for send in pipes:
            with suppress(BrokenPipeError):  # a worker that died starting: its error, if any, is raised by stop()
                send.send_bytes(payload)
            send.close()
        del payload
        _wait_ready(children, ready)
        with threadpool_limits(limits=cores), parallel.core_budget(cores):
            _claim_trials(study, objective, n_trials, storage, seed, sampler, on_trial, stop=stop)
        for child in children:
            child.join()
        stop()
    except BaseException:
        stopping.set()  # this worker's error, a worker's error, or Ctrl-C: every worker stops
        for child in children:
            child.terminate()
        for child in children:
            child.join()
        raise


#: How long the first worker waits for the spawned ones to be ready before it starts without them.
_READY_SECONDS = 120


def _wait_ready(children, ready) -> None:
    """Wait until every spawned worker has opened the study (so the trials are spread over all of them from the
    first), or has died, or :data:`_READY_SECONDS` have passed."""
    deadline, waiting = time.monotonic() + _READY_SECONDS, len(children)
    while waiting > sum(not child.is_alive() for child in children) and time.monotonic() < deadline:
        if ready.acquire(timeout=0.2):
            waiting -= 1


def _worker(k: int, parent: int, storage: str, study_name: str, receive, n_trials: int, seed: int, sampler: str,
            cores: int, heartbeat: tuple[int, int], ready, stopping, errors) -> None:
    """A spawned worker's life: die with its parent, open its own connection to the storage, receive the
    objective, say it is ready, and claim trials on ``cores`` cores until the study is done or ``stopping`` is
    set; its error goes back to the first worker as (k, kind, first line), and sets ``stopping`` for the others."""
    _die_with_parent(parent)
    os.environ[faults.WORKER] = str(k)
    optuna.logging.set_verbosity(logging.WARNING)
    studies.HEARTBEAT_SECONDS, studies.GRACE_SECONDS = heartbeat
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage, shared=True),
                                  pruner=_pruner(sampler))
        objective = pickle.loads(receive.recv_bytes())
        receive.close()
        ready.release()
        with threadpool_limits(limits=cores), parallel.core_budget(cores):
            _claim_trials(study, objective, n_trials, storage, seed, sampler, None, stop=stopping.is_set)
    except Exception as exc:  # noqa: BLE001 - raised again by the first worker, in one line
        errors.put((k, type(exc).__name__, first_line(exc, None)))
        stopping.set()
        sys.exit(1)


def _die_with_parent(parent: int) -> None:
    """Make Linux kill this process when its parent dies (``PR_SET_PDEATHSIG``), so that no worker goes on
    claiming trials for a probe that was killed; and leave now if the parent died already."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # elsewhere: _claim_trials checks the parent before each claim
    if os.getppid() != parent:
        os._exit(1)


#: Seconds between looks at a study whose last trials other workers are computing, and between the lines that
#: say which trials it waits for.
_POLL_SECONDS = 1.0
_WAITING_NOTE_SECONDS = 60.0


def _claim_trials(study, objective, n_trials: int, storage: str, seed: int, sampler: str, on_trial,
                  stop=lambda: False) -> None:
    """Claim and compute trials of ``study`` until it holds ``n_trials`` finished ones, waiting for those that
    other workers are computing (and claiming again those queued after a worker died).

    The claim lock covers the stale-trial check, the count, the ask and the naming of the trial's owner, so no
    two workers claim the last trial and, under a lock every worker shares, a RUNNING trial without an owner is
    one whose worker died while it held the lock. A queued retry is asked first (Optuna asks WAITING trials
    before sampling). The sampler is seeded by the number of trials claimed before, as one worker seeds by the
    number finished. ``stop`` is called before each claim: it raises, or returns True, to end the loop.
    """
    parent, waited = os.getppid(), None  # when this worker began waiting for others' trials
    while True:
        if stop() or (multiprocessing.parent_process() is not None and os.getppid() != parent):
            return  # stopped, or the first worker is gone and so is the probe this worker tuned for
        with claim_lock(storage, study.study_name) as release:
            _fail_stale_trials(study, retry=True, ownerless_dead=lock_is_global(storage))
            if len(_finished(study)) >= n_trials:
                return
            claimed = study.get_trials(deepcopy=False, states=_CLAIMED)
            waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in claimed)
            if len(claimed) >= n_trials and not waiting:
                release()
                waited = waited or time.monotonic()
                if time.monotonic() - waited > _WAITING_NOTE_SECONDS:
                    _note_waiting(study)
                    waited = time.monotonic()
                time.sleep(_POLL_SECONDS)
                continue
            study.sampler = SAMPLERS[sampler](_trial_seed(seed, _slot(study, len(claimed) - waiting)))
            asked, ended, waited = [], [], None  # ended: "taken" (failed as stale by another worker) or "returned"

            def claimed_objective(trial: optuna.Trial) -> float:
                faults.point("trial-claimed")
                trial.set_user_attr("owner", _owner())
                release()  # the trial is RUNNING under its owner's name: others may claim while it computes
                asked.append(trial.number)
                try:
                    value = objective(trial)
                except optuna.exceptions.UpdateFinishedTrialError:
                    ended.append("taken")  # its fold scores could not be stored: another worker failed it
                    raise
                except optuna.TrialPruned:
                    ended.append("returned")  # pruned: Optuna tells it, and may find it taken back meanwhile
                    raise
                ended.append("returned")
                return value

            try:
                study.optimize(claimed_objective, n_trials=1, callbacks=[on_trial] if on_trial else None)
            except Exception as exc:
                told_too_late = ended == ["returned"] and isinstance(exc, ValueError) and \
                    study.trials[asked[0]].state == optuna.trial.TrialState.FAIL  # "Cannot tell a FAIL trial."
                if ended == ["taken"] or told_too_late:
                    continue  # taken back as stale (and queued again, unless retried enough): not this worker's error
                raise EmbedstoreError(f"tuning study {study.study_name!r}: {first_line(exc, None)}") from None
        _check_scored(study, asked[0])


def _slot(study: optuna.Study, place: int) -> int | str:
    """What seeds the sampler for the trial at ``place`` among the claimed ones: the place, or, once some trials
    were given up after :data:`embedstore.studies.MAX_RETRY` retries, the place and how many (so a configuration
    that kills its worker every time is not sampled again for ever)."""
    given_up = sum(len(t.system_attrs.get("retry_history", [])) >= studies.MAX_RETRY
                   for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
    return f"{place}:{given_up}" if given_up else place


def _note_waiting(study: optuna.Study) -> None:
    """Say, on stderr, which running trials a worker with nothing left to claim is waiting for."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    names = ", ".join(f"{t.number} ({t.user_attrs.get('owner', 'no owner')}, since {t.datetime_start:%H:%M:%S})"
                      for t in running[:5])
    print(f"embedstore: study {study.study_name!r} waits for trial(s) {names} of other workers; a worker lost on "
          "another machine is noticed by the heartbeat of a database storage only", file=sys.stderr, flush=True)


def searches_path(space: str, fixed) -> bool:
    """Whether ``space`` is searched along a path: its head has a path parameter, and the user did not fix it."""
    return space in PATH_PARAMETERS and PATH_PARAMETERS[space] not in fixed


def _best(study: optuna.Study, n_trials: int, fixed) -> dict:
    """The parameters of the best of the study's first ``n_trials`` finished trials (a longer study stored
    earlier changes nothing; of equal values, the earliest)."""
    complete = [t for t in _finished(study)[:n_trials] if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"study {study.study_name!r} has no completed trial; every trial failed or was pruned")
    best = max(complete, key=lambda t: t.value)
    return {k: v for k, v in best.params.items() if k not in fixed}


def _grid_choices(space: str, fixed) -> list[dict]:
    """Every combination of the categorical parameters of ``space`` that are not ``fixed``, as dicts."""
    choices = [{}]
    for name, dist in search_distributions(space).items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution) and name not in fixed:
            choices = [{**c, name: v} for c in choices for v in dist.choices]
    return choices


def search_distributions(space: str) -> dict[str, optuna.distributions.BaseDistribution]:
    """The distributions ``SEARCH_SPACES[space]`` searches, by parameter name."""
    return {name: optuna.distributions.json_to_distribution(d) for name, d in search_space(space).items()}


def path_values(space: str, n: int) -> np.ndarray:
    """The ``n`` values of the path parameter of ``space``: log-spaced over its range, increasing."""
    dist = search_distributions(space)[PATH_PARAMETERS[space]]
    return np.logspace(np.log10(dist.low), np.log10(dist.high), n)


def _path_search(studies, head, space, X, y, fold_sets, metric, n_trials, prefix, fixed, on_trial) -> None:
    """Add to each study of ``studies`` (whose folds are ``fold_sets[i]``) a trial for every point of the path
    grid it lacks: per combination of the categorical parameters, each fold of every study that lacks a point fits
    the whole path once (warm-started, at the screening tolerance :data:`PATH_TOL`), all of them together in one
    :func:`fit_paths` call, and scores every point.

    A study's points of a combination are stored when all the fits are done, in grid order, skipping those a
    killed run stored already, so a resumed study holds the trials of an uninterrupted one, in the same order
    (their values equal to the path's tolerance where the studies fitted together differ: :func:`tune_many`).
    """
    param = PATH_PARAMETERS[space]
    values = path_values(space, n_trials)
    distributions = {k: v for k, v in search_distributions(space).items() if k not in fixed}
    stored = [{_params_key(t.params) for t in _finished(study)} for study in studies]
    for choice in _grid_choices(space, fixed):
        points = [{**choice, param: float(v)} for v in values]
        missing = [[_params_key(p) not in keys for p in points] for keys in stored]
        lacking = [i for i, gaps in enumerate(missing) if any(gaps)]
        if not lacking:
            continue
        screen = {} if "tol" in fixed else {"tol": PATH_TOL}  # a tol the user set is kept (and in the identity)
        estimator = clone(head).set_params(**{f"{prefix}{k}": v for k, v in {**choice, **screen}.items()})
        # every lacking study's folds in one call: their fits share the matrix and its passes
        paths = iter(fit_paths(estimator, X, y, [train for i in lacking for train, _ in fold_sets[i]], values))
        for i in lacking:
            scores = np.empty((len(fold_sets[i]), len(values)))
            for k, (_, test) in enumerate(fold_sets[i]):
                path = next(paths)
                for j, (fitted, proba) in enumerate(zip(path, predict_path(path, X, test))):
                    scores[k, j] = metric(y[test], proba, decide(fitted, proba))
            _store_points(studies[i], points, missing[i], scores, distributions, on_trial)


def _store_points(study, points, missing, scores, distributions, on_trial) -> None:
    """Add the ``missing`` ``points`` of a path to ``study``, each scored by the mean of its folds' ``scores``."""
    for j, params in enumerate(points):
        if not missing[j]:
            continue
        value = float(np.mean(scores[:, j]))
        trial = optuna.trial.create_trial(
            params={k: v for k, v in params.items() if k in distributions}, distributions=distributions,
            value=value if np.isfinite(value) else None,
            state=optuna.trial.TrialState.COMPLETE if np.isfinite(value) else optuna.trial.TrialState.FAIL,
            user_attrs={"owner": _owner(), **{f"fold_{k}": float(scores[k, j]) for k in range(len(scores))}},
        )
        faults.point("trial-commit")
        study.add_trial(trial)
        if on_trial is not None:
            on_trial(study, study.trials[-1])


def _open_study(storage: str, study_name: str, sampler: str, problem: dict | None,
                shared: bool = False, opened: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or load the study, claimed for ``problem`` (:func:`_claim`; None: no identity to check), once
    ``sampler`` is known; ``shared`` opens the storage with heartbeats (:func:`embedstore.studies.open_storage`),
    unless it is ``opened`` already (several studies in one storage)."""
    _check_sampler(sampler)
    optuna.logging.set_verbosity(logging.WARNING)
    opened = open_storage(storage, shared=shared) if opened is None else opened
    try:
        study = optuna.create_study(study_name=study_name, storage=opened, direction="maximize",
                                    pruner=_pruner(sampler), load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - a read-only file, a refused login, a full disk: the user's to fix
        raise ConfigError(f"cannot open study {study_name!r} in {shown_url(storage)}: {first_line(exc, None)}") from None
    if problem is not None:
        _claim(study, problem, storage)
    return study


def _check_sampler(sampler: str) -> None:
    """Refuse, in one line, a sampler that is none of :data:`SAMPLERS` (before any storage is opened)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"no sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")


def _pruner(sampler: str) -> optuna.pruners.BasePruner:
    """The median pruner for TPE; none for the random sampler, whose trials must not depend on each other."""
    if sampler == "random":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def _claim(study: optuna.Study, problem: dict, storage: str) -> None:
    """Mark a new study with ``problem``'s fingerprint; refuse a stored study made for another problem."""
    key = fingerprint(problem)
    stored = study.user_attrs.get("fingerprint")
    if stored is None and study.trials:
        raise ConfigError(f"study {study.study_name!r} in {shown_url(storage)} has trials of an unknown problem (no fingerprint: "
                          "an older embedstore or another tool made it); pass another --study-name or --storage")
    if stored is not None and stored != key:
        raise ConfigError(f"study {study.study_name!r} in {shown_url(storage)} was tuned for another problem (fingerprint "
                          f"{stored}, this one is {key}: other features, rows, folds, seed, head, parameters or "
                          "metric, or an earlier embedstore whose trials are computed otherwise); pass another "
                          "--study-name or --storage")
    if stored is None:
        study.set_user_attr("problem", problem)
        study.set_user_attr("fingerprint", key)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def _fail_stale_trials(study: optuna.Study, retry: bool = False, ownerless_dead: bool = True) -> None:
    """Mark FAIL the trials a dead process of this machine left RUNNING (killed mid-trial), so they neither count
    nor block; with ``retry`` (workers sharing the study, under its claim lock), queue each again with the same
    parameters, and fail those of other machines whose heartbeat went silent. A RUNNING trial without an owner
    counts as dead when ``ownerless_dead``: one worker alone, or workers under a lock they all share (a worker names
    itself before it lets go of the lock, so an owner-less trial's worker died holding it).
    """
    if retry:
        fail_silent_trials(study)  # other machines' trials, by their heartbeat (RDB storages)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("owner", ":")).rpartition(":")
        local = host == socket.gethostname() or (host == "" and ownerless_dead)
        mine = pid == str(os.getpid())  # this process computes no trial while it checks: the pid was a killed run's
        if local and (mine or not (pid.isdigit() and pid_alive(int(pid)))):
            try:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # finished meanwhile (a worker of another command, outside this lock)
            if retry:
                requeue(study, trial)


def _params_key(params: dict) -> tuple:
    """A trial's parameters as a hashable key (to tell which path points a study holds already)."""
    return tuple(sorted(params.items(), key=str))


def _owner() -> str:
    """``host:pid`` of this process, recorded on every trial it computes."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _trial_seed(seed: int, n_done: int) -> int:
    """The sampler seed of the trial that follows ``n_done`` finished ones: a function of the history only."""
    return int(hashlib.sha256(f"{seed}:{n_done}".encode()).hexdigest()[:8], 16)

