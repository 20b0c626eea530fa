"""A head that reads only some columns of its input frame: one feature set of the probe's frame, or several joined.

The probe hands every model one DataFrame holding all feature sets' columns (``<set>/<j>``) and the
metadata; :class:`ColumnsHead` picks the columns its head was built for, so models of one run (and
the bases of a stack) can share that frame. It is saved with the head (trusted by
:mod:`embedstore.heads.saved`).
"""

from __future__ import annotations

import copy

from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from embedstore.heads.base import ArgmaxPredictMixin, fit_paths, path_proba, single_core
from embedstore.heads.stack import select_columns


class ColumnsHead(ArgmaxPredictMixin, ClassifierMixin, BaseEstimator):
    """A head that reads only ``columns`` of the probe's input frame (one feature set, or a concatenation)."""

    def __init__(self, head=None, columns=None):
        self.head = head
        self.columns = columns

    def __sklearn_clone__(self) -> ColumnsHead:
        """An unfitted copy, as :func:`sklearn.base.clone` makes, with the column names copied as one sequence of
        the same type: clone copies a list's items one by one, which for a path of 20 fits on 1,280 columns was
        500,000 calls."""
        return type(self)(head=clone(self.head, safe=False), columns=copy.copy(self.columns))

    def fit(self, X, y):
        return self._wrap(clone(self.head).fit(select_columns(X, self.columns, self.head), y))

    def fit_paths(self, X, y, row_sets, values=None) -> list[list[ColumnsHead]]:
        """Fitted copies per row set and per value of the head's path (:func:`embedstore.heads.base.fit_paths`),
        all reading one selection of the columns."""
        fits = fit_paths(self.head, select_columns(X, self.columns, self.head), y, row_sets, values)
        return [[clone(self)._wrap(head) for head in path] for path in fits]

    def single_core(self) -> bool:
        """Whether the head's fit runs on one core (:func:`embedstore.heads.base.single_core`)."""
        return single_core(self.head)

    def path_proba(self, models: list[ColumnsHead], X) -> list:
        """``predict_proba`` of each of ``models`` (fitted copies of this wrapper), selecting the columns once
        (:func:`embedstore.heads.base.path_proba`)."""
        for model in models:
            check_is_fitted(model, "head_")
        heads = [model.head_ for model in models]
        return path_proba(heads, select_columns(X, self.columns, heads[0]))

    def _wrap(self, head) -> ColumnsHead:
        """This wrapper, fitted around the fitted ``head``."""
        self.head_, self.classes_ = head, head.classes_
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "head_")
        return self.head_.predict_proba(select_columns(X, self.columns, self.head_))
