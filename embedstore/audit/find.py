"""Finding what leaks: the candidate pairs (:func:`candidate_graph`), exact duplicates, the near-duplicate
threshold, flagged pairs, their clusters.

Functions of the store's rows (hashes, groups, the split side and fold of each row) and the candidate pairs of
the FAISS kNN graph (:func:`embedstore.match.pairs.knn_graph`), so memory grows as N x k, never N x N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from embedstore.errors import ConfigError
from embedstore.match.cluster import components
from embedstore.match.index import FeatureIndex
from embedstore.match.pairs import Pairs, candidate_pairs, co_cluster_pairs, knn_graph

MIN_SAME_GROUP_PAIRS = 20  # below this, a calibrated threshold would rest on a handful of pairs
HISTOGRAM_BIN = 0.005


@dataclass(frozen=True)
class Threshold:
    """The near-duplicate similarity and where it came from (``calibrated`` or ``given``); when calibrated,
    ``above`` pairs of the kNN graph lie at or above it, ``same_group`` of them pairs of one group."""

    value: float
    source: str
    precision: float | None = None
    above: int = 0
    same_group: int = 0


def calibrate(sim: np.ndarray, same_group: np.ndarray, exact: np.ndarray, precision: float) -> Threshold:
    """The lowest similarity ``t`` such that, of the candidate pairs at or above ``t``, a share of at least
    ``precision`` are pairs of one group: above it, a pair of two groups is as alike as the images of one
    lesion are, so it is probably one lesion under two ids.

    The pairs the audit is looking for would spoil the share they are measured by, so two kinds are left out:
    identical bytes (``exact``), and pairs of two groups more alike than any two distinct images of one group
    (copies re-encoded or resized). Both are flagged whatever the threshold. ConfigError (one line) when the
    graph has too few same-group pairs, or none at that precision.
    """
    same = np.asarray(same_group, dtype=bool)
    distinct = ~np.asarray(exact, dtype=bool)
    if (same & distinct).sum() < MIN_SAME_GROUP_PAIRS:
        raise ConfigError(f"only {int((same & distinct).sum())} pairs of images of one group among the nearest "
                          "neighbours: too few to calibrate a threshold; give --threshold (or more --neighbors, or "
                          "another --groups)")
    ceiling = sim[same & distinct].max()
    keep = distinct & (same | (sim <= ceiling))
    order = np.argsort(-sim[keep], kind="stable")
    ranked, same = sim[keep][order], same[keep][order]
    share = np.cumsum(same) / np.arange(1, len(same) + 1)
    end_of_ties = np.r_[ranked[1:] != ranked[:-1], True]  # a cut flags every pair of its similarity
    reached = np.flatnonzero((share >= precision) & end_of_ties)
    if not len(reached):
        raise ConfigError(f"no similarity has {precision:.0%} of the pairs above it in one group; give --threshold "
                          "or a lower --precision")
    last = int(reached[-1])
    return Threshold(float(ranked[last]), "calibrated", float(precision), last + 1, int(same[:last + 1].sum()))


def exact_pairs(sha256_code: np.ndarray, max_pairs: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of rows (i < j) whose image bytes are identical (the same code of the manifest's sha256);
    ConfigError (one line) above ``max_pairs``, which means the store holds many copies of a few images."""
    try:
        return co_cluster_pairs(sha256_code, max_pairs)
    except ValueError:
        copies = np.bincount(sha256_code).max()
        raise ConfigError(f"more than {max_pairs:,} pairs of identical images (one image has {copies:,} copies): "
                          "remove the copies from the source table before auditing") from None


def with_exact(candidates: Pairs, i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> Pairs:
    """The candidate pairs with the exact duplicates (i, j, their similarity) added, each pair once: a set of
    many copies of one image can outnumber the k neighbours an image keeps."""
    n = candidates.n
    code = np.concatenate([candidates.i * n + candidates.j, i * n + j])
    sims = np.concatenate([candidates.sim, sim.astype(np.float32)])
    code, first = np.unique(code, return_index=True)
    return Pairs(n, code // n, code % n, sims[first])


def candidate_graph(X: np.ndarray, ids, sha256_code: np.ndarray, neighbors: int, kind: str = "auto",
                    centre: bool = False, seed: int = 0, advance=None) -> Pairs:
    """The pairs an audit looks at: each row's ``neighbors`` nearest rows of ``X`` by cosine (FAISS, as ``match``
    searches), and every pair of identical bytes (``sha256_code``), each pair once with its similarity.
    ``advance(n)`` counts the rows searched."""
    index = FeatureIndex.build(X, ids, key="transient", kind=kind, centre=centre, seed=seed)
    sims, rows = knn_graph(index, X, min(neighbors, len(X) - 1), advance=advance)
    i, j = exact_pairs(sha256_code)
    exact_sim = np.einsum("ij,ij->i", index.prepare(X[i]), index.prepare(X[j])) if len(i) else np.empty(0)
    return with_exact(candidate_pairs(sims, rows), i, j, exact_sim)


def histogram(sim: np.ndarray, same_group: np.ndarray | None) -> pd.DataFrame:
    """Counts of candidate-pair similarities in bins of :data:`HISTOGRAM_BIN`, of one group and of two
    (``same_group`` None: every pair counted as ``pairs``)."""
    edges = np.arange(np.floor(sim.min() / HISTOGRAM_BIN) * HISTOGRAM_BIN, 1.0 + 2 * HISTOGRAM_BIN, HISTOGRAM_BIN)
    table = pd.DataFrame({"low": edges[:-1].round(4), "high": edges[1:].round(4)})
    if same_group is None:
        table["pairs"] = np.histogram(sim, edges)[0]
    else:
        table["same_group"] = np.histogram(sim[same_group], edges)[0]
        table["different_group"] = np.histogram(sim[~same_group], edges)[0]
    return table


#: The lines a pair can cross, in the order pairs.csv lists them.
CROSSINGS = ("cross_group", "cross_split", "cross_fold")


def crossings(pairs: Pairs, codes: dict[str, np.ndarray], fold: np.ndarray) -> dict[str, np.ndarray]:
    """For every pair, whether its two images have identical bytes (``exact``), lie in two groups, on two sides
    of the official split, or in two folds of its training side. ``codes`` holds an integer code per row for
    ``sha256``, ``group`` and ``split`` (a negative split code: a row dropped from the split, on no side);
    ``fold`` is each row's fold (-1 outside the folds)."""
    i, j = pairs.i, pairs.j
    split = codes["split"]
    return {
        "exact": codes["sha256"][i] == codes["sha256"][j],
        "cross_group": codes["group"][i] != codes["group"][j],
        "cross_split": (split[i] >= 0) & (split[j] >= 0) & (split[i] != split[j]),
        "cross_fold": (fold[i] >= 0) & (fold[j] >= 0) & (fold[i] != fold[j]),
    }


def flagged(sim: np.ndarray, crossed: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """Pairs that leak: identical bytes under two ids, or near-duplicates (similarity at or above ``threshold``)
    that cross a group, the split or the folds."""
    near = sim >= threshold
    return crossed["exact"] | (near & (crossed["cross_group"] | crossed["cross_split"] | crossed["cross_fold"]))


def most_similar(sim: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` most similar pairs where ``mask`` holds, most similar first."""
    where = np.flatnonzero(mask)
    return where[np.argsort(-sim[where], kind="stable")[:n]]


def pair_table(pairs: Pairs, at: np.ndarray, rows: pd.DataFrame, crossed: dict[str, np.ndarray]) -> pd.DataFrame:
    """The pairs at positions ``at``, one line each: both images' ``rows`` columns (suffixed ``_a``/``_b``: id,
    group, split, fold, label), their similarity, ``exact`` and the lines they cross."""
    a = rows.iloc[pairs.i[at]].reset_index(drop=True).add_suffix("_a")
    b = rows.iloc[pairs.j[at]].reset_index(drop=True).add_suffix("_b")
    table = pd.DataFrame({"id_a": a.pop("id_a"), "id_b": b.pop("id_b"), "similarity": pairs.sim[at].round(5)})
    for name in ("exact", *CROSSINGS):
        table[name] = crossed[name][at]
    return pd.concat([table, a, b], axis=1)


def clusters(n: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Suspected duplicate clusters: the connected components of the flagged pairs (i, j) over ``n`` rows.

    Returns each row's cluster number (-1 for a row in no flagged pair; clusters numbered from 0, largest
    first) and each row's cluster size (0 outside one)."""
    label = components(n, i, j)
    in_pair = np.zeros(n, dtype=bool)
    in_pair[i] = in_pair[j] = True
    sizes = np.bincount(label[in_pair], minlength=label.max() + 1)
    order = np.lexsort((np.arange(len(sizes)), -sizes))  # largest first, then by first row
    number = np.full(len(sizes), -1)
    number[order[sizes[order] > 0]] = np.arange(int((sizes > 0).sum()))
    cluster = np.where(in_pair, number[label], -1)
    return cluster, np.where(in_pair, sizes[label], 0)
