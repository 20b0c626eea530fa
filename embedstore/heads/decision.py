"""Decision rules: which class a head predicts from its class probabilities.

A head's ``predict_proba`` estimates p(k | x) under the class frequencies it
was trained on, and its plain ``predict`` (the argmax) maximises accuracy, so
on HAM10000 (two thirds nevi) it leans towards the majority class. Balanced
accuracy weighs every class equally; the Bayes decision for that goal is
``argmax_k p(k | x) / pi_k`` with ``pi`` the training class frequencies
(threshold moving, or post-hoc logit adjustment: Menon et al., "Long-tail
learning via logit adjustment", ICLR 2021).

Class weights at training time move the decision too, but they also change the
probabilities themselves, and with them the per-class ranking that ROC AUC
scores. Moving only the decision keeps ``predict_proba`` exactly as the head
learned it: AUC, average precision and pAUC are unchanged, and only the label
metrics (accuracy, balanced accuracy, F1) see the new decision.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from embedstore.heads.base import fit_paths, path_proba, single_core

#: Decision rules a probe accepts: the plain argmax, or the balanced-accuracy rule.
DECISIONS = ("argmax", "balanced")


class BalancedDecision(ClassifierMixin, BaseEstimator):
    """Wraps ``estimator``: same probabilities, but ``predict`` divides them by the training class prior.

    Learned attributes: ``estimator_`` (the fitted clone), ``classes_`` and
    ``class_prior_`` (class frequencies of the ``y`` given to ``fit``). Meant for
    heads trained without class weights or undersampling, whose probabilities
    follow the training prior; on a class-weighted head it corrects twice.
    ``fit`` passes extra keyword arguments on (a stack's ``groups``).
    """

    def __init__(self, estimator=None):
        self.estimator = estimator

    def fit(self, X, y, **fit_params):
        return self._wrap(clone(self.estimator).fit(X, y, **fit_params), X, y)

    def fit_paths(self, X, y, row_sets, values=None, **fit_params) -> list[list[BalancedDecision]]:
        """Fitted copies per row set and per value of the wrapped estimator's path
        (:func:`embedstore.heads.base.fit_paths`)."""
        y = np.asarray(y)
        fits = fit_paths(self.estimator, X, y, row_sets, values, **fit_params)
        return [[clone(self)._wrap(estimator, X, y[rows]) for estimator in path] for rows, path in zip(row_sets, fits)]

    def single_core(self) -> bool:
        """Whether the wrapped estimator's fit runs on one core (:func:`embedstore.heads.base.single_core`)."""
        return single_core(self.estimator)

    def path_proba(self, models: list[BalancedDecision], X) -> list[np.ndarray]:
        """``predict_proba`` of each of ``models`` (fitted copies of this wrapper): the wrapped estimators' own
        (:func:`embedstore.heads.base.path_proba`)."""
        for model in models:
            check_is_fitted(model, "estimator_")
        return path_proba([model.estimator_ for model in models], X)

    def _wrap(self, estimator, X, y) -> BalancedDecision:
        """This wrapper, fitted around ``estimator`` (fitted on ``X``, ``y``)."""
        self.estimator_ = estimator
        self.classes_ = estimator.classes_
        codes = np.searchsorted(self.classes_, np.asarray(y))
        self.class_prior_ = np.bincount(codes, minlength=self.classes_.size) / codes.size
        self.n_features_in_ = getattr(estimator, "n_features_in_", X.shape[1])
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decide(self.predict_proba(X))]

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Class codes of the balanced decision for probabilities ``proba`` from this head."""
        check_is_fitted(self, "class_prior_")
        return (np.asarray(proba) / self.class_prior_).argmax(1)


def decide(model, proba) -> np.ndarray:
    """What ``model.predict`` returns, computed from the ``proba`` the model already gave for the same rows.

    Saves running the model twice where both the probabilities and the classes are needed:
    the balanced rule for a :class:`BalancedDecision`, the argmax for every other head.
    """
    best = model.decide(proba) if isinstance(model, BalancedDecision) else np.asarray(proba).argmax(1)
    return model.classes_[best]
