"""Stacked ensemble: out-of-fold probabilities of several base heads feed a meta-learner.

Each base head sees its own columns of the input (one feature set, another
feature set, the embeddings plus metadata), so heads of different encoders
and kinds combine. The meta-learner is trained only on out-of-fold
probabilities computed on stratified *group* folds, so no base prediction it
learns from was made by a model that saw that row's lesion; the bases are also
fitted on all rows (with the folds' fits, in one go where a base can: a logistic
base's fits share one pass over its matrix, a LightGBM base's run side by side). Inside a probe's outer
cross-validation this is a fully nested scheme; there the stack is fitted on the training rows of the probe's
frame (:meth:`StackHead.fit_paths`): each base reads its columns of the frame (a view, where pandas can give
one) and takes only its rows from them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from embedstore.heads.base import ArgmaxPredictMixin, fit_paths, predict_rows, side_by_side
from embedstore.parallel import in_order
from embedstore.splits import group_kfold


def select_columns(X, columns, head=None):
    """The columns ``head`` reads: all of ``X`` (``columns=None``), or the named DataFrame columns.

    A head that names metadata columns to pass through (LightGBM's ``passthrough``) gets a DataFrame, whatever
    their types; other purely numeric selections become a float32 matrix, the array embedding heads expect.
    """
    if columns is None:
        return X
    part = X[list(columns)]
    if not getattr(head, "passthrough", ()) and all(pd.api.types.is_float_dtype(t) for t in part.dtypes):
        return part.to_numpy(np.float32)
    return part


def _logit_features(probas: list[np.ndarray]) -> np.ndarray:
    """Meta-features: the log-probabilities of every base, side by side (clipped away from 0)."""
    return np.log(np.clip(np.hstack(probas), 1e-6, 1.0))


class StackHead(ArgmaxPredictMixin, ClassifierMixin, BaseEstimator):
    """Stack of ``bases`` = ``[(name, head, columns), ...]`` under a meta-learner.

    ``columns`` is ``None`` (all of X) or a list of DataFrame column names.
    ``meta`` defaults to a multinomial logistic regression with ``meta_C`` and
    ``meta_class_weight`` (``"balanced"`` keeps the stack's top prediction from
    leaning towards the majority class when balanced accuracy is the goal).
    ``fit(X, y, groups=...)`` builds the out-of-fold probabilities on
    ``n_splits`` stratified group folds seeded by ``seed``.
    """

    def __init__(self, bases=(), meta=None, meta_C=1.0, meta_class_weight=None, n_splits=5, seed=0):
        self.bases = bases
        self.meta = meta
        self.meta_C = meta_C
        self.meta_class_weight = meta_class_weight
        self.n_splits = n_splits
        self.seed = seed

    def fit(self, X, y, groups=None):
        return self._fit_rows(X, y, np.arange(len(y)), groups)

    def fit_paths(self, X, y, row_sets, values=None, groups=None) -> list[list[StackHead]]:
        """A fitted copy per row set of ``row_sets`` (indices into ``X``, ``y`` and ``groups``, each row once):
        each base takes its rows from its columns of ``X``, with no copy of the rows' every column first."""
        if values is not None:
            raise TypeError("StackHead has no path parameter to sweep")
        return [[clone(self)._fit_rows(X, y, np.asarray(rows), groups)] for rows in row_sets]

    def _fit_rows(self, X, y, rows: np.ndarray, groups) -> StackHead:
        if not self.bases:
            raise ValueError("a stack needs at least one base head")
        if len(np.unique(rows)) < len(rows):  # out-of-fold probabilities are kept by row
            raise ValueError("a stack's rows must each appear once")
        self.classes_, local = np.unique(np.asarray(y)[rows], return_inverse=True)
        codes = np.full(len(y), -1)  # class codes over all of X; only ``rows`` are read
        codes[rows] = local
        folds = [(rows[train], rows[test]) for train, test in
                 group_kfold(local, None if groups is None else np.asarray(groups)[rows], n_splits=self.n_splits,
                             seed=self.seed)]
        self.oof_, self.bases_ = {}, []
        for name, head, columns in self.bases:
            Xb = select_columns(X, columns, head)
            *inner, final = [path[0] for path in fit_paths(head, Xb, codes, [train for train, _ in folds] + [rows])]
            oof = np.zeros((len(y), self.classes_.size))
            probas = list(in_order(lambda fit_test: predict_rows(fit_test[0], Xb, fit_test[1]),  # one-core heads: side by side
                                   zip(inner, [test for _, test in folds]), side_by_side(head)))
            for (_, test), proba in zip(folds, probas):
                oof[test] = proba
            self.oof_[name] = oof[rows]
            self.bases_.append((name, final, columns))
        self.meta_ = clone(self.meta) if self.meta is not None else LogisticRegression(
            C=self.meta_C, class_weight=self.meta_class_weight, max_iter=2000)
        self.meta_.fit(_logit_features(list(self.oof_.values())), local)
        self.n_features_in_ = X.shape[1]
        return self

    def base_probas(self, X) -> dict[str, np.ndarray]:
        """Each refitted base head's class probabilities for ``X``, by name (for base-vs-stack tables)."""
        check_is_fitted(self, "bases_")
        return {name: head.predict_proba(select_columns(X, cols, head)) for name, head, cols in self.bases_}

    def predict_proba(self, X) -> np.ndarray:
        return self.proba_of_bases(self.base_probas(X))

    def proba_of_bases(self, base_probas: dict[str, np.ndarray]) -> np.ndarray:
        """The stack's class probabilities from its bases' (:meth:`base_probas`), without predicting them again."""
        check_is_fitted(self, "meta_")
        return self.meta_.predict_proba(_logit_features([base_probas[name] for name, _, _ in self.bases_]))

