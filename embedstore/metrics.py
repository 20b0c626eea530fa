"""Pure metric functions of arrays, and grouped bootstrap confidence intervals.

Conventions: ``y_true`` holds integer class codes ``0..K-1``; ``proba`` is an
``[n, K]`` array of class probabilities whose column ``k`` belongs to class
``k``; ``y_pred`` holds the predicted class codes (a head's ``predict``, not
always the argmax of ``proba``). A binary problem has ``K == 2`` and class 1
is the positive class.
Nothing here reads files or fits models, so every function can be checked
against a direct computation and reused by any engineer (probe, match, report).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm


class CI(NamedTuple):
    """A point estimate with the bounds of its bootstrap confidence interval."""

    value: float
    low: float
    high: float


# ----------------------------------------------------------------------------- ranking metrics


def binary_auc(y_true, score) -> float:
    """ROC AUC of a binary problem by the rank-sum (Mann-Whitney) formula, ties counted half.

    Equal to ``sklearn.metrics.roc_auc_score`` but several times faster, which
    matters inside a 1000-sample bootstrap. NaN when one class is absent.
    """
    y = np.asarray(y_true).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true, proba) -> float:
    """ROC AUC: binary on the positive column, else the unweighted mean of one-vs-rest AUCs.

    The multiclass value equals ``roc_auc_score(..., multi_class="ovr",
    average="macro")``; classes absent from ``y_true`` (possible in a bootstrap
    resample) are left out of the mean instead of failing.
    """
    y = np.asarray(y_true)
    p = np.asarray(proba)
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    aucs = [binary_auc(y == k, p[:, k]) for k in range(p.shape[1])]
    return float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")


def binary_average_precision(y_true, score) -> float:
    """Average precision of a binary problem (the area under its precision-recall steps)."""
    return float(skm.average_precision_score(np.asarray(y_true).astype(bool), score))


def average_precision(y_true, proba) -> float:
    """Average precision: binary on the positive column, else the macro mean over classes present."""
    y = np.asarray(y_true)
    p = np.asarray(proba)
    cols = [1] if p.shape[1] == 2 else range(p.shape[1])
    aps = [binary_average_precision(y == k, p[:, k]) for k in cols if np.any(y == k)]
    return float(np.mean(aps)) if aps else float("nan")


def partial_auc(y_true, score, min_tpr: float = 0.8) -> float:
    """Partial ROC AUC above ``min_tpr`` true-positive rate, as scored by the ISIC 2024 challenge.

    The area between the ROC curve and the horizontal line TPR = ``min_tpr``,
    so it ranges from 0 to ``1 - min_tpr`` (0.2 by default). Computed exactly
    as the challenge's metric: flip labels and negate scores (so the region
    TPR >= min_tpr becomes FPR <= 1 - min_tpr), take sklearn's McClish-
    standardised ``roc_auc_score(max_fpr=...)`` and undo the standardisation.
    NaN when one class is absent.
    """
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    max_fpr = 1.0 - min_tpr
    scaled = skm.roc_auc_score(~y, -np.asarray(score, dtype=np.float64), max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / 0.5 * (scaled - 0.5))


def sensitivity_at_specificity(y_true, score, specificity: float = 0.9) -> float:
    """Highest sensitivity (TPR) among ROC operating points whose specificity is at least ``specificity``."""
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, _ = skm.roc_curve(y, score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max())


def roc_points(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve of a binary problem as (false positive rates, true positive rates), for drawing."""
    fpr, tpr, _ = skm.roc_curve(np.asarray(y_true).astype(bool), score)
    return fpr, tpr


def precision_recall_points(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    """The precision-recall curve of a binary problem as (recalls, precisions), for drawing as steps."""
    precision, recall, _ = skm.precision_recall_curve(np.asarray(y_true).astype(bool), score)
    return recall, precision


# ----------------------------------------------------------------------------- calibration


class Calibration(NamedTuple):
    """Equal-width bins of predicted probability: per bin the mean confidence, the observed
    frequency of the event and the number of predictions; ``ece`` is the expected calibration
    error (the count-weighted mean gap between confidence and frequency)."""

    edges: np.ndarray
    confidence: np.ndarray
    observed: np.ndarray
    counts: np.ndarray
    ece: float


def calibration(confidence, outcome, n_bins: int = 10) -> Calibration:
    """Reliability bins of ``confidence`` (probabilities in [0, 1]) against ``outcome`` (did the event happen).

    A probability on a bin edge falls in the upper bin, 1.0 in the last; empty bins have
    confidence and frequency 0 and count 0 (and weigh nothing in ``ece``).
    """
    confidence = np.asarray(confidence, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    safe = np.maximum(counts, 1)
    mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / safe
    observed = np.bincount(index, weights=np.asarray(outcome).astype(float), minlength=n_bins) / safe
    ece = float(np.sum(counts * np.abs(mean_confidence - observed)) / max(counts.sum(), 1))
    return Calibration(edges, mean_confidence, observed, counts, ece)


# ----------------------------------------------------------------------------- label metrics


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Confusion matrix ``[n_classes, n_classes]``: rows are true classes, columns predictions."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def accuracy(y_true, y_pred) -> float:
    """Fraction of rows whose predicted class is the true one."""
    return float(np.mean(np.asarray(y_pred) == np.asarray(y_true)))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean per-class recall over the classes present in ``y_true``.

    Equal to ``sklearn.metrics.balanced_accuracy_score``, by two bincounts (it
    runs a thousand times per bootstrap interval).
    """
    y = np.asarray(y_true)
    pred = np.asarray(y_pred)
    n = np.bincount(y)
    hits = np.bincount(y[pred == y], minlength=n.size)
    present = n > 0
    return float(np.mean(hits[present] / n[present]))


def _prf(average: str, which: int) -> Callable[[np.ndarray, np.ndarray, int], float]:
    """Precision (0), recall (1) or F1 (2) of the predicted classes, ``average`` over all ``n_classes``."""

    def metric(y_true, y_pred, n_classes: int) -> float:
        values = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=np.arange(n_classes), average=average, zero_division=0
        )
        return float(values[which])

    return metric


# ----------------------------------------------------------------------------- metric tables

#: Metrics of the predicted classes (a head's ``predict``): name -> f(y_true, y_pred, n_classes).
LABEL_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "accuracy": lambda y, pred, k: accuracy(y, pred),
    "balanced_accuracy": lambda y, pred, k: balanced_accuracy(y, pred),
    "precision_macro": _prf("macro", 0),
    "recall_macro": _prf("macro", 1),
    "f1_macro": _prf("macro", 2),
    "precision_weighted": _prf("weighted", 0),
    "recall_weighted": _prf("weighted", 1),
    "f1_weighted": _prf("weighted", 2),
}

#: Metrics of the class probabilities (a head's ``predict_proba``): name -> f(y_true, proba).
SCORE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "roc_auc": roc_auc,
    "average_precision": average_precision,
}

#: Extra score metrics of binary probes, on the positive-class probability.
BINARY_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "pauc_80": lambda y, p: partial_auc(np.asarray(y) == 1, np.asarray(p)[:, 1], min_tpr=0.8),
    "sensitivity_at_90_specificity": lambda y, p: sensitivity_at_specificity(
        np.asarray(y) == 1, np.asarray(p)[:, 1], 0.9
    ),
}

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def metric_functions(n_classes: int) -> dict[str, Metric]:
    """The metrics of a problem with ``n_classes`` classes, by name, each as ``f(y_true, proba, y_pred)``.

    Label metrics (accuracy, balanced accuracy, precision/recall/F1) score the
    predicted classes ``y_pred``, ranking metrics (ROC AUC, AP, pAUC) the
    probabilities, as scikit-learn scores ``predict`` and ``predict_proba``.
    The two differ when a head's decision rule is not the plain argmax (see
    :class:`embedstore.heads.BalancedDecision`). One signature for all lets a
    bootstrap resample ``(y_true, proba, y_pred)`` together.
    """
    table: dict[str, Metric] = {}
    for name, fn in LABEL_METRICS.items():
        table[name] = lambda y, p, pred, fn=fn: fn(y, pred, n_classes)
    scores = {**SCORE_METRICS, **(BINARY_METRICS if n_classes == 2 else {})}
    for name, fn in scores.items():
        table[name] = lambda y, p, pred, fn=fn: fn(y, p)
    return table


def evaluate(y_true, proba, y_pred=None) -> dict[str, float]:
    """Every applicable metric of one set of predictions (no intervals), by name.

    ``y_pred`` (class codes) defaults to the most probable class of each row.
    """
    p = np.asarray(proba)
    pred = p.argmax(1) if y_pred is None else np.asarray(y_pred)
    return {name: fn(y_true, p, pred) for name, fn in metric_functions(p.shape[1]).items()}


# ----------------------------------------------------------------------------- matching metrics


def _n_pairs(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    return counts * (counts - 1) // 2


def pair_counts_by_group(groups, clusters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair counts of a grouping, split by true group so lesions can be resampled.

    Returns float arrays over the sorted unique ``groups``: ``tp`` (pairs of the group put in
    one cluster), ``positive`` (all pairs of the group) and ``predicted`` (pairs put in one
    cluster that touch the group, each counted half at either end). Summed over groups they
    are exactly the pairwise true positives, positives and predicted positives of all pairs,
    without ever listing the pairs.
    """
    g = np.unique(np.asarray(groups), return_inverse=True)[1]
    c = np.unique(np.asarray(clusters), return_inverse=True)[1]
    n_groups = int(g.max()) + 1 if g.size else 0
    n_clusters = int(c.max()) + 1 if c.size else 1
    cells, cell_size = np.unique(g.astype(np.int64) * n_clusters + c, return_counts=True)
    tp = np.bincount(cells // n_clusters, weights=_n_pairs(cell_size), minlength=n_groups)
    positive = _n_pairs(np.bincount(g, minlength=n_groups)).astype(float)
    cluster_size = np.bincount(c)
    predicted = np.bincount(g, weights=(cluster_size[c] - 1) / 2.0, minlength=n_groups)
    return tp, positive, predicted


def pairwise_scores(tp: float, positive: float, predicted: float) -> dict[str, float]:
    """Precision, recall and F1 from pair counts (0 where a denominator is empty)."""
    precision = tp / predicted if predicted > 0 else 0.0
    recall = tp / positive if positive > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def pairwise_prf(groups, clusters) -> dict[str, float]:
    """Pairwise precision, recall and F1 of cluster labels: a pair is positive when both images
    share a true group, predicted positive when they share a cluster. Linear in the number of
    images (pairs are counted through the group x cluster contingency table, never listed)."""
    tp, positive, predicted = pair_counts_by_group(groups, clusters)
    return pairwise_scores(tp.sum(), positive.sum(), predicted.sum())


def recall_at_k(hits, k: int) -> np.ndarray:
    """Per query: 1.0 when one of its first ``k`` ranked neighbours is relevant, else 0.0.

    ``hits`` is a boolean ``[n_queries, K]`` array, ``hits[q, r]`` telling whether the
    neighbour ranked ``r`` (0 = nearest, the query itself excluded) is relevant.
    """
    return np.asarray(hits)[:, :k].any(axis=1).astype(float)


def retrieval_average_precision(hits, n_relevant) -> np.ndarray:
    """Per query average precision of a ranking: mean precision at the rank of each relevant item.

    ``hits`` as in :func:`recall_at_k`; ``n_relevant[q]`` is the number of relevant items in
    the whole gallery, so relevant items ranked beyond ``K`` count as never retrieved (this is
    the exact AP when ``K`` covers the gallery). Queries with no relevant item give NaN.
    """
    hits = np.asarray(hits, dtype=float)
    n_relevant = np.asarray(n_relevant, dtype=float)
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, (precision_at_rank * hits).sum(axis=1) / n_relevant, np.nan)


# ----------------------------------------------------------------------------- bootstrap


def _resample_weights(group_codes: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """How many times each row is drawn when whole groups are drawn with replacement."""
    drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
    return drawn[group_codes]


def bootstrap_ci(
    stat: Callable[..., float],
    *arrays,
    groups=None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> CI:
    """Percentile bootstrap interval of ``stat(*arrays)``, resampling whole groups with replacement.

    ``stat`` is any function of the arrays (rows aligned along axis 0), e.g.
    ``lambda y, p: roc_auc(y, p)`` or a pairwise F1 of cluster labels. Groups
    (lesions, patients) are drawn with replacement and all their rows come
    along, so correlated images of one lesion never make the interval too
    narrow; ``groups=None`` treats every row as its own group. Resamples where
    the statistic is undefined (NaN, or a ValueError such as a single class)
    are skipped. Returns ``CI(value, low, high)`` with ``value`` the statistic
    on the original arrays.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: all arrays need the same number of rows")
    codes = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_groups = int(codes.max()) + 1 if n else 0
    value = float(stat(*arrays))
    rng = np.random.default_rng(seed)
    samples = np.full(n_boot, np.nan)
    for b in range(n_boot):
        rows = np.repeat(np.arange(n), _resample_weights(codes, n_groups, rng))
        try:
            samples[b] = stat(*(a[rows] for a in arrays))
        except ValueError:
            continue
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return CI(value, float("nan"), float("nan"))
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return CI(value, float(low), float(high))
