"""``run_probe``: run the protocol (:mod:`embedstore.probe.protocol`) and write the probe's run folder.

Several ``features`` entries and/or several ``heads`` make a comparison: every entry × head is
evaluated the same way and tabulated (``comparison.csv``/``.tex``, :mod:`embedstore.runs.comparison`);
the best one (by the first headline metric) becomes the run's head, saved with skops
(:mod:`embedstore.heads.saved`, never a pickle) and a model card.

The folder is written by :func:`embedstore.runs.write_run`: ``run.json`` (:class:`ProbeRecord`),
``metrics.json`` (:class:`Metrics`), ``config.yaml``, then ``folds.csv``, ``predictions.parquet``,
``embedding_2d.parquet`` (a t-SNE map), the comparison tables and ``head/``; it replaces ``out`` in
one step, only a folder an earlier run wrote, only with ``overwrite``, checked before any model is
fitted; then the report.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from embedstore.heads import save_head
from embedstore.maps import feature_map
from embedstore.parallel import usable_cores
from embedstore.probe.card import model_card, write_card
from embedstore.probe.config import ProbeConfig
from embedstore.probe.models import ModelSpec
from embedstore.probe.protocol import ModelResult, Probe
from embedstore.runs import Metrics, ProbeRecord, Run, StudyRef, check_out, write_run
from embedstore.runs.comparison import metric_names, rows_of_metrics, write_comparison_tables


def run_probe(cfg: ProbeConfig, progress=None) -> Run:
    """Run the probe ``cfg`` describes and write its run folder (and report); returns the run written.

    ``progress(event, message)`` is called after every fold (``"fold"``), fit of several folds' models at once
    (``"fit"``), tuned model (``"tuned"``) and writing step (``"step"``).
    """
    t0 = time.perf_counter()
    check_out(cfg)  # before any model is fitted
    probe = Probe(cfg, progress)
    specs = [ModelSpec(entry, head) for entry in cfg.features for head in cfg.heads]
    with threadpool_limits(limits=cfg.blas_threads, user_api="blas"):
        results = [probe.evaluate_model(spec) for spec in specs]
        probe.progress("step", "writing the run folder (bootstrap CIs, t-SNE)" + (" and its report" if cfg.report else ""))
        models = probe.model_metrics(results)
        best = max(results, key=lambda r: models[r.spec.name][probe.headline_names()[0]].value)
        metrics = _metrics(probe, models, best)
        record = _record(probe, results, best, seconds=time.perf_counter() - t0)
        return write_run(cfg, record, metrics, lambda folder: _write_files(probe, results, best, metrics, folder))


def _metrics(probe: Probe, models: dict, best: ModelResult) -> Metrics:
    """``metrics.json``: the best model's metrics, every model's, on the rows they were scored on."""
    rows, groups = probe.scored_rows(), probe.data.groups
    return Metrics(headline=probe.headline_names(), metrics=models[best.spec.name], models=models,
                   model=best.spec.name, evaluated_on="test" if len(probe.test) else "oof", n=int(len(rows)),
                   n_groups=None if groups is None else int(len(set(groups[rows]))))


def _record(probe: Probe, results: list[ModelResult], best: ModelResult, seconds: float) -> ProbeRecord:
    """``run.json``: the best model's features, head and study, the problem, the models compared and the split."""
    cfg, d, spec = probe.cfg, probe.data, best.spec
    study = StudyRef(probe.storage, probe.study_name(spec, spec.head, "final")) if cfg.trials else None
    return ProbeRecord(
        store=str(Path(cfg.store).resolve()), features=[d.feature_keys[n] for n in spec.sets], feature_names=spec.sets,
        head=spec.head, target=cfg.target, groups=cfg.groups, classes=d.classes,
        positive_class=d.classes[1] if len(d.classes) == 2 else None, seed=cfg.seed,
        models=[r.spec.name for r in results], split=probe.split, study=study, seconds=round(seconds, 1),
        merged_groups=probe.merged, leakage=probe.leakage, transfer=probe.transfer,
    )


def _write_files(probe: Probe, results: list[ModelResult], best: ModelResult, metrics: Metrics, folder: Path) -> None:
    """The probe's own files in the run folder being written: folds, predictions, 2-D map, comparison, head."""
    cfg, d = probe.cfg, probe.data
    folds = pd.DataFrame([f for r in results for f in r.folds])
    first = ["fold", "n_train", "n_test"]
    folds[first + [c for c in folds.columns if c not in first]].to_csv(folder / "folds.csv", index=False)
    _predictions(probe, best).to_parquet(folder / "predictions.parquet", index=False)
    emb_cols = [c for n in best.spec.sets for c in d.columns[n]]
    home = slice(0, probe.n_home)  # the map is of this store's rows, the first of X (a transfer probe's others follow)
    labels = np.asarray(d.classes, dtype=object)[d.y[home]]
    feature_map(d.X, labels, d.ids[home], cfg.tsne_max, cfg.seed, columns=emb_cols,
                n_jobs=cfg.blas_threads or usable_cores()).to_parquet(folder / "embedding_2d.parquet", index=False)
    if len(metrics.models) > 1:
        rows = rows_of_metrics(metrics, Path(cfg.out).resolve().name)
        scored = ("rows of another store" if probe.transfer else "held-out test rows") if metrics.evaluated_on == "test" \
            else "out-of-fold predictions"
        write_comparison_tables(folder, rows, metric_names(rows, metrics.headline),
                                f"{len(rows)} models of one probe of {cfg.target}, scored on {scored}; point estimates "
                                "with 95% bootstrap confidence intervals (resampled by group); best value per metric in bold.")
    head = folder / "head"
    head.mkdir()
    save_head(best.model, head)
    write_card(model_card(probe, best, metrics.metrics), head)


def _predictions(probe: Probe, result: ModelResult) -> pd.DataFrame:
    """One row per scored image: its fold, split (``oof`` or ``test``), true and predicted class, probabilities
    (and, in a transfer probe, the store it is of)."""
    cfg, d = probe.cfg, probe.data
    fold = probe.fold_of_row
    classes = np.asarray(d.classes, dtype=object)
    parts = []
    sides = (("oof", probe.train, result.oof[probe.train], result.oof_pred[probe.train]),
             ("test", probe.test, result.test, result.test_pred))
    for split, rows, proba, pred in sides:
        if proba is None or not len(rows):
            continue
        frame = pd.DataFrame({"id": d.ids[rows], "fold": fold[rows], "split": split,
                              "y_true": classes[d.y[rows]], "y_pred": classes[pred]})
        if probe.transfer:  # ids of two stores: say whose each row is
            frame.insert(1, "store", probe.transfer.test_store if split == "test" else str(Path(cfg.store).resolve()))
        for k, c in enumerate(d.classes):
            frame[f"p_{c}"] = proba[:, k]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)
