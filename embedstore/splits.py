"""Group-aware folds and hold-outs: no lesion (or patient) is ever on both sides of a split.

Every function is seeded, returns integer row indices, and raises a
:class:`~embedstore.errors.ConfigError` with a one-line message when the data
cannot be split as asked (too few groups, a fold with no positives).

An official split column (:func:`column_split`) has three sides: train, test and
validation. The usual spellings of each are recognised (:data:`SPELLINGS`;
``dev`` is validation, as in most ML datasets' train/dev/test); a validation
split is never scored as test. Any other value is refused, listed, unless the
user maps it (``--split-map VALUE=train|valid|test|drop``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from embedstore.errors import ConfigError

Split = tuple[np.ndarray, np.ndarray]

#: The recognised spellings of each side of an official split column (lower-cased, stripped).
SPELLINGS = {
    "train": {"train", "training", "trn", "0", "false"},
    "test": {"test", "testing", "tst", "holdout", "1", "true"},
    "valid": {"val", "valid", "validation", "dev", "development"},
}
#: What ``--split-map VALUE=ACTION`` can do with the rows of a value.
SPLIT_ACTIONS = ("train", "test", "valid", "drop")


def group_kfold(y, groups, n_splits: int = 5, seed: int = 0, class_names=None) -> list[Split]:
    """Stratified group k-fold: folds keep class proportions as well as whole groups allow.

    ``groups=None`` makes every row its own group. Raises ConfigError when
    there are fewer groups than folds or when a test fold lacks a class that
    the training data has (an AUC would be undefined there), naming the class
    by ``class_names[code]`` when ``y`` holds codes.
    """
    y = np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    n_groups = len(pd.unique(groups))
    if n_groups < n_splits:
        raise ConfigError(f"only {n_groups} groups for {n_splits} folds: use fewer folds (--folds)")
    fold_of_row = _stratified_group_folds(y, groups, n_splits, seed)
    rows = np.arange(len(y))
    folds = [(rows[fold_of_row != k], rows[fold_of_row == k]) for k in range(n_splits)]
    for k, (_, test) in enumerate(folds):
        missing = set(np.unique(y)) - set(np.unique(y[test]))
        if missing:
            named = [class_names[c] if class_names is not None else c for c in sorted(m.item() for m in missing)]
            raise ConfigError(
                f"fold {k} has no rows of class(es) {', '.join(map(repr, named))}: too few groups of that class "
                f"for {n_splits} folds; use fewer folds or merge rare classes"
            )
    return folds


def _stratified_group_folds(y, groups, n_splits: int, seed: int) -> np.ndarray:
    """The fold of every row, exactly as scikit-learn's ``StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed)`` assigns it, in a fraction of its time.

    Its greedy algorithm is kept step for step (groups shuffled by ``RandomState(seed)``, stably sorted by
    the spread of their class counts, each put where the folds' per-class shares vary least, ties to the
    smaller fold), so folds, and every result computed on them, stay what they were. What changes is that
    each group's candidate folds are scored in one array operation instead of a Python loop of array
    operations: 0.8 s instead of 3.9 s for HAM10000's 7,470 lesions in 5 folds (measured beside another job),
    which nested tuning pays per outer fold.
    """
    _, y_inv, y_cnt = np.unique(np.asarray(y), return_inverse=True, return_counts=True)
    if np.all(n_splits > y_cnt):
        raise ConfigError(f"every class has fewer than {n_splits} rows: use fewer folds (--folds)")
    _, groups_inv = np.unique(groups, return_inverse=True)
    n_groups, n_classes = groups_inv.max() + 1, len(y_cnt)
    counts = np.zeros((n_groups, n_classes))
    np.add.at(counts, (groups_inv, y_inv), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    counts = counts[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n_groups)
    groups_inv = inv_perm[groups_inv]
    order = np.argsort(-np.std(counts, axis=1), kind="stable")
    per_fold = np.zeros((n_splits, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    diagonal = np.arange(n_splits)
    for group in order:
        candidates = np.broadcast_to(per_fold, (n_splits, n_splits, n_classes)).copy()
        candidates[diagonal, diagonal] += counts[group]  # candidate i: the group added to fold i
        scores = np.std(candidates / y_cnt, axis=1).mean(axis=1).tolist()
        sizes = per_fold.sum(axis=1).tolist()
        best, best_score, best_size = 0, np.inf, np.inf
        for i in range(n_splits):  # scikit-learn's order and tie rule (np.isclose's, written out: it is slow)
            close = best_score != np.inf and abs(scores[i] - best_score) <= 1e-8 + 1e-5 * abs(best_score)
            if scores[i] < best_score or (close and sizes[i] < best_size):
                best, best_score, best_size = i, scores[i], sizes[i]
        per_fold[best] += counts[group]
        fold_of_group[group] = best
    return fold_of_group[groups_inv]


def group_holdout(y, groups, test_size: float = 0.2, seed: int = 0, class_names=None) -> Split:
    """A stratified group hold-out of about ``test_size`` of the rows (one fold of a group k-fold)."""
    if not 0.0 < test_size < 0.5:
        raise ConfigError(f"hold-out fraction must be between 0 and 0.5, got {test_size}")
    n_splits = int(round(1.0 / test_size))
    return group_kfold(y, groups, n_splits=n_splits, seed=seed, class_names=class_names)[0]


@dataclass
class ColumnSplit:
    """Row indices of each side of an official split column; ``dropped`` rows are on none."""

    train: np.ndarray
    test: np.ndarray
    valid: np.ndarray
    dropped: np.ndarray


def column_split(values, split_map: dict | None = None, needs_test: bool = True) -> ColumnSplit:
    """Train, test and validation rows from an official split column.

    Values are read case-insensitively (:data:`SPELLINGS`: train/training/0/false,
    test/testing/holdout/1/true, val/valid/validation/dev). ``split_map`` maps
    values to an action of :data:`SPLIT_ACTIONS` and takes precedence (``{"valid":
    "train"}`` folds validation rows into training, ``{"excluded": "drop"}`` leaves
    rows out). Any other value is refused, listed, in one line, as is a split with no training rows, or
    (``needs_test``) no test rows.
    """
    words = pd.Series([_split_word(v) for v in values], dtype=object)
    actions = {word: side for side, spelled in SPELLINGS.items() for word in spelled}
    actions.update(_split_actions(split_map or {}, set(words)))
    unknown = sorted(set(words) - set(actions))
    if unknown:
        raise ConfigError(
            f"split column has values {unknown[:8]} that are not train, valid or test: map each with "
            f"--split-map VALUE=train|valid|test|drop (e.g. --split-map {unknown[0]}=drop)"
        )
    side = words.map(actions).to_numpy()
    split = ColumnSplit(*(np.flatnonzero(side == name) for name in ("train", "test", "valid", "drop")))
    if not len(split.train) or (needs_test and not len(split.test)):
        raise ConfigError("split column puts no row on the train or on the test side: it needs both")
    return split


def _split_word(value) -> str:
    """A split value as the word it is matched by: stripped, lower case; 1.0 reads as 1, a missing value as nan."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower()


def _split_actions(split_map: dict, words: set[str]) -> dict[str, str]:
    """``split_map`` with its keys read as :func:`_split_word` does; refuses unknown actions and absent values."""
    actions = {_split_word(k): str(v).strip().lower() for k, v in split_map.items()}
    bad = {k: v for k, v in actions.items() if v not in SPLIT_ACTIONS}
    if bad:
        raise ConfigError(f"--split-map {bad}: each value maps to one of {', '.join(SPLIT_ACTIONS)}")
    absent = sorted(set(actions) - words)
    if absent:
        raise ConfigError(f"--split-map names {absent}, which the split column does not have "
                          f"(it has {sorted(words)[:8]})")
    return actions


def check_disjoint(groups, train, test, sides: tuple[str, str] = ("train", "test")) -> None:
    """Raise ConfigError if any group has rows on both sides (e.g. an official split that leaks lesions)."""
    groups = np.asarray(groups)
    shared = set(groups[train]) & set(groups[test])
    if shared:
        example = sorted(map(str, shared))[:3]
        raise ConfigError(
            f"{len(shared)} group(s) appear in both {sides[0]} and {sides[1]} (e.g. {example}): "
            "the split leaks; fix the split column or drop --groups"
        )
