"""A small multilayer perceptron head (scikit-learn's MLPClassifier, Adam, early stopping)."""

from __future__ import annotations

from sklearn.neural_network import MLPClassifier

from embedstore.heads.base import EmbeddingHead


class MLPHead(EmbeddingHead):
    """One hidden ReLU layer of ``hidden`` units with L2 penalty ``alpha``; early stopping on a
    10% validation slice of the training rows keeps it from overfitting small stores."""

    def __init__(self, hidden=256, alpha=1e-3, learning_rate=1e-3, max_iter=200, norm="standard", pca=None,
                 whiten=False, class_weight=None, undersample=None, seed=0):
        self.hidden = hidden
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.norm = norm
        self.pca = pca
        self.whiten = whiten
        self.class_weight = class_weight
        self.undersample = undersample
        self.seed = seed

    def _fit_core(self, Z, codes, sample_weight):
        self.model_ = MLPClassifier(
            hidden_layer_sizes=(int(self.hidden),), alpha=self.alpha, learning_rate_init=self.learning_rate,
            max_iter=self.max_iter, early_stopping=True, n_iter_no_change=10, random_state=self.seed,
        )
        self.model_.fit(Z, codes, sample_weight=sample_weight)

    def _proba_core(self, Z):
        return self.model_.predict_proba(Z)
