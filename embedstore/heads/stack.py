"""Stacked ensemble: out-of-fold probabilities of several base heads feed a meta-learner.

Each base head sees its own columns of the input (one feature set, another
feature set, the embeddings plus metadata), so heads of different encoders
and kinds combine. The meta-learner is trained only on out-of-fold
probabilities computed on stratified *group* folds, so no base prediction it
learns from was made by a model that saw that row's lesion; the bases are also
fitted on all rows. Inside a probe's outer cross-validation this is a fully nested scheme; there the stacks of
every outer fold and the final one are fitted together on their rows of the probe's frame
(:meth:`StackHead.fit_paths`): each base reads its columns of the frame (a view, where pandas can give one),
takes only its rows from them, and fits all its models in one go where it can (a logistic base's fits share one
pass over its matrix, a LightGBM base's run side by side).

Given the probe's outer folds (``folds``), each stack takes the other outer folds as its inner folds instead of
drawing its own: the inner model of outer fold k that leaves out fold j is then the very model that outer fold j
needs without fold k, and the final stack's inner models are the outer folds' own. Five outer folds need 16
distinct fits per base (10 pairs of folds left out, 5 single folds, all rows) instead of 24 with three inner
folds of their own, each on more rows; no model of outer fold k ever saw fold k's rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from embedstore.heads.base import ArgmaxPredictMixin, fit_paths, predict_rows, side_by_side
from embedstore.heads.linear import LogRegHead
from embedstore.parallel import core_budget, in_order, one_blas_thread, usable_cores
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


def _distinct(row_sets: list[np.ndarray]) -> tuple[list[int], list[int]]:
    """The row sets to fit, each distinct one once (``firsts``: the index of its first occurrence, largest sets
    first, so that fits side by side end together), and which of them each row set of ``row_sets`` is.

    Sets are the same when they hold the same rows in the same order (a LightGBM fit's bagging depends on it)."""
    keys = [np.asarray(rows, dtype=np.int64).tobytes() for rows in row_sets]
    first: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    firsts = sorted(first.values(), key=lambda i: -len(row_sets[i]))
    position = {i: j for j, i in enumerate(firsts)}
    return firsts, [position[first[key]] for key in keys]


def _logit_features(probas: list[np.ndarray]) -> np.ndarray:
    """Meta-features: the log-probabilities of every base, side by side (clipped away from 0)."""
    return np.log(np.clip(np.hstack(probas), 1e-6, 1.0))


class StackHead(ArgmaxPredictMixin, ClassifierMixin, BaseEstimator):
    """Stack of ``bases`` = ``[(name, head, columns), ...]`` under a meta-learner.

    ``columns`` is ``None`` (all of X) or a list of DataFrame column names.
    ``meta`` defaults to a multinomial logistic regression (:class:`~embedstore.heads.LogRegHead` on the raw
    log-probabilities) with ``meta_C`` and ``meta_class_weight`` (``"balanced"`` keeps the stack's top prediction from
    leaning towards the majority class when balanced accuracy is the goal).
    ``fit(X, y, groups=...)`` builds the out-of-fold probabilities on
    ``n_splits`` stratified group folds seeded by ``seed``; a stack fitted by :meth:`fit_paths` with the outer
    ``folds`` used those instead (``n_splits`` is then unused; the run's ``config.yaml`` says which).
    """

    def __init__(self, bases=(), meta=None, meta_C=1.0, meta_class_weight=None, n_splits=5, seed=0):
        self.bases = bases
        self.meta = meta
        self.meta_C = meta_C
        self.meta_class_weight = meta_class_weight
        self.n_splits = n_splits
        self.seed = seed

    def fit(self, X, y, groups=None):
        self._fit_together([self], X, y, [np.arange(len(y))], groups, None)
        return self

    def fit_paths(self, X, y, row_sets, values=None, groups=None, folds=None, progress=None) -> list[list[StackHead]]:
        """A fitted copy per row set of ``row_sets`` (indices into ``X``, ``y`` and ``groups``, each row once):
        each base takes its rows from its columns of ``X``, with no copy of the rows' every column first.

        ``folds`` (the outer fold of each row of ``X``, -1 for a row of none), when given, makes each stack's inner
        folds the folds of its rows (its rows of no fold, a validation part, one more), instead of ``n_splits``
        group folds of its own; a base's fits of the same rows are then made once (the module's doc).

        The stacks are fitted together, base by base: one :func:`~embedstore.heads.base.fit_paths` call fits a
        base's models on every stack's inner training folds and rows (a probe's five outer folds and its final
        model with three inner folds each: 24 logistic fits sharing one pass over the matrix per evaluation, or 24
        LightGBM fits side by side, instead of four at a time; 16 with ``folds``), for the stacks of the same
        classes. Each stack gets the models it would get fitted alone. ``progress(message)``, when given, is called
        after each base."""
        if values is not None:
            raise TypeError("StackHead has no path parameter to sweep")
        stacks = [clone(self) for _ in row_sets]
        self._fit_together(stacks, X, y, row_sets, groups, progress, folds)
        return [[stack] for stack in stacks]

    def _fit_together(self, stacks: list[StackHead], X, y, row_sets, groups, progress, folds=None) -> None:
        """Fit ``stacks[i]`` (this stack or copies of it) on ``row_sets[i]``, base by base (:meth:`fit_paths`)."""
        if not self.bases:
            raise ValueError("a stack needs at least one base head")
        y = np.asarray(y)
        plans = [stack._plan(y, np.asarray(rows), groups, folds) for stack, rows in zip(stacks, row_sets)]
        for classes in dict.fromkeys(tuple(stack.classes_) for stack in stacks):  # stacks of one class set share codes
            same = [i for i, stack in enumerate(stacks) if tuple(stack.classes_) == classes]
            codes = np.full(len(y), -1)  # class codes over all of X; only the stacks' rows are read
            used = np.unique(np.concatenate([plans[i][0] for i in same]))
            codes[used] = np.searchsorted(np.asarray(classes), y[used])
            self._fit_bases(X, codes, [stacks[i] for i in same], [plans[i] for i in same], progress)
        for stack, (_, _, local) in zip(stacks, plans):
            stack._fit_meta(X, local)

    def _plan(self, y: np.ndarray, rows: np.ndarray, groups, folds=None) -> tuple[np.ndarray, list, np.ndarray]:
        """Set ``classes_``; ``rows``, this stack's inner folds of them (as rows of X: the given ``folds`` of its
        rows, else group folds of its own) and their class codes."""
        if len(np.unique(rows)) < len(rows):  # out-of-fold probabilities are kept by row
            raise ValueError(f"a stack's rows must each appear once; {len(rows) - len(np.unique(rows))} of its "
                             f"{len(rows)} rows appear twice or more")
        self.classes_, local = np.unique(y[rows], return_inverse=True)
        if folds is not None:
            fold = np.asarray(folds)[rows]
            inner = [(rows[fold != k], rows[fold == k]) for k in np.unique(fold)]
            if len(inner) < 2:
                raise ValueError(f"a stack's rows must span two folds or more to take them as its inner folds; "
                                 f"its {len(rows)} rows lie in one")
            return rows, inner, local
        inner = [(rows[train], rows[test]) for train, test in
                 group_kfold(local, None if groups is None else np.asarray(groups)[rows], n_splits=self.n_splits,
                             seed=self.seed)]
        return rows, inner, local

    def _fit_bases(self, X, codes: np.ndarray, stacks: list[StackHead], plans: list, progress) -> None:
        """Every base of ``stacks`` (clones of this stack, of one class set): fitted on each stack's inner
        training folds and all its rows, all at once, each distinct row set once; the inner folds' out-of-fold
        probabilities kept."""
        for stack in stacks:
            stack.oof_, stack.bases_ = {}, []
        row_sets = [part for rows, folds, _ in plans for part in [*(train for train, _ in folds), rows]]
        firsts, which = _distinct(row_sets)
        for name, head, columns in self.bases:
            Xb = select_columns(X, columns, head)
            with core_budget(min(usable_cores(), len(plans[0][1]) + 1)):  # one-core fits at once: one stack's count
                models = [path[0] for path in fit_paths(head, Xb, codes, [row_sets[i] for i in firsts])]
            fitted = iter([models[j] for j in which])
            inner, finals = [], []
            for _, folds, _ in plans:
                inner += [(next(fitted), test) for _, test in folds]
                finals.append(next(fitted))
            # one-core heads predict side by side; taken whole, so that their hold of the BLAS ends here
            probas = iter(list(in_order(lambda pair: predict_rows(pair[0], Xb, pair[1]), inner, side_by_side(head))))
            for stack, (rows, folds, _), final in zip(stacks, plans, finals):
                oof = np.zeros((len(codes), stack.classes_.size))
                for _, test in folds:
                    oof[test] = next(probas)
                stack.oof_[name] = oof[rows]
                stack.bases_.append((name, final, columns))
            if progress:
                progress(f"stack base {name}: {len(firsts)} models fitted")

    def _fit_meta(self, X, local: np.ndarray) -> None:
        """The meta-learner on the bases' out-of-fold log-probabilities (``local``: the rows' class codes), on one
        BLAS thread: its products are small (10,015 x 35 in the four-view stack; with scikit-learn's solver two
        threads made each fit 7 times slower, BENCHMARKS.md, seventh session).

        By default scikit-learn's logistic objective on the raw log-probabilities, fitted by
        :class:`~embedstore.heads.LogRegHead` (``norm="none"``): scikit-learn's lbfgs took 665 iterations per
        meta-learner of the four-view stack (1.1 s for one fit timed alone, seventh session), and in a profile of
        that probe its six fits took 11.7 s of the main thread (BENCHMARKS.md, ninth session)."""
        self.meta_ = clone(self.meta) if self.meta is not None else LogRegHead(
            C=self.meta_C, norm="none", class_weight=self.meta_class_weight, max_iter=2000)
        with one_blas_thread():
            self.meta_.fit(_logit_features(list(self.oof_.values())), local)
        self.n_features_in_ = X.shape[1]

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

