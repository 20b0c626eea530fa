"""Where the files that live beside a feature store go: the one module that places them.

A store ``stores/ham.zarr`` holds only zarr data. What embedstore derives from it and keeps
for reuse sits next to it, named after it, so copying or deleting a store with its neighbours is
one glob (``stores/ham*``):

- ``stores/ham.optuna.db``: the default Optuna storage of the probe's tuning studies;
- ``stores/ham.zarr.index/<key>.faiss`` (+ ``<key>.json``, its sidecar): the FAISS index of a feature set;
- ``stores/ham.zarr.index/<key>.head/``: the projection head that produced the derived feature set ``key``;
- ``stores/ham.zarr.audit/<features>/``: the leakage audit of a feature set (``embedstore audit``'s default
  folder), which ``probe`` and ``match`` read to say whether their folds cut a suspected duplicate.

:func:`remove_orphans` clears those of feature sets the store no longer holds.
"""

from __future__ import annotations

from pathlib import Path

from embedstore.atomic import clean_stale, remove_folder, written_by_embedstore


def study_storage(store_path: str | Path) -> str:
    """The default Optuna storage URL of a store: ``sqlite:///<store folder>/<store name>.optuna.db``."""
    store_path = Path(store_path).resolve()
    return f"sqlite:///{store_path.parent / (store_path.name.removesuffix('.zarr') + '.optuna.db')}"


def index_folder(store_path: str | Path) -> Path:
    """The folder of a store's saved indices and projection heads (never inside the zarr tree)."""
    store_path = Path(store_path)
    return store_path.parent / f"{store_path.name}.index"


def index_file(store_path: str | Path, key: str) -> Path:
    """The saved FAISS index of feature set ``key``."""
    return index_folder(store_path) / f"{key}.faiss"


def index_sidecar(index: Path) -> Path:
    """The JSON sidecar of a saved index: what it was built from, and its checksum."""
    return Path(index).with_suffix(".json")


def projection_head_folder(store_path: str | Path, key: str) -> Path:
    """The projection head that produced the derived feature set ``key``."""
    return index_folder(store_path) / f"{key}.head"


def audit_folder(store_path: str | Path) -> Path:
    """The folder of a store's leakage audits: one run folder each, named as the feature set was given to
    ``embedstore audit`` (the run's ``run.json`` holds the set's key)."""
    store_path = Path(store_path)
    return store_path.parent / f"{store_path.name}.audit"


def remove_orphans(store) -> list[Path]:
    """Remove the indices and projection heads beside ``store`` (a FeatureStore) whose feature set is gone
    (replaced by a newer projection, or left behind by a killed run), and the hidden copies of killed
    writes in that folder; returns what was removed."""
    folder = index_folder(store.path)
    if not folder.is_dir():
        return []
    keys = {info.key for info in store.feature_sets()}
    removed = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name.split(".")[0] in keys:
            continue
        if entry.suffix == ".head" and entry.is_dir() and (written_by_embedstore(entry) or (entry / "projection.json").is_file()):
            remove_folder(entry)
        elif entry.suffix in (".faiss", ".json") and entry.is_file():
            entry.unlink()
        else:
            continue
        removed.append(entry)
    for entry in folder.iterdir():  # hidden copies of killed writes: .<name>.embedstore-tmp-<pid>-...
        if entry.name.startswith(".") and ".embedstore-" in entry.name:
            removed += clean_stale(folder / entry.name[1:].split(".embedstore-")[0])
    return removed
