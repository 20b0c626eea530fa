"""Grouping images into lesions from their candidate-pair graph.

Three methods, each with one swept parameter (similarity or cosine distance):

* ``threshold``: keep pairs with cosine similarity >= t, take connected components;
* ``dbscan``: DBSCAN on cosine distance (1 - similarity) with radius ``eps`` over the sparse
  candidate graph; noise points become singleton clusters (with ``min_samples=2`` every point
  with a neighbour is a core point and DBSCAN reduces to the threshold graph at 1 - eps);
* ``agglomerative``: average-linkage clustering on cosine distance constrained to the
  candidate graph, cut where the average similarity between two clusters falls below t.

All work on :class:`~embedstore.match.pairs.Pairs`, so memory stays N * k. A
:class:`Grouper` prepares what a method needs once (e.g. the linkage tree) and then labels
the images for any parameter value, which makes sweeps cheap.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN, linkage_tree

from embedstore.errors import ConfigError
from embedstore.match.pairs import Pairs

METHODS = ("threshold", "dbscan", "agglomerative")

#: The parameter each method sweeps and its default grid (issue 4: 0.50-0.99, eps 0.1-0.9).
PARAMETERS = {
    "threshold": ("threshold", np.round(np.arange(0.50, 0.995, 0.01), 2)),
    "dbscan": ("eps", np.round(np.arange(0.10, 0.905, 0.01), 2)),
    "agglomerative": ("threshold", np.round(np.arange(0.50, 0.995, 0.01), 2)),
}


def floor_similarity(method: str, grid) -> float:
    """The lowest similarity a pair can have and still matter for any value of ``grid``."""
    grid = np.asarray(grid, dtype=float)
    return float(1.0 - grid.max()) if method == "dbscan" else float(grid.min())


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component labels of the undirected graph with edges (i, j) over n nodes."""
    graph = sp.coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    return connected_components(graph, directed=False)[1]


class Grouper:
    """Labels images with one method for any value of its parameter, from one candidate graph."""

    def __init__(self, method: str, pairs: Pairs, Xn: np.ndarray | None = None, min_samples: int = 2):
        if method not in METHODS:
            raise ConfigError(f"unknown grouping method {method!r}; choose one of {', '.join(METHODS)}")
        self.method = method
        self.pairs = pairs
        self.min_samples = min_samples
        self.param_name = PARAMETERS[method][0]
        if method == "agglomerative":
            if Xn is None:
                raise ValueError("agglomerative grouping needs the normalised vectors")
            self._trees = average_linkage_trees(Xn, pairs)
        if method == "dbscan":
            d = np.maximum(1.0 - pairs.sim.astype(np.float64), 1e-9)  # explicit entries, never dropped
            both = (np.r_[pairs.i, pairs.j], np.r_[pairs.j, pairs.i])
            self._dist = sp.csr_matrix((np.r_[d, d], both), shape=(pairs.n, pairs.n))

    def labels(self, value: float) -> np.ndarray:
        """Cluster label of every image for parameter ``value``."""
        n = self.pairs.n
        if self.method == "threshold":
            keep = self.pairs.sim >= value
            return components(n, self.pairs.i[keep], self.pairs.j[keep])
        if self.method == "dbscan":
            labels = DBSCAN(eps=value, min_samples=self.min_samples, metric="precomputed").fit_predict(self._dist)
            noise = labels < 0
            labels[noise] = labels.max() + 1 + np.arange(noise.sum())
            return labels
        return cut_trees(self._trees, n, 1.0 - value)


def average_linkage_trees(Xn: np.ndarray, pairs: Pairs) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Average-linkage merge trees on cosine distance, one per connected part of the candidate graph.

    Returns ``(members, children, distances)`` per part with two or more images. Merges are
    restricted to candidate pairs; parts of the graph never merge (their pairs all lie below the
    similarity floor, far beyond any useful cut).
    """
    n = pairs.n
    part = components(n, pairs.i, pairs.j)
    order = np.argsort(part, kind="stable")
    _, starts, counts = np.unique(part[order], return_index=True, return_counts=True)
    position = np.empty(n, dtype=np.int64)
    pair_order = np.argsort(part[pairs.i], kind="stable")
    pair_bounds = np.searchsorted(part[pairs.i][pair_order], np.arange(part.max() + 2))
    trees = []
    for start, count in zip(starts[counts > 1], counts[counts > 1]):
        members = order[start:start + count]
        position[members] = np.arange(count)
        p = part[members[0]]
        inside = pair_order[pair_bounds[p]:pair_bounds[p + 1]]
        a, b = position[pairs.i[inside]], position[pairs.j[inside]]
        conn = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(count, count))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about a constrained tree on tiny parts
            children, _, _, _, distances = linkage_tree(
                Xn[members], connectivity=(conn + conn.T).tocsr(), linkage="average",
                affinity="cosine", return_distance=True,
            )
        trees.append((members, np.asarray(children), np.asarray(distances)))
    return trees


def cut_trees(trees, n: int, max_distance: float) -> np.ndarray:
    """Image labels after applying every merge whose average distance is <= ``max_distance``.

    Each tree's nodes get global ids (its members for the leaves, fresh ids above ``n`` for its
    merges); an applied merge links its node to both children, and the connected components
    of those links, read at the leaves, are the clusters.
    """
    edges_i, edges_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    offset = n
    for members, children, distances in trees:
        m = len(members)
        node_ids = np.r_[members, offset + np.arange(m - 1)]
        merged = np.flatnonzero(distances <= max_distance)
        parents = node_ids[m + merged]
        edges_i.append(np.r_[parents, parents])
        edges_j.append(np.r_[node_ids[children[merged, 0]], node_ids[children[merged, 1]]])
        offset += m - 1
    labels = components(offset, np.concatenate(edges_i), np.concatenate(edges_j))[:n]
    return np.unique(labels, return_inverse=True)[1]
