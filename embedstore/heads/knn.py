"""kNN on cosine similarity through FAISS, with the temperature-weighted vote of DINO's kNN evaluation.

The neighbours are found by the FAISS search of :mod:`embedstore.match.index` (the one FAISS path).
"""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import normalize

from embedstore.heads.base import EmbeddingHead
from embedstore.match.index import exact_index, gpu_available, gpu_copy, search_index


class KNNHead(EmbeddingHead):
    """Each query's ``k`` most cosine-similar training rows vote with weight ``exp(sim / temperature)``.

    This is the weighted kNN of Caron et al. (DINO, 2021), ``temperature=0.07``
    and ``k=20`` as there. Class probabilities are the normalised vote totals;
    ``class_weight="balanced"`` scales each neighbour's vote by its class weight.
    Features are L2-normalised after the preprocessor so inner product is cosine. With ``device`` other than
    ``cpu`` (``auto``, ``cuda[:N]``) the search runs on FAISS's GPU index when the installed faiss has GPU support
    and sees a GPU, else on the CPU (the same exact search, so the same neighbours).
    """

    def __init__(self, k=20, temperature=0.07, norm="l2", pca=None, whiten=False, class_weight=None,
                 undersample=None, device="cpu", seed=0):
        self.k = k
        self.temperature = temperature
        self.norm = norm
        self.pca = pca
        self.whiten = whiten
        self.class_weight = class_weight
        self.undersample = undersample
        self.device = device
        self.seed = seed

    def _fit_core(self, Z, codes, sample_weight):
        self.bank_ = np.ascontiguousarray(normalize(Z), dtype=np.float32)
        self.bank_codes_ = codes
        n_classes = self.classes_.size
        if sample_weight is None:
            self.vote_weight_ = np.ones(n_classes)
        else:  # per-class weight: the mean sample weight of that class
            self.vote_weight_ = np.bincount(codes, sample_weight, n_classes) / np.bincount(codes, None, n_classes)

    def _proba_core(self, Z):
        k = min(self.k, self.bank_.shape[0])
        index = exact_index(self.bank_)
        if self.device != "cpu" and gpu_available():
            index = gpu_copy(index, self.device)
        sims, nbrs = search_index(index, np.ascontiguousarray(normalize(Z), dtype=np.float32), k)
        votes = np.exp((sims - sims[:, :1]) / self.temperature)  # shifted by the row max: same ratios, no overflow
        codes = self.bank_codes_[nbrs]
        votes = votes * self.vote_weight_[codes]
        proba = np.zeros((Z.shape[0], self.classes_.size))
        np.add.at(proba, (np.repeat(np.arange(Z.shape[0]), k), codes.ravel()), votes.ravel())
        return proba / proba.sum(1, keepdims=True)
