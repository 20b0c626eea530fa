"""Lesion matching on the full HAM10000 store, and FAISS at scale (issue 4, "Must show").

    .venv/bin/python benchmarks/bench_match.py ham        # frozen + numpy reference, FAISS vs numpy
    .venv/bin/python benchmarks/bench_match.py methods    # DBSCAN and average linkage under the same protocol
    .venv/bin/python benchmarks/bench_match.py heads      # projection heads (contrastive, triplet, infonce)
    .venv/bin/python benchmarks/bench_match.py scale      # 1,000,000 x 384-d synthetic vectors, IVF vs exact

``ham`` runs the engine's protocol (lesions with 2+ images, lesion-grouped 5-fold CV, cosine
threshold 0.50-0.99 in 0.01 steps chosen on the training folds' pairs, applied to the held-out
fold) beside the same protocol written directly with numpy (dense similarity matrices, scipy
connected components, pairs enumerated), and checks that they agree. Timings are ratios
measured in the same run (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import HAM_STORE, ham_store, peak_rss_mb  # noqa: E402

GRID = np.round(np.arange(0.50, 0.995, 0.01), 2)


def load_multi(features: str = "mobilenet_v2"):
    """Features and lesion ids of the HAM10000 images whose lesion has 2+ images."""
    from embedstore.store import FeatureStore

    store = FeatureStore.open(HAM_STORE) if HAM_STORE.exists() else None
    if store is None or store.info(features).n_done < len(store.manifest):
        ham_store(encoders=(features,))
        store = FeatureStore.open(HAM_STORE)
    X, table = store.load(features)
    sizes = table["lesion_id"].map(table["lesion_id"].value_counts())
    keep = (sizes >= 2).to_numpy()
    return X[keep], table["lesion_id"].astype(str).to_numpy()[keep]


# ----------------------------------------------------------------------------- numpy reference


def numpy_components(S: np.ndarray, t: float) -> np.ndarray:
    from scipy.sparse.csgraph import connected_components

    return connected_components(S >= t, directed=False)[1]


def numpy_prf(groups: np.ndarray, labels: np.ndarray, iu) -> tuple[float, float, float, int, int, int]:
    same_g = (groups[:, None] == groups[None, :])[iu]
    same_c = (labels[:, None] == labels[None, :])[iu]
    tp, pred, pos = int((same_g & same_c).sum()), int(same_c.sum()), int(same_g.sum())
    p = tp / pred if pred else 0.0
    r = tp / pos if pos else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0), tp, pred, pos


def unit(V: np.ndarray) -> np.ndarray:
    return V / np.linalg.norm(V, axis=1, keepdims=True)


def numpy_protocol(X, groups, folds):
    """The frozen-feature protocol written directly: plain cosine, for each held-out fold the
    threshold with the best pooled F1 over the training folds (each grouped on its own), dense
    similarity matrices, connected components, every pair enumerated. Also the pair-decision F1
    (a pair is positive when its similarity clears a threshold chosen the same way, no grouping)."""
    fold_of = np.zeros(len(groups), dtype=int)
    for k, (_, test) in enumerate(folds):
        fold_of[test] = k
    parts = []  # per fold: similarities and same-group flags of its pairs
    for k in range(len(folds)):
        rows = np.flatnonzero(fold_of == k)
        S = unit(X[rows]) @ unit(X[rows]).T
        iu = np.triu_indices(len(rows), k=1)
        parts.append((S, groups[rows], iu))
    cluster_counts = np.zeros((len(folds), len(GRID), 3))  # tp, predicted, positive per fold and threshold
    edge_counts = np.zeros((len(folds), len(GRID), 3))
    for k, (S, g, iu) in enumerate(parts):
        same = (g[:, None] == g[None, :])[iu]
        for v, t in enumerate(GRID):
            cluster_counts[k, v] = numpy_prf(g, numpy_components(S, t), iu)[3:]
            decided = S[iu] >= t
            edge_counts[k, v] = ((decided & same).sum(), decided.sum(), same.sum())

    def f1(c):
        p = np.divide(c[..., 0], c[..., 1], out=np.zeros_like(c[..., 0]), where=c[..., 1] > 0)
        r = c[..., 0] / c[..., 2]
        return p, r, np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=p + r > 0)

    out = {}
    for name, counts in (("clusters", cluster_counts), ("pairs", edge_counts)):
        chosen, pooled = [], np.zeros(3)
        for k in range(len(folds)):
            train = np.delete(np.arange(len(folds)), k)
            v = int(np.argmax(f1(counts[train].sum(axis=0))[2]))
            chosen.append(float(GRID[v]))
            pooled += counts[k, v]
        out[name] = (*(float(x) for x in f1(pooled)), chosen)
    r1, aps = [], []
    for S, g, _ in parts:
        S = S.copy()
        np.fill_diagonal(S, -np.inf)
        hits = g[np.argsort(-S, axis=1)[:, :-1]] == g[:, None]
        r1.extend(hits[:, 0])
        aps.extend((np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1) * hits).sum(axis=1) / hits.sum(axis=1))
    return out, float(np.mean(r1)), float(np.mean(aps))


# ----------------------------------------------------------------------------- parts


def fmt(m: dict, name: str) -> str:
    return f"{name} {m[name].format()}"


def engine(X, groups, **options):
    from embedstore.match.config import MatchConfig
    from embedstore.match.run import cross_validate, final_choice, summarise

    config = MatchConfig(**options)  # n_boot 1000, seed 0
    ids = np.arange(len(X)).astype(str)
    t0 = time.perf_counter()
    result = cross_validate(X, groups, ids, config)
    metrics = summarise(result, groups, config).metrics
    return result, metrics, time.perf_counter() - t0, final_choice(result, config)


def part_ham() -> None:
    import faiss

    from embedstore.match.index import normalise
    from embedstore.splits import group_kfold

    X, groups = load_multi()
    print(f"HAM10000 lesions with 2+ images: {len(np.unique(groups))} lesions, {len(X)} images, "
          f"MobileNetV2 {X.shape[1]}-d")
    result, m, seconds, (value, _) = engine(X, groups, method="threshold")
    print(f"engine (FAISS kNN graph, k=64): {fmt(m, 'pairwise_f1')}, {fmt(m, 'pairwise_precision')}, "
          f"{fmt(m, 'pairwise_recall')}, {fmt(m, 'recall@1')}, {fmt(m, 'recall@5')}, {fmt(m, 'mAP')}; "
          f"clusters {m['n_clusters'].value} for {m['n_groups_true'].value} lesions; "
          f"fold thresholds {result.values} -> final {value}; {seconds:.1f}s")
    folds = group_kfold(np.zeros(len(groups)), groups, n_splits=5, seed=0)
    t0 = time.perf_counter()
    ref, r1, mAP = numpy_protocol(X, groups, folds)
    np_seconds = time.perf_counter() - t0
    p, r, f1, chosen = ref["clusters"]
    print(f"numpy reference (dense): pairwise_f1 {f1:.3f}, precision {p:.3f}, recall {r:.3f}, "
          f"recall@1 {r1:.3f}, mAP {mAP:.3f}; fold thresholds {chosen}; {np_seconds:.1f}s")
    agree = (np.allclose([f1, p, r, r1, mAP], [m[k].value for k in ("pairwise_f1", "pairwise_precision",
                                                                        "pairwise_recall", "recall@1", "mAP")],
                         atol=1e-9) and chosen == result.values)
    print(f"engine and numpy agree (F1, precision, recall, recall@1, mAP, fold thresholds): {agree}")
    p, r, f1, chosen = ref["pairs"]
    print(f"numpy pair-decision F1 (each pair by its own similarity, no grouping; for orientation): "
          f"{f1:.3f}, precision {p:.3f}, recall {r:.3f}; fold thresholds {chosen}")
    # FAISS exact search against numpy brute force on the same vectors, top-10 of every image.
    Z = normalise(X)
    index = faiss.IndexFlatIP(Z.shape[1])
    index.add(Z)

    def faiss_knn():
        return index.search(Z, 11)[1]

    def numpy_knn():
        S = Z @ Z.T
        top = np.argpartition(-S, 11, axis=1)[:, :11]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(S, top, axis=1), axis=1), axis=1)

    t_faiss = min(timed(faiss_knn) for _ in range(3))
    t_numpy = min(timed(numpy_knn) for _ in range(3))
    same = np.mean([len(set(a) & set(b)) / 11 for a, b in zip(faiss_knn(), numpy_knn())])
    print(f"top-10 of {len(Z)} x {Z.shape[1]}-d: FAISS IndexFlatIP {t_faiss:.3f}s, numpy brute force {t_numpy:.3f}s, "
          f"numpy/FAISS time ratio {t_numpy / t_faiss:.2f}, neighbour overlap {same:.4f}")


def part_methods(methods: list[str]) -> None:
    X, groups = load_multi()
    for name in methods:
        res, mm, sec, (v, _) = engine(X, groups, method=name)
        print(f"{name}: {fmt(mm, 'pairwise_f1')}, {fmt(mm, 'pairwise_precision')}, {fmt(mm, 'pairwise_recall')}; "
              f"{mm['n_clusters'].value} clusters; fold values {res.values}; {sec:.1f}s")


def part_heads(losses: list[str], epochs: int) -> None:
    X, groups = load_multi()
    _, base, _, _ = engine(X, groups, method="threshold")
    print(f"frozen MobileNetV2: {fmt(base, 'pairwise_f1')}, {fmt(base, 'recall@1')}, {fmt(base, 'mAP')}")
    for loss in losses:
        result, m, seconds, (value, head) = engine(X, groups, method="threshold", projection=loss,
                                                   head={"epochs": epochs})
        met = m["pairwise_f1"].value >= 0.45 and m["recall@1"].value >= 0.60
        print(f"{loss}: {fmt(m, 'pairwise_f1')}, {fmt(m, 'pairwise_precision')}, {fmt(m, 'pairwise_recall')}, "
              f"{fmt(m, 'recall@1')}, {fmt(m, 'recall@5')}, {fmt(m, 'mAP')}; fold heads {result.heads}, "
              f"thresholds {result.values}; final {head} at {value}; {seconds:.0f}s; "
              f"target (F1 >= 0.45, recall@1 >= 0.60) {'met' if met else 'NOT met'}")


def part_scale(n: int, dim: int, n_queries: int, nlist: int, nprobe: int, chunk: int = 100_000) -> None:
    """IVF-Flat over n synthetic clustered unit vectors (generated chunk by chunk, never held twice)
    against exact top-10 by chunked numpy brute force, for n_queries vectors drawn from the collection."""
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n // 50, dim)).astype(np.float32)

    def make_chunk(c: int) -> np.ndarray:
        r = np.random.default_rng(1000 + c)
        size = min(chunk, n - c * chunk)
        V = centres[r.integers(0, len(centres), size)] + 0.6 * r.normal(size=(size, dim)).astype(np.float32)
        return V / np.linalg.norm(V, axis=1, keepdims=True)

    n_chunks = (n + chunk - 1) // chunk
    query_rows = np.sort(rng.choice(n, n_queries, replace=False))
    t0 = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    train = make_chunk(0)[: 64 * nlist]
    index.train(train)
    Q = np.empty((n_queries, dim), np.float32)
    for c in range(n_chunks):
        V = make_chunk(c)
        inside = (query_rows >= c * chunk) & (query_rows < c * chunk + len(V))
        Q[inside] = V[query_rows[inside] - c * chunk]
        index.add(V)
    build = time.perf_counter() - t0
    index.nprobe = nprobe
    t0 = time.perf_counter()
    _, approx = index.search(Q, 10)
    search = time.perf_counter() - t0

    t0 = time.perf_counter()
    best_s = np.full((n_queries, 10), -np.inf, np.float32)
    best_i = np.zeros((n_queries, 10), np.int64)
    generating = 0.0
    for c in range(n_chunks):
        g0 = time.perf_counter()
        V = make_chunk(c)
        generating += time.perf_counter() - g0
        for s in range(0, len(V), 5000):  # [queries, 5000] similarities at a time: bounded memory
            S = Q @ V[s:s + 5000].T
            top = np.argpartition(-S, 10, axis=1)[:, :10]
            cand_s = np.concatenate([best_s, np.take_along_axis(S, top, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, top + c * chunk + s], axis=1)
            keep = np.argsort(-cand_s, axis=1)[:, :10]
            best_s, best_i = np.take_along_axis(cand_s, keep, axis=1), np.take_along_axis(cand_i, keep, axis=1)
    exact = time.perf_counter() - t0 - generating  # the chunks are regenerated, not counted
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, best_i)])
    print(f"{n:,} x {dim}-d synthetic unit vectors, IVF-Flat nlist={nlist} nprobe={nprobe}: build {build:.1f}s, "
          f"top-10 of {n_queries:,} queries {search:.2f}s ({n_queries / search:,.0f} queries/s, "
          f"all {n:,} would take ~{n / (n_queries / search) / 60:.1f} min); exact numpy brute force of the same "
          f"queries {exact:.1f}s (ratio {exact / search:.1f}x); recall@10 vs exact {recall:.4f}; "
          f"peak RSS {peak_rss_mb():,.0f} MiB")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["ham", "methods", "heads", "scale"])
    parser.add_argument("--methods", default="dbscan,agglomerative")
    parser.add_argument("--losses", default="infonce,triplet,contrastive")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    args = parser.parse_args()
    if args.part == "ham":
        part_ham()
    elif args.part == "methods":
        part_methods(args.methods.split(","))
    elif args.part == "heads":
        part_heads(args.losses.split(","), args.epochs)
    else:
        part_scale(args.n, args.dim, args.queries, args.nlist, args.nprobe)


if __name__ == "__main__":
    main()
