"""The probe's protocol: split, group folds, nested tuning, out-of-fold and test predictions, metrics with CIs.

Every step is seeded by ``seed``:

1. Split: an official train/(validation/)test column (``split_column``, values mapped by ``split_map``),
   a stratified group hold-out (``holdout``), or none (cross-validation only). Validation rows are never
   scored: with tuning they choose the final head's hyperparameters (one fold: fit on train, score on
   validation) and the final head is refitted on train + validation; without tuning they are left out
   (``split_map: {valid: train}`` folds them into training). A transfer probe (``test_store``) takes its test rows
   from another store instead (those of its ``test_split``), less any byte-identical to a row fitted or tuned on;
   with ``select_on_store`` the validation rows are that store's ``select_split`` rows, which choose the final head's
   hyperparameters but are never fitted on.
2. Stratified group k-fold on the training rows. For each fold a model is fitted on the other folds and
   predicts this one: the out-of-fold (OOF) predictions. With ``trials > 0`` each fold first runs its own
   Optuna study on its training part only (inner group folds), so the OOF estimate is nested and no
   hyperparameter ever saw the rows it is scored on. A study is reused only by exactly the same problem
   (:func:`embedstore.tune.study_problem`). The studies of every fold and of the final head run first,
   together where they sweep a C path with one worker on a local storage (:func:`embedstore.tune.tune_many`:
   the paths of all of them in one fit); then the
   folds' models and the final one are fitted, together where one head can fit them at once
   (:func:`embedstore.probe.models.fit_each`: a logistic head's models, each with its own tuned C), and the
   folds' ``seconds`` in ``folds.csv`` (models fitted one by one only) time the fit alone, not its tuning.
3. The final head: hyperparameters tuned on all training rows (outer folds, or the validation rows when
   there are some), refitted on all of them (and the validation rows); it predicts the test rows when
   there are any.
4. Metrics on the test predictions (or the OOF ones without a test split), the headline ones with a
   bootstrap 95% interval resampled by group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.audit.use import leakage, merge_groups, merged_audit, pairs_to_merge
from embedstore.errors import ConfigError
from embedstore.heads import BalancedDecision, decide
from embedstore.heads.base import predict_rows, row_blocks, take_rows
from embedstore.layout import study_storage
from embedstore.metrics import (bootstrap_ci, bootstrap_metrics, evaluate, metric_functions,
                                top_k_sensitivity_by_patient)
from embedstore.probe.config import ProbeConfig, tune_metric
from embedstore.probe.data import ProbeData, joined, load_data, load_other_store
from embedstore.probe.patient import columns_for
from embedstore.probe.models import (METADATA_HEADS, ModelSpec, build_model, effective_params, fit, fit_each, stack_of,
                                     tunable_parts)
from embedstore.runs.record import Estimate, Transfer
from embedstore.splits import ColumnSplit, check_disjoint, column_split, group_holdout, group_kfold
from embedstore.store import FeatureStore, digest, fingerprint
from embedstore.tune import SEARCH_SPACES, study_problem, tune_many

MULTICLASS_HEADLINE = ["balanced_accuracy", "roc_auc", "accuracy", "f1_macro"]
TOP15 = "top15_sensitivity"  # with --patient-features, beside pAUC (the ISIC 2024 organisers' second metric)
BINARY_HEADLINE = ["roc_auc", "pauc_80", "balanced_accuracy", "sensitivity_at_90_specificity", "average_precision"]


@dataclass
class ModelResult:
    """What :meth:`Probe.evaluate_model` gives for one model: its predictions, per-fold metrics and final head.

    ``oof``/``oof_pred`` cover every row (NaN / -1 outside the training rows); ``test``/``test_pred``
    the test rows (None without a test split); ``base_oof``/``base_test`` a stack's bases' probabilities.
    """

    spec: ModelSpec
    oof: np.ndarray
    oof_pred: np.ndarray
    test: np.ndarray | None
    test_pred: np.ndarray | None
    folds: list[dict]
    model: object
    tuned: dict[str, dict]
    base_oof: dict[str, np.ndarray] = field(default_factory=dict)
    base_test: dict[str, np.ndarray] = field(default_factory=dict)


class Probe:
    """One probe run's data, split and folds; :func:`embedstore.probe.run_probe` is the entry point.

    ``progress(event, message)`` is called after every fold (``"fold"``), fit of several folds' models at once
    (``"fit"``), tuned model (``"tuned"``) and writing step (``"step"``).
    """

    def __init__(self, cfg: ProbeConfig, progress=None):
        self.cfg = cfg
        self.progress = progress or (lambda event, message: None)
        self.store = FeatureStore.open(cfg.store)
        self.data = load_data(cfg, self.store)
        self.n_home = len(self.data.y)  # this store's rows; a transfer probe's other stores' rows follow them
        self.merged = None  # GroupMerge: groups joined by an audit's flagged pairs (--merge-near-duplicates)
        if cfg.merge_near_duplicates:
            d = self.data
            first = d.X[d.columns[next(iter(d.columns))]]  # a threshold is applied to the first feature set
            pairs, source = pairs_to_merge(cfg.merge_near_duplicates, cfg.store, d.ids, first.to_numpy(np.float32),
                                           d.table["sha256"].to_numpy(), cfg.seed)
            d.groups, self.merged = merge_groups(pairs, source, d.ids, d.groups, self._split_sides())
        self.metric_name, self.metric = tune_metric(cfg, len(self.data.classes))
        self.storage = cfg.storage or study_storage(cfg.store)
        self.studies: dict[tuple[str, str, str], str] = {}  # (model, part, scope) -> Optuna study name
        self.transfer: Transfer | None = None
        self.selection_statistics: list[str] = []  # digests of --select-on-store's statistics (per-store)
        outside = self._other_stores() if cfg.test_store else {}
        self._split(outside)
        home = slice(0, self.n_home)  # the audits beside this store know its rows only
        self.leakage = leakage(cfg.store, self.data.feature_keys.values(), self.data.ids[home], self.sides()[home],
                               merged_audit(cfg.merge_near_duplicates))

    def _other_stores(self) -> dict[str, np.ndarray]:
        """A transfer probe's rows of other stores, appended to :attr:`data`: their positions by role (``test``,
        and ``select`` with ``--select-on-store``)."""
        cfg = self.cfg
        parts: dict[str, ProbeData] = {"test": load_other_store(cfg, cfg.test_store, self.data, cfg.scored_split())}
        if cfg.select_on_store:
            parts["select"] = load_other_store(cfg, cfg.select_on_store, self.data, cfg.selection_split())
            self.selection_statistics = parts["select"].normalization
        positions, start = {}, self.n_home
        for role, part in parts.items():
            positions[role] = np.arange(start, start + len(part.y))
            start += len(part.y)
        self.data = joined(self.data, list(parts.values()), cfg.metadata)
        return positions

    def sides(self) -> np.ndarray:
        """Each row's side of the run: ``fold k`` (held out in outer fold k), ``test``, ``valid``, or empty."""
        side = np.full(len(self.data.y), "", dtype=object)
        for k, (_, held_out) in enumerate(self.folds):
            side[held_out] = f"fold {k}"
        side[self.test], side[self.valid] = "test", "valid"
        return side

    def _split_sides(self) -> np.ndarray | None:
        """Each row's side of the split column (0 train, 1 test, 2 validation, 3 dropped), or None without one:
        what a merge of groups may not join across."""
        split = self._official_split
        if split is None:
            return None
        sides = np.zeros(len(self.data.y), dtype=int)
        for code, rows in enumerate((split.test, split.valid, split.dropped), start=1):
            sides[rows] = code
        return sides

    @cached_property
    def _official_split(self) -> ColumnSplit | None:
        """The split column's sides (None without one), read once for the merge and the split."""
        cfg = self.cfg
        if not cfg.split_column:
            return None
        return column_split(self.data.table[cfg.split_column].iloc[:self.n_home], cfg.split_map,
                            needs_test=not cfg.test_store)  # a transfer probe's test rows are another store's

    def _split(self, outside: dict[str, np.ndarray]) -> None:
        """Train, test and validation rows, the outer folds over the training rows, and what the final
        head is tuned and fitted on (``split`` says it, for run.json); a transfer probe's test (and validation)
        rows are ``outside``'s, of other stores."""
        cfg, d = self.cfg, self.data
        empty = np.array([], dtype=int)
        if cfg.split_column:
            split = self._official_split
        elif cfg.holdout:
            split = ColumnSplit(*group_holdout(d.y, d.groups, cfg.holdout, cfg.seed, d.classes), empty, empty)
        else:
            split = ColumnSplit(np.arange(self.n_home), empty, empty, empty)
        self.train, self.test = split.train, split.test
        self.valid = split.valid if cfg.trials else empty  # validation rows are used only to tune
        if outside:
            self._take_outside(split, outside)
        self._check_sides({"training": self.train, "test": self.test, "validation": self.valid})
        g = None if d.groups is None else d.groups[self.train]
        folds = group_kfold(d.y[self.train], g, cfg.folds, cfg.seed, class_names=d.classes)
        self.folds = [(self.train[tr], self.train[te]) for tr, te in folds]
        self.fold_of_row = np.full(len(d.y), -1)  # each row's outer fold (-1: none), for predictions.parquet and stacks
        for k, (_, test) in enumerate(self.folds):
            self.fold_of_row[test] = k
        # The final head's hyperparameters are chosen on tune_rows; it is fitted on fit_rows: train + this store's
        # validation rows, never another store's (--select-on-store chooses by them, it does not learn from them).
        self.tune_rows = np.sort(np.concatenate([self.train, self.valid]))
        self.fit_rows = self.train if cfg.select_on_store else self.tune_rows
        self.final_folds = [(self.train, self.valid)] if len(self.valid) else self.folds
        self.split = {
            "column": cfg.split_column, "map": cfg.split_map, "n_train": int(len(self.train)),
            "n_test": int(len(self.test)), "n_valid": int(len(self.valid) if cfg.select_on_store else len(split.valid)),
            "n_dropped": int(len(split.dropped)),
            "validation": (f"chose the final head's hyperparameters (fit on train, scored on the validation rows of "
                           f"{Path(cfg.select_on_store).name}); the final head was fitted on train alone")
                          if cfg.select_on_store else
                          ("chose the final head's hyperparameters (fit on train, scored on validation), "
                           "then the final head was refitted on train + validation") if len(self.valid) else
                          ("left out of training and scoring (no tuning); --split-map VALUE=train folds them "
                           "into training") if len(split.valid) else None,
        }

    def _take_outside(self, split: ColumnSplit, outside: dict[str, np.ndarray]) -> None:
        """The test rows (and, with ``--select-on-store``, the validation rows) of a transfer probe from other
        stores, less their images that are byte-identical to an image fitted or tuned on (and, for test rows, to a
        selection image): those are left out and counted, never scored."""
        cfg, d = self.cfg, self.data
        if len(split.test):
            raise ConfigError(f"this store's split column gives {len(split.test)} test rows, and --test-store gives the "
                              f"test rows: map them with --split-map VALUE=train or VALUE=drop")
        if cfg.select_on_store and len(split.valid):
            raise ConfigError(f"this store's split column gives {len(split.valid)} validation rows, and "
                              "--select-on-store gives them: map them with --split-map VALUE=train or VALUE=drop")
        sha = d.table["sha256"].to_numpy()
        seen = set(sha[self.train]) | set(sha[self.valid])  # every row a head is fitted or tuned on
        left_out = 0
        if "select" in outside:
            keep = ~np.isin(sha[outside["select"]], list(seen))
            self.valid, left_out = outside["select"][keep], int((~keep).sum())
            if not len(self.valid):
                raise ConfigError(f"every --select-split row of {cfg.select_on_store} is byte-identical to a training image")
            seen |= set(sha[self.valid])
        keep = ~np.isin(sha[outside["test"]], list(seen))
        self.test = outside["test"][keep]
        left_out += int((~keep).sum())
        if not len(self.test):
            raise ConfigError(f"every row of {cfg.test_store} to score is byte-identical to a training image")
        select = cfg.select_on_store
        self.transfer = Transfer(
            test_store=str(Path(cfg.test_store).resolve()), n_test=int(len(self.test)),
            split_column=cfg.test_split_column, split=cfg.scored_split() if cfg.test_split_column else None,
            groups=cfg.test_group_column(), identical_left_out=left_out, normalize=cfg.normalize,
            select_on_store=str(Path(select).resolve()) if select else None,
            select_split=cfg.selection_split() if select else None, n_select=int(len(self.valid)) if select else 0)

    def _check_sides(self, sides: dict[str, np.ndarray]) -> None:
        """No group on two sides of the split, and every class on each side that has rows."""
        d = self.data
        if d.groups is not None:
            for a, b in (("training", "test"), ("training", "validation"), ("validation", "test")):
                if len(sides[a]) and len(sides[b]):
                    check_disjoint(d.groups, sides[a], sides[b], (a, b))
        for side, rows in sides.items():
            missing = set(range(len(d.classes))) - set(d.y[rows]) if len(rows) else set()
            if missing:
                raise ConfigError(f"the {side} rows have no {[d.classes[k] for k in sorted(missing)]}: "
                                  "every class needs rows on each side of the split")

    def study_name(self, spec: ModelSpec, part: str, scope: str) -> str:
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
            "head": head, "params": effective_params(cfg, head),
            "metric": self.metric_name, "decision": cfg.decision,
        } | ({"normalize": cfg.normalize, "statistics": self._statistics(scope)} if cfg.normalize != "train" else {}) | ({"patient_features": cfg.patient_features, "patients": digest(d.patients[rows]),
              "patient_context": columns_for(d.context, sets)} if cfg.patient_features and head in METADATA_HEADS else {})

    def _statistics(self, scope: str) -> list[str]:
        """The digests of the per-store statistics of the stores whose rows a study at ``scope`` reads: this store's,
        and for the final head under ``--select-on-store`` that store's."""
        return self.data.normalization + (self.selection_statistics if scope == "final" else [])

    def _tune(self, spec: ModelSpec, scopes: list[tuple[np.ndarray, list, str]]) -> list[dict[str, dict]]:
        """Best parameters of every tunable part of ``spec`` for each scope ``(rows, folds, name)`` of
        ``scopes``, searched on its ``rows`` with its ``folds`` only: one dict per scope.

        Each part has its own study per scope, named ``store:target:features:head:fingerprint:scope`` (or
        ``--study-name:features:head:scope``) and reused only by exactly the same problem. A part's studies of
        all scopes are tuned together (:func:`embedstore.tune.tune_many`: a path search fits their paths at once).
        """
        cfg = self.cfg
        tuned: list[dict[str, dict]] = [{} for _ in scopes]
        if not cfg.trials:
            return tuned
        for key, sets, est, head in tunable_parts(cfg, self.data, spec):
            if head not in SEARCH_SPACES:
                continue
            fixed = frozenset(cfg.params.get(head, {}))
            part = f"{'+'.join(sets)}:{head}"
            names, problems = [], []
            for rows, folds, scope in scopes:
                local = [(np.searchsorted(rows, tr), np.searchsorted(rows, te)) for tr, te in folds]
                problems.append(study_problem(head, self.data.y[rows], local, cfg.seed, fixed, n_trials=cfg.trials,
                                              sampler=cfg.sampler, **self._problem(sets, head, rows, scope)))
                names.append(f"{cfg.study_name}:{part}:{scope}" if cfg.study_name else
                             f"{Path(cfg.store).name}:{cfg.target}{':' + cfg.positive if cfg.positive else ''}"
                             f":{part}:{fingerprint(problems[-1])}:{scope}")
                self.studies[spec.name, key, scope] = names[-1]
            results = tune_many(  # the whole frame and folds of its rows: no copy of the rows' every column
                est, head, self.data.X, self.data.y, [folds for _, folds, _ in scopes], self.metric, cfg.trials,
                self.storage, names, problems, cfg.seed,
                prefix="estimator__head__" if isinstance(est, BalancedDecision) else "head__",
                fixed=fixed, workers=cfg.tune_workers, sampler=cfg.sampler,
            )
            for out, (_, _, scope), (best, _) in zip(tuned, scopes, results):
                out[key] = best
                self.progress("tuned", f"tuned {key} ({scope}): {best}")
        return tuned

    def _inner_folds(self, train: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The inner group folds of an outer fold's training rows ``train``, as rows of the frame."""
        d = self.data
        inner = group_kfold(d.y[train], None if d.groups is None else d.groups[train], self.cfg.inner_folds,
                            self.cfg.seed, class_names=d.classes)
        return [(train[a], train[b]) for a, b in inner]

    def evaluate_model(self, spec: ModelSpec) -> ModelResult:
        """OOF (and test) probabilities and predicted classes, per-fold metrics, the final fitted model of one spec."""
        cfg, d = self.cfg, self.data
        oof = np.full((len(d.y), len(d.classes)), np.nan)
        oof_pred = np.full(len(d.y), -1)
        base_oof: dict[str, np.ndarray] = {}
        fold_rows = []
        scopes = [(train, self._inner_folds(train) if cfg.trials else [], f"fold{k}")
                  for k, (train, _) in enumerate(self.folds)]  # each outer fold tuned on its training rows only
        tuned = self._tune(spec, [*scopes, (self.tune_rows, self.final_folds, "final")])
        models = [build_model(cfg, d, spec, params) for params in tuned]  # every fold's, then the final one
        # one pass over the matrix per evaluation for every fold's head and the final one, where they can share it
        stack_folds = self.fold_of_row if cfg.stack_folds == "outer" else None  # a stack's inner folds: the outer ones
        shared = fit_each(models, d.X, d.y, [train for train, _ in self.folds] + [self.fit_rows], d.groups,
                          stack_folds, lambda message: self.progress("fit", f"{spec.name}: {message}")) or []
        if shared:
            self.progress("fit", f"{spec.name}: fitted {len(shared)} models together")
        for k, (train, test) in enumerate(self.folds):
            t0 = time.perf_counter()
            model = shared[k] if shared else fit(models[k], d.X, d.y, d.groups, train, stack_folds)
            oof[test], bases = _predict(model, d.X, test)
            oof_pred[test] = decide(model, oof[test])
            for name, p in bases.items():
                base_oof.setdefault(name, np.full_like(oof, np.nan))[test] = p
            scores = evaluate(d.y[test], oof[test], oof_pred[test])
            timing = {} if shared else {"seconds": round(time.perf_counter() - t0, 2)}  # where fitted alone
            fold_rows.append({"model": spec.name, "fold": k, "n_train": len(train), "n_test": len(test), **scores, **timing})
            self.progress("fold", f"{spec.name}: fold {k + 1}/{len(self.folds)} {self.metric_name}={scores[self.metric_name]:.3f}")
        final = shared[-1] if shared else fit(models[-1], d.X, d.y, d.groups, self.fit_rows, stack_folds)
        test_proba, base_test = _predict(final, d.X, self.test) if len(self.test) else (None, {})
        test_pred = decide(final, test_proba) if len(self.test) else None
        return ModelResult(spec, oof, oof_pred, test_proba, test_pred, fold_rows, final, tuned[-1], base_oof, base_test)

    # ------------------------------------------------------------------ metrics

    def headline_names(self) -> list[str]:
        if len(self.data.classes) > 2:
            return MULTICLASS_HEADLINE
        if self.data.patients is None:
            return BINARY_HEADLINE
        return [*BINARY_HEADLINE[:2], TOP15, *BINARY_HEADLINE[2:]]

    def scored_rows(self) -> np.ndarray:
        """The rows metrics are computed on: the test rows when there are some, else the training rows (OOF)."""
        return self.test if len(self.test) else self.train

    def metrics_with_ci(self, proba: np.ndarray, pred: np.ndarray | None = None) -> dict[str, Estimate]:
        """Every metric of ``proba`` and the predicted classes ``pred`` (default: the argmax of ``proba``),
        rows aligned with :meth:`scored_rows`; headline metrics with grouped CIs."""
        d, rows = self.data, self.scored_rows()
        y = d.y[rows]
        pred = proba.argmax(1) if pred is None else pred
        groups = None if d.groups is None else d.groups[rows]
        names = [n for n in self.headline_names() if n != TOP15]
        cis = bootstrap_metrics(names, y, proba, pred, groups=groups, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
        out = {name: Estimate.of(cis[name]) if name in cis else Estimate(fn(y, proba, pred))
               for name, fn in metric_functions(len(d.classes)).items()}
        if TOP15 in self.headline_names():
            out[TOP15] = self._top15(y, proba[:, 1], d.patients[rows])
        return out

    def _top15(self, y: np.ndarray, score: np.ndarray, patients: np.ndarray) -> Estimate:
        """Top-15 sensitivity: the mean over patients with a positive image of the share of their positives among
        their 15 highest-scored images; its CI resamples those patients."""
        per_patient = top_k_sensitivity_by_patient(y, score, patients, k=15)
        if not len(per_patient):
            return Estimate(float("nan"))
        if not self.cfg.n_boot:
            return Estimate(float(per_patient.mean()))
        return Estimate.of(bootstrap_ci(np.mean, per_patient, n_boot=self.cfg.n_boot, seed=self.cfg.seed))

    def model_metrics(self, results: list[ModelResult]) -> dict[str, dict[str, Estimate]]:
        """The metrics of every model of ``results``, by name, and of each stack's bases (``base (in stack)``)."""
        models = {}
        for r in results:
            models[r.spec.name] = self.metrics_with_ci(self.scored(r.test, r.oof), self.scored(r.test_pred, r.oof_pred))
            for name, oof in r.base_oof.items():
                models[f"{name} (in {r.spec.name})"] = self.metrics_with_ci(self.scored(r.base_test.get(name), oof))
        return models

    def scored(self, test: np.ndarray | None, oof: np.ndarray) -> np.ndarray:
        """The predictions a model is scored on (probabilities or classes): its test ones when there
        is a test split, else its OOF ones."""
        return test if len(self.test) else oof[self.train]


def _predict(model, X: pd.DataFrame, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``model``'s class probabilities for ``rows`` of ``X``, and a stack's bases' by name ({} for a single head),
    taken :data:`~embedstore.heads.base.PREDICT_ROWS` rows at a time; a stack's bases predict once, for both."""
    stack = stack_of(model)
    if stack is None:
        return predict_rows(model, X, rows), {}
    blocks = [stack.base_probas(take_rows(X, block)) for block in row_blocks(rows)]
    bases = {name: np.vstack([block[name] for block in blocks]) for name in blocks[0]}
    return stack.proba_of_bases(bases), bases
