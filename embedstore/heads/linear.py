"""Linear heads: the logistic-regression probe and a linear SVM with calibrated probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_array

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
    :mod:`embedstore.tune` does along a warm-started path (:meth:`fit_paths`).
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

    def fit_paths(self, X, y, row_sets, Cs=None, sample_weight=None) -> list[list[LogRegHead]]:
        """Fitted copies of this head on each row set of ``row_sets`` (indices into ``X``: the training rows of
        each fold, say), for each C of ``Cs`` (increasing, each fit warm-started from the one before: the
        regularisation path; a list of such paths, one per row set, e.g. each fold's own tuned C; None: this
        head's own C): ``[row set][C]``.

        Each copy is the model :meth:`fit` gives on its rows (to the solver's tolerance), with its own
        preprocessing. Where the row sets overlap, as folds do, the fits share one matrix, standardised over
        all their rows, with each fit's own standardisation an affine map of it, and one pass over it per
        round of evaluations (:func:`embedstore.heads.logistic.fit_paths`); where they share few rows
        (undersampled folds) or the head reduces with PCA, each is fitted on its own matrix.
        """
        X = check_array(X, dtype=np.float32)
        paths = logistic.per_task_paths([self.C] if Cs is None else Cs, len(row_sets))
        heads = [clone(self) for _ in row_sets]
        prepared = [head._training_rows(X, y, sample_weight, rows) for head, rows in zip(heads, row_sets)]
        union, positions = logistic.shared_rows([rows for rows, _, _ in prepared])
        device = self.fit_device()
        if self._can_share(heads, prepared, len(union)):  # every set's statistics, and the union's, in one pass
            *own, common = self.preprocessor().fit_each(X, [rows for rows, _, _ in prepared] + [union])
            for head, preprocessor in zip(heads, own):
                head.preprocessor_ = preprocessor
            G, tasks = self._shared(X, union, positions, prepared, [head.preprocessor_.affine() for head in heads],
                                    common)
            fits = logistic.fit_paths(G, tasks, heads[0].classes_.size, paths, self.tol, self.max_iter, device)
        else:  # little overlap (undersampled folds), PCA, other classes or repeated rows: each exactly as alone
            for head, (rows, _, _) in zip(heads, prepared):
                head.preprocessor_ = head.preprocessor().fit(X[rows])
            fits = [logistic.fit_path(head.preprocessor_.transform(X[rows]), codes, head.classes_.size, path, weights,
                                      self.tol, self.max_iter, device)
                    for head, (rows, codes, weights), path in zip(heads, prepared, paths)]
        return [[self._fitted_copy(head, fitted) for fitted in path] for head, path in zip(heads, fits)]

    def _can_share(self, heads, prepared, n_union: int) -> bool:
        """Whether the fits can share one matrix, and gain by it: the preprocessing an affine map (no PCA), the
        same classes in every row set (one class code per row), no row twice in a set (a row's weight is per fit
        and row), and each row used by two fits on average."""
        return (not (self.pca or self.whiten)
                and all(np.array_equal(head.classes_, heads[0].classes_) for head in heads)
                and all(len(np.unique(rows)) == len(rows) for rows, _, _ in prepared)
                and sum(len(rows) for rows, _, _ in prepared) >= 2 * n_union)

    def _shared(self, X, union, positions, prepared, maps, common) -> tuple[np.ndarray, list[logistic.Task]]:
        """The matrix the fits share (``union``'s rows, by ``common``, the head's own normalisation fitted over
        all of them) and each fit's task on it (its rows at ``positions`` of it)."""
        G = common.transform(X[union])
        mean, scale = common.affine()
        tasks = []
        for at, (_, codes, weights), (own_mean, own_scale) in zip(positions, prepared, maps):
            shift = (own_mean - mean) / scale  # (X - own_mean) / own_scale == (G - shift) * (scale / own_scale)
            tasks.append(logistic.Task(at, codes, weights, shift, scale / own_scale))
        return G, tasks

    def _fitted_copy(self, head: LogRegHead, fitted: logistic.LogisticFit) -> LogRegHead:
        """A copy of ``head`` (set up for its rows) holding ``fitted``, with ``C`` set to the C it was fitted with."""
        copy = clone(head).set_params(C=fitted.C)
        copy.classes_, copy.preprocessor_, copy.n_features_in_ = head.classes_, head.preprocessor_, head.n_features_in_
        copy._keep(fitted)
        return copy

    def fit_device(self) -> str:
        """The torch device name the fit runs on (``cpu``, ``cuda``, ``cuda:1``; ``cpu`` without torch where no GPU
        driver is loaded); ConfigError for one not present."""
        from embedstore.devices import device_name

        return device_name(self.device)

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
