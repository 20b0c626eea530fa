"""Candidate pairs from a k-nearest-neighbour search: the sparse similarity graph every
grouping method works on.

An N x N similarity matrix is never formed: each image keeps its ``k`` nearest neighbours
above a floor similarity, the pairs are made undirected (i < j) and deduplicated, so memory
grows as N * k. Lesions have a handful of images, so a few dozen neighbours per image hold
every pair a threshold in the useful range can join.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from embedstore.match.index import FeatureIndex, Rows


@dataclass(frozen=True)
class Pairs:
    """Undirected candidate pairs over ``n`` items: rows ``i < j`` and their cosine similarity."""

    n: int
    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray

    def above(self, threshold: float) -> "Pairs":
        keep = self.sim >= threshold
        return Pairs(self.n, self.i[keep], self.j[keep], self.sim[keep])


def knn_graph(index: FeatureIndex, X: np.ndarray | Rows, k: int, advance=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows of the index (self-matches removed).

    ``X`` must be the rows the index was built on, in the same order: an array, or :class:`Rows` (e.g. a feature
    set on disk), searched one block of queries at a time, so only a block of vectors and the [N, k] graph
    are held. ``advance(n)`` counts rows searched.
    """
    rows_in = X if isinstance(X, Rows) else Rows.of_array(X)
    k_eff = int(min(k + 1, index.meta.n)) - 1
    sims = np.empty((rows_in.n, k_eff), dtype=np.float32)
    nbrs = np.empty((rows_in.n, k_eff), dtype=np.int64)
    for start, block in rows_in.blocks():
        s, r = index.search(block, k_eff + 1, advance=advance)
        sims[start:start + len(r)], nbrs[start:start + len(r)] = without_self(s, r, start)
    return sims, nbrs


def without_self(sims: np.ndarray, rows: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's own row (query ``i`` is row ``first + i``) from its neighbours, or, when an exact
    duplicate ranked before it pushed it out, the last neighbour."""
    own = first + np.arange(len(rows))[:, None]
    is_self = rows == own
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), rows.shape[1] - 1)
    keep = np.ones_like(rows, dtype=bool)
    keep[np.arange(len(rows)), drop] = False
    k_eff = rows.shape[1] - 1
    return sims[keep].reshape(len(rows), k_eff), rows[keep].reshape(len(rows), k_eff)


def candidate_pairs(sims: np.ndarray, rows: np.ndarray, min_sim: float = -1.0) -> Pairs:
    """Undirected, deduplicated pairs from a kNN graph, keeping similarities >= ``min_sim``."""
    n = len(rows)
    a = np.repeat(np.arange(n), rows.shape[1])
    b = rows.ravel()
    s = sims.ravel()
    ok = (b >= 0) & (s >= min_sim) & (a != b)
    a, b, s = a[ok], b[ok], s[ok]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    code = lo.astype(np.int64) * n + hi
    code, first = np.unique(code, return_index=True)
    return Pairs(n, (code // n).astype(np.int64), (code % n).astype(np.int64), s[first].astype(np.float32))


def build_pairs(X: np.ndarray, k: int, min_sim: float = -1.0, ids=None, **index_kw) -> tuple[Pairs, FeatureIndex]:
    """Index raw features ``X`` (exact by default) and return their candidate pairs."""
    ids = np.arange(len(X)).astype(str) if ids is None else ids
    index = FeatureIndex.build(X, ids, key="transient", **index_kw)
    sims, rows = knn_graph(index, X, min(k, len(X) - 1))
    return candidate_pairs(sims, rows, min_sim), index


def co_cluster_pairs(labels: np.ndarray, max_pairs: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) that share a label, cluster by cluster, refusing to exceed ``max_pairs``."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    total = int((counts * (counts - 1) // 2).sum())
    if total > max_pairs:
        raise ValueError(f"{total} co-clustered pairs exceed the limit of {max_pairs}")
    out_i, out_j = [], []
    for start, c in zip(starts[counts > 1], counts[counts > 1]):
        members = np.sort(order[start:start + c])
        a, b = np.triu_indices(c, k=1)
        out_i.append(members[a])
        out_j.append(members[b])
    if not out_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def decided_pairs_table(
    ids: np.ndarray,
    groups: np.ndarray,
    clusters: np.ndarray,
    Xn: np.ndarray,
    max_pairs: int = 2_000_000,
) -> pd.DataFrame:
    """Every pair the grouping decided (same cluster) or missed (same group, other cluster).

    ``Xn`` are the normalised vectors the decision was made on; the similarity of each listed
    pair is their dot product. ``outcome`` is TP (same cluster, same group), FP (same cluster,
    other group) or FN (same group, other cluster).
    """
    ci, cj = co_cluster_pairs(clusters, max_pairs)
    gi, gj = co_cluster_pairs(groups, max_pairs)
    n = len(ids)
    codes_c = ci * n + cj
    codes_g = gi * n + gj
    codes = np.union1d(codes_c, codes_g)
    i, j = codes // n, codes % n
    same_cluster = np.isin(codes, codes_c)
    same_group = np.isin(codes, codes_g)
    sim = np.einsum("ij,ij->i", Xn[i], Xn[j]) if len(i) else np.empty(0, np.float32)
    outcome = np.where(same_cluster & same_group, "TP", np.where(same_cluster, "FP", "FN"))
    return pd.DataFrame({
        "id_a": ids[i], "id_b": ids[j],
        "group_a": groups[i], "group_b": groups[j],
        "similarity": sim.astype(np.float32),
        "same_group": same_group, "same_cluster": same_cluster, "outcome": outcome,
    })
