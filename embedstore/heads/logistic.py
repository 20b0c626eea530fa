"""L2-penalised logistic regression fitted fast on float32 feature matrices, alone or along a path of C.

The objective is scikit-learn's ``LogisticRegression`` (lbfgs) objective, exactly: the sample-weighted mean
log-loss plus ``||W||^2 / (2 C sum(w))``, intercept unpenalised; multinomial (softmax) for three or more
classes, binomial (one column) for two. What differs is how it is minimised, because on cached embeddings
(n ~ 10^4-10^5 rows, d ~ 10^3 columns) scikit-learn's fit is slow for two reasons that have nothing to do
with the problem (measured in BENCHMARKS.md, "Heads at the speed of the cache"):

- it upcasts the float32 matrix to float64 at every one of its hundreds of loss evaluations; here the
  products stay in float32 (the parameters, the loss and the per-row terms are float64);
- L-BFGS on raw standardised features is badly conditioned (~350 evaluations at ``C=1`` on HAM10000).
  Here it runs on preconditioned parameters ``W = L^-T A`` with ``L L^T = Z^T Z / n + lambda I`` (a change of
  variables: the optimum is the same, found in ~4x fewer evaluations), and stops on scikit-learn's own
  criterion measured in the original parameters (largest absolute gradient <= ``tol``, or no relative
  progress), so a fit is at least as converged as scikit-learn's.

:func:`fit_path` fits a sequence of increasing C, each warm-started from the previous solution: the
regularisation path that DINOv2's and CLIP_benchmark's linear evaluations sweep, at the cost of a few fits.

``device`` other than ``"cpu"`` (a torch device such as ``"cuda"``) keeps the matrix on that device and
evaluates the loss there; only the parameters (d x K numbers) travel per evaluation, so results equal the
CPU ones up to float32 rounding (tested on the CPU through the same torch code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize


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
    problem = _Problem(Z, codes, n_classes, sample_weight, device)
    fits, start = [], None
    for C in Cs:
        fitted = problem.solve(float(C), start, tol, max_iter)
        fits.append(fitted)
        start = fitted
    return fits


class _Problem:
    """The data of one fit, on its device, with what every C shares (the second-moment matrix)."""

    def __init__(self, Z, codes, n_classes: int, sample_weight, device: str):
        Z = np.ascontiguousarray(Z, dtype=np.float32)
        codes = np.asarray(codes)
        self.n, self.d = Z.shape
        self.k = 1 if n_classes == 2 else n_classes
        w = np.ones(self.n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.w = w / w.sum()  # the objective's mean is weighted by w / sum(w)
        self.w_sum = float(w.sum())
        target = np.zeros((self.n, self.k))
        if self.k == 1:
            target[:, 0] = codes == 1
        else:
            target[np.arange(self.n), codes] = 1.0
        self.target = target
        self.backend = _Backend(Z, device)
        self.moment = self.backend.weighted_moment(self.w)  # Z^T diag(w) Z, float64 [d, d]

    def solve(self, C: float, start: LogisticFit | None, tol: float, max_iter: int) -> LogisticFit:
        d, k = self.d, self.k
        lam = 1.0 / (C * self.w_sum)
        chol = scipy.linalg.cholesky(self.moment + lam * np.eye(d), lower=True)
        to_w = lambda a: scipy.linalg.solve_triangular(chol, a, trans="T", lower=True)  # noqa: E731 - W = L^-T A
        evals, last = [0], {}

        def loss_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
            evals[0] += 1
            W, b = to_w(x[: d * k].reshape(d, k)), x[d * k:]
            loss, g_raw = self._loss(self.backend.product(W) + b)
            g_w = self.backend.back(g_raw) + lam * W
            g_b = g_raw.sum(0)
            last["gmax"] = max(np.abs(g_w).max(), np.abs(g_b).max())
            loss += 0.5 * lam * float((W * W).sum())
            g_a = scipy.linalg.solve_triangular(chol, g_w, lower=True)  # dA = L^-1 dW
            return loss, np.concatenate([g_a.ravel(), g_b])

        def converged(intermediate_result) -> None:
            if last["gmax"] <= tol:
                raise StopIteration

        x0 = np.zeros(d * k + k)
        if start is not None:
            x0[: d * k] = (chol.T @ start.coef).ravel()  # A = L^T W
            x0[d * k:] = start.intercept
        result = scipy.optimize.minimize(
            loss_grad, x0, method="L-BFGS-B", jac=True, callback=converged,
            options={"maxiter": max_iter, "maxls": 50, "gtol": 0.0, "ftol": 64 * np.finfo(float).eps},
        )
        W = to_w(result.x[: d * k].reshape(d, k))
        return LogisticFit(np.ascontiguousarray(W), result.x[d * k:].copy(), C, evals[0])

    def _loss(self, raw: np.ndarray) -> tuple[float, np.ndarray]:
        """Weighted mean log-loss of the raw scores and its gradient with respect to them (float64)."""
        if self.k == 1:
            r, y = raw[:, 0], self.target[:, 0]
            loss = float(self.w @ (np.logaddexp(0.0, r) - y * r))
            return loss, (self.w * (1.0 / (1.0 + np.exp(-r)) - y))[:, None]
        top = raw.max(1, keepdims=True)
        e = np.exp(raw - top)
        total = e.sum(1, keepdims=True)
        log_norm = np.log(total)[:, 0] + top[:, 0]
        loss = float(self.w @ (log_norm - (raw * self.target).sum(1)))
        return loss, self.w[:, None] * (e / total - self.target)


class _Backend:
    """The two products with the feature matrix, on the CPU (numpy) or on a torch device."""

    def __init__(self, Z: np.ndarray, device: str):
        self.device = device
        if device == "cpu":
            self.Z = Z
        else:
            import torch

            self.torch = torch
            self.Z = torch.from_numpy(Z).to(device)

    def weighted_moment(self, w: np.ndarray) -> np.ndarray:
        """``Z^T diag(w) Z`` (w sums to one): the preconditioner's matrix."""
        if self.device == "cpu":
            root = self.Z * np.sqrt(w, dtype=np.float32)[:, None]
            return (root.T @ root).astype(np.float64)
        t = self.torch
        root = self.Z * t.from_numpy(np.sqrt(w).astype(np.float32)).to(self.device)[:, None]
        return (root.T @ root).double().cpu().numpy()

    def product(self, W: np.ndarray) -> np.ndarray:
        """``Z @ W`` as float64 [n, K]."""
        if self.device == "cpu":
            return (self.Z @ W.astype(np.float32)).astype(np.float64)
        t = self.torch
        return (self.Z @ t.from_numpy(W.astype(np.float32)).to(self.device)).double().cpu().numpy()

    def back(self, G: np.ndarray) -> np.ndarray:
        """``Z^T @ G`` as float64 [d, K]."""
        if self.device == "cpu":
            return (self.Z.T @ G.astype(np.float32)).astype(np.float64)
        t = self.torch
        return (self.Z.T @ t.from_numpy(G.astype(np.float32)).to(self.device)).double().cpu().numpy()
