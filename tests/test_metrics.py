"""Metric functions against direct computations and scikit-learn's reference implementations."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

from embedstore import metrics
from embedstore.metrics import (
    _bootstrap_samples,
    _group_codes,
    _resample_weights,
    average_precision,
    binary_auc,
    binary_average_precision,
    bootstrap_ci,
    bootstrap_metrics,
    calibration,
    evaluate,
    metric_functions,
    partial_auc,
    precision_recall_points,
    roc_auc,
    roc_points,
    sensitivity_at_specificity,
)
from embedstore.probe.protocol import BINARY_HEADLINE, MULTICLASS_HEADLINE


def _scores(n=400, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 1)
    return y, s


def _pauc_trapezoid(y, s, min_tpr):
    """Area between the ROC curve and TPR = min_tpr, by trapezoids over TPR."""
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    # Integrate (1 - FPR) over TPR in [min_tpr, 1]; x = 1 - TPR rises as the curve is walked backwards.
    x, h = (1 - tpr)[::-1], (1 - fpr)[::-1]
    x_max = 1 - min_tpr
    keep = x <= x_max
    xs, hs = list(x[keep]), list(h[keep])
    i = np.searchsorted(x, x_max, side="right")
    if i < len(x):  # close the region exactly at x_max by linear interpolation
        hs.append(h[i - 1] + (h[i] - h[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1]))
        xs.append(x_max)
    return np.trapezoid(hs, xs)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("min_tpr", [0.8, 0.5])
def test_partial_auc_matches_direct_trapezoid(ties, min_tpr):
    for seed in range(5):
        y, s = _scores(seed=seed, ties=ties)
        assert partial_auc(y, s, min_tpr) == pytest.approx(_pauc_trapezoid(y, s, min_tpr), abs=1e-9)


def test_partial_auc_range_is_zero_to_point_two():
    y, s = _scores()
    assert partial_auc(y, np.where(y, 1.0, 0.0)) == pytest.approx(0.2)  # perfect ranking
    assert partial_auc(y, np.where(y, 0.0, 1.0)) == pytest.approx(0.0)  # reversed ranking
    assert 0.0 < partial_auc(y, s) < 0.2
    assert np.isnan(partial_auc(np.ones(10, bool), np.arange(10)))


def test_binary_and_ovr_auc_equal_sklearn():
    rng = np.random.default_rng(1)
    y, s = _scores(ties=True)
    assert binary_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    y7 = rng.integers(0, 7, 500)
    logits = rng.normal(size=(500, 7)) + 1.5 * np.eye(7)[y7]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert roc_auc(y7, p) == pytest.approx(skm.roc_auc_score(y7, p, multi_class="ovr", average="macro"))
    missing = y7 != 3  # a class absent from y_true (as in a bootstrap resample) is left out, as sklearn does
    assert evaluate(y7[missing], p[missing])["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y7[missing], p[missing].argmax(1)))


def test_sensitivity_at_specificity_respects_the_bound():
    y, s = _scores(n=2000)
    sens = sensitivity_at_specificity(y, s, 0.9)
    # Threshold by hand: the lowest threshold that keeps >= 90% of negatives below it.
    neg = np.sort(s[~y])
    thr = neg[int(np.ceil(0.9 * neg.size)) - 1]
    assert sens == pytest.approx(np.mean(s[y] > thr), abs=1.0 / y.sum() + 1e-12)
    assert 0 < sens < 1


def test_evaluate_binary_has_pauc_and_multiclass_not():
    y, s = _scores()
    p = np.c_[1 - 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-s))]
    m = evaluate(y.astype(int), p)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"))
    assert "pauc_80" in m
    assert "pauc_80" not in evaluate(np.array([0, 1, 2]), np.eye(3))


def test_bootstrap_resamples_whole_groups():
    # Each group's rows share one value: a group bootstrap must keep them together,
    # so every resampled mean is a mean of whole groups with the group sizes as weights.
    groups = np.repeat(np.arange(30), 5)
    values = np.repeat(np.random.default_rng(0).normal(size=30), 5)
    seen = []

    def stat(v, g):
        counts = np.bincount(g, minlength=30)
        assert np.all(counts % 5 == 0)  # all five rows of a drawn group come along, every time
        seen.append(len(np.unique(g)))
        return v.mean()

    ci = bootstrap_ci(stat, values, groups, groups=groups, n_boot=200, seed=3)
    assert ci.low < ci.value < ci.high
    assert np.mean(seen) < 30  # groups are drawn with replacement, so some are missing


def test_grouped_interval_is_wider_than_row_interval_for_clustered_data():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 10)
    values = np.repeat(rng.normal(size=40), 10) + 0.01 * rng.normal(size=400)
    grouped = bootstrap_ci(np.mean, values, groups=groups, n_boot=500)
    rows = bootstrap_ci(np.mean, values, n_boot=500)
    assert (grouped.high - grouped.low) > 2 * (rows.high - rows.low)


def test_bootstrap_is_seeded_and_skips_undefined_resamples():
    y = np.array([1] + [0] * 19)
    s = np.arange(20.0)
    a = bootstrap_ci(binary_auc, y, s, n_boot=300, seed=7)
    b = bootstrap_ci(binary_auc, y, s, n_boot=300, seed=7)
    assert a == b
    assert np.isfinite(a.low)  # resamples without the one positive were skipped, not averaged in


def test_curve_points_trace_the_curves_the_metrics_summarise():
    y, s = _scores(ties=True)
    fpr, tpr = roc_points(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(binary_auc(y, s), abs=1e-12)  # ties counted half by both
    recall, precision = precision_recall_points(y, s)
    assert recall[0] == 1 and recall[-1] == 0 and precision[-1] == 1
    # AP is the step sum of precision over the recall gained at each threshold.
    assert -np.sum(np.diff(recall) * precision[:-1]) == pytest.approx(binary_average_precision(y, s), abs=1e-12)
    assert average_precision(y.astype(int), np.c_[-s, s]) == binary_average_precision(y, s)


def test_calibration_bins_and_ece_by_hand():
    confidence = np.array([0.05, 0.15, 0.15, 0.55, 0.95, 1.0, 0.1])
    outcome = np.array([0, 1, 0, 1, 1, 1, 0], dtype=bool)
    bins = calibration(confidence, outcome, n_bins=10)
    assert bins.edges.tolist() == pytest.approx(np.linspace(0, 1, 11).tolist())
    # 0.1 lies on an edge and goes up; 1.0 goes in the last bin.
    assert bins.counts.tolist() == [1, 3, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bins.confidence[1] == pytest.approx((0.15 + 0.15 + 0.1) / 3)
    assert bins.observed[1] == pytest.approx(1 / 3) and bins.observed[9] == 1.0
    gaps = [abs(0.05 - 0), 3 * abs(0.4 / 3 - 1 / 3), abs(0.55 - 1), 2 * abs(0.975 - 1)]
    assert bins.ece == pytest.approx(sum(gaps) / 7)
    perfect = calibration(np.repeat([0.25, 0.75], 4), np.array([1, 0, 0, 0, 1, 1, 1, 0], dtype=bool))
    assert perfect.ece == pytest.approx(0.0)


# ----------------------------------------------------------------------------- vectorised grouped bootstrap


@pytest.fixture(scope="module")
def ham_problems(ham_meta):
    """Probe-like predictions on 2,000 real HAM10000 rows, lesions as groups: a logistic regression on age, sex and
    localization (so many rows share a score), decided by the balanced rule (argmax of proba / class frequency,
    not the plain argmax). Of the dermatofibromas only one lesion (two images) is kept, so that many resamples
    lack the class. Problems: the 7 classes, melanoma vs rest, and that dermatofibroma vs rest."""
    meta = ham_meta.sample(2000, random_state=0)
    meta = meta[(meta.dx != "df") | (meta.lesion_id == meta[meta.dx == "df"].lesion_id.min())]
    X = np.c_[meta.age.fillna(meta.age.mean()) / 100, pd.get_dummies(meta[["sex", "localization"]])].astype(float)
    classes = sorted(meta.dx.unique())
    y = meta.dx.map({c: i for i, c in enumerate(classes)}).to_numpy()
    problems = {}
    for name, target in (("dx", y), ("mel", (y == classes.index("mel")).astype(int)),
                         ("df", (y == classes.index("df")).astype(int))):
        proba = LogisticRegression(max_iter=500).fit(X, target).predict_proba(X)
        pred = (proba / np.bincount(target)).argmax(1)
        problems[name] = (target, proba, pred, meta.lesion_id.to_numpy())
    return problems


def _same(a: float, b: float) -> bool:
    return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-12


@pytest.mark.parametrize("problem", ["dx", "mel", "df"])
@pytest.mark.parametrize("grouped", [True, False])
def test_bootstrap_metrics_equal_bootstrap_ci_of_each_headline_metric(ham_problems, problem, grouped):
    y, proba, pred, groups = ham_problems[problem]
    groups = groups if grouped else None
    headline = MULTICLASS_HEADLINE if proba.shape[1] > 2 else BINARY_HEADLINE
    table = metric_functions(proba.shape[1])
    cis = bootstrap_metrics(headline, y, proba, pred, groups=groups, n_boot=100, seed=3)
    assert list(cis) == headline
    for name in headline:
        expected = bootstrap_ci(table[name], y, proba, pred, groups=groups, n_boot=100, seed=3)
        assert cis[name].value == expected.value, name
        assert _same(cis[name].low, expected.low) and _same(cis[name].high, expected.high), (name, cis[name], expected)
    if problem == "df":  # the rare class is missing from some resamples, which are skipped, as bootstrap_ci does
        samples = _bootstrap_samples(headline, y, proba, pred, groups, 100, 3)
        assert 0 < np.isnan(samples["roc_auc"]).sum() < 100
        assert np.isfinite(cis["roc_auc"].low)


@pytest.mark.parametrize("problem", ["dx", "mel", "df"])
@pytest.mark.parametrize("grouped", [True, False])
def test_every_metric_of_every_resample_equals_the_metric_of_the_copied_rows(ham_problems, problem, grouped):
    # Stronger than the interval's two quantiles: resample by resample, every metric the probe knows, against
    # the metric of the rows bootstrap_ci copies for the same seed (NaN exactly where it is undefined there).
    y, proba, pred, groups = ham_problems[problem]
    groups = groups if grouped else None
    table = metric_functions(proba.shape[1])
    samples = _bootstrap_samples(list(table), y, proba, pred, groups, 30, 5)
    codes, n_groups = _group_codes(groups, len(y))
    rng = np.random.default_rng(5)
    for b in range(30):
        rows = np.repeat(np.arange(len(y)), _resample_weights(codes, n_groups, rng))
        for name, fn in table.items():
            assert _same(samples[name][b], fn(y[rows], proba[rows], pred[rows])), (name, b)


def test_sensitivity_follows_sklearns_dropped_roc_points(ham_problems):
    # sensitivity_at_specificity takes its maximum over sklearn's roc_curve, which drops points where the curve
    # goes on by the same step (drop_intermediate). Pairs of one melanoma and one other image sharing a score
    # make such runs everywhere; the vectorised metric must drop the same points.
    y, proba, _, _ = ham_problems["mel"]
    pos, neg = np.flatnonzero(y == 1)[:40], np.flatnonzero(y == 0)[:40]
    rows = np.ravel(np.c_[pos, neg])
    score = np.repeat(np.sort(proba[pos, 1]), 2)
    y2, proba2 = y[rows], np.c_[1 - score, score]
    pred2 = (score > np.median(score)).astype(int)
    fn = metric_functions(2)["sensitivity_at_90_specificity"]
    samples = _bootstrap_samples(["sensitivity_at_90_specificity"], y2, proba2, pred2, None, 200, 0)
    codes, n_groups = _group_codes(None, len(y2))
    rng = np.random.default_rng(0)
    dropped = 0
    for b in range(200):
        r = np.repeat(np.arange(len(y2)), _resample_weights(codes, n_groups, rng))
        assert _same(samples["sensitivity_at_90_specificity"][b], fn(y2[r], proba2[r], pred2[r])), b
        fpr, tpr, _ = skm.roc_curve(y2[r], score[r], drop_intermediate=False)
        dropped += tpr[fpr <= 0.1 + 1e-12].max() != fn(y2[r], proba2[r], pred2[r])
    assert dropped > 0  # the case this test is for did occur


def test_bootstrap_metrics_chunks_continue_the_same_draws(ham_problems, monkeypatch):
    y, proba, pred, groups = ham_problems["mel"]
    whole = bootstrap_metrics(BINARY_HEADLINE, y, proba, pred, groups=groups, n_boot=50, seed=1)
    monkeypatch.setattr(metrics, "_CHUNK_VALUES", 1)  # one resample per chunk
    assert bootstrap_metrics(BINARY_HEADLINE, y, proba, pred, groups=groups, n_boot=50, seed=1) == whole


def test_bootstrap_metrics_refuses_unknown_metrics_and_codes(ham_problems):
    y, proba, pred, _ = ham_problems["dx"]
    with pytest.raises(ValueError, match="pauc_80"):
        bootstrap_metrics(["pauc_80"], y, proba, pred)  # a binary metric asked of 7 classes
    with pytest.raises(ValueError, match="class codes"):
        bootstrap_metrics(["accuracy"], y, proba, np.where(pred == 0, -1, pred))
