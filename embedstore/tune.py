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

Resuming is deterministic: trials run one at a time, each sampled by a TPE
sampler seeded by (seed, number of finished trials), so a trial's parameters
depend on the study's history only, never on how many processes it took.
A trial left RUNNING by a dead process (killed mid-trial) is marked FAIL when
the study is resumed; it neither counts nor shifts the seeds. One process at a
time works on a study.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from contextlib import closing

import numpy as np
import optuna
from sklearn.base import clone

from embedstore import faults
from embedstore.atomic import pid_alive
from embedstore.errors import ConfigError, first_line
from embedstore.heads.base import fit_paths, predict_rows, side_by_side
from embedstore.heads.decision import decide
from embedstore.parallel import in_order
from embedstore.store import digest, fingerprint

SpaceFn = Callable[[optuna.Trial], dict]

_WEIGHTS = ["balanced", None]

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


def study_problem(space: str, y, folds, seed: int, fixed, n_trials: int | None = None, **context) -> dict:
    """Everything that decides a trial's value, as plain JSON: the problem a study may be reused for.

    This module adds what :func:`tune` sees (search space, fixed parameter names, labels, folds, seed, and for a
    path search the number of path values ``n_trials``); ``context`` is what only the caller knows (feature
    fingerprints, row ids, target, metric, decision, ...). ``fingerprint(study_problem(...))`` is the study's identity.
    """
    search = {"path": PATH_PARAMETERS[space], "values": n_trials} if searches_path(space, fixed) else {}
    return {
        "protocol": 2,  # TPE seeded per finished trial, median pruner over folds; 2: every PCA on one BLAS thread
        "space": space,
        "distributions": search_space(space),
        **({"search": search} if search else {}),
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
    """
    if space not in SEARCH_SPACES:
        raise ConfigError(f"no search space for head {space!r}: tunable heads are {', '.join(SEARCH_SPACES)}")
    optuna.logging.set_verbosity(logging.WARNING)
    study = _open_study(storage, study_name)
    if problem is not None:
        _claim(study, problem, storage)
    _fail_stale_trials(study)

    if searches_path(space, fixed):
        _path_search(study, head, space, X, y, folds, metric, n_trials, prefix, fixed, on_trial)
        return _best(study, n_trials * len(_grid_choices(space, fixed)), fixed), study

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("owner", _owner())  # a rerun tells a dead owner's trial
        params = {f"{prefix}{k}": v for k, v in SEARCH_SPACES[space](trial).items() if k not in fixed}
        value = cv_score(clone(head).set_params(**params), X, y, folds, metric, trial)
        faults.point("trial-commit")
        return value

    while (n_done := len(_finished(study))) < n_trials:
        study.sampler = optuna.samplers.TPESampler(seed=_trial_seed(seed, n_done))
        study.optimize(objective, n_trials=1, callbacks=[on_trial] if on_trial else None)
        last = study.trials[-1]
        if last.state == optuna.trial.TrialState.FAIL:
            raise ConfigError(f"trial {last.number} of study {study_name!r} scored no number (NaN or infinite): "
                              "the metric is undefined on these folds; choose another --metric")
    return _best(study, n_trials, fixed), study


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


def _path_search(study, head, space, X, y, folds, metric, n_trials, prefix, fixed, on_trial) -> None:
    """Add to ``study`` a trial for every point of the path grid it lacks: per combination of the categorical
    parameters, each fold fits the whole path (warm-started) once and scores every point.

    A combination's points are stored when all its folds are done, in grid order, skipping those a killed run
    stored already, so a resumed study holds the trials of an uninterrupted one, in the same order.
    """
    param = PATH_PARAMETERS[space]
    values = path_values(space, n_trials)
    distributions = {k: v for k, v in search_distributions(space).items() if k not in fixed}
    stored = {_params_key(t.params) for t in _finished(study)}
    for choice in _grid_choices(space, fixed):
        points = [{**choice, param: float(v)} for v in values]
        missing = [_params_key(p) not in stored for p in points]
        if not any(missing):
            continue
        estimator = clone(head).set_params(**{f"{prefix}{k}": v for k, v in choice.items()})
        scores = np.empty((len(folds), len(values)))
        paths = fit_paths(estimator, X, y, [train for train, _ in folds], values)  # the folds' fits share the matrix
        for k, ((_, test), path) in enumerate(zip(folds, paths)):
            for j, fitted in enumerate(path):
                proba = predict_rows(fitted, X, test)
                scores[k, j] = metric(y[test], proba, decide(fitted, proba))
        for j, params in enumerate(points):
            if not missing[j]:
                continue
            value = float(np.mean(scores[:, j]))
            trial = optuna.trial.create_trial(
                params={k: v for k, v in params.items() if k in distributions}, distributions=distributions,
                value=value if np.isfinite(value) else None,
                state=optuna.trial.TrialState.COMPLETE if np.isfinite(value) else optuna.trial.TrialState.FAIL,
                user_attrs={"owner": _owner(), **{f"fold_{k}": float(scores[k, j]) for k in range(len(folds))}},
            )
            faults.point("trial-commit")
            study.add_trial(trial)
            if on_trial is not None:
                on_trial(study, study.trials[-1])


def _open_study(storage: str, study_name: str) -> optuna.Study:
    try:
        return optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction="maximize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
            load_if_exists=True,
        )
    except Exception as exc:  # noqa: BLE001 - a malformed URL, unknown dialect or missing driver is the user's input
        raise ConfigError(f"cannot open Optuna storage {storage!r}: {first_line(exc, None)}") from None


def _claim(study: optuna.Study, problem: dict, storage: str) -> None:
    """Mark a new study with ``problem``'s fingerprint; refuse a stored study made for another problem."""
    key = fingerprint(problem)
    stored = study.user_attrs.get("fingerprint")
    if stored is None and study.trials:
        raise ConfigError(f"study {study.study_name!r} in {storage} has trials of an unknown problem (no fingerprint: "
                          "an older embedstore or another tool made it); pass another --study-name or --storage")
    if stored is not None and stored != key:
        raise ConfigError(f"study {study.study_name!r} in {storage} was tuned for another problem (fingerprint "
                          f"{stored}, this one is {key}: other features, rows, folds, seed, head, parameters or "
                          "metric, or an earlier embedstore whose trials are computed otherwise); pass another "
                          "--study-name or --storage")
    if stored is None:
        study.set_user_attr("problem", problem)
        study.set_user_attr("fingerprint", key)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def _fail_stale_trials(study: optuna.Study) -> None:
    """Mark FAIL the trials a dead process left RUNNING (killed mid-trial), so they neither count nor block."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("owner", ":")).rpartition(":")
        if host in ("", socket.gethostname()) and not (pid.isdigit() and pid_alive(int(pid))):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def _params_key(params: dict) -> tuple:
    """A trial's parameters as a hashable key (to tell which path points a study holds already)."""
    return tuple(sorted(params.items(), key=str))


def _owner() -> str:
    """``host:pid`` of this process, recorded on every trial it computes."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _trial_seed(seed: int, n_done: int) -> int:
    """The sampler seed of the trial that follows ``n_done`` finished ones: a function of the history only."""
    return int(hashlib.sha256(f"{seed}:{n_done}".encode()).hexdigest()[:8], 16)

