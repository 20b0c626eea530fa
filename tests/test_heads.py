"""Heads on real HAM10000 features: the scikit-learn contract, and each head against a direct computation."""

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_info, threadpool_limits

from embedstore.heads import HEADS, BalancedDecision, KNNHead, LGBMHead, LogRegHead, Preprocessor, StackHead, decide, make_head
from embedstore.errors import ConfigError
from embedstore.heads.base import undersample_indices
from embedstore.splits import group_holdout, group_kfold
from embedstore.store import FeatureStore

@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small solves run fastest single-threaded on a shared CPU (as the probe runs them)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


FAST = {"lgbm": {"n_estimators": 30, "pca": 16}, "mlp": {"max_iter": 50}}


@pytest.fixture(scope="module")
def ham(ham_store):
    store = FeatureStore.open(ham_store)
    X, table = store.load("mobilenet_v2")
    X2, _ = store.load("efficientnet_lite0", ids=table["id"])
    y, groups = table["dx"].to_numpy(), table["lesion_id"].to_numpy()
    train, test = group_holdout(y, groups, 0.25, seed=0)
    return {"X": X, "X2": X2, "y": y, "groups": groups, "table": table, "train": train, "test": test}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_follow_the_sklearn_contract(ham, name):
    X, y, train, test = ham["X"], ham["y"], ham["train"], ham["test"]
    head = make_head(name, **FAST.get(name, {}))
    with pytest.raises(NotFittedError):
        check_is_fitted(head)
    fitted = clone(head).fit(X[train], y[train])
    check_is_fitted(fitted)
    proba = fitted.predict_proba(X[test])
    assert proba.shape == (len(test), 7)
    assert np.allclose(proba.sum(1), 1.0) and (proba >= 0).all()
    assert list(fitted.classes_) == sorted(set(y))
    assert np.array_equal(fitted.predict(X[test]), fitted.classes_[proba.argmax(1)])
    # Better than always predicting the most frequent class: the head learned something from the features.
    assert np.mean(fitted.predict(X[test]) == y[test]) > 0.3
    again = clone(fitted)
    assert again.get_params() == head.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(again)


def test_logreg_is_the_plain_sklearn_probe(ham):
    X, y, train, test = ham["X"], ham["y"], ham["train"], ham["test"]
    # converged, both reach the one optimum, up to the float32 rounding of embedstore's products (which stops its
    # L-BFGS at a largest gradient of ~1e-5, where scikit-learn's float64 one goes on)
    ours = LogRegHead(C=0.5, norm="standard", tol=1e-6).fit(X[train], y[train]).predict_proba(X[test])
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-8, max_iter=10000)).fit(X[train], y[train])
    assert np.abs(ours - ref.predict_proba(X[test])).max() < 3e-2
    assert np.abs(ours - ref.predict_proba(X[test])).mean() < 1e-3
    assert (ours.argmax(1) == ref.predict_proba(X[test]).argmax(1)).mean() > 0.98


def test_knn_is_dinos_temperature_weighted_vote(ham):
    X, y, train, test = ham["X"], ham["y"], ham["train"], ham["test"]
    k, T = 10, 0.07
    proba = KNNHead(k=k, temperature=T).fit(X[train], y[train]).predict_proba(X[test])
    bank = X[train] / np.linalg.norm(X[train], axis=1, keepdims=True)
    query = X[test] / np.linalg.norm(X[test], axis=1, keepdims=True)
    sims = query @ bank.T
    classes, codes = np.unique(y[train], return_inverse=True)
    for i in range(len(test)):
        top = np.argsort(-sims[i])[:k]
        votes = np.zeros(len(classes))
        np.add.at(votes, codes[top], np.exp(sims[i, top] / T))
        assert np.allclose(proba[i], votes / votes.sum(), atol=1e-4)


def test_balanced_class_weights_shift_predictions_away_from_the_majority(ham):
    X, y, train, test = ham["X"], ham["y"], ham["train"], ham["test"]
    majority = pd.Series(y[train]).value_counts().index[0]
    plain = LogRegHead(C=0.05).fit(X[train], y[train]).predict(X[test])
    weighted = LogRegHead(C=0.05, class_weight="balanced").fit(X[train], y[train]).predict(X[test])
    assert np.mean(weighted == majority) < np.mean(plain == majority)


def test_balanced_decision_keeps_the_probabilities_and_divides_by_the_training_prior(ham):
    X, y, train, test = ham["X"], ham["y"], ham["train"], ham["test"]
    plain = LogRegHead(C=0.05).fit(X[train], y[train])
    decided = BalancedDecision(LogRegHead(C=0.05)).fit(X[train], y[train])
    proba = decided.predict_proba(X[test])
    assert np.array_equal(proba, plain.predict_proba(X[test]))  # AUC, AP and pAUC cannot change
    classes, counts = np.unique(y[train], return_counts=True)
    assert np.allclose(decided.class_prior_, counts / counts.sum())
    expected = classes[(proba / (counts / counts.sum())).argmax(1)]
    assert np.array_equal(decided.predict(X[test]), expected)
    for head in (decided, plain):  # decide() gives predict()'s answer from probabilities already computed
        assert np.array_equal(decide(head, head.predict_proba(X[test])), head.predict(X[test]))
    # Dividing by the largest prior can only take predictions away from the majority class.
    majority = classes[counts.argmax()]
    assert np.mean(expected == majority) < np.mean(plain.predict(X[test]) == majority)
    assert clone(decided).get_params()["estimator"].get_params() == LogRegHead(C=0.05).get_params()


def test_undersampling_caps_every_class_at_ratio_times_the_smallest():
    codes = np.repeat([0, 1, 2], [500, 40, 10])
    kept = undersample_indices(codes, 3, seed=0)
    assert np.bincount(codes[kept]).tolist() == [30, 30, 10]
    assert np.array_equal(kept, undersample_indices(codes, 3, seed=0))
    assert len(undersample_indices(codes, None)) == len(codes)


def test_pca_whitening_decorrelates_the_features(ham):
    Z = Preprocessor(norm="standard", pca=32, whiten=True).fit_transform(ham["X"])
    assert Z.shape[1] == 32
    assert np.allclose(np.cov(Z, rowvar=False), np.eye(32), atol=0.05)


def test_lgbm_reads_metadata_with_missing_values_and_categories(ham):
    table, train, test = ham["table"], ham["train"], ham["test"]
    frame = pd.DataFrame(ham["X"], columns=[f"f{i}" for i in range(ham["X"].shape[1])])
    frame["age"] = table["age"].astype(float).where(np.arange(len(table)) % 3 > 0)  # a third of the ages missing
    frame["sex"] = table["sex"].astype("category")
    frame["localization"] = table["localization"].astype(object)
    head = LGBMHead(n_estimators=30, pca=16, passthrough=("age", "sex", "localization"))
    head.fit(frame.iloc[train], ham["y"][train])
    assert set(head.categories_) == {"sex", "localization"}
    names = head.model_.booster_.feature_name()
    assert {"age", "sex", "localization"} <= set(names) and sum(n.startswith("emb_") for n in names) == 16
    unseen = frame.iloc[test].copy()
    unseen["localization"] = "somewhere new"  # a category never seen in training becomes missing, not an error
    assert np.allclose(head.predict_proba(unseen).sum(1), 1.0)


def test_standardisations_of_many_row_sets_in_one_pass_equal_scikit_learns(ham, monkeypatch):
    """The logistic head's folds standardise on their own rows from one pass over the matrix: the same means,
    variances and scales as a StandardScaler fitted on each set's copy, constant and large-mean columns included,
    a row given twice counted twice, over several blocks of the pass."""
    from embedstore.heads import base

    monkeypatch.setattr(base, "STATISTICS_ROWS", 64)  # several blocks on the test store's rows
    X = ham["X"][:, :40].copy()
    X[:, 0] = 3.0  # constant
    X[:, 1] = 1000.0 + np.arange(len(X)) % 2 * 1e-4  # a large mean, a tiny spread: sums about 0 would cancel
    X[ham["test"], 2] = 7.5  # constant in the test rows only, far from the centre of the first rows
    rows = [ham["train"], ham["test"], np.r_[ham["test"], ham["test"][:7]], np.arange(len(X))]
    fitted = Preprocessor(norm="standard").fit_each(X, rows)
    for prep, part in zip(fitted, rows):
        expected = StandardScaler().fit(X[part])
        np.testing.assert_allclose(prep.scaler_.mean_, expected.mean_, rtol=1e-12)
        np.testing.assert_allclose(prep.scaler_.var_, expected.var_, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(prep.scaler_.scale_, expected.scale_, rtol=1e-9)
        assert prep.scaler_.n_samples_seen_ == expected.n_samples_seen_ == len(part)
        np.testing.assert_allclose(prep.transform(X[:20]), Preprocessor(norm="standard").fit(X[part]).transform(X[:20]),
                                   rtol=1e-5, atol=1e-5)
    assert fitted[0].scaler_.scale_[0] == 1.0  # the constant column is left unscaled, as scikit-learn leaves it
    assert fitted[1].scaler_.var_[2] == 0.0 and fitted[1].scaler_.scale_[2] == 1.0  # so is one constant in a set


def test_stack_meta_learner_sees_only_group_out_of_fold_probabilities(ham):
    X, X2, y, groups, train = ham["X"], ham["X2"], ham["y"], ham["groups"], ham["train"]
    frame = pd.concat([pd.DataFrame(X, columns=[f"a{i}" for i in range(X.shape[1])]),
                       pd.DataFrame(X2, columns=[f"b{i}" for i in range(X2.shape[1])])], axis=1).iloc[train]
    cols_a, cols_b = [f"a{i}" for i in range(X.shape[1])], [f"b{i}" for i in range(X2.shape[1])]
    stack = StackHead(bases=[("a", LogRegHead(C=0.1, tol=1e-7), cols_a), ("b", KNNHead(k=10), cols_b)], n_splits=3, seed=0)
    stack.fit(frame, y[train], groups=groups[train])
    # Rebuild base "a"'s out-of-fold probabilities by hand on the same group folds (fitted one by one, where the
    # stack fits its folds together: the same models up to the solver's tolerance).
    codes = np.unique(y[train], return_inverse=True)[1]
    expected = np.zeros_like(stack.oof_["a"])
    for tr, te in group_kfold(codes, groups[train], n_splits=3, seed=0):
        assert not set(groups[train][tr]) & set(groups[train][te])
        expected[te] = LogRegHead(C=0.1, tol=1e-7).fit(X[train][tr], codes[tr]).predict_proba(X[train][te])
    # Up to the solver's tolerance: on 2026-12-07's packages the largest of the 2,100 differences is 2.2e-3 (the
    # mean 5e-5); a stack that saw its own fold's labels would be off by far more, on average.
    gap = np.abs(stack.oof_["a"] - expected)
    assert gap.max() < 5e-3 and gap.mean() < 2e-4
    assert stack.meta_.coef_.shape == (2 * 7, 7)  # log-probabilities of both bases, per class
    assert set(stack.base_probas(frame.iloc[:5])) == {"a", "b"}
    assert stack.predict_proba(frame.iloc[:5]).shape == (5, 7)


def test_stacks_fitted_together_are_the_stacks_fitted_alone(ham):
    """A probe's outer folds' stacks and its final one are fitted together, base by base (one pass over a logistic
    base's matrix for all of them, LightGBM fits side by side): each is the stack it would be fitted alone, its
    LightGBM base exactly, its logistic base to the solver's tolerance (a matrix shared by other rows rounds
    otherwise)."""
    frame, y, groups, train = _frame_with_metadata(ham), ham["y"], ham["groups"], ham["train"]
    features = [c for c in frame.columns if c.startswith("f")]
    stack = StackHead(bases=[("gb", LGBMHead(n_estimators=20, pca=8, passthrough=("age", "sex")), [*features, "age", "sex"]),
                             ("lr", LogRegHead(C=0.1, tol=1e-7), features)],
                      n_splits=3, seed=0)
    row_sets = [train[fold] for fold, _ in group_kfold(y[train], groups[train], n_splits=3, seed=0)] + [train]
    messages = []
    together = [path[0] for path in stack.fit_paths(frame, y, row_sets, groups=groups, progress=messages.append)]
    # 4 stacks x (3 inner folds + all rows) = 16 fits, but the final stack's own group folds of ``train`` are these
    # outer folds (the same call), so its three inner models are the outer folds' models, fitted once: 13
    assert messages == ["stack base gb: 13 models fitted", "stack base lr: 13 models fitted"]
    for rows, fitted in zip(row_sets, together):
        alone = clone(stack).fit(frame.iloc[rows], y[rows], groups=groups[rows])
        assert np.array_equal(fitted.classes_, alone.classes_)
        assert np.array_equal(fitted.oof_["gb"], alone.oof_["gb"])
        probas, expected = fitted.base_probas(frame), alone.base_probas(frame)
        assert np.array_equal(probas["gb"], expected["gb"])
        for gap in (np.abs(fitted.oof_["lr"] - alone.oof_["lr"]), np.abs(probas["lr"] - expected["lr"])):
            assert gap.max() < 5e-3 and gap.mean() < 2e-4  # as the stack's own folds against fits one by one


def test_stacks_taking_the_outer_folds_as_inner_folds_fit_each_distinct_model_once(ham):
    """Given the outer folds, a stack's inner folds are the other outer folds (its rows of none, one more), so the
    inner model of outer fold k without fold j is outer fold j's without fold k, and the final stack's are the
    outer folds' own: 4 folds need 6 + 4 + 1 = 11 fits per base instead of 20. Each stack is still the stack it
    would be fitted alone on those folds, and none of outer fold k's models saw fold k."""
    frame, y, groups, train, test = _frame_with_metadata(ham), ham["y"], ham["groups"], ham["train"], ham["test"]
    features = [c for c in frame.columns if c.startswith("f")]
    stack = StackHead(bases=[("gb", LGBMHead(n_estimators=20, pca=8, passthrough=("age", "sex")), [*features, "age", "sex"]),
                             ("lr", LogRegHead(C=0.1, tol=1e-7), features)],
                      n_splits=3, seed=0)
    outer = [(train[tr], train[te]) for tr, te in group_kfold(y[train], groups[train], n_splits=4, seed=0)]
    folds = np.full(len(y), -1)
    for k, (_, held) in enumerate(outer):
        folds[held] = k
    row_sets = [rows for rows, _ in outer] + [train]
    messages = []
    together = [path[0] for path in stack.fit_paths(frame, y, row_sets, groups=groups, folds=folds, progress=messages.append)]
    assert messages == ["stack base gb: 11 models fitted", "stack base lr: 11 models fitted"]
    for k, (rows, held) in enumerate(outer):
        _, inner, _ = clone(stack)._plan(y, rows, groups, folds)
        assert [sorted(part) for _, part in inner] == [sorted(other) for j, (_, other) in enumerate(outer) if j != k]
        assert all(not set(fit_rows) & set(held) for fit_rows, _ in inner)
    for rows, fitted in zip(row_sets, together):
        alone = clone(stack).fit_paths(frame, y, [rows], groups=groups, folds=folds)[0][0]
        assert np.array_equal(fitted.oof_["gb"], alone.oof_["gb"])
        probas, expected = fitted.base_probas(frame), alone.base_probas(frame)
        assert np.array_equal(probas["gb"], expected["gb"])
        for gap in (np.abs(fitted.oof_["lr"] - alone.oof_["lr"]), np.abs(probas["lr"] - expected["lr"])):
            assert gap.max() < 5e-3 and gap.mean() < 2e-4
    # rows of no outer fold (a validation part) are one more inner fold; rows of one fold cannot be stacked
    with_valid = np.concatenate([train, test])
    _, inner, _ = clone(stack)._plan(y, with_valid, groups, folds)
    assert len(inner) == 5 and sorted(inner[0][1]) == sorted(test)
    with pytest.raises(ValueError, match="two folds or more"):
        clone(stack).fit_paths(frame, y, [outer[0][1]], groups=groups, folds=folds)


def test_lgbm_bins_the_embedding_with_embedding_bins_and_the_metadata_with_lightgbms_own(ham):
    from embedstore.heads import coerce_params

    frame, y = _frame_with_metadata(ham), ham["y"]
    features = [c for c in frame.columns if c.startswith("f")]
    head = LGBMHead(n_estimators=5, pca=8, passthrough=("age", "sex")).fit(frame[[*features, "age", "sex"]], y)
    assert head.model_.booster_.params["max_bin_by_feature"] == [63] * 8 + [255] * 2
    coarse = LGBMHead(n_estimators=5, pca=8, embedding_bins=4).fit(frame[features], y)
    used = coarse.model_.booster_.trees_to_dataframe()["threshold"].dropna().groupby(
        coarse.model_.booster_.trees_to_dataframe()["split_feature"]).nunique()
    assert used.max() <= 3  # four bins per component leave at most three thresholds to split on
    assert coerce_params("lgbm", {"embedding_bins": "127"}) == {"embedding_bins": 127}
    with pytest.raises(ConfigError, match="lgbm.embedding_bins must be >= 2"):
        coerce_params("lgbm", {"embedding_bins": 1})


def test_lgbm_and_the_embedding_heads_train_on_the_same_undersampled_weighted_rows(ham):
    import lightgbm as lgb
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import normalize
    from sklearn.utils.class_weight import compute_sample_weight

    from embedstore.heads.base import training_rows

    X, y, train, test = ham["X"][ham["train"]], ham["y"][ham["train"]], ham["train"], ham["test"]
    sample_weight = np.linspace(0.5, 1.5, len(train))
    options = {"class_weight": "balanced", "undersample": 3, "seed": 1}
    rows, codes, weights = training_rows(LGBMHead(**options), y, sample_weight)
    counts = np.bincount(codes)
    assert counts.max() <= np.ceil(3 * counts.min()) < np.bincount(np.unique(y, return_inverse=True)[1]).max()
    np.testing.assert_allclose(weights, compute_sample_weight("balanced", codes) * sample_weight[rows])

    # LightGBM on exactly those rows and weights, by hand, is the LGBM head ...
    head = LGBMHead(n_estimators=30, pca=16, **options).fit(X, y, sample_weight=sample_weight)
    pca = PCA(n_components=16, random_state=1).fit(X[rows])
    columns = [f"emb_{i}" for i in range(16)]
    direct = lgb.LGBMClassifier(n_estimators=30, learning_rate=0.05, num_leaves=31, min_child_samples=20,
                                subsample=0.8, subsample_freq=1, colsample_bytree=0.5, reg_lambda=1.0,
                                random_state=1, n_jobs=1, verbose=-1, max_bin_by_feature=[63] * 16)
    direct.fit(pd.DataFrame(pca.transform(X[rows]), columns=columns), codes, sample_weight=weights)
    query = ham["X"][test]
    np.testing.assert_allclose(head.predict_proba(query),
                               direct.predict_proba(pd.DataFrame(pca.transform(query), columns=columns)))
    # ... and a logistic regression on them is the logreg head.
    logreg = LogRegHead(C=0.5, norm="l2", tol=1e-7, **options).fit(X, y, sample_weight=sample_weight)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000, random_state=1)
    ref.fit(normalize(X[rows]), codes, sample_weight=weights)
    np.testing.assert_allclose(logreg.predict_proba(query), ref.predict_proba(normalize(query)), atol=2e-4)
    assert np.array_equal(logreg.predict(query), logreg.classes_[ref.predict_proba(normalize(query)).argmax(1)])


def _frame_with_metadata(ham) -> pd.DataFrame:
    """The probe's kind of frame: feature columns, then metadata (numeric, categorical, text)."""
    table = ham["table"]
    frame = pd.DataFrame(ham["X"], columns=[f"f{i}" for i in range(ham["X"].shape[1])])
    frame["age"] = table["age"].astype(float).to_numpy()
    frame["sex"] = table["sex"].astype(object).to_numpy()
    return frame


def test_lgbm_row_sets_fitted_side_by_side_equal_fits_one_by_one(ham, monkeypatch):
    """A stack's or a trial's LightGBM folds run on the cores at once; each model is the one fitted alone, on
    a copy of its rows (also where the PCA would otherwise use more BLAS threads)."""
    from embedstore.heads import base

    frame, y, groups, train = _frame_with_metadata(ham), ham["y"], ham["groups"], ham["train"]
    codes = np.unique(y[train], return_inverse=True)[1]
    row_sets = [train[tr] for tr, _ in group_kfold(codes, groups[train], n_splits=3, seed=0)]
    head = LGBMHead(n_estimators=30, pca=16, passthrough=("age", "sex"), undersample=4, class_weight="balanced")
    monkeypatch.setattr(base, "usable_cores", lambda: 2)
    together = [path[0] for path in head.fit_paths(frame, y, row_sets)]
    query = frame.iloc[ham["test"]]
    with threadpool_limits(limits=2, user_api="blas"):
        alone = [clone(head).fit(frame.iloc[rows], y[rows]) for rows in row_sets]
    for a, b in zip(together, alone):
        assert np.array_equal(a.predict_proba(query), b.predict_proba(query))


def test_lgbm_predicts_in_blocks_what_it_predicts_at_once(ham, monkeypatch):
    from embedstore.heads import base

    frame, y, train, test = _frame_with_metadata(ham), ham["y"], ham["train"], ham["test"]
    head = LGBMHead(n_estimators=30, pca=16, passthrough=("age", "sex")).fit(frame.iloc[train], y[train])
    at_once = head.predict_proba(frame.iloc[test])
    monkeypatch.setattr(base, "PREDICT_ROWS", 7)
    np.testing.assert_allclose(head.predict_proba(frame.iloc[test]), at_once, atol=1e-6)
    np.testing.assert_allclose(base.predict_rows(head, frame, test), at_once, atol=1e-6)


def test_stack_fitted_on_rows_of_the_whole_frame_equals_the_stack_of_their_copy(ham):
    """The probe fits a stack on its training rows of the whole frame (no copy of their every column): the same
    stack as one fitted on a copy of those rows."""
    frame, y, groups, train, test = _frame_with_metadata(ham), ham["y"], ham["groups"], ham["train"], ham["test"]
    features = [c for c in frame.columns if c.startswith("f")]
    stack = StackHead(bases=[("gb", LGBMHead(n_estimators=20, pca=8, passthrough=("age", "sex")), [*features, "age", "sex"]),
                             ("lr", LogRegHead(C=0.1), features)],
                      n_splits=3, seed=0)
    with threadpool_limits(limits=2, user_api="blas"):
        on_rows = stack.fit_paths(frame, y, [train], groups=groups)[0][0]
        # the LightGBM base's folds ran side by side on one BLAS thread each; the hold ended with them
        assert {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"} == {2}
        on_copy = clone(stack).fit(frame.iloc[train], y[train], groups=groups[train])
    np.testing.assert_allclose(on_rows.predict_proba(frame.iloc[test]), on_copy.predict_proba(frame.iloc[test]), atol=1e-9)
    bases = on_rows.base_probas(frame.iloc[test])
    assert np.array_equal(on_rows.proba_of_bases(bases), on_rows.predict_proba(frame.iloc[test]))
