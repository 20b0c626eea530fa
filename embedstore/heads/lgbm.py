"""Gradient-boosted trees (LightGBM) on embeddings plus the store's tabular metadata.

Input is a numeric matrix, or a DataFrame whose ``passthrough`` columns are
metadata (age, sex, localization, ...): object/category columns become
pandas categoricals with the categories seen in training, and missing values
stay NaN, which LightGBM handles natively. The other columns are the
embedding, optionally reduced by PCA first (trees split poorly on 1000+
correlated dimensions), each binned into ``embedding_bins`` histogram bins
(LightGBM's ``max_bin`` for those columns; the metadata keep LightGBM's 255).
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.utils.validation import check_is_fitted

from embedstore.heads.base import ArgmaxPredictMixin, row_blocks, side_by_side, take_rows, training_rows
from embedstore.parallel import in_order, one_blas_thread

#: LightGBM's own number of histogram bins per column, which the metadata columns keep.
LIGHTGBM_MAX_BIN = 255


class LGBMHead(ArgmaxPredictMixin, ClassifierMixin, BaseEstimator):
    """LightGBM classifier over ``[PCA(embedding), metadata]`` with class weights and undersampling.

    ``n_jobs`` defaults to 1: OpenMP threads that share a busy CPU with other
    processes spin-wait, and a 2-thread fit measured 18x slower than 1 thread here.
    The cores are used instead by fitting several row sets side by side (:meth:`fit_paths`: a stack's inner
    folds, a tuning trial's folds), each on one core, which gives the same models as fitting them one by one.

    ``embedding_bins`` is 63, not LightGBM's 255: a tree's cost is mostly per bin (finding each split, building
    each histogram), and 63 bins made a fit on 64 PCA components of HAM10000 1.9 times faster, with the
    LightGBM head's and the four-view stack's figures within their CIs of 255 bins' (BENCHMARKS.md, ninth
    session). The metadata columns, few and often with few values, keep 255.
    """

    def __init__(self, n_estimators=300, learning_rate=0.05, num_leaves=31, min_child_samples=20,
                 subsample=0.8, colsample_bytree=0.5, reg_lambda=1.0, pca=64, embedding_bins=63, passthrough=(),
                 class_weight=None, undersample=None, n_jobs=1, seed=0):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.pca = pca
        self.embedding_bins = embedding_bins
        self.passthrough = passthrough
        self.class_weight = class_weight
        self.undersample = undersample
        self.n_jobs = n_jobs
        self.seed = seed

    def _split(self, X) -> tuple[np.ndarray, pd.DataFrame]:
        """The embedding as float32 and the metadata as a typed DataFrame."""
        if not isinstance(X, pd.DataFrame):
            X = pd.DataFrame(np.asarray(X))
        meta_cols = [c for c in self.passthrough]
        missing = [c for c in meta_cols if c not in X.columns]
        if missing:
            raise ValueError(f"metadata column(s) {missing} not in X")
        emb = X.drop(columns=meta_cols).to_numpy(np.float32)
        return emb, X[meta_cols].reset_index(drop=True)

    def _design(self, emb: np.ndarray, meta: pd.DataFrame) -> pd.DataFrame:
        reduced = self.pca_.transform(emb) if self.pca_ is not None else emb
        design = pd.DataFrame(reduced, columns=[f"emb_{i}" for i in range(reduced.shape[1])])
        for col in meta.columns:
            if col in self.categories_:  # values unseen in training become missing
                values = meta[col].astype("string")
                values = values.where(values.isin(self.categories_[col]))
                design[col] = pd.Categorical(values, categories=self.categories_[col])
            else:
                design[col] = pd.to_numeric(meta[col], errors="coerce").astype(np.float64)
        return design

    def fit(self, X, y, sample_weight=None):
        return self._fit_rows(X, y, None, sample_weight)

    def fit_paths(self, X, y, row_sets, values=None) -> list[list[LGBMHead]]:
        """A fitted copy per row set of ``row_sets`` (indices into ``X``), several at once on a head that runs on
        one core (:func:`embedstore.parallel.in_order`); each reads only the rows it keeps."""
        if values is not None:
            raise TypeError("LGBMHead has no path parameter to sweep")
        return [[head] for head in in_order(lambda rows: clone(self)._fit_rows(X, y, rows), row_sets, side_by_side(self))]

    def single_core(self) -> bool:
        """Whether a fit runs on one core (``n_jobs=1``), leaving the others to fits beside it."""
        return self.n_jobs == 1

    def _fit_rows(self, X, y, rows, sample_weight=None) -> LGBMHead:
        """Fit on ``rows`` of ``X``/``y`` (None: all), undersampling first: only the kept rows are read and
        converted, not every row of a 400,000-row frame."""
        rows = np.arange(len(X)) if rows is None else np.asarray(rows)
        kept, codes, weights = training_rows(self, np.asarray(y)[rows],
                                             None if sample_weight is None else np.asarray(sample_weight)[rows])
        emb, meta = self._split(take_rows(X, rows[kept]))
        self.categories_ = {
            c: sorted(meta[c].dropna().astype(str).unique())
            for c in meta.columns
            if not pd.api.types.is_numeric_dtype(meta[c]) or isinstance(meta[c].dtype, pd.CategoricalDtype)
        }
        n = min(int(self.pca), *emb.shape) if self.pca else 0
        with one_blas_thread():  # randomized SVD's result depends on the BLAS's thread count: one, everywhere
            self.pca_ = PCA(n_components=n, random_state=self.seed).fit(emb) if n else None
        design = self._design(emb, meta)
        n_embedding = self.pca_.n_components_ if self.pca_ is not None else emb.shape[1]
        self.model_ = lgb.LGBMClassifier(
            n_estimators=self.n_estimators, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples, subsample=self.subsample, subsample_freq=1,
            colsample_bytree=self.colsample_bytree, reg_lambda=self.reg_lambda, random_state=self.seed,
            n_jobs=self.n_jobs, verbose=-1,
            max_bin_by_feature=[int(self.embedding_bins)] * n_embedding + [LIGHTGBM_MAX_BIN] * meta.shape[1],
        )
        self.model_.fit(design, codes, sample_weight=weights)
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, computed on :data:`embedstore.heads.base.PREDICT_ROWS` rows at a time (the float32
        embedding and the design of a block, not of a 100,000-row held-out fold at once)."""
        check_is_fitted(self, "model_")
        blocks = [self.model_.predict_proba(self._design(*self._split(take_rows(X, block))))
                  for block in row_blocks(np.arange(len(X)))]
        return np.vstack(blocks) if blocks else np.empty((0, self.classes_.size))
