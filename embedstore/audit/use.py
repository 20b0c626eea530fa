"""What probe and match runs take from a leakage audit (``embedstore audit``'s run folder).

- :func:`merge_groups`: ``--merge-near-duplicates AUDIT``: the groups of every pair the audit flagged are
  joined (connected components) before the run splits, so a suspected duplicate never straddles its folds. The
  audit may be of any feature set of the store: its pairs are pairs of images.
- :func:`leakage`: how many flagged pairs of the audits of the run's feature sets (those in
  ``<store>.audit/``, and the merged one) have their two images on two sides of the run's split; the run
  says it in one line (:class:`~embedstore.runs.Leakage`). It reads audits, it never runs one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from embedstore.errors import ConfigError
from embedstore.layout import audit_folder
from embedstore.match.cluster import components
from embedstore.runs import GroupMerge, Leakage, is_run_folder, read_run

PAIRS_FILE = "pairs.csv"


def flagged_pairs(audit: str | Path) -> pd.DataFrame:
    """The ids (``id_a``, ``id_b``) of every pair the audit at ``audit`` flagged; ConfigError (one line) when it
    is not an audit or is damaged."""
    run = read_run(audit)
    if run.kind != "audit":
        raise ConfigError(f"{audit} is a {run.kind} run, not an audit: pass a folder written by `embedstore audit`")
    pairs = run.table(PAIRS_FILE)
    if pairs is None or not {"id_a", "id_b"} <= set(pairs.columns):
        raise ConfigError(f"{audit} has no readable {PAIRS_FILE} (the audit folder is damaged): rerun the audit")
    return pairs[["id_a", "id_b"]].astype(str)


def _positions(ids: np.ndarray, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (in ``ids``) of the two images of each pair whose images are both among ``ids``."""
    row = pd.Series(np.arange(len(ids)), index=pd.Index(np.asarray(ids).astype(str)))
    a, b = pairs["id_a"].map(row), pairs["id_b"].map(row)
    both = a.notna() & b.notna()
    return a[both].to_numpy(dtype=np.int64), b[both].to_numpy(dtype=np.int64)


def merge_groups(audit: str | Path, ids: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, GroupMerge]:
    """``groups`` (None: every image its own group, named by its id) with the groups of every pair the audit
    flagged joined; a joined group is named after the first of its groups in sorted order. The audit may be of
    any feature set of the store (its pairs are images), but its pairs must be images of this run. Returns the
    groups and what was merged, for the run record."""
    pairs = flagged_pairs(audit)
    a, b = _positions(ids, pairs)
    if len(pairs) and not len(a):
        raise ConfigError(f"none of the {len(pairs)} pairs flagged by {audit} are images of this run: it audits "
                          "another store (or other rows); audit this store first (embedstore audit)")
    base = np.asarray(ids if groups is None else groups).astype(str)
    codes, names = pd.factorize(pd.Series(base), sort=True)
    label = components(len(names), codes[a], codes[b])
    sizes = np.bincount(label)
    first = np.full(len(sizes), len(names))
    np.minimum.at(first, label, np.arange(len(names)))  # names are sorted: the smallest code is the first name
    merged = np.asarray(names)[first[label]][codes]
    joined = sizes[label] > 1
    return merged, GroupMerge(
        audit=str(audit), pairs=int(len(a)), groups_before=int(len(names)), groups_after=int(len(sizes)),
        groups_merged=int(joined.sum()), groups_formed=int((sizes > 1).sum()),
    )


def audits_of(store: str | Path, keys: Iterable[str]) -> list[Path]:
    """The audit folders beside ``store`` (``<store>.audit/*``) that audit one of the feature sets ``keys``."""
    folder, keys = audit_folder(store), set(keys)
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not is_run_folder(entry):
            continue
        try:
            run = read_run(entry)
        except Exception:  # noqa: BLE001 - a damaged audit is skipped here; reading it explicitly says why
            continue
        if run.kind == "audit" and keys & set(run.record.features):
            found.append(entry)
    return found


def leakage(store: str | Path, keys: Iterable[str], ids: np.ndarray, side: np.ndarray,
            merged_from: str | Path | None = None) -> Leakage | None:
    """How many pairs flagged by the audits of ``keys`` (beside ``store``, and ``merged_from``) have their two
    images on two sides of the run: ``side`` names each row's side (``fold 0``, ``test``, ...; empty for a row
    the run does not use). None when no audit exists."""
    keys = list(keys)
    audits = audits_of(store, keys)
    if merged_from is not None and Path(merged_from).resolve() not in {p.resolve() for p in audits}:
        audits.append(Path(merged_from))
    if not audits:
        return None
    pairs = pd.concat([flagged_pairs(a) for a in audits], ignore_index=True)
    ordered = np.sort(pairs.to_numpy(dtype=str), axis=1)
    pairs = pd.DataFrame(ordered, columns=["id_a", "id_b"]).drop_duplicates()
    a, b = _positions(ids, pairs)
    side = np.asarray(side).astype(str)
    used = (side[a] != "") & (side[b] != "")
    return Leakage(audits=tuple(str(p) for p in audits), flagged=int(used.sum()),
                   straddling=int((used & (side[a] != side[b])).sum()))
