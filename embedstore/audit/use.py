"""What probe and match runs take from a leakage audit (``embedstore audit``'s run folder).

- :func:`merge_groups`: ``--merge-near-duplicates AUDIT`` (or a cosine similarity): the groups of every pair
  the audit flagged (:func:`pairs_to_merge`; with a number, the run's own near-duplicates at that similarity) are
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

from embedstore.audit.find import candidate_graph
from embedstore.errors import ConfigError, EmbedstoreError
from embedstore.layout import audit_folder
from embedstore.match.cluster import components
from embedstore.runs import GroupMerge, Leakage, is_run_folder, read_run
from embedstore.runs.config import merge_threshold

PAIRS_FILE = "pairs.csv"


def flagged_pairs(audit: str | Path, store: str | Path | None = None) -> pd.DataFrame:
    """The ids (``id_a``, ``id_b``) of every pair the audit at ``audit`` flagged; ConfigError (one line) when it
    is not an audit, is damaged, or (given ``store``) audits another store."""
    run = read_run(audit)
    if run.kind != "audit":
        raise ConfigError(f"{audit} is a {run.kind} run, not an audit: pass a folder written by `embedstore audit`")
    if store is not None and Path(run.record.store).resolve() != Path(store).resolve():
        raise ConfigError(f"{audit} audits the store {run.record.store}, not {Path(store).resolve()}: audit this "
                          "store first (embedstore audit)")
    pairs = run.table(PAIRS_FILE)
    if pairs is None or not {"id_a", "id_b"} <= set(pairs.columns):
        raise ConfigError(f"{audit} has no readable {PAIRS_FILE} (the audit folder is damaged): rerun the audit")
    return pairs[["id_a", "id_b"]]


def _positions(ids: np.ndarray, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (in ``ids``) of the two images of each pair whose images are both among ``ids``."""
    row = pd.Series(np.arange(len(ids)), index=pd.Index(np.asarray(ids).astype(str)))
    a, b = pairs["id_a"].map(row), pairs["id_b"].map(row)
    both = a.notna() & b.notna()
    return a[both].to_numpy(dtype=np.int64), b[both].to_numpy(dtype=np.int64)


def near_duplicate_pairs(X: np.ndarray, ids: np.ndarray, sha256: np.ndarray, threshold: float,
                         neighbors: int = 10, seed: int = 0) -> pd.DataFrame:
    """The ids (``id_a``, ``id_b``) of the pairs of rows of ``X`` whose cosine similarity is at or above
    ``threshold`` among each row's ``neighbors`` nearest (the audit's kNN graph), and of identical bytes."""
    code = pd.factorize(pd.Series(sha256))[0]
    pairs = candidate_graph(X, ids, code, neighbors, seed=seed)
    keep = (pairs.sim >= threshold) | (code[pairs.i] == code[pairs.j])
    ids = np.asarray(ids).astype(str)
    return pd.DataFrame({"id_a": ids[pairs.i[keep]], "id_b": ids[pairs.j[keep]]})


def pairs_to_merge(spec: str | Path, store: str | Path, ids: np.ndarray, X: np.ndarray,
                   sha256: np.ndarray, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """The pairs ``--merge-near-duplicates SPEC`` joins and how to name their source: an audit folder's flagged
    pairs, or, for a number, the near-duplicates of the run's own features ``X`` at that similarity."""
    threshold = merge_threshold(spec)
    if threshold is None:
        return flagged_pairs(spec, store), str(spec)
    return near_duplicate_pairs(X, ids, sha256, threshold, seed=seed), f"cosine >= {threshold:g}"


def merge_groups(pairs: pd.DataFrame, source: str, ids: np.ndarray, groups: np.ndarray | None,
                 fixed: np.ndarray | None = None) -> tuple[np.ndarray, GroupMerge]:
    """``groups`` (None: every image its own group, named by its id) with the groups of every pair (``id_a``,
    ``id_b``) joined; a joined group is named after the first of its groups in sorted order.

    Pairs with an image outside the run's rows (``ids``) are left out, and so are pairs across the run's fixed
    split (``fixed``: each row's side, e.g. train / test of a split column), which regrouping cannot join.
    Returns the groups and what was merged (``source`` names where the pairs came from), for the run record."""
    a, b = _positions(ids, pairs)
    across = np.zeros(len(a), dtype=bool) if fixed is None else np.asarray(fixed)[a] != np.asarray(fixed)[b]
    a, b = a[~across], b[~across]
    base = np.asarray(ids if groups is None else groups).astype(str)
    codes, names = pd.factorize(pd.Series(base), sort=True)
    label = components(len(names), codes[a], codes[b])
    sizes = np.bincount(label)
    first = np.full(len(sizes), len(names))
    np.minimum.at(first, label, np.arange(len(names)))  # names are sorted: the smallest code is the first name
    merged = np.asarray(names)[first[label]][codes]
    return merged, GroupMerge(
        audit=source, pairs=int(len(a)), pairs_across_split=int(across.sum()), groups_before=int(len(names)),
        groups_after=int(len(sizes)), groups_merged=int((sizes[label] > 1).sum()), groups_formed=int((sizes > 1).sum()),
    )


def merged_audit(spec: str | Path | None) -> str | Path | None:
    """The audit folder ``--merge-near-duplicates`` names (None for a threshold or none)."""
    return None if spec is None or merge_threshold(spec) is not None else spec


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
        except EmbedstoreError:  # a damaged audit is skipped here; reading it explicitly says why
            continue
        if run.kind == "audit" and keys & set(run.record.features):
            found.append(entry)
    return found


def leakage(store: str | Path, keys: Iterable[str], ids: np.ndarray, side: np.ndarray,
            merged_from: str | Path | None = None) -> Leakage | None:
    """How many pairs flagged by the audits of ``keys`` (beside ``store``, and ``merged_from``) have their two
    images on two sides of the run: ``side`` names each row's side (``fold 0``, ``fold 1``, ..., ``test``,
    ``valid``; empty for a row the run does not use). Two folds are a straddle; a fold and ``test`` (or
    ``valid``) lie across the fixed split. An audit beside the store that cannot be read is passed over (the
    run goes on); None when no audit exists."""
    audits = audits_of(store, keys)
    merged_path = None if merged_from is None else Path(merged_from).resolve()
    if merged_path is not None and merged_path not in {p.resolve() for p in audits}:
        audits.append(Path(merged_from))
    read, parts, merged = [], [], None
    for audit in audits:
        try:
            parts.append(flagged_pairs(audit))
        except EmbedstoreError:
            if audit.resolve() == merged_path:
                raise
            continue
        read.append(audit)
        if audit.resolve() == merged_path:
            merged = str(audit)
    if not read:
        return None
    pairs = pd.concat(parts, ignore_index=True)
    ordered = np.sort(pairs.to_numpy(dtype=str), axis=1)
    pairs = pd.DataFrame(ordered, columns=["id_a", "id_b"]).drop_duplicates()
    a, b = _positions(ids, pairs)
    side = np.asarray(side).astype(str)
    used = (side[a] != "") & (side[b] != "")
    apart = used & (side[a] != side[b])
    folds = np.char.startswith(side[a], "fold") & np.char.startswith(side[b], "fold")
    return Leakage(audits=tuple(str(p) for p in read), flagged=int(used.sum()), straddling=int((apart & folds).sum()),
                   across_split=int((apart & ~folds).sum()), merged=merged)
