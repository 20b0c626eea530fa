"""The probe run: classical heads on cached features, evaluated on group folds, written as a run folder.

Protocol (every step seeded by ``seed``):

1. Load the feature sets from the store (rows every set has), the target, the
   group column and any metadata columns; drop rows without a target.
2. Split: an official train/(validation/)test column (``split_column``, values
   mapped by ``split_map``), a stratified group hold-out (``holdout``), or none
   (cross-validation only). Validation rows are never scored: with tuning they
   choose the final head's hyperparameters (one fold: fit on train, score on
   validation) and the final head is refitted on train + validation; without
   tuning they are left out (``split_map: {valid: train}`` folds them into training).
3. Stratified group k-fold on the training rows. For each fold a model is
   fitted on the other folds and predicts this one: the out-of-fold (OOF)
   predictions. With ``trials > 0`` each fold first runs its own Optuna study
   on its training part only (inner group folds), so the OOF estimate is nested
   and no hyperparameter ever saw the rows it is scored on. A study is reused
   only by exactly the same problem (:func:`embedstore.tune.study_problem`).
4. The final head: hyperparameters tuned on all training rows (outer folds,
   or the validation rows when there are some), refitted on all of them (and
   the validation rows), saved with a model card; it predicts the test rows
   when there are any.
5. Metrics on the test predictions (or the OOF ones without a test split), each
   with a bootstrap 95% interval resampled by group; per-fold metrics; a t-SNE
   map; then the report, when :mod:`embedstore.report` can write one.

Several ``features`` entries and/or several ``heads`` make a comparison: every
entry × head is evaluated the same way and tabulated (CSV, Markdown, LaTeX);
the best one (by the first headline metric) becomes the run's head.

The run folder is written aside and replaces ``out`` in one step
(:func:`embedstore.atomic.replacing_folder`): only a folder that an earlier
run wrote, only with ``overwrite``, checked before any model is fitted. The
head is saved with skops (:mod:`embedstore.heads.saved`), never as a pickle.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from embedstore import __version__
from embedstore.atomic import check_replaceable, replacing_folder, write_file
from embedstore.errors import ConfigError, EmbedstoreError, StoreError, reject_unknown_options
from embedstore.heads import (DECISIONS, HEADS, BalancedDecision, StackHead, coerce_params, decide, load_head,
                              make_head, save_head, select_columns)
from embedstore.heads.saved import MODEL_FILE
from embedstore.metrics import bootstrap_ci, evaluate, metric_functions
from embedstore.splits import ColumnSplit, check_disjoint, column_split, group_holdout, group_kfold
from embedstore.store import FeatureStore, digest, fingerprint
from embedstore.tune import SEARCH_SPACES, default_storage, study_problem, tune

MULTICLASS_HEADLINE = ["balanced_accuracy", "roc_auc", "accuracy", "f1_macro"]
BINARY_HEADLINE = ["roc_auc", "pauc_80", "balanced_accuracy", "sensitivity_at_90_specificity", "average_precision"]
METADATA_HEADS = {"lgbm"}


@dataclass
class ProbeConfig:
    """Everything a probe run depends on; ``config.yaml`` is this, resolved, and reruns it."""

    store: str
    target: str
    features: list[str]  # each entry a feature set, or several joined by "+" (concatenated / stacked)
    out: str = "runs/probe"
    overwrite: bool = False  # replace an existing run folder at ``out`` (never a folder embedstore did not write)
    groups: str | None = None
    heads: list[str] = field(default_factory=lambda: ["logreg"])
    stack_heads: list[str] = field(default_factory=lambda: ["logreg"])  # stack bases, one per feature set each
    stack_joint: list[str] = field(default_factory=list)  # stack bases on all feature sets of the entry at once
    metadata: list[str] = field(default_factory=list)
    positive: str | None = None  # makes a binary "positive vs rest" problem of the target
    folds: int = 5
    inner_folds: int = 3
    split_column: str | None = None
    split_map: dict = field(default_factory=dict)  # split-column value -> train, test, valid or drop
    holdout: float = 0.0
    trials: int = 0
    metric: str | None = None  # tuning metric; default balanced_accuracy (multiclass) or roc_auc (binary)
    decision: str = "argmax"  # predicted class: "argmax", or "balanced" (argmax of p / training class prior)
    params: dict = field(default_factory=dict)  # fixed head parameters, e.g. {logreg: {C: 1.0}}
    storage: str | None = None
    study_name: str | None = None
    seed: int = 0
    n_boot: int = 1000
    tsne_max: int = 3000
    blas_threads: int = 1  # BLAS threads; one is fastest for these small solves on a shared CPU
    report: bool = True

    @classmethod
    def from_dict(cls, raw: dict) -> "ProbeConfig":
        reject_unknown_options(raw, {f.name for f in fields(cls)}, "probe")
        missing = [k for k in ("store", "target", "features") if not raw.get(k)]
        if missing:
            raise ConfigError(f"probe needs {', '.join(missing)} (on the command line or in the config file)")
        raw = dict(raw)
        for key in ("features", "heads", "stack_heads", "stack_joint", "metadata"):
            if isinstance(raw.get(key), str):
                raw[key] = [s.strip() for s in raw[key].split(",") if s.strip()]
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for head in [*self.heads, *self.stack_heads, *self.stack_joint]:
            if head not in HEADS and head != "stack":
                raise ConfigError(f"unknown head {head!r}: choose from {', '.join([*HEADS, 'stack'])}")
        if "stack" in [*self.stack_heads, *self.stack_joint]:
            raise ConfigError("stack_heads and stack_joint list the base heads of a stack; they cannot contain 'stack'")
        if self.folds < 2 or self.inner_folds < 2:
            raise ConfigError("folds and inner_folds must be at least 2")
        if self.decision not in DECISIONS:
            raise ConfigError(f"unknown decision {self.decision!r}: choose from {', '.join(DECISIONS)}")
        if self.trials < 0:
            raise ConfigError("--trials must be 0 (no tuning) or more")
        if self.split_column and self.holdout:
            raise ConfigError("give either a split column or a hold-out fraction, not both")
        if not isinstance(self.split_map, dict):
            raise ConfigError(f"split_map maps split-column values to train, valid, test or drop, not {self.split_map!r}")
        if self.split_map and not self.split_column:
            raise ConfigError("--split-map maps the values of a split column: give --split-column too")
        if self.metadata and not ({"lgbm", "stack"} & set(self.heads)):
            raise ConfigError("--metadata is read by the lgbm head (alone or in a stack): add --head lgbm or stack")
        if not isinstance(self.params, dict):
            raise ConfigError(f"params must map head names to their parameters (e.g. {{logreg: {{C: 0.5}}}}), "
                              f"not {self.params!r}")
        unknown = sorted(set(self.params) - set(HEADS) - {"stack"}, key=str)
        if unknown:
            raise ConfigError(f"params are keyed by head name; {unknown} is not a head")
        self.params = {head: coerce_params(head, values) for head, values in self.params.items()}


# ----------------------------------------------------------------------------- data


@dataclass
class ProbeData:
    """The aligned inputs of a probe: one DataFrame with every feature set's columns and the metadata."""

    X: pd.DataFrame
    y: np.ndarray  # class codes 0..K-1
    classes: list[str]
    groups: np.ndarray | None
    ids: np.ndarray
    table: pd.DataFrame
    feature_keys: dict[str, str]  # feature-set name as given -> store key
    columns: dict[str, list[str]]  # feature-set name -> its column names in X
    infos: dict[str, dict]


def _set_names(cfg: ProbeConfig) -> list[str]:
    names: list[str] = []
    for entry in cfg.features:
        for name in entry.split("+"):
            if name and name not in names:
                names.append(name)
    return names


def load_data(cfg: ProbeConfig, store: FeatureStore) -> ProbeData:
    """Features of every named set (rows all of them have), the target as codes, groups, metadata."""
    names = _set_names(cfg)
    keys = {name: store.resolve(name) for name in names}
    manifest = store.manifest
    for what, col in (("target", cfg.target), ("group", cfg.groups), ("split", cfg.split_column),
                      *(("metadata", c) for c in cfg.metadata)):
        if col and col not in manifest.columns:
            usable = ", ".join(c for c in manifest.columns if not c.startswith("_") and c not in ("sha256",))
            raise ConfigError(f"{what} column {col!r} is not in the store's table; it has: {usable}")
    labelled = manifest.set_index("id")[cfg.target].notna()
    ids = [i for i in common_ids(store, keys.values()) if labelled[i]]
    if not ids:
        raise ConfigError(f"no row has both features and a {cfg.target!r} value")
    X, table, columns = feature_frame(store, keys, cfg.metadata, ids)
    infos = {}
    for name, key in keys.items():
        info = store.info(key)
        infos[name] = {"key": key, "name": info.name, "encoder": info.encoder, "dim": info.dim}
    labels = table[cfg.target].astype(str).to_numpy()
    if cfg.positive is not None:
        if cfg.positive not in set(labels):
            raise ConfigError(f"positive class {cfg.positive!r} is not a value of {cfg.target!r}: {sorted(set(labels))[:10]}")
        classes = [f"not_{cfg.positive}", cfg.positive]
        y = (labels == cfg.positive).astype(int)
    else:
        classes = sorted(set(labels))
        y = np.searchsorted(classes, labels)
    if len(classes) < 2:
        raise ConfigError(f"target {cfg.target!r} has a single class ({classes[0]!r}); a probe needs two or more")
    groups = _group_labels(cfg, table)
    _check_class_groups(cfg, y, classes, groups)
    return ProbeData(X, y, classes, groups, np.asarray(ids), table, keys, columns, infos)


def _group_labels(cfg: ProbeConfig, table: pd.DataFrame) -> np.ndarray | None:
    """The group column as strings; ConfigError when some rows have none (each would silently be one group)."""
    if not cfg.groups:
        return None
    empty = int(table[cfg.groups].isna().sum())
    if empty:
        raise ConfigError(f"group column {cfg.groups!r} is empty in {empty} of {len(table)} rows: fill it (e.g. with "
                          "the image id, one group per image) or choose another --groups")
    return table[cfg.groups].astype(str).to_numpy()


def _check_class_groups(cfg: ProbeConfig, y: np.ndarray, classes: list[str], groups: np.ndarray | None) -> None:
    """ConfigError naming a class with fewer groups (images, without groups) than folds: a fold would miss it."""
    units = np.arange(len(y)) if groups is None else groups
    for code, n in pd.Series(units).groupby(y).nunique().items():
        if n < cfg.folds:
            what = f"{cfg.groups} group(s)" if cfg.groups else "image(s)"
            raise ConfigError(f"class {classes[code]!r} has {n} {what}, fewer than the {cfg.folds} folds: a fold has no "
                              f"rows of class {classes[code]!r}; use fewer folds (--folds) or merge rare classes")


def common_ids(store: FeatureStore, keys) -> list[str]:
    """Ids of the manifest rows that every feature set in ``keys`` has final, fresh features for."""
    ids = None
    for key in keys:
        _, t = store.load(key, columns=["id"])
        ids = t["id"] if ids is None else ids[ids.isin(set(t["id"]))]
    return list(ids)


def feature_frame(store: FeatureStore, keys: dict[str, str], metadata: list[str], ids):
    """The heads' input: ``<name>/<j>`` columns of each feature set, then the metadata columns.

    Returns the frame, the manifest rows it came from and each set's column names.
    Non-numeric metadata become pandas categoricals; numeric ones float (NaN kept).
    """
    blocks, columns, table = [], {}, None
    for name, key in keys.items():
        X, t = store.load(key, ids=ids)
        table = t if table is None else table
        columns[name] = [f"{name}/{j}" for j in range(X.shape[1])]
        blocks.append(pd.DataFrame(X, columns=columns[name]))
    frame = pd.concat(blocks, axis=1)
    for col in metadata:
        values = store.manifest.set_index("id").loc[table["id"], col].reset_index(drop=True)
        frame[col] = values.astype(float) if pd.api.types.is_numeric_dtype(values) else values.astype("category")
    return frame, table, columns


# ----------------------------------------------------------------------------- models


class ColumnsHead(ClassifierMixin, BaseEstimator):
    """A head that reads only ``columns`` of the probe's input frame (one feature set, or a concatenation)."""

    def __init__(self, head=None, columns=None):
        self.head = head
        self.columns = columns

    def fit(self, X, y):
        self.head_ = clone(self.head).fit(select_columns(X, self.columns), y)
        self.classes_ = self.head_.classes_
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "head_")
        return self.head_.predict_proba(select_columns(X, self.columns))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


@dataclass
class ModelSpec:
    """One model of the run: a feature entry and a head (with its stack bases when the head is a stack)."""

    entry: str
    head: str

    @property
    def name(self) -> str:
        return f"{self.entry} × {self.head}"


def _base_params(cfg: ProbeConfig, head: str) -> dict:
    params = {"seed": cfg.seed} if head != "stack" else {}
    params.update(cfg.params.get(head, {}))
    return params


def build_model(cfg: ProbeConfig, data: ProbeData, spec: ModelSpec, tuned: dict[str, dict] | None = None):
    """The estimator of ``spec``, reading the probe frame; ``tuned`` overrides parameters per base name.

    With ``decision: balanced`` it is wrapped in :class:`BalancedDecision` (same probabilities,
    balanced-accuracy decision).
    """
    tuned = tuned or {}
    sets = spec.entry.split("+")
    if spec.head != "stack":
        return _decided(cfg, _single(cfg, data, sets, spec.head, tuned.get(spec.head, {})))
    bases = []
    for base_name, base_sets, head in _stack_bases(cfg, sets):
        est = _single(cfg, data, base_sets, head, tuned.get(base_name, {}))
        bases.append((base_name, est.head, est.columns))
    return _decided(cfg, StackHead(bases=bases, n_splits=cfg.inner_folds, seed=cfg.seed, **cfg.params.get("stack", {})))


def _decided(cfg: ProbeConfig, model):
    return BalancedDecision(model) if cfg.decision == "balanced" else model


def stack_of(model) -> StackHead | None:
    """The (fitted or unfitted) stack inside ``model``, or None when it is no stack."""
    if isinstance(model, BalancedDecision):
        model = getattr(model, "estimator_", model.estimator)
    return model if isinstance(model, StackHead) else None


def _stack_bases(cfg: ProbeConfig, sets: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, feature sets, head) of each base of a stack over ``sets``."""
    bases = [(f"{name} × {head}", [name], head) for name in sets for head in cfg.stack_heads]
    return bases + [(f"{'+'.join(sets)} × {head}", sets, head) for head in cfg.stack_joint]


def _single(cfg: ProbeConfig, data: ProbeData, sets: list[str], head: str, tuned: dict) -> ColumnsHead:
    columns = [c for name in sets for c in data.columns[name]]
    params = {**_base_params(cfg, head), **tuned}
    if head in METADATA_HEADS and cfg.metadata:
        columns = [*columns, *cfg.metadata]
        params["passthrough"] = tuple(cfg.metadata)
    return ColumnsHead(make_head(head, **params), columns)


def _tunable(cfg: ProbeConfig, data: ProbeData, spec: ModelSpec) -> list[tuple[str, list[str], ColumnsHead, str]]:
    """(tuned-parameter key, feature sets, estimator, head name) of every part of ``spec`` that has
    hyperparameters to tune.

    Each part is scored with the run's decision rule (wrapped as :func:`build_model` wraps the model).
    """
    if spec.head != "stack":
        parts = [(spec.head, spec.entry.split("+"), spec.head)]
    else:
        parts = _stack_bases(cfg, spec.entry.split("+"))
    return [(name, sets, _decided(cfg, _single(cfg, data, sets, h, {})), h) for name, sets, h in parts]


# ----------------------------------------------------------------------------- the run


def _tune_metric(cfg: ProbeConfig, n_classes: int):
    name = cfg.metric or ("roc_auc" if n_classes == 2 else "balanced_accuracy")
    fns = metric_functions(n_classes)
    if name not in fns:
        raise ConfigError(f"unknown metric {name!r}: choose from {', '.join(fns)}")
    return name, fns[name]


def _fit(model, X: pd.DataFrame, y, groups, rows):
    """A fitted clone of ``model`` on ``rows`` (a stack also gets their groups for its inner folds)."""
    if stack_of(model) is not None:
        return clone(model).fit(X.iloc[rows], y[rows], groups=None if groups is None else groups[rows])
    return clone(model).fit(X.iloc[rows], y[rows])


class Probe:
    """One probe run; :func:`run_probe` is the entry point."""

    def __init__(self, cfg: ProbeConfig, progress=None):
        self.cfg = cfg
        self.progress = progress or (lambda event, message: None)  # event: "fold", "tuned" or "step"
        self.store = FeatureStore.open(cfg.store)
        self.data = load_data(cfg, self.store)
        self.metric_name, self.metric = _tune_metric(cfg, len(self.data.classes))
        self.storage = cfg.storage or default_storage(cfg.store)
        self._split()

    def _split(self) -> None:
        """Train, test and validation rows, the outer folds over the training rows, and what the final
        head is tuned and fitted on (``split`` says it, for run.json)."""
        cfg, d = self.cfg, self.data
        empty = np.array([], dtype=int)
        if cfg.split_column:
            split = column_split(d.table[cfg.split_column], cfg.split_map)
        elif cfg.holdout:
            split = ColumnSplit(*group_holdout(d.y, d.groups, cfg.holdout, cfg.seed, d.classes), empty, empty)
        else:
            split = ColumnSplit(np.arange(len(d.y)), empty, empty, empty)
        self.train, self.test = split.train, split.test
        self.valid = split.valid if cfg.trials else empty  # validation rows are used only to tune
        sides = {"training": self.train, "test": self.test, "validation": self.valid}
        if d.groups is not None:
            for a, b in (("training", "test"), ("training", "validation"), ("validation", "test")):
                if len(sides[a]) and len(sides[b]):
                    check_disjoint(d.groups, sides[a], sides[b], (a, b))
        for side, rows in sides.items():
            missing = set(range(len(d.classes))) - set(d.y[rows]) if len(rows) else set()
            if missing:
                raise ConfigError(f"the {side} rows have no {[d.classes[k] for k in sorted(missing)]}: "
                                  "every class needs rows on each side of the split")
        g = None if d.groups is None else d.groups[self.train]
        folds = group_kfold(d.y[self.train], g, cfg.folds, cfg.seed, class_names=d.classes)
        self.folds = [(self.train[tr], self.train[te]) for tr, te in folds]
        self.fit_rows = np.sort(np.concatenate([self.train, self.valid]))
        self.final_folds = [(self.train, self.valid)] if len(self.valid) else self.folds
        self.split = {
            "column": cfg.split_column, "map": cfg.split_map, "n_train": int(len(self.train)),
            "n_test": int(len(self.test)), "n_valid": int(len(split.valid)), "n_dropped": int(len(split.dropped)),
            "validation": ("chose the final head's hyperparameters (fit on train, scored on validation), "
                           "then the final head was refitted on train + validation") if len(self.valid) else
                          ("left out of training and scoring (no tuning); --split-map VALUE=train folds them "
                           "into training") if len(split.valid) else None,
        }
        self.studies: dict[tuple[str, str, str], str] = {}  # (model, part, scope) -> Optuna study name

    def _study_name(self, spec: ModelSpec, part: str, scope: str) -> str:
        """The study :meth:`_tune` used for ``part`` of ``spec`` at ``scope``; a stack's own head has one
        study per base, named here comma-separated."""
        if (spec.name, part, scope) in self.studies:
            return self.studies[spec.name, part, scope]
        return ", ".join(name for (model, _, sc), name in self.studies.items() if model == spec.name and sc == scope)

    def _problem(self, sets: list[str], head: str, rows: np.ndarray, scope: str) -> dict:
        """What, besides the search and the folds, decides the value of a trial tuning ``head`` on ``sets``."""
        cfg, d = self.cfg, self.data
        metadata = cfg.metadata if head in METADATA_HEADS else []
        return {
            "features": [d.feature_keys[name] for name in sets],
            "rows": digest(d.ids[rows]),
            "images": digest(d.table["sha256"].to_numpy()[rows]),
            "metadata": metadata,
            "metadata_values": digest(pd.util.hash_pandas_object(d.table[metadata].iloc[rows], index=False))
            if metadata else None,
            "target": cfg.target, "positive": cfg.positive, "classes": d.classes,
            "groups": cfg.groups, "scope": scope, "inner_folds": cfg.inner_folds,
            "head": head, "params": _base_params(cfg, head), "metric": self.metric_name, "decision": cfg.decision,
        }

    def _tune(self, spec: ModelSpec, rows: np.ndarray, folds, scope: str) -> dict[str, dict]:
        """Best parameters of every tunable part of ``spec``, searched on ``rows`` with ``folds`` only.

        Each part has its own study, named ``store:target:features:head:fingerprint:scope`` (or
        ``--study-name:features:head:scope``) and reused only by exactly the same problem.
        """
        if not self.cfg.trials:
            return {}
        tuned = {}
        for key, sets, est, head in _tunable(self.cfg, self.data, spec):
            if head not in SEARCH_SPACES:
                continue
            local = [(np.searchsorted(rows, tr), np.searchsorted(rows, te)) for tr, te in folds]
            fixed = frozenset(self.cfg.params.get(head, {}))
            problem = study_problem(head, self.data.y[rows], local, self.cfg.seed, fixed,
                                    **self._problem(sets, head, rows, scope))
            part = f"{'+'.join(sets)}:{head}"
            name = (f"{self.cfg.study_name}:{part}:{scope}" if self.cfg.study_name else
                    f"{Path(self.cfg.store).name}:{self.cfg.target}{':' + self.cfg.positive if self.cfg.positive else ''}"
                    f":{part}:{fingerprint(problem)}:{scope}")
            self.studies[spec.name, key, scope] = name
            tuned[key], _ = tune(
                est, head, self.data.X.iloc[rows], self.data.y[rows], local, self.metric, self.cfg.trials,
                self.storage, name, self.cfg.seed,
                prefix="estimator__head__" if isinstance(est, BalancedDecision) else "head__",
                fixed=fixed, problem=problem,
            )
            self.progress("tuned", f"tuned {key} ({scope}): {tuned[key]}")
        return tuned

    def evaluate_model(self, spec: ModelSpec) -> dict:
        """OOF (and test) probabilities and predicted classes, per-fold metrics, the final fitted model of one spec."""
        cfg, d = self.cfg, self.data
        oof = np.full((len(d.y), len(d.classes)), np.nan)
        oof_pred = np.full(len(d.y), -1)
        base_oof: dict[str, np.ndarray] = {}
        fold_rows = []
        for k, (train, test) in enumerate(self.folds):
            t0 = time.perf_counter()
            tuned = {}
            if cfg.trials:
                inner = group_kfold(d.y[train], None if d.groups is None else d.groups[train], cfg.inner_folds, cfg.seed,
                                    class_names=d.classes)
                tuned = self._tune(spec, train, [(train[a], train[b]) for a, b in inner], f"fold{k}")
            model = _fit(build_model(cfg, d, spec, tuned), d.X, d.y, d.groups, train)
            oof[test] = model.predict_proba(d.X.iloc[test])
            oof_pred[test] = decide(model, oof[test])
            stack = stack_of(model)
            if stack is not None:
                for name, p in stack.base_probas(d.X.iloc[test]).items():
                    base_oof.setdefault(name, np.full_like(oof, np.nan))[test] = p
            scores = evaluate(d.y[test], oof[test], oof_pred[test])
            fold_rows.append({"model": spec.name, "fold": k, "n_train": len(train), "n_test": len(test),
                              **scores, "seconds": round(time.perf_counter() - t0, 2)})
            self.progress("fold", f"{spec.name}: fold {k + 1}/{len(self.folds)} {self.metric_name}={scores[self.metric_name]:.3f}")
        tuned = self._tune(spec, self.fit_rows, self.final_folds, "final")
        final = _fit(build_model(cfg, d, spec, tuned), d.X, d.y, d.groups, self.fit_rows)
        test_proba = final.predict_proba(d.X.iloc[self.test]) if len(self.test) else None
        test_pred = decide(final, test_proba) if len(self.test) else None
        stack = stack_of(final)
        base_test = stack.base_probas(d.X.iloc[self.test]) if stack is not None and len(self.test) else {}
        return {"spec": spec, "oof": oof, "oof_pred": oof_pred, "test": test_proba, "test_pred": test_pred,
                "folds": fold_rows, "model": final, "tuned": tuned, "base_oof": base_oof, "base_test": base_test}

    # ------------------------------------------------------------------ metrics

    def headline_names(self) -> list[str]:
        return BINARY_HEADLINE if len(self.data.classes) == 2 else MULTICLASS_HEADLINE

    def scored_rows(self) -> np.ndarray:
        return self.test if len(self.test) else self.train

    def metrics_with_ci(self, proba: np.ndarray, pred: np.ndarray | None = None) -> dict[str, dict]:
        """Every metric of ``proba`` and the predicted classes ``pred`` (default: the argmax of ``proba``),
        rows aligned with :meth:`scored_rows`; headline metrics with grouped CIs."""
        d, rows = self.data, self.scored_rows()
        y = d.y[rows]
        pred = proba.argmax(1) if pred is None else pred
        groups = None if d.groups is None else d.groups[rows]
        out = {}
        for name, fn in metric_functions(len(d.classes)).items():
            if name in self.headline_names():
                ci = bootstrap_ci(fn, y, proba, pred, groups=groups, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
                out[name] = {"value": ci.value, "ci_low": ci.low, "ci_high": ci.high}
            else:
                out[name] = {"value": fn(y, proba, pred), "ci_low": None, "ci_high": None}
        return out

    def scored(self, test: np.ndarray | None, oof: np.ndarray) -> np.ndarray:
        """The predictions a model is scored on (probabilities or classes): its test ones when there
        is a test split, else its OOF ones."""
        return test if len(self.test) else oof[self.train]


# ----------------------------------------------------------------------------- writing


def _tsne(X: np.ndarray, labels: np.ndarray, ids: np.ndarray, max_rows: int, seed: int) -> pd.DataFrame:
    """2-D t-SNE of (at most ``max_rows``, stratified by label) rows, after PCA to 50 dimensions."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(X))
    if len(rows) > max_rows:
        counts = pd.Series(labels).value_counts()
        strat = labels if counts.min() >= 2 else None
        rows, _ = train_test_split(rows, train_size=max_rows, stratify=strat, random_state=seed)
        rows = np.sort(rows)
    Z = X[rows]
    Z = PCA(n_components=min(50, *Z.shape), random_state=seed).fit_transform(Z)
    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(rows) - 1) / 3), random_state=seed).fit_transform(Z)
    return pd.DataFrame({"id": ids[rows], "x": xy[:, 0], "y": xy[:, 1], "label": labels[rows]})


def _card(probe: Probe, result: dict, metrics: dict) -> dict:
    cfg, d = probe.cfg, probe.data
    spec = result["spec"]
    return {
        "format": 2,  # 2: the head is model.skops (format 1, model.joblib, was a pickle)
        "model": spec.name,
        "model_file": MODEL_FILE,
        "head": spec.head,
        "features": [{**d.infos[n], "given_as": n} for n in spec.entry.split("+")],
        "metadata": cfg.metadata,
        "target": cfg.target,
        "positive_class": cfg.positive,
        "classes": d.classes,
        "decision": cfg.decision,
        "tuned_params": result["tuned"],
        "fixed_params": {h: cfg.params[h] for h in cfg.params},
        "trained_on": {"store": str(Path(cfg.store).resolve()), "n_rows": int(len(probe.fit_rows)),
                       "n_groups": None if d.groups is None else int(len(set(d.groups[probe.fit_rows])))},
        "evaluation": "held-out test rows" if len(probe.test) else f"{cfg.folds}-fold group cross-validation (OOF)",
        "metrics": metrics,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedstore_version": __version__,
    }


def _card_markdown(card: dict) -> str:
    feats = "\n".join(f"- `{f['name']}` (encoder {f['encoder']}, dim {f['dim']}, fingerprint `{f['key']}`)"
                      for f in card["features"])
    rows = "\n".join(
        f"| {name} | {m['value']:.4f} | " + (f"{m['ci_low']:.4f} – {m['ci_high']:.4f} |" if m["ci_low"] is not None else "– |")
        for name, m in card["metrics"].items()
    )
    return (
        f"# Model card: {card['model']}\n\n"
        f"Predicts `{card['target']}` ({', '.join(card['classes'])}) from frozen-encoder features.\n\n"
        f"## Features\n{feats}\n"
        + (f"- metadata columns: {', '.join(card['metadata'])}\n" if card["metadata"] else "")
        + f"\nApply with `embedstore predict HEAD_DIR STORE --out FILE`; it refuses features of another fingerprint.\n\n"
        f"## Training\n- rows: {card['trained_on']['n_rows']}, groups: {card['trained_on']['n_groups']}\n"
        + _decision_line(card) +
        f"- tuned parameters: `{json.dumps(card['tuned_params'])}`\n- fixed parameters: `{json.dumps(card['fixed_params'])}`\n"
        f"- trained {card['created']} with embedstore {card['embedstore_version']}\n\n"
        f"## Metrics ({card['evaluation']}, 95% CIs by group bootstrap)\n| metric | value | 95% CI |\n|---|---|---|\n{rows}\n"
    )


def _decision_line(card: dict) -> str:
    if card.get("decision") == "balanced":
        return ("- decision: balanced (the predicted class maximises p(class) / training frequency of the class, "
                "the rule for balanced accuracy; probabilities are the head's own)\n")
    return "- decision: argmax (the most probable class)\n"


def comparison_table(models: dict[str, dict], headline: list[str]) -> pd.DataFrame:
    """One row per model, ``metric`` and ``metric_ci`` columns for each headline metric."""
    rows = []
    for name, metrics in models.items():
        row = {"model": name}
        for m in headline:
            row[m] = metrics[m]["value"]
            row[f"{m}_ci"] = f"{metrics[m]['ci_low']:.3f}–{metrics[m]['ci_high']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_latex(table: pd.DataFrame, headline: list[str]) -> str:
    """The comparison as a LaTeX tabular: value with its 95% CI in brackets, best value of each column bold."""
    best = {m: table[m].max() for m in headline}
    esc = lambda s: str(s).replace("_", r"\_").replace("×", r"$\times$").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "c" * len(headline) + "}", r"\toprule",
             "model & " + " & ".join(esc(m) for m in headline) + r" \\", r"\midrule"]
    for _, row in table.iterrows():
        cells = []
        for m in headline:
            value = f"{row[m]:.3f}"
            value = rf"\textbf{{{value}}}" if row[m] == best[m] else value
            cells.append(f"{value} [{row[f'{m}_ci'].replace('–', '--')}]")
        lines.append(esc(row["model"]) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def _write_run(probe: Probe, results: list[dict], out: Path, seconds: float) -> dict:
    cfg, d = probe.cfg, probe.data
    headline = probe.headline_names()
    models = {}
    for r in results:
        models[r["spec"].name] = probe.metrics_with_ci(probe.scored(r["test"], r["oof"]),
                                                       probe.scored(r["test_pred"], r["oof_pred"]))
        for name, oof in r["base_oof"].items():
            models[f"{name} (in {r['spec'].name})"] = probe.metrics_with_ci(probe.scored(r["base_test"].get(name), oof))
    key = headline[0]
    best = max(results, key=lambda r: models[r["spec"].name][key]["value"])
    spec = best["spec"]
    rows = probe.scored_rows()

    with replacing_folder(out, overwrite=cfg.overwrite, kind="probe") as tmp:
        run = {
            "format": 1, "kind": "probe", "embedstore_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "store": str(Path(cfg.store).resolve()),
            "features": [d.feature_keys[n] for n in spec.entry.split("+")],
            "feature_names": spec.entry.split("+"),
            "head": spec.head, "target": cfg.target, "groups": cfg.groups, "classes": d.classes,
            "positive_class": d.classes[1] if len(d.classes) == 2 else None,
            "seed": cfg.seed, "models": [r["spec"].name for r in results], "split": probe.split,
            "study": {"storage": probe.storage, "name": probe._study_name(spec, spec.head, "final")} if cfg.trials else None,
            "seconds": round(seconds, 1),
        }
        (tmp / "run.json").write_text(json.dumps(run, indent=2))
        (tmp / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        metrics = models[spec.name]
        (tmp / "metrics.json").write_text(json.dumps(
            {"headline": headline, "metrics": metrics, "models": models, "model": spec.name,
             "evaluated_on": "test" if len(probe.test) else "oof", "n": int(len(rows)),
             "n_groups": None if d.groups is None else int(len(set(d.groups[rows])))}, indent=2))
        folds = pd.DataFrame([f for r in results for f in r["folds"]])
        first = ["fold", "n_train", "n_test"]
        folds[first + [c for c in folds.columns if c not in first]].to_csv(tmp / "folds.csv", index=False)
        _predictions(probe, best).to_parquet(tmp / "predictions.parquet", index=False)
        emb_cols = [c for n in spec.entry.split("+") for c in d.columns[n]]
        labels = np.asarray(d.classes, dtype=object)[d.y]
        _tsne(d.X[emb_cols].to_numpy(np.float32), labels, d.ids, cfg.tsne_max, cfg.seed).to_parquet(
            tmp / "embedding_2d.parquet", index=False)
        if len(results) > 1 or any(r["base_oof"] for r in results):
            table = comparison_table(models, headline)
            table.to_csv(tmp / "comparison.csv", index=False)
            (tmp / "comparison.tex").write_text(comparison_latex(table, headline))
        head = tmp / "head"
        head.mkdir()
        save_head(best["model"], head)
        card = _card(probe, best, metrics)
        (head / "model_card.json").write_text(json.dumps(card, indent=2))
        (head / "MODEL_CARD.md").write_text(_card_markdown(card))
    return {"out": out, "headline": headline, "metrics": metrics, "models": models, "model": spec.name}


def _predictions(probe: Probe, result: dict) -> pd.DataFrame:
    d = probe.data
    fold = np.full(len(d.y), -1)
    for k, (_, test) in enumerate(probe.folds):
        fold[test] = k
    classes = np.asarray(d.classes, dtype=object)
    parts = []
    sides = (("oof", probe.train, result["oof"][probe.train], result["oof_pred"][probe.train]),
             ("test", probe.test, result["test"], result["test_pred"]))
    for split, rows, proba, pred in sides:
        if proba is None or not len(rows):
            continue
        frame = pd.DataFrame({"id": d.ids[rows], "fold": fold[rows], "split": split,
                              "y_true": classes[d.y[rows]], "y_pred": classes[pred]})
        for k, c in enumerate(d.classes):
            frame[f"p_{c}"] = proba[:, k]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def run_probe(cfg: ProbeConfig, progress=None) -> dict:
    """Run the probe ``cfg`` describes and write its run folder; returns the summary (out, headline, metrics).

    ``progress(event, message)`` is called after every fold (``"fold"``), tuned
    model (``"tuned"``) and writing step (``"step"``).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    check_replaceable(out, cfg.overwrite)  # before any model is fitted
    probe = Probe(cfg, progress)
    specs = [ModelSpec(entry, head) for entry in cfg.features for head in cfg.heads]
    with threadpool_limits(limits=cfg.blas_threads, user_api="blas"):
        results = [probe.evaluate_model(spec) for spec in specs]
        probe.progress("step", "writing the run folder (bootstrap CIs, t-SNE)")
        summary = _write_run(probe, results, out, time.perf_counter() - t0)
    if cfg.report:
        probe.progress("step", "writing the report")
        summary["report"] = _write_report(out)
    return summary


def _write_report(out: Path):
    """The report of the run, when :mod:`embedstore.report` offers ``write_report`` (else None)."""
    try:
        from embedstore.report import write_report
    except ImportError:
        return None
    return write_report(out)


# ----------------------------------------------------------------------------- predict


def _read_card(head_dir: Path) -> dict:
    """The model card of a saved head; EmbedstoreError when ``head_dir`` has none or it is not JSON."""
    card_file = head_dir / "model_card.json"
    if not card_file.is_file():
        raise EmbedstoreError(f"{head_dir} is not a saved head (no model_card.json); pass a probe run's head/ folder")
    try:
        card = json.loads(card_file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise EmbedstoreError(f"{card_file} is not valid JSON ({exc}); re-run the probe that wrote it") from None
    if not isinstance(card, dict) or not {"features", "classes", "metadata", "target", "positive_class"} <= set(card):
        raise EmbedstoreError(f"{card_file} is not a model card of embedstore; pass a probe run's head/ folder")
    return card


def predict(head_dir: str | Path, store_path: str | Path, out: str | Path) -> pd.DataFrame:
    """Apply a saved head to every row of ``store_path`` that has its feature sets; write CSV or parquet.

    Refuses a head that is not a skops file of trusted types (:func:`embedstore.heads.load_head`), and a store
    whose feature sets have another fingerprint than the ones the head was trained on. The file is written
    aside and renamed into place.
    """
    head_dir = Path(head_dir)
    card = _read_card(head_dir)
    model = load_head(head_dir)
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give a .csv or .parquet file to write")
    inside = [d for d in Path(out).resolve().parents if (d / "zarr.json").is_file()]
    if inside:
        raise ConfigError(f"--out {out} is inside the zarr store {inside[-1]}; write predictions outside any store")
    store = FeatureStore.open(store_path)
    keys = {}
    for feat in card["features"]:
        try:
            key = store.resolve(feat["key"])
        except StoreError:
            key = None
        if key != feat["key"]:
            others = [i.key for i in store.feature_sets() if i.name == feat["name"] or i.encoder == feat["encoder"]]
            hint = f" (it has {feat['name']} with fingerprint {', '.join(others)})" if others else ""
            raise StoreError(
                f"{store_path} has no features of fingerprint {feat['key']} ({feat['name']}){hint}: the head was "
                f"trained on those; extract them with the same encoder settings first"
            )
        keys[feat["given_as"]] = key
    missing = [c for c in card["metadata"] if c not in store.manifest.columns]
    if missing:
        raise ConfigError(f"the head reads metadata column(s) {missing}, which {store_path} does not have")
    ids = common_ids(store, keys.values())
    if not ids:
        raise StoreError(f"{store_path} has no finished rows of {', '.join(keys)} to predict: run `embedstore extract` "
                         "first (`embedstore ls` shows what is pending or failed)")
    X, table, _ = feature_frame(store, keys, card["metadata"], ids)
    proba = model.predict_proba(X)
    classes = np.asarray(card["classes"], dtype=object)
    frame = pd.DataFrame({"id": table["id"].to_numpy(), "y_pred": classes[decide(model, proba)]})
    for k, c in enumerate(card["classes"]):
        frame[f"p_{c}"] = proba[:, k]
    if card["target"] in store.manifest.columns:
        truth = store.manifest.set_index("id").loc[table["id"], card["target"]].astype(str).to_numpy()
        if card["positive_class"] is not None:
            truth = np.where(truth == card["positive_class"], card["classes"][1], card["classes"][0])
        frame.insert(1, "y_true", truth)
    if Path(out).suffix == ".parquet":
        write_file(out, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        write_file(out, lambda tmp: frame.to_csv(tmp, index=False))
    return frame
