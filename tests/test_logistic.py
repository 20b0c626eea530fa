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
    for C, fitted in zip(Cs, model.fit_path(X, y, Cs)):
        alone = BalancedDecision(ColumnsHead(LogRegHead(C=C, class_weight="balanced", tol=1e-6), columns)).fit(X, y)
        assert fitted.estimator_.head_.C == C
        assert np.abs(fitted.predict_proba(X) - alone.predict_proba(X)).max() < 2e-3
        assert (fitted.predict(X) == alone.predict(X)).mean() > 0.99
        assert np.array_equal(fitted.class_prior_, alone.class_prior_)
