"""``embedstore predict``: apply a saved head to a store whose feature sets have the fingerprints it was trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from embedstore.atomic import write_file
from embedstore.errors import ConfigError, StoreError
from embedstore.heads import decide, load_head
from embedstore.probe.card import read_card
from embedstore.probe.data import common_ids, feature_frame, matching_keys, rows_of_split
from embedstore.probe.normalize import statistics_of
from embedstore.store import FeatureStore


def predict(head_dir: str | Path, store_path: str | Path, out: str | Path,
            split: tuple[str, str] | None = None) -> pd.DataFrame:
    """Apply a saved head to every row of ``store_path`` that has its feature sets (with ``split=(column, value)``,
    only the rows whose ``column`` is ``value``); write CSV or parquet, with a ``y_true`` column where the store has
    the head's target (:func:`_labels`).

    Refuses a head that is not a skops file of trusted types (:func:`embedstore.heads.load_head`), and a store
    whose feature sets have another fingerprint than the ones the head was trained on. A head trained with
    ``--normalize per-store`` standardises this store's features on this store's own statistics (all its rows of
    the feature set, whatever ``split``). The file is written aside and renamed into place.
    """
    head_dir = Path(head_dir)
    card = read_card(head_dir)
    model = load_head(head_dir)
    _check_out(out)
    store = FeatureStore.open(store_path)
    keys = matching_keys(store, store_path, card["features"])
    patient = card.get("patient_features")  # cards written before patient context have none
    missing = [c for c in card["metadata"] if c not in store.manifest.columns]
    if missing:
        raise ConfigError(f"the head reads metadata column(s) {missing}, which {store_path} does not have")
    if patient and patient not in store.manifest.columns:
        raise ConfigError(f"the head reads each image's patient context from column {patient!r}, which {store_path} "
                          "does not have")
    ids = common_ids(store, keys.values())
    if not ids:
        raise StoreError(f"{store_path} has no finished rows of {', '.join(keys)} to predict: run `embedstore extract` "
                         "first (`embedstore ls` shows what is pending or failed)")
    if split is not None:
        ids = rows_of_split(store, store_path, ids, *split)
    statistics = statistics_of(store, keys, card.get("normalize", "train"))  # cards before #15: train
    X, table, _, context = feature_frame(store, keys, card["metadata"], ids, patient, statistics)
    lacking = sorted(set(card.get("patient_context", [])) - set(context))
    if lacking:
        raise ConfigError(f"the head reads patient context {lacking}, which cannot be made from {store_path} (a "
                          "metadata column that is not numeric there?)")
    proba = model.predict_proba(X)
    classes = np.asarray(card["classes"], dtype=object)
    frame = pd.DataFrame({"id": table["id"].to_numpy(), "y_pred": classes[decide(model, proba)]})
    for k, c in enumerate(card["classes"]):
        frame[f"p_{c}"] = proba[:, k]
    truth = _labels(store, card, table["id"])
    if truth is not None:
        frame.insert(1, "y_true", truth)
    if Path(out).suffix == ".parquet":
        write_file(out, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        write_file(out, lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def _check_out(out: str | Path) -> None:
    """ConfigError unless ``out`` may be a predictions file: not a folder, not inside a zarr store."""
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give a .csv or .parquet file to write")
    inside = [d for d in Path(out).resolve().parents if (d / "zarr.json").is_file()]
    if inside:
        raise ConfigError(f"--out {out} is inside the zarr store {inside[-1]}; write predictions outside any store")


def _labels(store: FeatureStore, card: dict, ids: pd.Series) -> np.ndarray | None:
    """The true class of each row (None where it has no label) when ``store`` has the head's target column; for a
    positive-vs-rest head, only when the positive class is one of its values (otherwise the column means
    something else there, and every row would read as a negative)."""
    column = card["target"]
    if column not in store.manifest.columns:
        return None
    values = store.manifest.set_index("id")[column]
    labels = values.loc[ids].to_numpy(dtype=object)
    missing = pd.isna(labels)
    labels = np.where(missing, None, labels.astype(str))
    positive = card["positive_class"]
    if positive is None:
        return labels
    if positive not in set(values.dropna().astype(str)):
        return None
    return np.where(missing, None, np.where(labels == positive, card["classes"][1], card["classes"][0]))

