"""The logistic probe's solver (embedstore.heads.logistic) against scikit-learn, on real HAM10000 features.

The solver minimises scikit-learn's LogisticRegression objective; converged, both reach the same optimum,
so their probabilities agree up to float32 rounding of the products.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from embedstore.heads import BalancedDecision, ColumnsHead, LogRegHead
from embedstore.heads import logistic


@pytest.fixture(scope="module")
def features(ham_store):
    """Standardised MobileNetV2 features and diagnoses of the ~400 real HAM10000 images of the test store."""
    from embedstore.store import FeatureStore

    X, table = FeatureStore.open(ham_store).load("mobilenet_v2", columns=["dx"])
    classes, codes = np.unique(table["dx"].to_numpy(), return_inverse=True)
    return StandardScaler().fit_transform(X).astype(np.float32), codes, classes.size


def _reference(Z, codes, C, weights):
    return LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(Z.astype(np.float64), codes, sample_weight=weights)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("C", [0.003, 0.1])
def test_fit_reaches_scikit_learns_optimum(features, binary, C):
    Z, codes, n_classes = features
    if binary:  # the most common diagnosis against the rest: scikit-learn's binomial model
        codes, n_classes = (codes == np.bincount(codes).argmax()).astype(int), 2
    weights = compute_sample_weight("balanced", codes)
    ref = _reference(Z, codes, C, weights)
    fitted = logistic.fit(Z, codes, n_classes, C, weights, tol=1e-7)
    assert fitted.coef.shape == (Z.shape[1], 1 if binary else n_classes)
    assert np.abs(fitted.proba(Z) - ref.predict_proba(Z)).max() < 2e-3
    assert (fitted.proba(Z).argmax(1) == ref.predict(Z)).mean() > 0.99


def test_unweighted_classes_scaled_apart_reach_scikit_learns_optimum(features):
    """Unweighted classes of unequal shares: the preconditioner scales each class's curvature apart (in the
    eigenbasis), which changes the search, not the optimum."""
    Z, codes, n_classes = features
    assert np.bincount(codes).max() > 5 * np.bincount(codes).min()
    fitted = logistic.fit(Z, codes, n_classes, 0.1, tol=1e-7)
    ref = _reference(Z, codes, 0.1, None)
    assert np.abs(fitted.proba(Z) - ref.predict_proba(Z)).max() < 2e-3
    assert (fitted.proba(Z).argmax(1) == ref.predict(Z)).mean() > 0.99


def test_fewer_rows_than_columns_at_a_weak_penalty(features):
    """Binary fits on a few hundred rows of 1,280 columns (an undersampled fold) at a weak penalty: the float32 moment is
    singular there, and the solver must still reach scikit-learn's optimum instead of failing to factor it."""
    Z, codes, _ = features
    rows = np.concatenate([np.flatnonzero(codes == 0), np.flatnonzero(codes != 0)[:250]])  # fewer rows than columns
    Zs = StandardScaler().fit_transform(Z[rows]).astype(np.float32)
    y = (codes[rows] == 0).astype(int)
    weights = compute_sample_weight("balanced", y)
    assert Zs.shape[0] < Zs.shape[1]
    for C in (1.0, 1e4):
        fitted = logistic.fit(Zs, y, 2, C, weights, tol=1e-7)
        ref = _reference(Zs, y, C, weights)
        assert np.abs(fitted.proba(Zs) - ref.predict_proba(Zs)).max() < 2e-3


def test_path_points_equal_fits_from_scratch(features):
    Z, codes, n_classes = features
    Cs = [0.001, 0.01, 0.1]
    path = logistic.fit_path(Z, codes, n_classes, Cs, tol=1e-6)
    assert [f.C for f in path] == Cs
    for on_path in path:  # the warm start changes where the search starts, not where it ends
        alone = logistic.fit(Z, codes, n_classes, on_path.C, tol=1e-6)
        assert np.abs(on_path.proba(Z) - alone.proba(Z)).max() < 2e-3


def test_torch_code_gives_the_numpy_results(features):
    """The code a GPU runs (torch products), run on the CPU: the same model up to float32 rounding."""
    Z, codes, n_classes = features
    on_numpy = logistic.fit(Z, codes, n_classes, 0.1, tol=1e-6)
    on_torch = logistic.fit(Z, codes, n_classes, 0.1, tol=1e-6, device="cpu:0")
    assert np.abs(on_numpy.proba(Z) - on_torch.proba(Z)).max() < 1e-3


def test_head_path_through_wrappers_equals_separate_fits(features):
    Z, codes, _ = features
    y = np.asarray(["a", "b", "c", "d", "e", "f", "g"])[codes]
    columns = [f"x{j}" for j in range(Z.shape[1])]
    import pandas as pd

    X = pd.DataFrame(Z, columns=columns)
    model = BalancedDecision(ColumnsHead(LogRegHead(class_weight="balanced", tol=1e-6), columns))
    Cs = [0.003, 0.03]
    (path,) = model.fit_paths(X, y, [np.arange(len(y))], Cs)
    for C, fitted in zip(Cs, path):
        alone = BalancedDecision(ColumnsHead(LogRegHead(C=C, class_weight="balanced", tol=1e-6), columns)).fit(X, y)
        assert fitted.estimator_.head_.C == C
        assert np.abs(fitted.predict_proba(X) - alone.predict_proba(X)).max() < 2e-3
        assert (fitted.predict(X) == alone.predict(X)).mean() > 0.99
        assert np.array_equal(fitted.class_prior_, alone.class_prior_)


@pytest.mark.parametrize("binary", [False, True])
def test_folds_fitted_together_equal_fits_alone(features, binary):
    """The folds' models and the refit on all rows, fitted at once over one shared matrix (each with its own
    standardisation as an affine map of it), are the models each fit alone gives."""
    from embedstore.splits import group_kfold

    Z, codes, _ = features
    if binary:
        codes = (codes == np.bincount(codes).argmax()).astype(int)
    X = Z * 3.0 + 1.5  # raw features: every fold standardises them on its own rows
    row_sets = [train for train, _ in group_kfold(codes, None, 4, 0)] + [np.arange(len(codes))]
    head = LogRegHead(C=0.05, class_weight="balanced", tol=1e-7)
    together = head.fit_paths(X, codes, row_sets)
    for rows, (fitted,) in zip(row_sets, together):
        alone = LogRegHead(C=0.05, class_weight="balanced", tol=1e-7).fit(X[rows], codes[rows])
        # to where float32 products stop making progress, from other roundings of the same standardisation
        assert np.abs(fitted.predict_proba(X) - alone.predict_proba(X)).max() < 3e-3
        assert np.allclose(fitted.preprocessor_.scaler_.mean_, alone.preprocessor_.scaler_.mean_)


def test_folds_fitted_together_are_reproducible_and_follow_the_path(features):
    """Fitting the folds together twice gives the same numbers to the last bit (the threads' order of asking
    does not enter the products), and every point of their path is the fit of that C."""
    Z, codes, _ = features
    row_sets = [np.flatnonzero(np.arange(len(codes)) % 3 != k) for k in range(3)]
    head = LogRegHead(tol=1e-7)
    first = head.fit_paths(Z, codes, row_sets, [0.003, 0.03])
    second = head.fit_paths(Z, codes, row_sets, [0.003, 0.03])
    for path_a, path_b, rows in zip(first, second, row_sets):
        assert [h.C for h in path_a] == [0.003, 0.03]
        for a, b in zip(path_a, path_b):
            assert np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_)
        alone = LogRegHead(C=0.03, tol=1e-7).fit(Z[rows], codes[rows])
        # both stop where float32 products stop making progress (a largest gradient near 1e-5), from other starts
        assert np.abs(path_a[1].predict_proba(Z) - alone.predict_proba(Z)).max() < 3e-3
        assert np.abs(path_a[0].predict_proba(Z) - alone.predict_proba(Z)).max() > 0.05  # another C is far off


def test_undersampled_folds_are_fitted_each_on_its_own_rows(features):
    """Folds that share few rows (20:1 undersampling of a rare class) are fitted one by one, each as alone."""
    Z, codes, _ = features
    rare = (codes == np.bincount(codes).argmin()).astype(int)
    row_sets = [np.flatnonzero(np.arange(len(rare)) % 2 != k) for k in range(2)]
    head = LogRegHead(C=0.1, undersample=2, tol=1e-7)
    for rows, (fitted,) in zip(row_sets, head.fit_paths(Z, rare, row_sets)):
        alone = LogRegHead(C=0.1, undersample=2, tol=1e-7).fit(Z[rows], rare[rows])
        assert fitted.n_evals_ == alone.n_evals_
        assert np.array_equal(fitted.coef_, alone.coef_)


def test_row_sets_with_other_classes_or_repeated_rows_are_fitted_each_alone(features):
    """A row set lacking a class, or holding a row twice (a bootstrap sample), cannot share one matrix of class
    codes and row weights: each is fitted as alone, with its own classes."""
    Z, codes, _ = features
    rarest = np.bincount(codes).argmin()
    without = np.flatnonzero(codes != rarest)
    repeated = np.sort(np.random.default_rng(0).choice(len(codes), len(codes)))
    row_sets = [np.arange(len(codes)), without, repeated]
    for rows, (fitted,) in zip(row_sets, LogRegHead(C=0.1, tol=1e-6).fit_paths(Z, codes, row_sets)):
        alone = LogRegHead(C=0.1, tol=1e-6).fit(Z[rows], codes[rows])
        assert np.array_equal(fitted.classes_, alone.classes_)
        assert np.array_equal(fitted.coef_, alone.coef_)


def test_folds_with_their_own_c_fitted_together_equal_fits_alone(features):
    """Each row set with its own C (each fold's tuned C), fitted at once over one shared matrix: each model is
    the one its C gives alone; a list of paths that does not match the row sets is refused."""
    Z, codes, _ = features
    row_sets = [np.flatnonzero(np.arange(len(codes)) % 3 != k) for k in range(3)]
    Cs = [0.002, 0.02, 0.2]
    together = LogRegHead(class_weight="balanced", tol=1e-7).fit_paths(Z, codes, row_sets, [[C] for C in Cs])
    for rows, C, (fitted,) in zip(row_sets, Cs, together):
        alone = LogRegHead(C=C, class_weight="balanced", tol=1e-7).fit(Z[rows], codes[rows])
        assert fitted.C == C
        assert np.abs(fitted.predict_proba(Z) - alone.predict_proba(Z)).max() < 2e-3
    with pytest.raises(ValueError, match="2 paths of C for 3 tasks"):
        LogRegHead().fit_paths(Z, codes, row_sets, [[0.1], [1.0]])


def test_path_predictions_equal_each_models_own(features):
    """predict_path prepares the rows once for all models of a path (through the decision and column
    wrappers), and gives each model's own probabilities; an estimator without path_proba predicts one by one."""
    import pandas as pd
    from sklearn.neighbors import KNeighborsClassifier

    from embedstore.heads.base import predict_path, predict_rows

    Z, codes, _ = features
    columns = [f"x{j}" for j in range(Z.shape[1])]
    X = pd.DataFrame(Z * 2.0 + 1.0, columns=columns)
    model = BalancedDecision(ColumnsHead(LogRegHead(class_weight="balanced", tol=1e-4), columns))
    train, test = np.arange(0, len(codes), 2), np.arange(1, len(codes), 2)
    (path,) = model.fit_paths(X, codes, [train], [0.001, 0.01, 0.1])
    for fitted, proba in zip(path, predict_path(path, X, test)):
        assert np.array_equal(proba, predict_rows(fitted, X, test))
    knn = [KNeighborsClassifier(k).fit(Z[train], codes[train]) for k in (3, 5)]
    for fitted, proba in zip(knn, predict_path(knn, Z, test)):
        assert np.array_equal(proba, fitted.predict_proba(Z[test]))


def test_an_uneven_path_and_a_class_without_weight_give_finite_optima(features):
    """A path whose last step is far longer than the one before (the extrapolated start is held to one step),
    and a binary fit where one class has no weight: finite models, each point the fit of its C."""
    Z, codes, n_classes = features
    path = logistic.fit_path(Z, codes, n_classes, [0.001, 0.0011, 1.0], tol=1e-6)
    alone = logistic.fit(Z, codes, n_classes, 1.0, tol=1e-6)
    assert np.abs(path[-1].proba(Z) - alone.proba(Z)).max() < 3e-3
    binary = (codes == 0).astype(int)
    weights = np.where(binary == 1, 0.0, 1.0)
    fitted = logistic.fit(Z, binary, 2, 0.1, weights)
    assert np.isfinite(fitted.coef).all() and np.isfinite(fitted.intercept).all()
