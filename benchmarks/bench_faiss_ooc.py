"""FAISS indices beyond memory (issue 13, part 3): an IVF-PQ index built from a store chunk by chunk.

    .venv/bin/python benchmarks/bench_faiss_ooc.py                     # 10,000,000 x 384-d (about 45 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_faiss_ooc.py --rows 200000       # a quick run

1. ``write`` (skipped when the store is there): a store of ``--rows`` synthetic 384-d vectors, written block by block
   through the store API (manifest, then ``FeatureSet.write_rows`` per block of 65,536 rows, float16 on disk, 1,024
   rows per chunk as extraction writes them), never holding them all. The vectors are a mixture of 1,000 Gaussians
   (Dirichlet(1) weights) in a 64-d latent space (centres N(0, I), spread 0.5 around them) mapped into 384-d by a
   random orthonormal map, plus isotropic noise of 0.05 in every dimension: clustered, with most variance in few
   directions, as image embeddings are. 1,000 queries are drawn from the same mixture (another seed), not from the store.
2. ``build``, in a child process: ``embedstore.match.query.load_index(kind="ivfpq")``, the path ``embedstore query``
   takes: the index is built from the store a block at a time and saved; then the 1,000 queries are searched
   (top 10, re-ranked by exact vectors read back from the store), once more by PQ codes alone, and the saved index
   is loaded again. Its peak RSS (VmHWM) is the figure that must stay under 4 GiB.
3. ``truth``, in another child: exact top 10 of the queries by a brute-force pass over the store, block by block.
4. recall@10 = the share of each query's exact 10 nearest found in its 10 returned, averaged.

Results: ``benchmarks/out/faiss_ooc/results.json`` (the store lives beside it: ``synthetic-<rows>.zarr``, 7.7 GB at
10M rows; delete it when done).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, peak_rss_mb  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "faiss_ooc"
DIM, LATENT, CLUSTERS, SPREAD, NOISE = 384, 64, 1000, 0.5, 0.05
BLOCK = 65536
NAME = "synthetic"
N_QUERIES, K = 1000, 10


def mixture(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mixture's latent centres, weights and latent-to-384-d orthonormal map (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, LATENT)))[0].T.astype(np.float32)
    centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
    return centres, rng.dirichlet(np.ones(CLUSTERS)), basis


def draw(n: int, seed: int, model) -> np.ndarray:
    """``n`` vectors of the mixture, float32, reproducible from ``seed``."""
    centres, weights, basis = model
    rng = np.random.default_rng(seed)
    z = centres[rng.choice(CLUSTERS, n, p=weights)] + SPREAD * rng.standard_normal((n, LATENT), dtype=np.float32)
    return z @ basis + NOISE * rng.standard_normal((n, DIM), dtype=np.float32)


def store_path(rows: int) -> Path:
    return OUT / f"{NAME}-{rows}.zarr"


def write_store(rows: int) -> dict:
    """Write the synthetic store block by block through the store API; returns its timings."""
    import pandas as pd

    from embedstore.store import FeatureStore
    from embedstore.store.feature_set import DONE

    path = store_path(rows)
    started = time.perf_counter()
    store = FeatureStore.create_or_open(path)
    ids = [f"syn{i:08d}" for i in range(rows)]
    sha = [hashlib.sha256(i.encode()).hexdigest() for i in ids]  # stands for the bytes of an image never written
    with store.preparing():
        store.update_manifest(pd.DataFrame({"id": ids, "_path": ids}),
                              pd.DataFrame({"sha256": sha, "_size": -1, "_mtime_ns": -1}),
                              {"kind": "synthetic", "rows": rows, "dim": DIM})
    del ids
    fs = store.require_feature_set(NAME, NAME, {"encoder": NAME}, DIM, "float16", 1024)
    model = mixture()
    for b, start in enumerate(range(0, rows, BLOCK)):
        stop = min(rows, start + BLOCK)
        fs.write_rows(np.arange(start, stop), draw(stop - start, 1 + b, model), sha[start:stop],
                      [""] * (stop - start), np.full(stop - start, DONE))
        if b % 16 == 0:
            print(f"written {stop:,}/{rows:,} rows, {time.perf_counter() - started:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"write_s": round(time.perf_counter() - started, 1), "store_bytes": size}


def queries() -> np.ndarray:
    return draw(N_QUERIES, 10**6, mixture())


def build(rows: int) -> dict:
    """Child: build the IVF-PQ index from the store (as embedstore query does), search, reload."""
    from embedstore.match.query import load_index
    from embedstore.store import FeatureStore

    store = FeatureStore.open(store_path(rows))
    t = time.perf_counter()
    index, table, _ = load_index(store, store.resolve(NAME), kind="ivfpq", rebuild=True, progress=True)
    build_s = time.perf_counter() - t
    build_peak = peak_rss_mb()
    Q = queries()
    t = time.perf_counter()
    _, found = index.search(Q, K)
    query_s = time.perf_counter() - t
    t = time.perf_counter()
    for q in Q[:20]:
        index.search(q[None], K)
    single_s = (time.perf_counter() - t) / 20
    exact, index.exact = index.exact, None
    t = time.perf_counter()
    _, pq_only = index.search(Q, K)
    pq_s = time.perf_counter() - t
    index.exact = exact
    t = time.perf_counter()
    loaded, _, _ = load_index(store, store.resolve(NAME), kind="ivfpq")
    load_s = time.perf_counter() - t
    same = bool((loaded.search(Q[:50], K)[1] == found[:50]).all())
    np.save(OUT / f"found-{rows}.npy", found)
    np.save(OUT / f"pq_only-{rows}.npy", pq_only)
    from embedstore.layout import index_file
    return {"build_s": round(build_s, 1), "build_peak_rss_mb": round(build_peak), "params": index.meta.params,
            "query_s_1000": round(query_s, 2), "query_s_single": round(single_s, 3), "query_pq_only_s_1000":
            round(pq_s, 2), "reload_s": round(load_s, 1), "reloaded_same_results": same,
            "index_file_bytes": index_file(store.path, index.meta.key).stat().st_size, "peak_rss_mb": round(peak_rss_mb())}


def truth(rows: int) -> dict:
    """Child: exact top ``K`` of the queries by cosine, one block of the store at a time."""
    from embedstore.match.index import Rows, normalise
    from embedstore.store import FeatureStore

    store = FeatureStore.open(store_path(rows))
    fs, store_rows = store.usable_rows(NAME)
    Q = normalise(queries())
    best_s = np.full((len(Q), K), -np.inf, dtype=np.float32)
    best_r = np.full((len(Q), K), -1, dtype=np.int64)
    t = time.perf_counter()
    for start, X in Rows.of_feature_set(fs, store_rows).blocks():
        S = Q @ normalise(X).T
        top = np.argpartition(-S, K - 1, axis=1)[:, :K]
        s = np.concatenate([best_s, np.take_along_axis(S, top, axis=1)], axis=1)
        r = np.concatenate([best_r, top + start], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :K]
        best_s, best_r = np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)
    np.save(OUT / f"truth-{rows}.npy", best_r)
    return {"truth_s": round(time.perf_counter() - t, 1), "truth_peak_rss_mb": round(peak_rss_mb())}


def ids_json(rows: int) -> dict:
    """Child: what a sidecar listing every id (format 1) would cost: its size, and the peak RSS of parsing it."""
    text = json.dumps({"ids": [f"syn{i:08d}" for i in range(rows)]})
    path = OUT / "ids.json"
    path.write_text(text)
    del text
    t = time.perf_counter()
    base = rss_mb()
    ids = json.loads(path.read_text())["ids"]
    out = {"ids_json_bytes": path.stat().st_size, "ids_json_parse_s": round(time.perf_counter() - t, 1),
           "ids_json_parsed_mb": round(rss_mb() - base), "n": len(ids)}
    path.unlink()
    return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def child(step: str, rows: int) -> dict:
    """Run ``step`` in a fresh process (its peak memory its own) and return its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--rows", str(rows), "--step", step], stdout=subprocess.PIPE,
                          text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result[f"{step}_child_ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--step", choices=["build", "truth", "ids_json"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.step:
        print(json.dumps({"build": build, "truth": truth, "ids_json": ids_json}[args.step](args.rows)), flush=True)
        return
    results = {"rows": args.rows, "dim": DIM, "distribution": (
        f"mixture of {CLUSTERS} Gaussians (Dirichlet(1) weights) in a {LATENT}-d latent space, centres N(0, I), "
        f"spread {SPREAD}, orthonormal map to {DIM}-d, plus N(0, {NOISE}^2) noise per dimension"),
        "queries": N_QUERIES, "k": K}
    if not (store_path(args.rows) / "zarr.json").is_file():
        results.update(write_store(args.rows))
    for step in ("build", "truth", "ids_json"):
        results.update(child(step, args.rows))
        print(json.dumps(results), flush=True)
    exact = np.load(OUT / f"truth-{args.rows}.npy")
    for name in ("found", "pq_only"):
        got = np.load(OUT / f"{name}-{args.rows}.npy")
        recall = np.mean([len(set(a) & set(e)) / K for a, e in zip(got, exact)])
        results["recall@10" if name == "found" else "recall@10_pq_only"] = round(float(recall), 4)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
