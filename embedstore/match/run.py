"""The match run: lesion-grouped cross-validation of a grouping method (and projection head),
the final refit on all lesions, and the run folder.

Protocol (issue 4). The images of lesions with ``min_group_size`` or more images are split
into lesion-grouped folds. For each fold:

* frozen features: the method's parameter is swept over the training folds (each grouped on its
  own, pair counts pooled, so the value is chosen on sets the size of the held-out fold) and
  the value with the best pairwise F1 is applied to the held-out fold;
* with a projection head: a lesion-grouped validation split of the training lesions scores each
  head candidate (trained on the rest) together with the parameter sweep on the validation
  projections; the best head is refit on all training lesions, projects the held-out fold,
  and the chosen parameter groups it.

Held-out folds are grouped on their own, so every reported figure comes from images whose
lesions no choice was made on. The final model uses the fold parameters averaged (numbers)
or most often chosen (head candidates), refit on all lesions; its projected features are
written back to the store as a new feature set and its grouping of all images is the
``cluster`` column of ``clusters.csv``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.atomic import replacing_folder
from embedstore.audit.use import leakage, merge_groups, merged_audit, pairs_to_merge
from embedstore.errors import ConfigError
from embedstore.layout import projection_head_folder, remove_orphans
from embedstore.match.cluster import Grouper, floor_similarity
from embedstore.match.config import MatchConfig
from embedstore.match.index import FeatureIndex, normalise
from embedstore.match.pairs import candidate_pairs, decided_pairs_table, knn_graph
from embedstore.match.projection import ProjectionHead
from embedstore.match.query import require_column
from embedstore.metrics import (
    bootstrap_ci,
    pair_counts_by_group,
    pairwise_prf,
    pairwise_scores,
    recall_at_k,
    retrieval_average_precision,
)
from embedstore.runs import Estimate, MatchRecord, Metrics, Run, check_out, write_run
from embedstore.splits import group_holdout, group_kfold

HEADLINE = ["pairwise_f1", "recall@1", "mAP"]
EXACT_RETRIEVAL_MAX = 20_000  # held-out sets up to this size are ranked in full for mAP


# ----------------------------------------------------------------------------- building blocks


def grouper_for(Z: np.ndarray, config: MatchConfig) -> Grouper:
    """A :class:`Grouper` over unit vectors ``Z`` from their kNN candidate pairs."""
    index = FeatureIndex.build(Z, np.arange(len(Z)), key="transient", kind=config.index,
                               centre=False, seed=config.seed)
    sims, rows = knn_graph(index, Z, min(config.neighbors, len(Z) - 1))
    pairs = candidate_pairs(sims, rows, floor_similarity(config.method, config.sweep_grid))
    return Grouper(config.method, pairs, Z, min_samples=config.min_samples)


def sweep(Z: np.ndarray, groups: np.ndarray, config: MatchConfig, parts: np.ndarray | None = None) -> pd.DataFrame:
    """Pairwise precision/recall/F1 and cluster count for every value of the method's grid.

    With ``parts`` (a part number per row), each part is grouped on its own and the pair counts
    are pooled: a parameter is then chosen on sets of the size it will be applied to (a held-out
    fold), which matters for graph methods, whose components grow with the set.
    """
    parts = np.zeros(len(Z), dtype=int) if parts is None else np.asarray(parts)
    counts = np.zeros((len(config.sweep_grid), 4))  # tp, positive, predicted, clusters
    for part in np.unique(parts):
        rows = np.flatnonzero(parts == part)
        grouper = grouper_for(Z[rows], config)
        for v, value in enumerate(config.sweep_grid):
            labels = grouper.labels(value)
            tp, positive, predicted = pair_counts_by_group(groups[rows], labels)
            counts[v] += (tp.sum(), positive.sum(), predicted.sum(), labels.max() + 1)
    return pd.DataFrame([
        {"value": value, **pairwise_scores(*counts[v, :3]), "n_clusters": int(counts[v, 3])}
        for v, value in enumerate(config.sweep_grid)
    ])


def best_value(table: pd.DataFrame) -> tuple[float, float]:
    """The swept value with the highest F1 (the first such value on ties) and that F1."""
    row = table.loc[table["f1"].idxmax()]
    return float(row["value"]), float(row["f1"])


def retrieval(Z: np.ndarray, groups: np.ndarray, config: MatchConfig) -> dict[str, np.ndarray]:
    """Per-image recall@1, recall@5 and average precision of ranking the other images by cosine.

    NaN for images whose group has no other image in ``Z`` (nothing to retrieve).
    """
    n = len(Z)
    depth = n - 1 if n <= EXACT_RETRIEVAL_MAX else min(n - 1, 100)
    index = FeatureIndex.build(Z, np.arange(n), key="transient", kind=config.index, centre=False)
    _, rows = knn_graph(index, Z, depth)
    hits = (groups[np.maximum(rows, 0)] == groups[:, None]) & (rows >= 0)
    codes, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    n_relevant = counts[inverse] - 1
    has = n_relevant > 0
    out = {
        "recall@1": recall_at_k(hits, 1),
        "recall@5": recall_at_k(hits, 5),
        "AP": retrieval_average_precision(hits, n_relevant),
    }
    return {k: np.where(has, v, np.nan) for k, v in out.items()}


def space(X: np.ndarray, head: ProjectionHead | None, mean: np.ndarray | None) -> np.ndarray:
    """Unit vectors of raw features: through the head when there is one, else centred + normalised."""
    return head.transform(X) if head is not None else normalise(X, mean)


# ----------------------------------------------------------------------------- cross-validation


@dataclass
class CVResult:
    """Everything the cross-validation produced, aligned to the rows it was given."""

    folds: pd.DataFrame           # one row per fold
    sweep: pd.DataFrame           # every swept value (and head candidate) per fold
    fold_of: np.ndarray           # held-out fold of each row
    cv_clusters: np.ndarray       # held-out cluster of each row (unique across folds)
    retrieval: dict[str, np.ndarray]
    pairs: pd.DataFrame           # decided and missed pairs of the held-out folds
    values: list[float] = field(default_factory=list)
    heads: list[dict] = field(default_factory=list)


def choose_on_training(X, groups, parts, config: MatchConfig, fold: int, progress=None,
                       split_groups=None) -> tuple[float, dict, pd.DataFrame]:
    """Pick (parameter value, head candidate) using only the training rows given.

    Frozen features: the grid is swept over the training folds (``parts``), each grouped on its
    own. Projection heads: a validation split that keeps ``split_groups`` (default ``groups``) whole scores
    each candidate head (trained on the rest) with the sweep over the validation projections.
    """
    if config.projection == "none":
        mean = X.mean(axis=0) if config.centre else None
        table = sweep(normalise(X, mean), groups, config, parts).assign(candidate="")
        value, _ = best_value(table)
        return value, {}, table.assign(fold=fold, chosen=table["value"] == value)
    split_groups = groups if split_groups is None else split_groups
    inner_train, inner_val = group_holdout(np.zeros(len(groups)), split_groups, config.validation_size,
                                           seed=config.seed + fold)
    tables, best = [], None
    for candidate in config.head_candidates:
        head = projection_head(config, candidate).fit(X[inner_train], groups[inner_train])
        table = sweep(head.transform(X[inner_val]), groups[inner_val], config)
        value, f1 = best_value(table)
        if best is None or f1 > best[0]:
            best = (f1, value, candidate)
        tables.append(table.assign(candidate=json.dumps(candidate, sort_keys=True)))
        if progress is not None:
            progress()
    _, value, candidate = best
    table = pd.concat(tables, ignore_index=True).assign(fold=fold)
    chosen_key = json.dumps(candidate, sort_keys=True)
    table["chosen"] = (table["candidate"] == chosen_key) & (table["value"] == value)
    return value, candidate, table


def projection_head(config: MatchConfig, candidate: dict) -> ProjectionHead:
    """An unfitted projection head of the configured loss and parameters, with ``candidate``'s on top."""
    return ProjectionHead(loss=config.projection, seed=config.seed, **(config.head | candidate))


def cross_validate(X: np.ndarray, groups: np.ndarray, ids: np.ndarray, config: MatchConfig,
                   progress=None, split_groups: np.ndarray | None = None) -> CVResult:
    """Lesion-grouped CV of the configured method on features ``X`` (rows of ``groups``, the groups to recover).

    ``split_groups`` (default ``groups``) are what the folds keep whole: with ``--merge-near-duplicates``, the
    lesions joined by an audit's flagged pairs, while ``groups`` stay the truth the metrics score.
    """
    split_groups = groups if split_groups is None else split_groups
    folds = group_kfold(np.zeros(len(groups)), split_groups, n_splits=config.folds, seed=config.seed)
    fold_of = np.full(len(groups), -1)
    cv_clusters = np.full(len(groups), -1)
    ret = {k: np.full(len(groups), np.nan) for k in ("recall@1", "recall@5", "AP")}
    fold_rows, sweeps, pair_tables, values, heads = [], [], [], [], []
    fold_number = np.zeros(len(groups), dtype=int)
    for k, (_, test) in enumerate(folds):
        fold_number[test] = k
    for k, (train, test) in enumerate(folds):
        value, candidate, table = choose_on_training(X[train], groups[train], fold_number[train], config, k, progress,
                                                     split_groups[train])
        head = projection_head(config, candidate).fit(X[train], groups[train]) if config.projection != "none" else None
        mean = X[train].mean(axis=0) if config.centre else None
        Z = space(X[test], head, mean)
        labels = grouper_for(Z, config).labels(value)
        fold_of[test] = k
        cv_clusters[test] = labels + (cv_clusters.max() + 1)
        r = retrieval(Z, groups[test], config)
        for name in ret:
            ret[name][test] = r[name]
        prf = pairwise_prf(groups[test], labels)
        fold_rows.append({
            "fold": k, "n_train": len(train), "n_test": len(test),
            "n_groups_test": len(np.unique(groups[test])), config.param_name: value,
            "head": json.dumps(candidate, sort_keys=True) if candidate else "",
            "pairwise_precision": prf["precision"], "pairwise_recall": prf["recall"], "pairwise_f1": prf["f1"],
            "recall@1": float(np.nanmean(r["recall@1"])), "recall@5": float(np.nanmean(r["recall@5"])),
            "mAP": float(np.nanmean(r["AP"])), "n_clusters": int(labels.max()) + 1,
        })
        sweeps.append(table)
        pair_tables.append(decided_pairs_table(ids[test], groups[test], labels, Z).assign(fold=k))
        values.append(value)
        heads.append(candidate)
        if progress is not None:
            progress()
    sweep_table = pd.concat(sweeps, ignore_index=True)
    sweep_table.insert(2, "param", config.param_name)
    return CVResult(
        folds=pd.DataFrame(fold_rows),
        sweep=sweep_table[["fold", "candidate", "param", "value", "precision", "recall", "f1",
                           "n_clusters", "chosen"]],
        fold_of=fold_of, cv_clusters=cv_clusters, retrieval=ret,
        pairs=pd.concat(pair_tables, ignore_index=True), values=values, heads=heads,
    )


def summarise(result: CVResult, groups: np.ndarray, config: MatchConfig) -> Metrics:
    """Pooled held-out metrics with lesion-bootstrap CIs (``config.n_boot`` resamples): the run's metrics.json."""
    tp, positive, predicted = pair_counts_by_group(groups, result.cv_clusters)
    metrics = {}
    for name in ("precision", "recall", "f1"):
        ci = bootstrap_ci(lambda a, b, c, _n=name: pairwise_scores(a.sum(), b.sum(), c.sum())[_n],
                          tp, positive, predicted, n_boot=config.n_boot, seed=config.seed)
        metrics[f"pairwise_{name}"] = Estimate.of(ci)
    for name, key in (("recall@1", "recall@1"), ("recall@5", "recall@5"), ("mAP", "AP")):
        values = result.retrieval[key]
        ok = np.isfinite(values)
        metrics[name] = Estimate.of(bootstrap_ci(np.mean, values[ok], groups=groups[ok], n_boot=config.n_boot,
                                                 seed=config.seed))
    n_groups = int(len(np.unique(groups)))
    metrics["n_clusters"] = Estimate(int(len(np.unique(result.cv_clusters))))
    metrics["n_groups_true"] = Estimate(n_groups)
    return Metrics(headline=HEADLINE, metrics=metrics, n=int(len(groups)), n_groups=n_groups,
                   model=config.method, evaluated_on="cv")


def final_choice(result: CVResult, config: MatchConfig) -> tuple[float, dict]:
    """The final parameter (fold values averaged, on the grid's 0.01 scale) and head candidate (mode)."""
    value = round(float(np.mean(result.values)), 2)
    keys = [json.dumps(h, sort_keys=True) for h in result.heads]
    head = json.loads(Counter(keys).most_common(1)[0][0]) if keys else {}
    return value, head


# ----------------------------------------------------------------------------- the run


def select_rows(table: pd.DataFrame, config: MatchConfig) -> np.ndarray:
    """Row numbers of images with a group whose lesion has at least ``min_group_size`` images."""
    require_column(table, config.groups, "group by")
    groups = table[config.groups]
    has = groups.notna().to_numpy()
    sizes = groups.map(groups.value_counts()).fillna(0).to_numpy()
    if not (sizes[has] >= 2).any():
        raise ConfigError(
            f"every {config.groups} value occurs once: matching needs groups with 2+ images "
            "(is this the right --groups column?)"
        )
    rows = np.flatnonzero(has & (sizes >= config.min_group_size))
    if len(np.unique(groups.to_numpy()[rows])) < config.folds:
        raise ConfigError(f"only {len(np.unique(groups.to_numpy()[rows]))} groups for {config.folds} folds; "
                          "use fewer --folds or a lower min_group_size")
    return rows


@dataclass
class MatchInputs:
    """The store rows a match run works on, read and checked before any work starts."""

    store: object
    key: str
    name: str
    X_all: np.ndarray        # every row with features (projected features are written for all)
    table_all: pd.DataFrame
    rows: np.ndarray         # the rows of lesions with min_group_size+ images


def load_inputs(config: MatchConfig) -> MatchInputs:
    """Open the store, resolve the feature set and select the rows; every input error surfaces here."""
    from embedstore.store import FeatureStore  # the store module pulls in zarr; import when used

    store = FeatureStore.open(config.store)
    key = store.resolve(config.feature_set)
    X_all, table_all = store.load(key)
    rows = select_rows(table_all, config)
    return MatchInputs(store, key, store.info(key).name, X_all, table_all, rows)


def run_match(config: MatchConfig, progress=None, inputs: MatchInputs | None = None) -> Run:
    """Run the match protocol on a store and write the run folder ``config.out``; returns the run."""
    check_out(config)
    inputs = inputs or load_inputs(config)
    store, key, X_all, table_all = inputs.store, inputs.key, inputs.X_all, inputs.table_all
    X = X_all[inputs.rows]
    table = table_all.iloc[inputs.rows].reset_index(drop=True)
    groups = table[config.groups].astype(str).to_numpy()
    ids = table["id"].astype(str).to_numpy()
    split_groups, merged = groups, None
    if config.merge_near_duplicates:
        pairs, source = pairs_to_merge(config.merge_near_duplicates, config.store, ids, X, table["sha256"].to_numpy(),
                                       config.seed)
        split_groups, merged = merge_groups(pairs, source, ids, groups)

    result = cross_validate(X, groups, ids, config, progress=progress, split_groups=split_groups)
    sides = np.where(result.fold_of >= 0, np.char.add("fold ", result.fold_of.astype(str)), "")
    leaks = leakage(config.store, [key], ids, sides, merged_audit(config.merge_near_duplicates))
    metrics = summarise(result, groups, config)
    value, candidate = final_choice(result, config)

    head, projected_key = None, None
    if config.projection != "none":
        head = projection_head(config, candidate).fit(X, groups)
        if config.write_features:
            projected_key = write_projection(store, key, inputs.name, head, X_all, table_all, config)
    Z = space(X, head, X.mean(axis=0) if config.centre else None)
    final_labels = grouper_for(Z, config).labels(value)
    if progress is not None:
        progress()

    clusters = pd.DataFrame({"id": ids, "group": groups, "fold": result.fold_of,
                             "cv_cluster": result.cv_clusters, "cluster": final_labels})
    record = MatchRecord(
        store=str(Path(config.store).resolve()), features=(key,), feature_names=(inputs.name,),
        groups=config.groups, seed=config.seed, method=config.method, projection=config.projection,
        parameter={config.param_name: value}, head=candidate or None, projected_features=projected_key,
        merged_groups=merged, leakage=leaks,
    )
    return write_run(config, record, metrics, lambda folder: write_match_files(folder, result, clusters, head))


def write_projection(store, key, name, head, X_all, table_all, config) -> str:
    """Project every row of the store with the final head and store it as the feature set
    ``<name>+<projection>``, replacing the previous one only once the new set and its head are saved
    (:meth:`FeatureStore.put_features`); then the heads and indices of replaced sets are removed."""
    def save_head(new_key: str) -> None:
        folder = projection_head_folder(store.path, new_key)
        if not (folder / "projection.json").is_file():
            with replacing_folder(folder, overwrite=True, kind="projection-head", what="projection head") as staging:
                head.save(staging)

    new_key = store.put_features(
        f"{name}+{config.projection}", head.transform(X_all), table_all["id"].astype(str).tolist(), parent=key,
        overwrite=True, before_commit=save_head,
        config={"kind": config.projection, "head": head.get_params(), "groups": config.groups,
                "min_group_size": config.min_group_size, "seed": config.seed},
    )
    remove_orphans(store)
    return new_key


def write_match_files(folder: Path, result: CVResult, clusters: pd.DataFrame, head: ProjectionHead | None) -> None:
    """The files of a match run folder besides its record: the folds, the sweep, the pairs, the clusters, the head."""
    result.folds.to_csv(folder / "folds.csv", index=False)
    result.sweep.to_csv(folder / "sweep.csv", index=False)
    result.pairs.to_csv(folder / "pairs.csv", index=False)
    clusters.to_csv(folder / "clusters.csv", index=False)
    if head is not None:
        head.save(folder / "head")

