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
  Here it runs on preconditioned parameters ``W = L^-T A`` with ``L L^T = Z^T diag(w) Z + lambda I`` (a
  change of variables: the optimum is the same, found in ~4x fewer evaluations; for fits that share a matrix,
  ``Z`` is the shared matrix, ``w`` the fits' mean row weights and lambda their mean), and stops on
  scikit-learn's own criterion measured in the original parameters (largest absolute gradient <= ``tol``,
  or no relative progress), so a fit is at least as converged as scikit-learn's;
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

    Each task keeps its own L-BFGS minimisation and stopping rule; the tasks share the passes over ``G``
    and the preconditioner (from the tasks' mean row weights; with one task, exactly its own). So each model
    is the optimum of its own objective, to the same tolerance as when fitted alone.
    """
    problems = _Problems(_Backend(np.ascontiguousarray(G, dtype=np.float32), device), tasks, n_classes)
    lockstep = _Lockstep(problems.evaluate, len(tasks))
    fits = [_Fit(problems, lockstep, i) for i in range(len(tasks))]
    with _scipy_blas_single_threaded():
        if len(fits) == 1:
            return [fits[0].path(Cs, tol, max_iter)]
        with ThreadPoolExecutor(len(fits), thread_name_prefix="logistic") as pool:
            running = [pool.submit(one.path, Cs, tol, max_iter) for one in fits]
            return [future.result() for future in running]


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
class _Preconditioner:
    """``L`` with ``L L^T = M + lambda I`` for one C, and ``L^-1`` in float32: with the inverse, the two changes
    of variables per evaluation are [d, d] x [d, K] products (five times faster than triangular solves), and
    in float32 they read half the bytes."""

    C: float
    chol: np.ndarray
    inv: np.ndarray


@dataclass(frozen=True)
class _Ask:
    """One task's request for an evaluation: its parameters ``x`` (preconditioned ``A``, then the intercept)."""

    task: int
    pre: _Preconditioner
    x: np.ndarray


class _Problems:
    """The data of all tasks on the shared matrix, the preconditioners they share, and their joint evaluation."""

    def __init__(self, backend: _Backend, tasks: list[Task], n_classes: int):
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
        self.moment = backend.weighted_moment(self.weights.mean(1))  # G^T diag(mean w) G, float64 [d, d]
        member = np.zeros((n, len(tasks)), dtype=bool)
        for i, task in enumerate(tasks):
            member[slice(None) if task.rows is None else task.rows, i] = True
        self.block_tasks = [member[lo:hi].any(0) for lo, hi in backend.blocks()]  # a block is computed for these
        self._held: dict[float, list] = {}  # C -> [preconditioner, tasks holding it]
        self._lock = threading.Lock()

    def hold(self, C: float) -> _Preconditioner:
        """The preconditioner of ``C``, made by the first task to reach it and shared with the others."""
        with self._lock:
            if C not in self._held:
                chol = _cholesky(self.moment, float(np.mean(1.0 / (C * self.w_sum))))
                inv = scipy.linalg.solve_triangular(chol, np.eye(self.d), lower=True).astype(np.float32)
                self._held[C] = [_Preconditioner(C, chol, inv), 0]
            self._held[C][1] += 1
            return self._held[C][0]

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
        pres = [a.pre for a in asks]
        W = _grouped(pres, [a.x[: d * k].reshape(d, k) for a in asks], _times(lambda pre: pre.inv.T))  # W = L^-T A
        raw_W = np.hstack([self.scale[t][:, None] * Wi for t, Wi in zip(tasks, W)])
        bias = np.stack([a.x[d * k:] - (self.shift[t] * self.scale[t]) @ Wi for a, t, Wi in zip(asks, tasks, W)])
        loss, R_sum, G_R = np.zeros(m), np.zeros((m, k)), np.zeros((d, m * k))
        for (lo, hi), active in zip(self.backend.blocks(), self.block_tasks):
            on = np.flatnonzero(active[tasks])  # the asks whose task has rows in this block
            if not on.size:
                continue
            cols = (on[:, None] * k + np.arange(k)).ravel()
            raw = self.backend.product(raw_W[:, cols], lo, hi).reshape(hi - lo, on.size, k) + bias[on]
            block_loss, R = self._loss(raw, self.weights[lo:hi][:, np.asarray(tasks)[on]], self.codes[lo:hi])
            loss[on] += block_loss
            R_sum[on] += R.sum(0)
            G_R[:, cols] += self.backend.back(R.reshape(hi - lo, on.size * k), lo, hi)
        answers, g_w = [], []
        for i, (a, t, Wi) in enumerate(zip(asks, tasks, W)):
            lam = 1.0 / (a.pre.C * self.w_sum[t])
            g = self.scale[t][:, None] * (G_R[:, i * k:(i + 1) * k] - np.outer(self.shift[t], R_sum[i])) + lam * Wi
            g_w.append(g)
            loss[i] += 0.5 * lam * float((Wi * Wi).sum())
        g_a = _grouped(pres, g_w, _times(lambda pre: pre.inv))  # dA = L^-1 dW
        for i in range(m):
            gmax = max(np.abs(g_w[i]).max(), np.abs(R_sum[i]).max())
            answers.append((float(loss[i]), np.concatenate([g_a[i].ravel(), R_sum[i]]), float(gmax)))
        return answers

    def _loss(self, raw: np.ndarray, w: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each task's weighted log-loss over a block of rows, and its gradient with respect to the raw scores.

        ``raw`` [B, m, K] scores, ``w`` [B, m] weights, ``codes`` [B] classes; float64.
        """
        if self.k == 1:
            r, y = raw[..., 0], (codes == 1)[:, None]
            loss = (w * (np.logaddexp(0.0, r) - y * r)).sum(0)
            return loss, (w * (scipy.special.expit(r) - y))[..., None]
        top = raw.max(2, keepdims=True)
        e = np.exp(raw - top)
        total = e.sum(2, keepdims=True)
        log_norm = np.log(total)[..., 0] + top[..., 0]
        picked = np.take_along_axis(raw, np.broadcast_to(codes[:, None, None], (len(codes), raw.shape[1], 1)), 2)[..., 0]
        loss = (w * (log_norm - picked)).sum(0)
        p = e / total
        p[np.arange(len(codes)), :, codes] -= 1.0
        return loss, w[..., None] * p


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


def _grouped(pres: list[_Preconditioner], parts: list[np.ndarray], product) -> list[np.ndarray]:
    """``product(pres[i], parts[i])`` for every i, computed once per preconditioner for all parts sharing it
    (the parts side by side): one read of the [d, d] matrix instead of one per task."""
    out: list[np.ndarray] = [parts[0]] * len(parts)
    for pre in {id(p): p for p in pres}.values():
        members = [i for i, p in enumerate(pres) if p is pre]
        joint = product(pre, np.hstack([parts[i] for i in members]))
        width = joint.shape[1] // len(members)
        for j, i in enumerate(members):
            out[i] = joint[:, j * width:(j + 1) * width]
    return out


def _times(matrix):
    """``(pre, B) -> matrix(pre) @ B`` in float32 (the inverse is kept in float32: it is read twice per round of
    evaluations, and half the bytes is half the time), as float64."""
    return lambda pre, B: (matrix(pre) @ B.astype(np.float32)).astype(np.float64)


class _Fit:
    """One task's L-BFGS minimisations along the path of C, evaluated through the lockstep."""

    def __init__(self, problems: _Problems, lockstep: _Lockstep, task: int):
        self.problems, self.lockstep, self.task = problems, lockstep, task

    def path(self, Cs, tol: float, max_iter: int) -> list[LogisticFit]:
        """The fits of every C of ``Cs``, each warm-started from the one before; leaves the lockstep at the end."""
        try:
            fits, start = [], None
            for C in Cs:
                start = self.solve(float(C), start, tol, max_iter)
                fits.append(start)
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
                x0[: d * k] = (pre.chol.T @ start.coef).ravel()  # A = L^T W
                x0[d * k:] = start.intercept
            result = scipy.optimize.minimize(
                loss_grad, x0, method="L-BFGS-B", jac=True, callback=converged,
                options={"maxiter": max_iter, "maxls": 50, "gtol": 0.0, "ftol": 64 * np.finfo(float).eps},
            )
            W = _times(lambda p: p.inv.T)(pre, result.x[: d * k].reshape(d, k))
            return LogisticFit(np.ascontiguousarray(W), result.x[d * k:].copy(), C, evals[0])
        finally:
            self.problems.release(pre)


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
        """``G[lo:hi] @ W`` as float64."""
        if self.device == "cpu":
            return (self.G[lo:hi] @ W.astype(np.float32)).astype(np.float64)
        t = self.torch
        return (self.G[lo:hi] @ t.from_numpy(W.astype(np.float32)).to(self.device)).double().cpu().numpy()

    def back(self, R: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """``G[lo:hi]^T @ R`` as float64."""
        R32 = R.astype(np.float32)
        if self.device == "cpu":
            return (self.G[lo:hi].T @ R32).astype(np.float64)
        t = self.torch
        return (self.G[lo:hi].T @ t.from_numpy(R32).to(self.device)).double().cpu().numpy()
