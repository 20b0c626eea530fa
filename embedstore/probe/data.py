"""The probe's input: the feature sets of a store (rows all of them have), the target, groups and metadata, aligned.

:func:`load_data` reads what a probe run needs; :func:`common_ids` and :func:`feature_frame` are shared with
:func:`embedstore.probe.predict`, which builds the same input frame for a saved head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.errors import ConfigError, StoreError
from embedstore.probe.config import ProbeConfig
from embedstore.probe.normalize import StoreStatistics, statistics_of
from embedstore.probe.patient import patient_context, patient_ids
from embedstore.store import FeatureStore


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
    context: list[str]  # patient-context columns in X (--patient-features), read by lgbm beside the metadata
    patients: np.ndarray | None  # each row's patient id (--patient-features), for top-15 sensitivity
    normalization: list[str] = field(default_factory=list)  # digests of the store's statistics (--normalize per-store)


def set_names(cfg: ProbeConfig) -> list[str]:
    """Every feature set the entries of ``cfg.features`` name (``a+b`` names two), each once, in order."""
    names: list[str] = []
    for entry in cfg.features:
        for name in entry.split("+"):
            if name and name not in names:
                names.append(name)
    return names


def load_data(cfg: ProbeConfig, store: FeatureStore) -> ProbeData:
    """Features of every named set (rows all of them have), the target as codes, groups, metadata."""
    keys = {name: store.resolve(name) for name in set_names(cfg)}
    _check_columns(store, "the store's table", target=cfg.target, group=cfg.groups, split=cfg.split_column,
                   patient=cfg.patient_features, metadata=cfg.metadata)
    labelled = store.manifest.set_index("id")[cfg.target].notna()
    ids = [i for i in common_ids(store, keys.values()) if labelled[i]]
    if not ids:
        raise ConfigError(f"no row has both features and a {cfg.target!r} value")
    statistics = statistics_of(store, keys, cfg.normalize)
    X, table, columns, context = feature_frame(store, keys, cfg.metadata, ids, cfg.patient_features, statistics)
    infos = {}
    for name, key in keys.items():
        info = store.info(key)
        infos[name] = {"key": key, "name": info.name, "encoder": info.encoder, "dim": info.dim}
    y, classes = target_codes(cfg, table[cfg.target].astype(str).to_numpy())
    groups = _group_labels(cfg.groups, table)
    _check_class_groups(cfg, y, classes, groups)
    patients = patient_ids(table[cfg.patient_features]) if cfg.patient_features else None
    return ProbeData(X, y, classes, groups, np.asarray(ids), table, keys, columns, infos, context, patients,
                     [s.digest() for s in statistics.values()] if statistics else [])


def load_other_store(cfg: ProbeConfig, path: str, home: ProbeData, split: str | None) -> ProbeData:
    """The rows of another store that a transfer probe scores (``split`` = ``cfg.test_split``) or chooses its
    hyperparameters on (``cfg.select_split``): rows with every feature set of ``home`` under the same fingerprint,
    a target value and, with ``--test-split-column``, that ``split``; their target as ``home``'s class codes.

    Their groups are ``--test-groups`` (default ``--groups``; ``none``: each image its own), prefixed with the
    store's path so no group of two stores is taken for one. Features are normalised as ``home``'s, by this store's
    own statistics under ``--normalize per-store``.
    """
    store = FeatureStore.open(path)
    keys = matching_keys(store, path, [{**home.infos[name], "given_as": name} for name in home.feature_keys])
    target = cfg.test_target or cfg.target
    groups = cfg.test_group_column()
    if cfg.test_groups is None and cfg.groups and cfg.groups not in store.manifest.columns:
        raise ConfigError(f"the test store {path} has no group column {cfg.groups!r}: name its groups with "
                          "--test-groups COL (or --test-groups none: each image its own group)")
    _check_columns(store, f"the table of {path}", target=target, group=groups, split=cfg.test_split_column,
                   patient=cfg.patient_features, metadata=cfg.metadata)
    ids = common_ids(store, keys.values())
    if cfg.test_split_column:
        ids = rows_of_split(store, path, ids, cfg.test_split_column, split)
    labelled = store.manifest.set_index("id")[target].notna()
    ids = [i for i in ids if labelled[i]]
    if not ids:
        which = f" among its {cfg.test_split_column}={split} rows" if cfg.test_split_column else ""
        raise ConfigError(f"no row of {path} with features of {', '.join(keys)} has a {target!r} value{which}")
    statistics = statistics_of(store, keys, cfg.normalize)
    X, table, _, context = feature_frame(store, keys, cfg.metadata, ids, cfg.patient_features, statistics)
    if context != home.context:
        raise ConfigError(f"the patient context of {path} has other columns than this store's ({context} against "
                          f"{home.context}): a metadata column is numeric in one store only")
    y = _codes_of(cfg, table[target].astype(str).to_numpy(), home.classes, path, target)
    group_labels = _group_labels(groups, table, "--test-groups")
    if group_labels is not None:  # one store's lesion L is not another's: the resolved path keeps them apart
        group_labels = f"{Path(path).resolve()}:" + group_labels.astype(object)
    patients = patient_ids(table[cfg.patient_features]) if cfg.patient_features else None
    return ProbeData(X, y, home.classes, group_labels, np.asarray(ids), table, home.feature_keys, home.columns,
                     home.infos, context, patients, [s.digest() for s in statistics.values()] if statistics else [])


def _codes_of(cfg: ProbeConfig, labels: np.ndarray, classes: list[str], path: str, target: str) -> np.ndarray:
    """Another store's labels as the codes of this probe's ``classes``; ConfigError for a class it does not know."""
    if cfg.positive is not None:
        return (labels == (cfg.test_positive or cfg.positive)).astype(int)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ConfigError(f"{target!r} of {path} has values the head was not trained on: {unknown[:5]}; probe "
                          f"classes are {classes}")
    return np.searchsorted(classes, labels)


def joined(home: ProbeData, others: list[ProbeData], metadata: list[str]) -> ProbeData:
    """``home``'s rows followed by each of ``others``' (the same feature columns), as one probe input: non-numeric
    metadata re-made categorical over the values of all stores; groups by image where a store has none; ``home``'s
    statistics digests (the other stores' stay with them)."""
    parts = [home, *others]
    for col in metadata:  # a column empty in one store reads as float there: it takes the others' type
        numeric = {pd.api.types.is_numeric_dtype(p.X[col]) for p in parts if p.X[col].notna().any()}
        if len(numeric) > 1:
            raise ConfigError(f"metadata column {col!r} is numeric in one store and text in another: make it one type "
                              "in both stores' tables")
    X = pd.concat([p.X for p in parts], ignore_index=True)  # a copy of the features: a transfer probe holds them twice
    for col in metadata:
        if not pd.api.types.is_numeric_dtype(X[col]):
            X[col] = X[col].astype(str).where(X[col].notna()).astype("category")
    groups = None
    if any(p.groups is not None for p in parts):
        groups = np.concatenate([p.groups if p.groups is not None else
                                 np.array([f"image {k}:{i}" for i in p.ids], dtype=object)
                                 for k, p in enumerate(parts)])
    patients = None if home.patients is None else np.concatenate([p.patients for p in parts])
    return ProbeData(X, np.concatenate([p.y for p in parts]), home.classes, groups,
                     np.concatenate([p.ids for p in parts]), pd.concat([p.table for p in parts], ignore_index=True),
                     home.feature_keys, home.columns, home.infos, home.context, patients, home.normalization)


def rows_of_split(store: FeatureStore, store_path, ids: list[str], column: str, value: str) -> list[str]:
    """The ``ids`` whose ``column`` is ``value``, compared as text, exactly (the value as the table writes it);
    ConfigError when the column is not there or none of them has that value (naming the values they have)."""
    manifest = store.manifest.set_index("id")
    if column not in manifest.columns:
        raise ConfigError(f"split column {column!r} is not in the table of {store_path}")
    values = manifest.loc[ids, column].astype(str)
    kept = [i for i, v in zip(ids, values) if v == value]
    if not kept:
        seen = sorted(set(values))[:10]
        raise ConfigError(f"no row of {store_path} with features has {column}={value} (values: {', '.join(seen)})")
    return kept


def _check_columns(store: FeatureStore, where: str, metadata: list[str], **named: str | None) -> None:
    """ConfigError naming the first column a probe reads that ``store``'s table lacks, and the columns it has."""
    columns = store.manifest.columns
    for what, col in (*named.items(), *(("metadata", c) for c in metadata)):
        if col and col not in columns:
            usable = ", ".join(c for c in columns if not c.startswith("_") and c not in ("sha256",))
            raise ConfigError(f"{what} column {col!r} is not in {where}; it has: {usable}")


def matching_keys(store: FeatureStore, store_path, features: list[dict]) -> dict[str, str]:
    """Each feature set of ``features`` (dicts of ``key``, ``name``, ``encoder``, ``given_as``) -> its key in
    ``store``; StoreError naming the first one the store lacks with that fingerprint (another crop mode, size or
    weights is another fingerprint)."""
    keys = {}
    for feat in features:
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
    return keys


def target_codes(cfg: ProbeConfig, labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Class codes and class names of the target (``not_<positive>``, ``<positive>`` for a positive-vs-rest probe)."""
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
    return y, classes


def _group_labels(column: str | None, table: pd.DataFrame, option: str = "--groups") -> np.ndarray | None:
    """The group column as strings; ConfigError when some rows have none (each would silently be one group)."""
    if not column:
        return None
    empty = int(table[column].isna().sum())
    if empty:
        raise ConfigError(f"group column {column!r} is empty in {empty} of {len(table)} rows: fill it (e.g. with "
                          f"the image id, one group per image) or choose another {option}")
    return table[column].astype(str).to_numpy()


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


def feature_frame(store: FeatureStore, keys: dict[str, str], metadata: list[str], ids, patient: str | None = None,
                  statistics: dict[str, StoreStatistics] | None = None):
    """The heads' input: ``<name>/<j>`` columns of each feature set (standardised by ``statistics``, the store's
    own, under ``--normalize per-store``), then the metadata columns, then, with a ``patient`` id column, the
    patient-context columns (:mod:`embedstore.probe.patient`).

    Returns the frame, the manifest rows it came from, each set's column names and the context columns' names.
    Non-numeric metadata become pandas categoricals; numeric ones float (NaN kept). The feature sets fill one
    float32 matrix that the frame wraps without a copy (one set: the loaded array itself), so building it holds
    the features once plus one set's rows, not a frame per set and their concatenation.
    """
    sets, columns, table = [], {}, None
    for name, key in keys.items():
        X, t = store.load(key, ids=ids)
        if statistics:
            statistics[name].apply(X)
        table = t if table is None else table
        columns[name] = [f"{name}/{j}" for j in range(X.shape[1])]
        sets.append(X)
    if len(sets) == 1:
        matrix = sets.pop()
    else:
        matrix = np.empty((len(table), sum(x.shape[1] for x in sets)), dtype=np.float32)
        start = 0
        while sets:
            X = sets.pop(0)
            matrix[:, start:start + X.shape[1]] = X
            start += X.shape[1]
            del X
    frame = pd.DataFrame(matrix, columns=[c for name in keys for c in columns[name]], copy=False)
    for col in metadata:
        values = store.manifest.set_index("id").loc[table["id"], col].reset_index(drop=True)
        frame[col] = values.astype(float) if pd.api.types.is_numeric_dtype(values) else values.astype("category")
    if not patient:
        return frame, table, columns, []
    context = patient_context(frame, columns, table[patient].to_numpy(), metadata)
    for column in context.columns:  # added in place: a concatenation would copy every feature column
        frame[column] = context[column].to_numpy()
    return frame, table, columns, list(context.columns)
