"""Linear heads: the logistic-regression probe and a linear SVM with calibrated probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from embedstore.heads.base import EmbeddingHead


class LogRegHead(EmbeddingHead):
    """The linear probe: multinomial logistic regression (L-BFGS) on normalised features.

    ``C`` is the inverse L2 strength; DINOv2 and CLIP_benchmark search it on
    a log grid, which is what :mod:`embedstore.tune` does.
    """

    def __init__(self, C=1.0, norm="standard", pca=None, whiten=False, class_weight=None,
                 undersample=None, max_iter=1000, seed=0):
        self.C = C
        self.norm = norm
        self.pca = pca
        self.whiten = whiten
        self.class_weight = class_weight
        self.undersample = undersample
        self.max_iter = max_iter
        self.seed = seed

    def _fit_core(self, Z, codes, sample_weight):
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        self.model_.fit(Z, codes, sample_weight=sample_weight)

    def _proba_core(self, Z):
        return self.model_.predict_proba(Z)


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
