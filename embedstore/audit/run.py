"""``run_audit``: find what leaks in one feature set of a store and write the audit's run folder.

Steps: the rows (features, sha256, group, official split side, the fold a probe would put each in); the
FAISS kNN graph of the features (:func:`embedstore.match.pairs.knn_graph`, k per image, bounded memory) with
the exact duplicates added; the near-duplicate threshold, given or calibrated on the store's own groups
(:func:`embedstore.audit.find.calibrate`); the pairs that leak and their clusters. The folder (through
:func:`embedstore.runs.write_run`, like a probe or match run): ``run.json`` (:class:`AuditRecord`),
``metrics.json`` (the counts), ``config.yaml``, ``pairs.csv`` (every flagged pair), ``nearest_pairs.csv``
(the most similar pairs that cross each line, flagged or not: the report's sheets), ``clusters.csv`` (the
images of each suspected duplicate cluster), ``histogram.csv`` (similarities of same- and
different-group pairs), then the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.audit.config import AuditConfig
from embedstore.audit.find import (CROSSINGS, Threshold, calibrate, candidate_graph, clusters, crossings, flagged,
                                   histogram, most_similar, pair_table)
from embedstore.errors import ConfigError
from embedstore.probe.data import target_codes
from embedstore.progress import progress_bar
from embedstore.runs import AuditRecord, Estimate, Metrics, Run, check_out, write_run
from embedstore.splits import column_split, group_kfold

HEADLINE = ("n_cross_group_pairs", "n_cross_fold_pairs", "n_cross_split_pairs", "n_exact_duplicate_pairs")


@dataclass
class AuditRows:
    """What the audit knows of each row of the feature set: ``frame`` (id, group, split, fold, label) and the
    integer codes the pairs are compared by."""

    frame: pd.DataFrame
    codes: dict[str, np.ndarray]
    fold: np.ndarray


def audit_rows(cfg: AuditConfig, table: pd.DataFrame) -> AuditRows:
    """Each row's group, official split side and fold, the folds made as ``probe`` makes them: the training side
    of the split column (every row without one), rows with a ``target`` value, stratified by it (by nothing
    without a target), ``cfg.folds`` group folds seeded by ``cfg.seed``. A row without a group value is its own
    group here (a probe refuses such rows, so no probe's folds hold them)."""
    for what, column in (("group", cfg.groups), ("target", cfg.target), ("split", cfg.split_column)):
        if column and column not in table.columns:
            raise ConfigError(f"{what} column {column!r} is not in the store's table")
    ids = table["id"].astype(str).to_numpy()
    groups = None
    if cfg.groups:
        named = table[cfg.groups].notna().to_numpy()
        groups = np.where(named, table[cfg.groups].astype(str).to_numpy(), ids)
    side = np.full(len(table), "train", dtype=object)
    if cfg.split_column:
        split = column_split(table[cfg.split_column], cfg.split_map)
        for name in ("test", "valid", "dropped"):
            side[getattr(split, name)] = name
    eligible = side == "train"
    label = None
    if cfg.target:
        label = table[cfg.target]
        eligible &= label.notna().to_numpy()
    rows = np.flatnonzero(eligible)
    if cfg.target:
        y, classes = target_codes(cfg, label.to_numpy()[rows].astype(str))
    else:
        y, classes = np.zeros(len(rows), dtype=int), None
    fold = np.full(len(table), -1)
    folds = group_kfold(y, None if groups is None else groups[rows], cfg.folds, cfg.seed, class_names=classes)
    for k, (_, test) in enumerate(folds):
        fold[rows[test]] = k
    group = ids if groups is None else groups
    frame = pd.DataFrame({"id": ids, "group": group, "split": side, "fold": fold})
    if label is not None:
        frame["label"] = label.astype(str).to_numpy()
    split_code = pd.factorize(pd.Series(side))[0]
    codes = {"sha256": pd.factorize(table["sha256"])[0], "group": pd.factorize(pd.Series(group))[0],
             "split": np.where(side == "dropped", -1, split_code)}
    return AuditRows(frame, codes, fold)


def run_audit(cfg: AuditConfig, progress: bool = False) -> Run:
    """Audit ``cfg.feature_set`` of ``cfg.store`` for leakage and write the folder ``cfg.out``; returns it.

    With ``progress``, a bar (or log lines) counts the rows searched for neighbours, the long step.
    """
    from embedstore.store import FeatureStore  # the store module pulls in zarr; import when used

    started = time.perf_counter()
    check_out(cfg)
    store = FeatureStore.open(cfg.store)
    key = store.resolve(cfg.feature_set)
    X, table = store.load(key)
    if len(X) < 2:
        raise ConfigError(f"feature set {key} has {len(X)} row(s) with features: nothing to compare")
    rows = audit_rows(cfg, table)
    with progress_bar(f"audit {cfg.feature_set}: nearest neighbours", len(X), enabled=progress) as advance:
        pairs = candidate_graph(X, rows.frame["id"].to_numpy(), rows.codes["sha256"], cfg.neighbors, kind=cfg.index,
                                centre=cfg.centre, seed=cfg.seed, advance=advance)
    del X
    crossed = crossings(pairs, rows.codes, rows.fold)
    same = ~crossed["cross_group"] if cfg.groups else None
    threshold = (Threshold(float(cfg.threshold), "given") if cfg.threshold is not None
                 else calibrate(pairs.sim, same, crossed["exact"], cfg.precision))
    leaking = flagged(pairs.sim, crossed, threshold.value)
    at = np.flatnonzero(leaking)
    at = at[np.argsort(-pairs.sim[at], kind="stable")]
    flagged_table = pair_table(pairs, at, rows.frame, crossed)
    cluster, size = clusters(len(rows.frame), pairs.i[at], pairs.j[at])
    cluster_table = rows.frame.assign(cluster=cluster, cluster_size=size)[cluster >= 0].sort_values(
        ["cluster", "id"], kind="stable")
    nearest = []
    for kind in CROSSINGS:
        top = most_similar(pairs.sim, crossed[kind], cfg.sheet_pairs)
        nearest.append(pair_table(pairs, top, rows.frame, crossed).assign(kind=kind, flagged=leaking[top]))
    nearest = pd.concat(nearest, ignore_index=True)
    near = pairs.sim >= threshold.value
    counts = {
        "n_exact_duplicate_pairs": int(crossed["exact"].sum()),
        "n_near_duplicate_pairs": int(near.sum()),
        "n_cross_group_pairs": int((leaking & crossed["cross_group"]).sum()),
        "n_cross_split_pairs": int((leaking & crossed["cross_split"]).sum()),
        "n_cross_fold_pairs": int((leaking & crossed["cross_fold"]).sum()),
        "n_flagged_pairs": int(leaking.sum()),
        "n_duplicate_clusters": int(cluster.max() + 1),
        "n_images_in_clusters": int((cluster >= 0).sum()),
        "n_images_largest_cluster": int(size.max(initial=0)),
        "n_candidate_pairs": int(len(pairs.sim)),
    }
    if cfg.groups:
        counts["n_same_group_pairs_above_threshold"] = int((near & same).sum())
    metrics = Metrics(headline=[h for h in HEADLINE if h != "n_cross_split_pairs" or cfg.split_column],
                      metrics={k: Estimate(v) for k, v in counts.items()}, n=len(rows.frame),
                      n_groups=int(rows.frame["group"].nunique()), model="audit", evaluated_on="cv")
    record = AuditRecord(
        store=str(Path(cfg.store).resolve()), features=(key,), feature_names=(store.info(key).name,),
        groups=cfg.groups, seed=cfg.seed, threshold=round(threshold.value, 6), threshold_from=_source(threshold),
        precision=threshold.precision, neighbors=cfg.neighbors, folds=cfg.folds, target=cfg.target,
        positive=cfg.positive, split_column=cfg.split_column, seconds=round(time.perf_counter() - started, 1),
    )
    hist = histogram(pairs.sim, same)

    def write_files(folder: Path) -> None:
        flagged_table.to_csv(folder / "pairs.csv", index=False)
        nearest.to_csv(folder / "nearest_pairs.csv", index=False)
        cluster_table.to_csv(folder / "clusters.csv", index=False)
        hist.to_csv(folder / "histogram.csv", index=False)

    return write_run(cfg, record, metrics, write_files)


def _source(threshold: Threshold) -> str:
    """How the threshold was set, in words for run.json and the report."""
    if threshold.source == "given":
        return "given (--threshold)"
    return (f"calibrated: the lowest similarity with {threshold.precision:.0%} of the {threshold.above} nearest-"
            f"neighbour pairs at or above it in one group ({threshold.same_group} of them; identical images, and "
            "pairs of two groups more alike than any two images of one group, left out)")
