"""Group-aware folds and hold-outs: no lesion (or patient) is ever on both sides of a split.

Every function is seeded, returns integer row indices, and raises a
:class:`~embedstore.errors.ConfigError` with a one-line message when the data
cannot be split as asked (too few groups, a fold with no positives).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from embedstore.errors import ConfigError

Split = tuple[np.ndarray, np.ndarray]

_TRAIN_WORDS = {"train", "training", "trn", "dev", "0", "false"}
_TEST_WORDS = {"test", "testing", "tst", "holdout", "val", "validation", "1", "true"}


def group_kfold(y, groups, n_splits: int = 5, seed: int = 0) -> list[Split]:
    """Stratified group k-fold: folds keep class proportions as well as whole groups allow.

    ``groups=None`` makes every row its own group. Raises ConfigError when
    there are fewer groups than folds or when a test fold lacks a class that
    the training data has (an AUC would be undefined there).
    """
    y = np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    n_groups = len(pd.unique(groups))
    if n_groups < n_splits:
        raise ConfigError(f"only {n_groups} groups for {n_splits} folds: use fewer folds (--folds)")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = [(np.sort(tr), np.sort(te)) for tr, te in cv.split(np.zeros(len(y)), y, groups)]
    for k, (_, test) in enumerate(folds):
        missing = set(np.unique(y)) - set(np.unique(y[test]))
        if missing:
            raise ConfigError(
                f"fold {k} has no rows of class(es) {sorted(missing)}: too few groups of that class "
                f"for {n_splits} folds; use fewer folds or merge rare classes"
            )
    return folds


def group_holdout(y, groups, test_size: float = 0.2, seed: int = 0) -> Split:
    """A stratified group hold-out of about ``test_size`` of the rows (one fold of a group k-fold)."""
    if not 0.0 < test_size < 0.5:
        raise ConfigError(f"hold-out fraction must be between 0 and 0.5, got {test_size}")
    n_splits = int(round(1.0 / test_size))
    return group_kfold(y, groups, n_splits=n_splits, seed=seed)[0]


def column_split(values) -> Split:
    """Train/test rows from an official split column (``train``/``test``, ``training``/``test``, 0/1, booleans)."""
    words = pd.Series(values).astype(str).str.strip().str.lower()
    unknown = sorted(set(words) - _TRAIN_WORDS - _TEST_WORDS)
    if unknown:
        raise ConfigError(
            f"split column has values {unknown[:5]} that are neither train nor test "
            "(expected train/test, training/test, 0/1 or true/false)"
        )
    is_test = words.isin(_TEST_WORDS).to_numpy()
    if is_test.all() or not is_test.any():
        raise ConfigError("split column puts every row on one side: it needs both train and test rows")
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def check_disjoint(groups, train, test) -> None:
    """Raise ConfigError if any group has rows on both sides (e.g. an official split that leaks lesions)."""
    groups = np.asarray(groups)
    shared = set(groups[train]) & set(groups[test])
    if shared:
        example = sorted(map(str, shared))[:3]
        raise ConfigError(
            f"{len(shared)} group(s) appear in both train and test (e.g. {example}): "
            "the split leaks; fix the split column or drop --groups"
        )
