"""L2-penalised logistic regression fitted fast on float32 feature matrices: one model, a path of C, or the
models of several folds of one matrix at once.

The objective is scikit-learn's ``LogisticRegression`` (lbfgs) objective, exactly: the sample-weighted mean
log-loss plus ``||W||^2 / (2 C sum(w))``, intercept unpenalised; multinomial (softmax) for three or more
classes, binomial (one column) for two. What differs is how it is minimised, because on cached embeddings
(n ~ 10^4-10^5 rows, d ~ 10^3 columns) scikit-learn's fit is slow for reasons that have nothing to do with
the problem (measured in BENCHMARKS.md, "Heads at the speed of the cache"):

- it upcasts the float32 matrix to float64 at every one of its hundreds of loss evaluations; here the
  products stay in float32 (the loss, the per-row terms and L-BFGS's parameters are float64);
- L-BFGS on raw standardised features is badly conditioned (~350 evaluations at ``C=1`` on HAM10000).
  Here it runs on preconditioned parameters: class k's coefficients are ``W_k = V R_k A_k`` with
  ``M = Z^T diag(w) Z = V S V^T`` and ``R_k = (c_k S + lambda)^-1/2`` (lambda the penalty), a change of
  variables: the optimum is the same, found in several times fewer evaluations. ``c_k`` scales the data's
  curvature per class: the log-loss's curvature for class k is about ``pi_k (1 - pi_k) M`` where the model
  predicts the weighted class shares ``pi``; ``c_k = sqrt(pi_k (1 - pi_k))``, divided by its largest value,
  took the fewest evaluations on HAM10000 (the six fits of the plain probe: 155-196 each, against 204-232
  with ``c_k = 1``, and 416-485 with ``c_k = pi_k``). With balanced class weights, or two classes, every
  ``c_k`` is 1. For fits that share a matrix, ``Z`` is the shared matrix and ``w``, ``pi`` and lambda are
  the fits' means.
  One eigendecomposition serves every C of a path: each C only rescales columns. (A problem of one C whose
  classes all scale alike uses the Cholesky factor of ``M + lambda I`` instead: cheaper for one C, and the
  same evaluations, as any two square roots differ by a rotation, to which L-BFGS is invariant.) A fit stops on
  scikit-learn's own criterion measured in the original parameters (largest absolute gradient <= ``tol``,
  or no relative progress), so it is at least as converged as scikit-learn's;
- one model's evaluation is bound by memory, not arithmetic: it reads the whole matrix twice (``Z @ W``, then
  ``Z^T @ R``). :func:`fit_paths` fits the models of several row sets of one matrix (the folds of a
  cross-validation and the final refit) together: each keeps its own L-BFGS, in its own thread, and a
  round of evaluations reads the matrix once for all of them, block by block, while each block is in the
  cache. Six fold models of HAM10000 cost about what three fitted one after another do (11.7 s against
  4.1 s for one, BENCHMARKS.md).

:func:`fit_path` fits a sequence of increasing C, each warm-started from the previous solution: the
regularisation path that DINOv2's and CLIP_benchmark's linear evaluations sweep, at the cost of a few fits.

``device`` other than ``"cpu"`` (a torch device such as ``"cuda"``) keeps the matrix on that device and
computes the products there; only parameters and per-row scores travel, so results equal the CPU ones up to
float32 rounding (tested on the CPU through the same torch code).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special
from threadpoolctl import ThreadpoolController

#: Rows of the matrix per block of an evaluation on the CPU: 1,024 rows of 1,280 float32 features (5 MB) stay
#: in a 16 MB cache between the block's two products.
CPU_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class LogisticFit:
    """One fitted model: ``coef`` [d, K'] and ``intercept`` [K'] (K' = 1 for two classes, else K),
    the C it was fitted with and how many loss evaluations it took."""

    coef: np.ndarray
    intercept: np.ndarray
    C: float
    n_evals: int

    def proba(self, Z) -> np.ndarray:
        return predict_proba(Z, self.coef, self.intercept)


def predict_proba(Z, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Class probabilities [n, K] of a fitted model (two columns for a binary one, as scikit-learn gives)."""
    raw = (np.asarray(Z, dtype=np.float32) @ coef.astype(np.float32)).astype(np.float64) + intercept
    if raw.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-raw[:, 0]))
        return np.column_stack([1.0 - p, p])
    raw -= raw.max(1, keepdims=True)
    e = np.exp(raw)
    return e / e.sum(1, keepdims=True)


def fit(Z, codes, n_classes: int, C: float, sample_weight=None, tol: float = 1e-5, max_iter: int = 1000,
        device: str = "cpu") -> LogisticFit:
    """The model of one ``C`` (from zero, as scikit-learn starts)."""
    return fit_path(Z, codes, n_classes, [C], sample_weight, tol, max_iter, device)[0]


def fit_path(Z, codes, n_classes: int, Cs, sample_weight=None, tol: float = 1e-5, max_iter: int = 1000,
             device: str = "cpu") -> list[LogisticFit]:
    """Models of every C in ``Cs`` (increasing), each warm-started from the previous one's solution.

    ``Z`` is the [n, d] matrix (made float32), ``codes`` the integer classes ``0..n_classes-1``,
    ``sample_weight`` per-row weights (None: all 1).
    """
    return fit_paths(Z, [Task(None, codes, sample_weight)], n_classes, Cs, tol, max_iter, device)[0]


@dataclass(frozen=True)
class Task:
    """One model to fit on a shared matrix ``G``: its rows (None: all), their integer classes and weights
    (None: all 1), and the affine map from ``G`` to the model's own features,
    ``Z = (G[rows] - shift) * scale`` (None: identity), e.g. a fold's own standardisation of a matrix
    standardised over all folds."""

    rows: np.ndarray | None
    codes: np.ndarray
    weights: np.ndarray | None = None
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None


def shared_rows(row_sets: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The rows several fits share, for their shared matrix: every row of ``row_sets``, once, ordered so that
    rows used by the same fits lie together, and each row set as positions in that order.

    :func:`fit_paths` computes a block of rows only for the fits that use it: with the rows of each inner
    fold's held-out part together, each block is computed for two of three inner fits, not all three.
    """
    union = np.unique(np.concatenate(row_sets))
    pattern = np.zeros((len(union), len(row_sets)), dtype=bool)
    at = [np.searchsorted(union, rows) for rows in row_sets]
    for i, where in enumerate(at):
        pattern[where, i] = True
    order = np.lexsort(pattern.T[::-1]) if len(row_sets) > 1 else np.arange(len(union))
    position = np.empty(len(union), dtype=np.int64)
    position[order] = np.arange(len(union))
    return union[order], [position[where] for where in at]


def fit_paths(G, tasks: list[Task], n_classes: int, Cs, tol: float = 1e-5, max_iter: int = 1000,
              device: str = "cpu") -> list[list[LogisticFit]]:
    """:func:`fit_path` of every task of ``tasks`` over one shared matrix ``G``, all at once: the models of
    the folds of a cross-validation, say, each on its own rows of one feature matrix.

    ``Cs`` is one path for every task, or a list of paths, one per task (each fold's own tuned C, say).
    Each task keeps its own L-BFGS minimisation and stopping rule; the tasks share the passes over ``G``
    and the preconditioner of each C (from the tasks' mean row weights; with one task, exactly its own). So
    each model is the optimum of its own objective, to the same tolerance as when fitted alone.
    """
    paths = per_task_paths(Cs, len(tasks))
    problems = _Problems(_Backend(np.ascontiguousarray(G, dtype=np.float32), device), tasks, n_classes,
                         {C for path in paths for C in path})
    lockstep = _Lockstep(problems.evaluate, len(tasks))
    fits = [_Fit(problems, lockstep, i) for i in range(len(tasks))]
    with _scipy_blas_single_threaded():
        if len(fits) == 1:
            return [fits[0].path(paths[0], tol, max_iter)]
        with ThreadPoolExecutor(len(fits), thread_name_prefix="logistic") as pool:
            running = [pool.submit(one.path, path, tol, max_iter) for one, path in zip(fits, paths)]
            return [future.result() for future in running]


def per_task_paths(Cs, n_tasks: int) -> list[list[float]]:
    """The path of C of each of ``n_tasks`` tasks: ``Cs`` for all, or ``Cs[i]`` for task i where ``Cs`` holds
    one sequence per task."""
    Cs = list(Cs)
    if Cs and np.ndim(Cs[0]):
        if len(Cs) != n_tasks:
            raise ValueError(f"{len(Cs)} paths of C for {n_tasks} tasks")
        return [[float(C) for C in path] for path in Cs]
    return [[float(C) for C in Cs]] * n_tasks


def _scipy_blas_single_threaded():
    """A context in which scipy's own copy of OpenBLAS (the pip wheels ship one beside numpy's) runs one thread.

    L-BFGS-B calls it on vectors of ~10^4 numbers, where threads gain nothing; but after each call its
    threads spin, waiting for more work, on the cores numpy's OpenBLAS needs for the matrix products.
    Measured on HAM10000 (2 cores): one fit 9.0 s with them, 4.1 s without. Where scipy and numpy share one
    BLAS (conda), nothing is limited.
    """
    controller = ThreadpoolController()
    own = [lib.filepath for lib in controller.lib_controllers
           if lib.user_api == "blas" and "scipy" in Path(lib.filepath).parent.name]
    return controller.select(filepath=own).limit(limits=1) if own else nullcontext()


@dataclass(frozen=True)
class _Basis:
    """What every C of a problem shares of the change of variables ``W = B (root * A)``: ``B`` in float32
    (read twice per round of evaluations: half the bytes), ``B^-1`` (float64, to map a solution back for a
    warm start) and, for an eigenbasis, the eigenvalues that each C's ``root`` is made from."""

    B32: np.ndarray
    inverse: np.ndarray
    values: np.ndarray | None


@dataclass(frozen=True)
class _Preconditioner:
    """The change of variables of one C: ``W = B (root * A)`` with the problem's basis ``B`` and ``root``
    [d, K'] the per-class scales ``(c_k s + lambda)^-1/2`` over the eigenvalues ``s`` (all ones for a Cholesky
    basis, which holds the scale itself)."""

    C: float
    root: np.ndarray


@dataclass(frozen=True)
class _Ask:
    """One task's request for an evaluation: its parameters ``x`` (preconditioned ``A``, then the intercept)."""

    task: int
    pre: _Preconditioner
    x: np.ndarray


class _Problems:
    """The data of all tasks on the shared matrix, the preconditioners they share, and their joint evaluation."""

    def __init__(self, backend: _Backend, tasks: list[Task], n_classes: int, Cs: set[float]):
        self.backend = backend
        n, d = backend.n, backend.d
        self.d, self.k = d, 1 if n_classes == 2 else n_classes
        self.codes = np.zeros(n, dtype=np.int64)
        self.weights = np.zeros((n, len(tasks)))  # each task's row weights over the shared rows, summing to one
        self.w_sum = np.empty(len(tasks))
        self.shift, self.scale = np.zeros((len(tasks), d)), np.ones((len(tasks), d))
        for i, task in enumerate(tasks):
            rows = np.arange(n) if task.rows is None else np.asarray(task.rows)
            w = np.ones(len(rows)) if task.weights is None else np.asarray(task.weights, dtype=np.float64)
            self.codes[rows] = task.codes  # one class per row: the tasks are subsets of one labelled matrix
            self.weights[rows, i] = w / w.sum()
            self.w_sum[i] = w.sum()
            if task.shift is not None:
                self.shift[i] = task.shift
            if task.scale is not None:
                self.scale[i] = task.scale
        mean_w = self.weights.mean(1)
        self.moment = backend.weighted_moment(mean_w)  # G^T diag(mean w) G, float64 [d, d]
        share = np.bincount(self.codes, weights=mean_w, minlength=n_classes)[-self.k:] / mean_w.sum()
        scale = np.sqrt(share * (1.0 - share))  # [K'] per-class scale of the data's curvature (the module's doc)
        self.curvature = scale / scale.max() if scale.max() > 0 else np.ones(self.k)  # (one class: no scale)
        self.Cs = Cs
        self.basis: _Basis | None = None  # made by the first hold(), in the fits' threads
        member = np.zeros((n, len(tasks)), dtype=bool)
        for i, task in enumerate(tasks):
            member[slice(None) if task.rows is None else task.rows, i] = True
        self.block_tasks = [member[lo:hi].any(0) for lo, hi in backend.blocks()]  # a block is computed for these
        self._held: dict[float, list] = {}  # C -> [preconditioner, tasks holding it]
        self._lock = threading.Lock()

    def hold(self, C: float) -> _Preconditioner:
        """The preconditioner of ``C``, made by the first task to reach it and shared with the others."""
        with self._lock:
            if self.basis is None:
                self.basis = self._make_basis()
            if C not in self._held:
                if self.basis.values is None:
                    root = np.ones((self.d, self.k))
                else:
                    root = 1.0 / np.sqrt(self.basis.values[:, None] * self.curvature[None, :] + self._penalty(C))
                self._held[C] = [_Preconditioner(C, root), 0]
            self._held[C][1] += 1
            return self._held[C][0]

    def _make_basis(self) -> _Basis:
        """The eigenbasis of the moment, which serves every C and scales each class; or, for a problem of one C
        whose classes all scale alike (balanced class weights, two classes), the Cholesky factor of its
        ``M + lambda I``, which costs a third of an eigendecomposition (0.36 s against 0.97 s at d = 2,048) and
        gives the same evaluations (any two square roots differ by a rotation, to which L-BFGS is invariant)."""
        if len(self.Cs) == 1 and np.allclose(self.curvature, 1.0, rtol=0.0, atol=1e-3):
            chol = _cholesky(self.moment, self._penalty(next(iter(self.Cs))))
            inv = scipy.linalg.solve_triangular(chol, np.eye(self.d), lower=True).astype(np.float32)
            return _Basis(inv.T, chol.T, None)  # W = L^-T A, A = L^T W
        values, V = _eigen(self.moment)
        return _Basis(V.astype(np.float32), V.T, values)

    def _penalty(self, C: float) -> float:
        """lambda of ``C``: the tasks' mean penalty on weights that sum to one."""
        return float(np.mean(1.0 / (C * self.w_sum)))

    def release(self, pre: _Preconditioner) -> None:
        """A task is done with ``pre``; the last one frees it."""
        with self._lock:
            self._held[pre.C][1] -= 1
            if not self._held[pre.C][1]:
                del self._held[pre.C]

    def evaluate(self, asks: list[_Ask]) -> list[tuple[float, np.ndarray, float]]:
        """Loss, gradient in ``x`` and largest absolute gradient in the original parameters, for every ask,
        from one blocked pass over the matrix."""
        d, k, m = self.d, self.k, len(asks)
        tasks = [a.task for a in asks]
        W = np.hsplit(self.rotate(np.hstack([a.pre.root * a.x[: d * k].reshape(d, k) for a in asks])), m)
        raw_W = np.hstack([self.scale[t][:, None] * Wi for t, Wi in zip(tasks, W)]).astype(np.float32)
        bias = np.stack([a.x[d * k:] - (self.shift[t] * self.scale[t]) @ Wi for a, t, Wi in zip(asks, tasks, W)])
        loss, R_sum, G_R = np.zeros(m), np.zeros((m, k)), np.zeros((d, m * k))
        for (lo, hi), active in zip(self.backend.blocks(), self.block_tasks):
            on = _computed(active[tasks])
            if on is None:  # no ask has rows in this block
                continue
            cols = slice(on.start * k, on.stop * k) if isinstance(on, slice) else (on[:, None] * k + np.arange(k)).ravel()
            raw = np.add(self.backend.product(raw_W[:, cols], lo, hi).reshape(hi - lo, -1, k), bias[on],
                         dtype=np.float64)
            block_loss, R = self._loss(raw, self.weights[lo:hi][:, np.asarray(tasks)[on]], self.codes[lo:hi])
            loss[on] += block_loss
            R_sum[on] += R.sum(0)
            G_R[:, cols] += self.backend.back(R.reshape(hi - lo, -1), lo, hi)  # a view where ``cols`` is a slice
        answers, g_w = [], []
        for i, (a, t, Wi) in enumerate(zip(asks, tasks, W)):
            lam = 1.0 / (a.pre.C * self.w_sum[t])
            g = self.scale[t][:, None] * (G_R[:, i * k:(i + 1) * k] - np.outer(self.shift[t], R_sum[i])) + lam * Wi
            g_w.append(g)
            loss[i] += 0.5 * lam * float((Wi * Wi).sum())
        g_a = np.hsplit(self.rotate(np.hstack(g_w), back=True), m)  # dA = root * B^T dW
        for i, a in enumerate(asks):
            gmax = max(np.abs(g_w[i]).max(), np.abs(R_sum[i]).max())
            answers.append((float(loss[i]), np.concatenate([(a.pre.root * g_a[i]).ravel(), R_sum[i]]), float(gmax)))
        return answers

    def rotate(self, X: np.ndarray, back: bool = False) -> np.ndarray:
        """``B @ X`` (``back``: ``B^T @ X``) in float32, as float64: the basis part of the change of variables,
        one product for the asks of every task and C."""
        return ((self.basis.B32.T if back else self.basis.B32) @ X.astype(np.float32)).astype(np.float64)

    def _loss(self, raw: np.ndarray, w: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each task's weighted log-loss over a block of rows, and its gradient with respect to the raw scores.

        ``raw`` [B, m, K] scores (float64; the softmax overwrites them), ``w`` [B, m] weights, ``codes`` [B] classes.
        """
        if self.k == 1:
            r, y = raw[..., 0], (codes == 1)[:, None]
            loss = (w * (np.logaddexp(0.0, r) - y * r)).sum(0)
            return loss, (w * (scipy.special.expit(r) - y))[..., None]
        top = raw.max(2, keepdims=True)
        picked = np.take_along_axis(raw, np.broadcast_to(codes[:, None, None], (len(codes), raw.shape[1], 1)), 2)[..., 0]
        p = np.exp(np.subtract(raw, top, out=raw), out=raw)  # raw is the caller's scratch: reused in place
        total = p.sum(2, keepdims=True)
        loss = (w * (np.log(total)[..., 0] + top[..., 0] - picked)).sum(0)
        p /= total
        p[np.arange(len(codes)), :, codes] -= 1.0
        p *= w[..., None]
        return loss, p


def _computed(active: np.ndarray) -> slice | np.ndarray | None:
    """Which asks a block is computed for, given which of them (``active``, in ask order) have rows in it: the
    asks from the first active one to the last, as a slice, where the inactive ones among them are at most a
    third of it; otherwise the active ones' indices; None where none is active.

    A slice's columns are read and added to in place; an inactive ask inside it costs its share of the
    products and the loss, and adds exactly zero (its rows in the block weigh zero, and its scores are
    finite). An index list's columns must be copied out and scattered back: measured at d = 2,048, 7 classes
    and 1,024-row blocks, that took 3.9 ms for 22 asks, and the products of 24 asks 8.0 ms (0.33 ms each),
    so the list pays only where over about a third of the span is inactive (BENCHMARKS.md, eighth session).
    """
    on = np.flatnonzero(active)
    if not on.size:
        return None
    span = on[-1] + 1 - on[0]
    return slice(int(on[0]), int(on[-1]) + 1) if 3 * (span - on.size) <= span else on


def _cholesky(moment: np.ndarray, lam: float) -> np.ndarray:
    """Lower Cholesky factor of ``moment + lam I``, with ``lam`` raised where that is not positive definite.

    With fewer rows than columns the moment is singular, and computed in float32 it has eigenvalues a little
    below zero, which a weak penalty (large C) does not lift: the factorisation fails. The preconditioner is
    only a change of variables, and any positive definite one has the same optimum, so ``lam`` is raised by
    steps of the float32 rounding scale of the moment's diagonal until it factors; where ``lam`` alone works
    nothing changes.
    """
    scale = float(np.trace(moment)) / len(moment)
    for extra in (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        try:
            return scipy.linalg.cholesky(moment + (lam + extra * scale) * np.eye(len(moment)), lower=True)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the preconditioner's moment matrix is not positive definite")


def _eigen(moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the symmetric ``moment``, the eigenvalues raised to zero where rounding
    left them below it.

    With fewer rows than columns the moment is singular, and computed in float32 some of its eigenvalues come
    out a little below zero; a weak penalty (large C) would not lift them. The true curvature there is the
    penalty's alone, which zero gives; any positive definite preconditioner has the same optimum.
    """
    values, V = np.linalg.eigh(moment)
    return np.maximum(values, 0.0), V


class _Fit:
    """One task's L-BFGS minimisations along the path of C, evaluated through the lockstep."""

    def __init__(self, problems: _Problems, lockstep: _Lockstep, task: int):
        self.problems, self.lockstep, self.task = problems, lockstep, task

    def path(self, Cs, tol: float, max_iter: int) -> list[LogisticFit]:
        """The fits of every C of ``Cs``, each warm-started from the ones before (:func:`_path_start`); leaves
        the lockstep at the end."""
        try:
            fits: list[LogisticFit] = []
            for C in Cs:
                fits.append(self.solve(float(C), _path_start(fits, float(C)), tol, max_iter))
            return fits
        finally:
            self.lockstep.leave()

    def solve(self, C: float, start: LogisticFit | None, tol: float, max_iter: int) -> LogisticFit:
        d, k = self.problems.d, self.problems.k
        pre = self.problems.hold(C)
        try:
            evals, last = [0], {}

            def loss_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
                evals[0] += 1
                loss, grad, last["gmax"] = self.lockstep.ask(self.task, _Ask(self.task, pre, x))
                return loss, grad

            def converged(intermediate_result) -> None:
                if last["gmax"] <= tol:
                    raise StopIteration

            x0 = np.zeros(d * k + k)
            if start is not None:
                x0[: d * k] = ((self.problems.basis.inverse @ start.coef) / pre.root).ravel()  # A = (B^-1 W) / root
                x0[d * k:] = start.intercept
            result = scipy.optimize.minimize(
                loss_grad, x0, method="L-BFGS-B", jac=True, callback=converged,
                options={"maxiter": max_iter, "maxls": 50, "gtol": 0.0, "ftol": 64 * np.finfo(float).eps},
            )
            W = self.problems.rotate(pre.root * result.x[: d * k].reshape(d, k))
            return LogisticFit(np.ascontiguousarray(W), result.x[d * k:].copy(), C, evals[0])
        finally:
            self.problems.release(pre)


def _path_start(fits: list[LogisticFit], C: float) -> LogisticFit | None:
    """Where the fit of ``C`` starts on a path: from zero first, then from the last solution, and from the
    third C on, from the line through the last two solutions, extended linearly in log C to ``C`` (at most one
    last step's length: on a log grid, exactly one).

    The solutions of a regularisation path move smoothly with log C, so the line lands closer to the next
    one than the last solution does: on HAM10000 (MobileNetV2, 20 values of C, 3 folds) a path took 355
    evaluations at tol 1e-3 against 627 from the last solution, and 2,361 against 4,841 at tol 1e-5.
    """
    if len(fits) < 2 or fits[-1].C == fits[-2].C:
        return fits[-1] if fits else None
    before, last = fits[-2], fits[-1]
    t = min(np.log(C / last.C) / np.log(last.C / before.C), 1.0)
    return LogisticFit(last.coef + t * (last.coef - before.coef), last.intercept + t * (last.intercept - before.intercept),
                       C, 0)


class _Lockstep:
    """Evaluations of several fits, running in threads, served together.

    A round waits until every fit still running has asked, then one call of ``serve`` answers them all, in
    the order of the fits (so the products, and the results, do not depend on which thread asked first); a
    fit that ends leaves, so the others never wait for it. With one fit, every ask is answered at once.
    """

    def __init__(self, serve, members: int):
        self._serve = serve
        self._live = members
        self._asks: dict[int, object] = {}
        self._answers: dict[int, object] = {}
        self._cond = threading.Condition()

    def ask(self, member: int, item):
        """The answer to ``item`` from fit number ``member``, computed with the other fits' asks of this round."""
        with self._cond:
            self._asks[member] = item
            self._serve_if_complete()
            while member not in self._answers:
                self._cond.wait()
            answer = self._answers.pop(member)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def leave(self) -> None:
        """A fit has ended (or failed): rounds no longer wait for it."""
        with self._cond:
            self._live -= 1
            self._serve_if_complete()

    def _serve_if_complete(self) -> None:
        """Answer the round once every live fit has asked (called with the lock held)."""
        if not self._asks or len(self._asks) < self._live:
            return
        members = sorted(self._asks)
        asks = [self._asks.pop(m) for m in members]
        try:
            self._answers.update(zip(members, self._serve(asks)))
        except BaseException as exc:  # noqa: BLE001 - every waiting fit must hear of it, not hang
            self._answers.update(dict.fromkeys(members, exc))
        self._cond.notify_all()


class _Backend:
    """The products with the shared matrix, block by block, on the CPU (numpy) or on a torch device."""

    def __init__(self, G: np.ndarray, device: str):
        self.device = device
        self.n, self.d = G.shape
        if device == "cpu":
            self.G = G
            self.block = CPU_BLOCK_ROWS
        else:
            import torch

            self.torch = torch
            self.G = torch.from_numpy(G).to(device)
            self.block = self.n  # a device's memory is fast: one block

    def blocks(self):
        """``(lo, hi)`` of each block of rows."""
        return ((lo, min(lo + self.block, self.n)) for lo in range(0, self.n, self.block))

    def weighted_moment(self, w: np.ndarray) -> np.ndarray:
        """``G^T diag(w) G`` (float64 [d, d]): the preconditioner's matrix."""
        if self.device == "cpu":
            root = self.G * np.sqrt(w, dtype=np.float32)[:, None]
            return (root.T @ root).astype(np.float64)
        t = self.torch
        root = self.G * t.from_numpy(np.sqrt(w).astype(np.float32)).to(self.device)[:, None]
        return (root.T @ root).double().cpu().numpy()

    def product(self, W: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """``G[lo:hi] @ W`` in float32, for a float32 ``W`` (a column slice of a wider matrix is read in place)."""
        if self.device == "cpu":
            return self.G[lo:hi] @ W
        t = self.torch
        return (self.G[lo:hi] @ t.from_numpy(np.ascontiguousarray(W)).to(self.device)).cpu().numpy()

    def back(self, R: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """``G[lo:hi]^T @ R`` in float32 (``R`` is rounded to float32; the caller sums the blocks in float64)."""
        R32 = R.astype(np.float32)
        if self.device == "cpu":
            return self.G[lo:hi].T @ R32
        t = self.torch
        return (self.G[lo:hi].T @ t.from_numpy(R32).to(self.device)).cpu().numpy()
