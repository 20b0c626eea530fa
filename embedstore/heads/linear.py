"""Linear heads: the logistic-regression probe and a linear SVM with calibrated probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import LinearSVC

from embedstore.heads import logistic
from embedstore.heads.base import EmbeddingHead


class LogRegHead(EmbeddingHead):
    """The linear probe: L2-penalised logistic regression (multinomial; binomial for two classes) on
    normalised features, with scikit-learn's objective and stopping rule (``tol``, ``max_iter``).

    ``tol`` (largest absolute gradient at the stop) is 1e-5, ten times tighter than scikit-learn's default:
    the objective is flat near its optimum, and on HAM10000 (MobileNetV2, C=1, 5 folds) a stop at 1e-4 left
    the pooled macro AUC up to 0.004 from the optimum's, in either direction depending on the starting
    point, while 1e-5 lands within 0.0002 of it (BENCHMARKS.md, "Heads at the speed of the cache").

    ``C`` is the inverse L2 strength; DINOv2 and CLIP_benchmark search it on a log grid, which
    :mod:`embedstore.tune` does along a warm-started path (:func:`embedstore.heads.logistic.fit_path`).
    It is fitted by :mod:`embedstore.heads.logistic` (float32 products, preconditioned L-BFGS) on
    ``device`` (``cpu``, ``cuda``, ``auto``); predicting always runs on the CPU.
    """

    def __init__(self, C=1.0, norm="standard", pca=None, whiten=False, class_weight=None,
                 undersample=None, max_iter=1000, tol=1e-5, device="cpu", seed=0):
        self.C = C
        self.norm = norm
        self.pca = pca
        self.whiten = whiten
        self.class_weight = class_weight
        self.undersample = undersample
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.seed = seed

    def _fit_core(self, Z, codes, sample_weight):
        self._keep(logistic.fit(Z, codes, self.classes_.size, self.C, sample_weight, self.tol, self.max_iter,
                                self.fit_device()))

    def fit_path(self, X, y, Cs, sample_weight=None) -> list[LogRegHead]:
        """One fitted copy of this head per C of ``Cs`` (increasing), each fit warm-started from the one before:
        the regularisation path, for what a sweep of C costs (:func:`embedstore.heads.logistic.fit_path`)."""
        Z, codes, weights = self._prepare(X, y, sample_weight)
        fits = logistic.fit_path(Z, codes, self.classes_.size, Cs, weights, self.tol, self.max_iter, self.fit_device())
        heads = []
        for fitted in fits:
            head = clone(self).set_params(C=fitted.C)
            head.classes_, head.preprocessor_, head.n_features_in_ = self.classes_, self.preprocessor_, self.n_features_in_
            head._keep(fitted)
            heads.append(head)
        return heads

    def fit_device(self) -> str:
        """The torch device name the fit runs on (``cpu`` without torch); ConfigError for one not present."""
        if self.device == "cpu":
            return "cpu"
        from embedstore.devices import resolve_device

        return str(resolve_device(self.device))

    def _keep(self, fitted: logistic.LogisticFit) -> None:
        self.coef_, self.intercept_, self.n_evals_ = fitted.coef, fitted.intercept, fitted.n_evals

    def _proba_core(self, Z):
        if "model_" in vars(self):  # a head saved before embedstore fitted its own: a scikit-learn model inside
            return self.model_.predict_proba(Z)
        return logistic.predict_proba(Z, self.coef_, self.intercept_)


class SVMHead(EmbeddingHead):
    """Linear SVM (one-vs-rest hinge loss) whose scores are turned into probabilities by
    Platt scaling fitted on internal folds (``CalibratedClassifierCV``, sigmoid)."""

    def __init__(self, C=0.1, norm="standard", pca=None, whiten=False, class_weight=None,
                 undersample=None, calibration_folds=3, seed=0):
        self.C = C
        self.norm = norm
        self.pca = pca
        self.whiten = whiten
        self.class_weight = class_weight
        self.undersample = undersample
        self.calibration_folds = calibration_folds
        self.seed = seed

    def _fit_core(self, Z, codes, sample_weight):
        svm = LinearSVC(C=self.C, random_state=self.seed, max_iter=5000)
        self.model_ = CalibratedClassifierCV(svm, method="sigmoid", cv=self.calibration_folds)
        self.model_.fit(Z, codes, sample_weight=sample_weight)

    def _proba_core(self, Z):
        return self.model_.predict_proba(Z)
