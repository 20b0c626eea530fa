"""Optuna studies for the heads: search spaces (declared here, in one place), pruning across folds, storage.

A study maximises the mean of one metric over group folds. Each trial
reports its running mean after every fold, so the median pruner stops a bad
trial after a fold or two instead of paying for all of them; per-fold scores
are kept as trial user attributes. Studies live in an Optuna storage (by
default a sqlite file beside the feature store) and are created with
``load_if_exists=True``, so rerunning an interrupted probe resumes its study
and only runs the trials still missing. ``optuna-dashboard sqlite:///...`` shows them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
from sklearn.base import clone

from embedstore.errors import ConfigError
from embedstore.heads.decision import decide

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


def default_storage(store_path: str | Path) -> str:
    """``sqlite:///<store folder>/<store name>.optuna.db``: studies sit beside the store they tune on."""
    store_path = Path(store_path).resolve()
    return f"sqlite:///{store_path.parent / (store_path.name.removesuffix('.zarr') + '.optuna.db')}"


def cv_score(head, X, y, folds, metric: Callable, trial: optuna.Trial | None = None) -> float:
    """Mean of ``metric(y_test, proba, y_pred)`` over ``folds`` (a function of
    :func:`embedstore.metrics.metric_functions`); with a trial, report after each fold and prune."""
    scores = []
    for k, (train, test) in enumerate(folds):
        fitted = clone(head).fit(_rows(X, train), y[train])
        proba = fitted.predict_proba(_rows(X, test))
        scores.append(float(metric(y[test], proba, decide(fitted, proba))))
        if trial is not None:
            trial.set_user_attr(f"fold_{k}", scores[-1])
            trial.report(float(np.mean(scores)), step=k)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return float(np.mean(scores))


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
) -> tuple[dict, optuna.Study]:
    """Search ``SEARCH_SPACES[space]`` for ``head`` (its other parameters stay) and return the best parameters.

    ``prefix`` addresses a nested estimator's parameters (e.g. ``"head__"``);
    parameters in ``fixed`` were set by the user and are left out of the search.

    Runs only the trials the stored study still lacks (a finished study runs
    none), so an interrupted probe resumes where it stopped.
    """
    if space not in SEARCH_SPACES:
        raise ConfigError(f"no search space for head {space!r}: tunable heads are {', '.join(SEARCH_SPACES)}")
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
            load_if_exists=True,
        )
    except Exception as exc:  # noqa: BLE001 - a malformed URL, unknown dialect or missing driver is the user's input
        raise ConfigError(f"cannot open Optuna storage {storage!r}: {str(exc).splitlines()[0]}") from None
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]

    def objective(trial: optuna.Trial) -> float:
        params = {f"{prefix}{k}": v for k, v in SEARCH_SPACES[space](trial).items() if k not in fixed}
        return cv_score(clone(head).set_params(**params), X, y, folds, metric, trial)

    remaining = max(0, n_trials - len(done))
    if remaining:
        study.optimize(objective, n_trials=remaining, callbacks=[on_trial] if on_trial else None)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"study {study_name!r} has no completed trial; every trial failed or was pruned")
    return {k: v for k, v in study.best_params.items() if k not in fixed}, study


def _rows(X, rows):
    return X.iloc[rows] if hasattr(X, "iloc") else X[rows]
