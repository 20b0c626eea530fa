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
import pandas as pd
from scipy import sparse
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


def top_k_sensitivity_by_patient(y_true, score, patients, k: int = 15) -> np.ndarray:
    """Per patient with at least one positive image: the share of their positive images among their ``k``
    highest-scored images (the ISIC 2024 organisers' secondary metric, top-15 sensitivity, is the mean of these).
    A clinic reviews each patient's most suspicious lesions first; this says how many of the malignant ones are
    among those ``k``. One value per such patient, in the order of the sorted patient ids."""
    frame = pd.DataFrame({"patient": np.asarray(patients), "y": np.asarray(y_true).astype(bool),
                          "score": np.asarray(score, dtype=float)})
    # Ties at the 15th place are shared: each of t tied images counts as (places left) / t of a place, so the
    # value does not depend on the rows' order.
    higher = frame.groupby("patient")["score"].rank(method="min", ascending=False) - 1
    tied = frame.groupby(["patient", "score"])["score"].transform("size")
    frame["found"] = frame["y"] * np.clip((k - higher) / tied, 0.0, 1.0)
    per = frame.groupby("patient")[["y", "found"]].sum()
    per = per[per["y"] > 0]
    return (per["found"] / per["y"]).to_numpy()


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


def _group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    """Each row's group as a code ``0..G-1`` (``groups=None``: every row its own group), and ``G``."""
    codes = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    return codes, int(codes.max()) + 1 if n else 0


def _drawn_groups(n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """How many times each group is drawn when ``n_groups`` groups are drawn with replacement (one resample)."""
    return np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)


def _resample_weights(group_codes: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """How many times each row is drawn when whole groups are drawn with replacement."""
    return _drawn_groups(n_groups, rng)[group_codes]


def _percentile_ci(value: float, samples: np.ndarray, alpha: float) -> CI:
    """``value`` with the percentile interval of the finite ``samples`` (NaN bounds when none is finite)."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return CI(value, float("nan"), float("nan"))
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return CI(value, float(low), float(high))


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
    on the original arrays. :func:`bootstrap_metrics` gives the same intervals
    of the probe's metrics many times faster.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: all arrays need the same number of rows")
    codes, n_groups = _group_codes(groups, n)
    value = float(stat(*arrays))
    rng = np.random.default_rng(seed)
    samples = np.full(n_boot, np.nan)
    for b in range(n_boot):
        rows = np.repeat(np.arange(n), _resample_weights(codes, n_groups, rng))
        try:
            samples[b] = stat(*(a[rows] for a in arrays))
        except ValueError:
            continue
    return _percentile_ci(value, samples, alpha)


# ----------------------------------------------------------------------------- vectorised grouped bootstrap
#
# bootstrap_ci copies the drawn rows of every resample and scores the copy. bootstrap_metrics draws the same
# resamples but keeps each as a count per group, and computes every metric from weight sums over a few units:
# the cells of the confusion matrix, and per probability column the rows of the positive class and of the
# others in each score unit (scores ranked once; see _ScoreColumn). A sparse (unit x group) matrix of row counts,
# built once, turns a chunk of resamples into unit weights by one product. Each formula below is the one its
# metric evaluates on the copied rows (a copy is a row of weight 1), so both give the same numbers up to float
# rounding.

#: The most float64 values one (units or groups x resamples) array of a chunk holds (16 MiB): resamples are scored
#: in chunks of this many values over the most units or groups, so memory stays bounded at any number of rows.
_CHUNK_VALUES = 1 << 21


def _unit_matrix(units: np.ndarray, codes: np.ndarray, n_units: int, n_groups: int) -> sparse.csr_array:
    """Rows counted per (unit, group): ``matrix @ drawn`` is each unit's weight in each resample of ``drawn``."""
    return sparse.csr_array((np.ones(len(units)), (units, codes)), shape=(n_units, n_groups))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1.0), 0.0)


class _Curve(NamedTuple):
    """One probability column in a chunk of resamples, ``[n_resamples, n_units]`` by ascending score: the weight
    of the positive and of the negative rows of each score unit (:class:`_ScoreColumn`), their running sums up to
    and including it, and their totals ``[n_resamples, 1]``. Every sum is of integer weights, so exact."""

    pos: np.ndarray
    neg: np.ndarray
    pos_upto: np.ndarray
    neg_upto: np.ndarray
    n_pos: np.ndarray
    n_neg: np.ndarray

    def defined(self, values: np.ndarray) -> np.ndarray:
        """``values`` with NaN where a resample lacks the positive or the negative class."""
        return np.where((self.n_pos[:, 0] > 0) & (self.n_neg[:, 0] > 0), values, np.nan)


class _ScoreColumn:
    """One probability column ranked once: per score unit (ascending) and group, the rows of the positive class
    and of the other classes.

    A unit is a distinct score that some positive row has, or a run of consecutive distinct scores that only
    negative rows have, pooled. Pooling such a run changes none of the ranking metrics below: inside it the
    curve only moves along the negatives' axis, where AUC, pAUC and AP gain no area and sensitivity no height
    (the point of the score just above the run is as high, at a lower FPR, and ``drop_intermediate`` keeps it,
    since its step has positives and the run's has none). With few
    positives (ISIC 2024: 393 in 401,059) the curves have a few hundred units instead of a point per row.
    """

    def __init__(self, score: np.ndarray, positive: np.ndarray, codes: np.ndarray, n_groups: int):
        _, tie = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True)
        has_positive = np.zeros(int(tie.max()) + 1, dtype=bool)
        has_positive[tie[positive]] = True
        starts_unit = has_positive | np.r_[True, has_positive[:-1]]
        unit = (np.cumsum(starts_unit) - 1)[tie]
        self.n_units = int(starts_unit.sum())
        self.positive = _unit_matrix(unit[positive], codes[positive], self.n_units, n_groups)
        self.negative = _unit_matrix(unit[~positive], codes[~positive], self.n_units, n_groups)

    def curve(self, drawn: np.ndarray) -> _Curve:
        """The column's :class:`_Curve` in the resamples ``drawn`` (``[n_groups, n_resamples]`` group counts)."""
        # Resamples become rows, so that the running sums run along contiguous memory.
        pos = np.ascontiguousarray((self.positive @ drawn).T)
        neg = np.ascontiguousarray((self.negative @ drawn).T)
        pos_upto, neg_upto = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
        return _Curve(pos, neg, pos_upto, neg_upto, pos_upto[:, -1:], neg_upto[:, -1:])


def _weighted_auc(c: _Curve) -> np.ndarray:
    """:func:`binary_auc` per resample: each positive's weight times the negative weight scored below it,
    ties counted half (the rank-sum formula, exact in integer weights)."""
    wins = np.einsum("bt,bt->b", c.pos, c.neg_upto - 0.5 * c.neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c.defined(wins / (c.n_pos * c.n_neg)[:, 0])


def _weighted_partial_auc(c: _Curve, min_tpr: float) -> np.ndarray:
    """:func:`partial_auc` per resample, by its own steps: sklearn's ROC curve of the flipped problem (scores
    ascending; x the positives' share at or below, y the negatives'), cut at ``max_fpr`` with sklearn's linear
    interpolation, integrated by trapezoids, McClish-standardised and the standardisation undone."""
    max_fpr = 1.0 - min_tpr
    with np.errstate(invalid="ignore", divide="ignore"):
        x, x0 = c.pos_upto / c.n_pos, (c.pos_upto - c.pos) / c.n_pos  # each point and the one before it
        y, y0 = c.neg_upto / c.n_neg, (c.neg_upto - c.neg) / c.n_neg
        inside = x <= max_fpr
        crossing = (x0 < max_fpr) & ~inside
        y_cut = (y - y0) / (x - x0) * (max_fpr - x0) + y0
        area = np.where(inside, (x - x0) * (y + y0) / 2.0,
                        np.where(crossing, (max_fpr - x0) * (y0 + y_cut) / 2.0, 0.0)).sum(1)
    min_area = 0.5 * max_fpr**2
    scaled = 0.5 * (1 + (area - min_area) / (max_fpr - min_area))
    return c.defined(min_area + (max_fpr - min_area) / 0.5 * (scaled - 0.5))


def _weighted_sensitivity(c: _Curve, specificity: float) -> np.ndarray:
    """:func:`sensitivity_at_specificity` per resample: the highest TPR among the points of sklearn's ROC curve
    (walked from the highest score down) with FPR at most ``1 - specificity``, after sklearn's
    ``drop_intermediate`` has removed every point where the curve goes on by the same step it came in with
    (its first and last points kept)."""
    n_boot, n_units = c.pos.shape
    tp, fp = c.n_pos - c.pos_upto + c.pos, c.n_neg - c.neg_upto + c.neg  # weight at or above each unit
    present = c.pos + c.neg > 0  # a unit no drawn row has is no point of the resample's curve
    # The curve's next point is the next lower unit present; it is reached by that unit's own weights.
    following = np.maximum.accumulate(np.where(present, np.arange(n_units), -1), axis=1)
    following = np.hstack([np.full((n_boot, 1), -1), following[:, :-1]])
    step_pos = np.take_along_axis(np.hstack([np.zeros((n_boot, 1)), c.pos]), following + 1, axis=1)
    step_neg = np.take_along_axis(np.hstack([np.zeros((n_boot, 1)), c.neg]), following + 1, axis=1)
    first, last = tp + fp == c.pos + c.neg, following == -1
    kept = present & (first | last | (step_pos != c.pos) | (step_neg != c.neg))
    with np.errstate(invalid="ignore", divide="ignore"):
        allowed = fp / c.n_neg <= 1.0 - specificity + 1e-12
        best = np.where(kept & allowed, tp, 0.0).max(1) / c.n_pos[:, 0]
    return c.defined(best)


def _weighted_average_precision(c: _Curve) -> np.ndarray:
    """:func:`binary_average_precision` per resample: sklearn's step sum of the precision at each unit (of the
    weight at or above it) times the recall gained there; NaN without positives (:func:`average_precision`
    leaves such classes out)."""
    tp = c.n_pos - c.pos_upto + c.pos
    precision = _ratio(tp, tp + c.n_neg - c.neg_upto + c.neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.maximum(0.0, (c.pos * precision).sum(1) / c.n_pos[:, 0])
    return np.where(c.n_pos[:, 0] > 0, ap, np.nan)


#: Ranking metrics of one probability column, as f(curve) -> one value per resample.
_CURVE_METRICS: dict[str, Callable[[_Curve], np.ndarray]] = {
    "roc_auc": _weighted_auc,
    "average_precision": _weighted_average_precision,
    "pauc_80": lambda c: _weighted_partial_auc(c, min_tpr=0.8),
    "sensitivity_at_90_specificity": lambda c: _weighted_sensitivity(c, specificity=0.9),
}


def _label_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of :data:`LABEL_METRICS` per resample, from the confusion matrices ``[n_resamples, K, K]``
    (rows true classes): per-class counts as ``precision_recall_fscore_support`` takes them, over all K labels."""
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    true, predicted = confusion.sum(2), confusion.sum(1)
    present = true > 0
    out = {"accuracy": tp.sum(1) / true.sum(1),
           "balanced_accuracy": _ratio(tp, true).sum(1) / present.sum(1)}
    per_class = {"precision": _ratio(tp, predicted), "recall": _ratio(tp, true), "f1": _ratio(2 * tp, true + predicted)}
    for name, values in per_class.items():
        out[f"{name}_macro"] = values.mean(1)
        out[f"{name}_weighted"] = (values * true).sum(1) / true.sum(1)
    return out


def _nanmean(values: list[np.ndarray]) -> np.ndarray:
    """Mean over the columns' values that are defined, per resample (NaN where none is), as ``np.nanmean``."""
    stacked = np.vstack(values)
    defined = ~np.isnan(stacked)
    count = defined.sum(0)
    return np.where(count > 0, np.where(defined, stacked, 0.0).sum(0) / np.maximum(count, 1), np.nan)


def _bootstrap_samples(names, y, proba, y_pred, groups, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Each metric of ``names`` on each of :func:`bootstrap_ci`'s resamples for ``seed`` (NaN where undefined).

    ``y`` and ``y_pred`` are integer codes ``0..K-1``. Ranking metrics score the positive column of a binary
    problem, else every class's column and average the classes defined in the resample.
    """
    n, n_classes = proba.shape
    codes, n_groups = _group_codes(groups, n)
    labelled = [name for name in names if name in LABEL_METRICS]
    ranked = [name for name in names if name not in LABEL_METRICS]
    confusion = _unit_matrix(y * n_classes + y_pred, codes, n_classes**2, n_groups)
    columns = [_ScoreColumn(proba[:, k], y == k, codes, n_groups)
               for k in ([1] if n_classes == 2 else range(n_classes))] if ranked else []
    samples = {name: np.empty(n_boot) for name in names}
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_VALUES // max(n_groups, n_classes**2, *(column.n_units for column in columns)))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        drawn = np.stack([_drawn_groups(n_groups, rng) for _ in range(size)], axis=1).astype(np.float64)
        if labelled:
            label = _label_metrics((confusion @ drawn).T.reshape(size, n_classes, n_classes))
            for name in labelled:
                samples[name][start:start + size] = label[name]
        per_column: dict[str, list[np.ndarray]] = {name: [] for name in ranked}
        for column in columns:
            curve = column.curve(drawn)
            for name in ranked:
                per_column[name].append(_CURVE_METRICS[name](curve))
        for name in ranked:
            samples[name][start:start + size] = _nanmean(per_column[name])
    return samples


def bootstrap_metrics(
    names,
    y_true,
    proba,
    y_pred,
    groups=None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, CI]:
    """Grouped bootstrap intervals of several metrics of :func:`metric_functions` at once, by name.

    Equal to ``bootstrap_ci(metric_functions(K)[name], y_true, proba, y_pred, groups=groups, n_boot=n_boot,
    seed=seed, alpha=alpha)`` for every name (same resamples, same value, same bounds up to float rounding),
    without copying a resample: each is a weight per group, ranks are computed once, and resamples are
    scored together in chunks of bounded memory. ``y_true`` and ``y_pred`` hold class codes ``0..K-1``.
    """
    names = list(names)
    y, p, pred = np.asarray(y_true), np.asarray(proba), np.asarray(y_pred)
    table = metric_functions(p.shape[1])
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"bootstrap_metrics: no metric {unknown} for {p.shape[1]} classes; known: {list(table)}")
    if not len(y) == len(p) == len(pred):
        raise ValueError("bootstrap_metrics: y_true, proba and y_pred need the same number of rows")
    classes = np.arange(p.shape[1])
    if not (np.isin(y, classes).all() and np.isin(pred, classes).all()):
        raise ValueError(f"bootstrap_metrics: y_true and y_pred must be class codes 0..{p.shape[1] - 1}")
    samples = _bootstrap_samples(names, y.astype(np.int64), p, pred.astype(np.int64), groups, n_boot, seed)
    return {name: _percentile_ci(float(table[name](y, p, pred)), samples[name], alpha) for name in names}
