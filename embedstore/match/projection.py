"""Projection heads: a small torch MLP trained on cached features so that images of one lesion
land close together on the unit sphere.

Three losses, all on L2-normalised outputs of a batch drawn as P lesions x K images:

* ``contrastive``: pulls same-lesion pairs together and pushes other pairs beyond a margin
  (Hadsell et al. 2006, on Euclidean distance between unit vectors);
* ``triplet``: batch-hard triplet loss, each anchor's farthest positive against its nearest
  negative in the batch (Hermans et al. 2017);
* ``infonce``: supervised InfoNCE (SupCon, Khosla et al. 2020), every other image of the
  anchor's lesion a positive, the rest of the batch negatives, at a temperature.

:class:`ProjectionHead` follows scikit-learn's estimator contract (``fit(X, groups)``,
``transform``), so it can be cloned and cross-validated; it runs on the GPU when asked or
when one is present (``device="auto"``).

torch is imported inside the functions that use it (and the :class:`MLP` module class is
defined on first use), so that ``embedstore match`` without a projection head, and the match
config, do not pay for loading torch.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from embedstore.devices import resolve_device
from embedstore.errors import ConfigError

if TYPE_CHECKING:
    import torch

LOSSES = ("contrastive", "triplet", "infonce")


# ----------------------------------------------------------------------------- losses


def _distances(z: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between unit vectors, from their cosine similarities."""
    import torch

    return torch.sqrt(torch.clamp(2.0 - 2.0 * z @ z.T, min=1e-12))


def contrastive_loss(z: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean of positive-pair d^2 and negative-pair max(0, margin - d)^2, each averaged on its own."""
    import torch
    import torch.nn.functional as F

    d = _distances(z)
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool, device=z.device)
    pos, neg = same & off, ~same
    loss_pos = (d[pos] ** 2).mean() if pos.any() else d.new_zeros(())
    loss_neg = (F.relu(margin - d[neg]) ** 2).mean() if neg.any() else d.new_zeros(())
    return loss_pos + loss_neg


def triplet_loss(z: torch.Tensor, y: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-hard triplet loss: max(0, d(a, hardest p) - d(a, hardest n) + margin) per anchor."""
    import torch
    import torch.nn.functional as F

    d = _distances(z)
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool, device=z.device)
    pos = same & off
    has = pos.any(1) & (~same).any(1)
    if not has.any():
        return d.new_zeros(())
    hardest_pos = torch.where(pos, d, torch.zeros_like(d)).max(1).values
    hardest_neg = torch.where(~same, d, torch.full_like(d, float("inf"))).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin)[has].mean()


def info_nce_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised InfoNCE: mean over anchors of -mean log softmax(sim / T) over their positives."""
    import torch

    logits = z @ z.T / temperature
    eye = torch.eye(len(y), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return logits.new_zeros(())
    per_anchor = -torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


# ----------------------------------------------------------------------------- sampling


def lesion_batches(groups: np.ndarray, lesions_per_batch: int, images_per_lesion: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of P x K batches: lesions with 2+ images in random order, up to K images each.

    Single-image lesions carry no positive pair, so they are left out of training.
    """
    order = np.argsort(groups, kind="stable")
    _, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    multi = np.flatnonzero(counts >= 2)
    rng.shuffle(multi)
    batches = []
    for b in range(0, len(multi), lesions_per_batch):
        rows = []
        for g in multi[b:b + lesions_per_batch]:
            members = order[starts[g]:starts[g] + counts[g]]
            rows.append(rng.permutation(members)[:images_per_lesion])
        if len(rows) >= 2:
            batches.append(np.concatenate(rows))
    return batches


# ----------------------------------------------------------------------------- the head


def warmup_cosine(total_steps: int, warmup: float = 0.1):
    """Learning-rate factor per step: linear warm-up over ``warmup`` of the steps, then cosine to 0."""
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return factor


@contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` intra-op CPU threads (None: torch's default), restoring the setting after.

    The head's matrices are small: on a shared machine one thread is many times faster than
    several OpenMP threads spinning against other processes for the same cores.
    """
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_MLP = None


def _mlp_class():
    """The :class:`MLP` module class, defined on first use (it subclasses ``torch.nn.Module``)."""
    global _MLP
    if _MLP is None:
        import torch.nn.functional as F
        from torch import nn

        class MLP(nn.Module):
            """Linear -> GELU -> dropout -> linear, with an L2-normalised output."""

            def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float):
                super().__init__()
                self.net = nn.Sequential(
                    nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return F.normalize(self.net(x), dim=1)

        MLP.__qualname__ = "MLP"  # pickles refer to embedstore.match.projection.MLP, found by __getattr__ below
        _MLP = MLP
    return _MLP


def __getattr__(name: str):
    if name == "MLP":
        return _mlp_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ProjectionHead(TransformerMixin, BaseEstimator):
    """An MLP trained with a metric-learning loss on cached features; ``transform`` gives unit vectors.

    Inputs are centred on the training mean and L2-normalised first (the same preparation the
    frozen features get before cosine search), so one learning rate suits every encoder.
    """

    def __init__(self, loss: str = "infonce", hidden_dim: int = 512, out_dim: int = 128,
                 epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-4,
                 lesions_per_batch: int = 128, images_per_lesion: int = 4,
                 temperature: float = 0.1, margin: float | None = None, dropout: float = 0.1,
                 device: str = "auto", threads: int | None = 1, seed: int = 0):
        self.loss = loss
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.lesions_per_batch = lesions_per_batch
        self.images_per_lesion = images_per_lesion
        self.temperature = temperature
        self.margin = margin
        self.dropout = dropout
        self.device = device
        self.threads = threads
        self.seed = seed

    def _loss(self, z, y):
        if self.loss == "infonce":
            return info_nce_loss(z, y, self.temperature)
        if self.loss == "triplet":
            return triplet_loss(z, y, 0.2 if self.margin is None else self.margin)
        return contrastive_loss(z, y, 1.0 if self.margin is None else self.margin)

    def _prepare(self, X) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        X = torch.as_tensor(np.asarray(X, dtype=np.float32)) - self.input_mean_
        return F.normalize(X, dim=1)

    def fit(self, X, groups) -> "ProjectionHead":
        """Train on features ``X`` [n, D] whose rows of one lesion share a ``groups`` value."""
        with torch_threads(self.threads):
            return self._fit(X, groups)

    def _fit(self, X, groups) -> "ProjectionHead":
        import torch

        if self.loss not in LOSSES:
            raise ConfigError(f"unknown projection loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        X = np.asarray(X, dtype=np.float32)
        groups = np.unique(np.asarray(groups), return_inverse=True)[1]
        if np.bincount(groups).max(initial=0) < 2:
            raise ConfigError("every group has a single image: a projection head needs lesions with 2+ images")
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        device = resolve_device(self.device)
        self.input_mean_ = torch.as_tensor(X.mean(axis=0))
        inputs = self._prepare(X).to(device)
        labels = torch.as_tensor(groups, device=device)
        model = _mlp_class()(X.shape[1], self.hidden_dim, self.out_dim, self.dropout).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n_batches = len(lesion_batches(groups, self.lesions_per_batch, self.images_per_lesion, rng))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.epochs * n_batches))
        self.loss_curve_ = []
        model.train()
        for _ in range(self.epochs):
            total, steps = 0.0, 0
            for rows in lesion_batches(groups, self.lesions_per_batch, self.images_per_lesion, rng):
                idx = torch.as_tensor(rows, device=device)
                loss = self._loss(model(inputs[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total, steps = total + float(loss.detach()), steps + 1
            self.loss_curve_.append(total / max(steps, 1))
        self.model_ = model.cpu().eval()
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X, batch: int = 65536) -> np.ndarray:
        """Unit-norm projections [n, out_dim] (float32) of raw features ``X``."""
        import torch

        X = np.asarray(X, dtype=np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ConfigError(f"head expects {self.n_features_in_}-d features, got {X.shape[1]}-d")
        with torch.no_grad(), torch_threads(self.threads):
            out = [self.model_(self._prepare(X[s:s + batch])).numpy() for s in range(0, len(X), batch)]
        return np.concatenate(out).astype(np.float32) if out else np.empty((0, self.out_dim), np.float32)

    # -- persistence: safetensors weights + JSON parameters ------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model_.state_dict().items()}
        tensors["input_mean"] = self.input_mean_.contiguous()
        save_file(tensors, str(folder / "projection.safetensors"))
        params = self.get_params() | {"n_features_in": self.n_features_in_}
        (folder / "projection.json").write_text(json.dumps(params, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ProjectionHead":
        from safetensors.torch import load_file

        folder = Path(folder)
        params = json.loads((folder / "projection.json").read_text())
        n_in = params.pop("n_features_in")
        head = cls(**params)
        tensors = load_file(str(folder / "projection.safetensors"))
        head.input_mean_ = tensors.pop("input_mean")
        head.model_ = _mlp_class()(n_in, head.hidden_dim, head.out_dim, head.dropout)
        head.model_.load_state_dict({k[len("model."):]: v for k, v in tensors.items()})
        head.model_.eval()
        head.n_features_in_ = n_in
        return head


#: Candidate hyperparameters per loss, compared by lesion-grouped validation inside each fold.
HEAD_GRIDS: dict[str, list[dict]] = {
    "infonce": [{"temperature": 0.05}, {"temperature": 0.1}, {"temperature": 0.2}],
    "triplet": [{"margin": 0.1}, {"margin": 0.2}, {"margin": 0.4}],
    "contrastive": [{"margin": 0.8}, {"margin": 1.0}, {"margin": 1.2}],
}
