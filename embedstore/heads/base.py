"""What every embedding head shares: label bookkeeping, imbalance handling and optional PCA.

A head is a scikit-learn classifier (parameters in ``__init__``, learned
attributes ending in ``_``, ``fit``/``predict``/``predict_proba``), so it can
be cloned, grid-searched and put in a pipeline. Subclasses implement only
``_fit_core(Z, codes, sample_weight)`` and ``_proba_core(Z)`` on the
preprocessed matrix ``Z`` and integer class codes.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler, normalize
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.validation import check_array, check_is_fitted

from embedstore.parallel import one_blas_thread, usable_cores

NORMS = ("l2", "standard", "none")


class Preprocessor(TransformerMixin, BaseEstimator):
    """Row L2-normalisation or per-feature standardisation, then optional PCA (with whitening).

    ``pca`` is a number of components (int) or ``None``; ``whiten=True``
    without ``pca`` whitens with all components. L2-normalised inputs are the
    cosine geometry DINOv2's and CLIP_benchmark's linear probes use.
    """

    def __init__(self, norm: str = "l2", pca: int | None = None, whiten: bool = False, seed: int = 0):
        self.norm = norm
        self.pca = pca
        self.whiten = whiten
        self.seed = seed

    def fit(self, X, y=None):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        X = check_array(X, dtype=np.float32)
        self.scaler_ = StandardScaler().fit(X) if self.norm == "standard" else None
        if self.pca or self.whiten:
            Z = self._normed(X)
            n = min(int(self.pca) if self.pca else Z.shape[1], *Z.shape)
            with one_blas_thread():  # randomized SVD's result depends on the BLAS's thread count: one, everywhere
                self.pca_ = PCA(n_components=n, whiten=self.whiten, random_state=self.seed).fit(Z)
        else:
            self.pca_ = None
        self.n_features_in_ = X.shape[1]
        return self

    def _normed(self, X):
        X = self.row_normed(X)
        return self.scaler_.transform(X) if self.norm == "standard" else X

    def row_normed(self, X):
        """The part of the normalisation that treats each row alone: L2 (``norm="l2"``), else none."""
        return normalize(X) if self.norm == "l2" else X

    def affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mean, scale)`` with ``transform(X) == (row_normed(X) - mean) / scale``, or None where the fitted
        map is no such thing (PCA): what lets several fits share one matrix (a logistic head's ``fit_paths``)."""
        check_is_fitted(self, "n_features_in_")
        if self.pca_ is not None:
            return None
        if self.scaler_ is not None:
            return self.scaler_.mean_, self.scaler_.scale_
        return np.zeros(self.n_features_in_), np.ones(self.n_features_in_)

    def transform(self, X):
        check_is_fitted(self, "n_features_in_")
        Z = self._normed(check_array(X, dtype=np.float32))
        return (self.pca_.transform(Z) if self.pca_ is not None else Z).astype(np.float32)

    def fit_each(self, X: np.ndarray, row_sets: list[np.ndarray]) -> list[Preprocessor]:
        """A clone of this preprocessor fitted on ``X[rows]`` for each of ``row_sets``: what
        ``[clone(self).fit(X[rows]) for rows in row_sets]`` gives, but a standardisation without PCA (the
        probe's logistic heads) takes every set's statistics in one pass over ``X``
        (:func:`standard_scalers`) instead of a pass and a copy of the rows per set."""
        if self.norm != "standard" or self.pca or self.whiten:
            return [clone(self).fit(X[rows]) for rows in row_sets]
        X = check_array(X, dtype=np.float32)
        fitted = []
        for scaler in standard_scalers(X, row_sets):
            prep = clone(self)
            prep.scaler_, prep.pca_, prep.n_features_in_ = scaler, None, X.shape[1]
            fitted.append(prep)
        return fitted


#: Rows of a matrix converted to float64 at a time by :func:`standard_scalers`.
STATISTICS_ROWS = 8192


def standard_scalers(X: np.ndarray, row_sets: list[np.ndarray]) -> list[StandardScaler]:
    """``StandardScaler().fit(X[rows])`` for each of ``row_sets``, from one pass over ``X``.

    Each set's sums, and sums of squares about a common centre (the mean of the first block of rows: close
    to every set's mean, so that the variance's two terms do not cancel), are matrix products of the sets'
    row counts with blocks of ``X`` in float64, as scikit-learn accumulates. The scalers' means and variances
    equal scikit-learn's to float64 rounding where the centre is near the set's mean; a column constant in one set
    but not about the centre gets a variance of 0 and a scale of 1, as scikit-learn gives it; the scales follow
    scikit-learn's rule for near-constant features. Memory: a block of ``X`` in float64 and the sets' counts,
    whatever the number of rows.
    """
    n, d = X.shape
    counts = np.zeros((len(row_sets), n))
    for i, rows in enumerate(row_sets):
        counts[i] = np.bincount(np.asarray(rows), minlength=n)  # a row twice in a set counts twice, as X[rows]
    sizes = counts.sum(1)
    used = np.flatnonzero(counts.any(0))  # blocks of the used rows only: the same sums for the same rows in the
    centre = X[used[:STATISTICS_ROWS]].mean(0, dtype=np.float64)  # same order, whatever other rows X holds
    sums, squares = np.zeros((len(row_sets), d)), np.zeros((len(row_sets), d))
    for lo in range(0, len(used), STATISTICS_ROWS):
        block = used[lo:lo + STATISTICS_ROWS]
        D = X[block].astype(np.float64) - centre
        sums += counts[:, block] @ D
        squares += counts[:, block] @ (D * D)
    scalers = []
    for size, total, square in zip(sizes, sums, squares):
        shift = total / size
        scaler = StandardScaler()
        scaler.mean_ = centre + shift
        var = square / size - shift * shift
        # a column constant in this set but not about the centre leaves rounding noise (at most about size * eps
        # times its mean square about the centre), where scikit-learn computes 0
        noise = var <= _EPS * square
        scaler.var_ = np.where(noise, 0.0, var)
        scaler.n_samples_seen_, scaler.n_features_in_ = int(size), d
        near_constant = noise | (scaler.var_ <= size * _EPS * scaler.var_ + (size * scaler.mean_ * _EPS) ** 2)
        scaler.scale_ = np.where(near_constant, 1.0, np.sqrt(scaler.var_))
        scalers.append(scaler)
    return scalers


_EPS = np.finfo(np.float64).eps


def undersample_indices(codes: np.ndarray, ratio: float | None, seed: int = 0) -> np.ndarray:
    """Rows kept when every class is capped at ``ratio`` times the size of the smallest class.

    ``ratio=None`` keeps every row. This is the majority-class undersampling
    of the ISIC 2024 solutions (e.g. ``ratio=20``: at most 20 negatives per positive).
    """
    if not ratio:
        return np.arange(len(codes))
    rng = np.random.default_rng(seed)
    counts = np.bincount(codes)
    cap = int(np.ceil(ratio * counts[counts > 0].min()))
    keep = []
    for k in np.flatnonzero(counts):
        rows = np.flatnonzero(codes == k)
        keep.append(rows if rows.size <= cap else rng.choice(rows, cap, replace=False))
    return np.sort(np.concatenate(keep))


def class_sample_weight(codes: np.ndarray, class_weight, sample_weight=None) -> np.ndarray | None:
    """Per-row weights from ``class_weight`` (None, "balanced" or {code: weight}) times ``sample_weight``."""
    if class_weight is None:
        return sample_weight
    w = compute_sample_weight(class_weight, codes)
    return w if sample_weight is None else w * np.asarray(sample_weight)


class ArgmaxPredictMixin:
    """``predict``: the class of highest probability, for every head that defines ``predict_proba`` and ``classes_``.

    Listed before scikit-learn's ``ClassifierMixin`` in a head's bases.
    """

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


def training_rows(head, y, sample_weight=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The set-up every head's ``fit`` shares: sets ``head.classes_`` from ``y``, keeps the rows that the head's
    ``undersample`` ratio leaves (seeded by ``head.seed``) and weighs them by ``head.class_weight`` times
    ``sample_weight``.

    Returns the kept rows, their integer class codes and their weights (None when unweighted).
    """
    head.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
    rows = undersample_indices(codes, head.undersample, head.seed)
    weights = class_sample_weight(
        codes[rows], head.class_weight, None if sample_weight is None else np.asarray(sample_weight)[rows]
    )
    return rows, codes[rows], weights


class EmbeddingHead(ArgmaxPredictMixin, ClassifierMixin, BaseEstimator):
    """Base of the heads that read a numeric feature matrix (logreg, knn, svm, mlp).

    Subclasses declare ``norm``, ``pca``, ``whiten``, ``class_weight``,
    ``undersample`` and ``seed`` among their ``__init__`` parameters.
    """

    def fit(self, X, y, sample_weight=None):
        self._fit_core(*self._prepare(X, y, sample_weight))
        return self

    def _prepare(self, X, y, sample_weight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What every fit does first (:meth:`_set_up`); returns the preprocessed training matrix, its class
        codes and weights for ``_fit_core``."""
        X = check_array(X, dtype=np.float32)
        rows, codes, weights = self._set_up(X, y, sample_weight)
        return self.preprocessor_.transform(X[rows]), codes, weights

    def _set_up(self, X: np.ndarray, y, sample_weight):
        """Classes, kept rows and their weights, the preprocessor fitted on them, for a fit on ``X``/``y``/
        ``sample_weight``; returns the kept rows, their class codes and weights."""
        rows, codes, weights = self._training_rows(X, y, sample_weight, np.arange(len(X)))
        self.preprocessor_ = self.preprocessor().fit(X[rows])
        return rows, codes, weights

    def _training_rows(self, X: np.ndarray, y, sample_weight, rows: np.ndarray):
        """Classes, kept rows and their weights for a fit on ``rows`` of ``X``/``y``/``sample_weight``: the
        kept rows (indices into ``X``), their class codes and weights. The preprocessor is fitted on them next."""
        rows = np.asarray(rows)
        y = np.asarray(y)[rows]
        kept, codes, weights = training_rows(self, y, None if sample_weight is None else np.asarray(sample_weight)[rows])
        if self.classes_.size < 2:
            raise ValueError("a head needs at least two classes in y")
        self.n_features_in_ = X.shape[1]
        return rows[kept], codes, weights

    def preprocessor(self) -> Preprocessor:
        """This head's preprocessing, unfitted (its ``norm``, ``pca``, ``whiten`` and ``seed``)."""
        return Preprocessor(self.norm, self.pca, self.whiten, self.seed)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "preprocessor_")
        return self._proba_core(self.preprocessor_.transform(X))

    def path_proba(self, heads: list[EmbeddingHead], X) -> list[np.ndarray]:
        """``predict_proba`` of each of ``heads`` (fitted copies of this head), transforming ``X`` once per
        preprocessor they share (:func:`path_proba`)."""
        prepared: dict[int, np.ndarray] = {}
        for head in heads:
            check_is_fitted(head, "preprocessor_")
            if id(head.preprocessor_) not in prepared:
                prepared[id(head.preprocessor_)] = head.preprocessor_.transform(X)
        return [head._proba_core(prepared[id(head.preprocessor_)]) for head in heads]

    def _fit_core(self, Z: np.ndarray, codes: np.ndarray, sample_weight: np.ndarray | None) -> None:
        raise NotImplementedError

    def _proba_core(self, Z: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def fit_paths(estimator, X, y, row_sets, values=None, **fit_params) -> list[list]:
    """Fitted clones of ``estimator``, one list per row set of ``row_sets`` (indices into ``X`` and ``y``) with
    one fit per value of its path parameter (``values``; None: its own setting, one fit).

    An estimator with a ``fit_paths`` method fits them its own way (a logistic head fits all row sets in one
    pass over the matrix per evaluation, a LightGBM head several side by side, a stack reads only its rows'
    columns); any other is cloned and fitted per row set. ``fit_params`` (a stack's ``groups``, over all of
    ``X``) go to the estimator's own ``fit_paths``.
    """
    if hasattr(estimator, "fit_paths"):
        return clone(estimator).fit_paths(X, y, row_sets, values, **fit_params)
    if values is not None:
        raise TypeError(f"{type(estimator).__name__} has no path parameter to sweep")
    y = np.asarray(y)
    return [[clone(estimator).fit(take_rows(X, rows), y[rows])] for rows in row_sets]


def single_core(estimator) -> bool:
    """Whether a fit of ``estimator`` runs on one core (a LightGBM head at ``n_jobs=1``, or a wrapper of one),
    so that several of its fits may run side by side (:func:`embedstore.parallel.in_order`)."""
    return bool(getattr(estimator, "single_core", lambda: False)())


def side_by_side(estimator) -> int:
    """How many fits or predictions of ``estimator`` run at once (``workers`` of
    :func:`embedstore.parallel.in_order`): every usable core for a :func:`single_core` estimator, else one."""
    return usable_cores() if single_core(estimator) else 1


#: Rows predicted at a time (:func:`predict_rows`, LightGBM's design): bounds the copy of the rows' columns that a
#: prediction of a 100,000-row held-out fold takes.
PREDICT_ROWS = 32_768


def predict_rows(model, X, rows) -> np.ndarray:
    """``model.predict_proba`` of ``rows`` of ``X``, taken ``PREDICT_ROWS`` at a time: memory bounded whatever
    the number of rows, and the same probabilities (each row is predicted alone)."""
    blocks = [model.predict_proba(take_rows(X, block)) for block in row_blocks(rows)]
    return np.vstack(blocks) if blocks else model.predict_proba(take_rows(X, rows))


def predict_path(models: list, X, rows) -> list[np.ndarray]:
    """:func:`predict_rows` of every model of ``models``, fitted copies of one estimator on one row set that
    differ only in their path parameter (the fits of a path, :func:`fit_paths`), by :func:`path_proba`."""
    blocks = [path_proba(models, take_rows(X, block)) for block in row_blocks(rows)]
    if not blocks:
        return path_proba(models, take_rows(X, rows))
    return [np.vstack([block[i] for block in blocks]) for i in range(len(models))]


def path_proba(models: list, X) -> list[np.ndarray]:
    """``predict_proba`` of each of ``models`` (fitted copies of one estimator) on ``X``: an estimator with a
    ``path_proba`` method prepares ``X`` once for all of them (a logistic path's models share their
    preprocessing), any other predicts model by model. The same probabilities either way."""
    if hasattr(models[0], "path_proba"):
        return models[0].path_proba(models, X)
    return [model.predict_proba(X) for model in models]


def row_blocks(rows) -> list[np.ndarray]:
    """``rows`` cut into consecutive blocks of at most ``PREDICT_ROWS``."""
    rows = np.asarray(rows)
    return [rows[lo:lo + PREDICT_ROWS] for lo in range(0, len(rows), PREDICT_ROWS)]


def take_rows(X, rows):
    """``rows`` of ``X`` (a DataFrame or an array); ``X`` itself, not a copy, when they are all its rows in order."""
    rows = np.asarray(rows)
    if len(rows) == len(X) and np.array_equal(rows, np.arange(len(X))):
        return X
    return X.iloc[rows] if hasattr(X, "iloc") else X[rows]
