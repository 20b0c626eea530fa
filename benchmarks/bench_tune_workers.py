"""Tuning studies shared by several workers (issue #13): 100 trials with 1, 2 and 4 workers on each storage.

    python benchmarks/bench_tune_workers.py                          # PostgreSQL, journal file, sqlite
    python benchmarks/bench_tune_workers.py --storages journal --workers 1,2

One study per run: the kNN head (TPE over k, temperature and class weights, median pruning over the folds) on all
10,015 MobileNetV2 embeddings of HAM10000 in ``stores/ham10000.zarr`` (``make demo``-style extraction of the full
set: ``embedstore extract ../shared/data/ham10000/metadata.csv --store stores/ham10000.zarr``), 3 lesion-grouped
folds, balanced accuracy, seed 0, through :func:`embedstore.tune.tune` as the probe calls it. Each run has a new
storage: a database on a throw-away PostgreSQL server (``tools/postgres_server.py``), a new journal file, a new
sqlite file. Wall time counts from the call to the best value returned, workers' start included.

On this machine's 2 cores the workers share the CPU (each gets ``cores // workers`` BLAS and OpenMP threads), so
the figures say what sharing a study costs and whether the storage keeps up, not what more machines would give.
With TPE the best value differs between runs: the trials depend on which others had finished when each was
sampled. Figures go to stdout and ``benchmarks/out/tune_workers/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from postgres_server import PostgresServer  # noqa: E402

from embedstore.heads import KNNHead  # noqa: E402
from embedstore.metrics import metric_functions  # noqa: E402
from embedstore.splits import group_kfold  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402
from embedstore.tune import tune  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "tune_workers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=str(ROOT / "stores" / "ham10000.zarr"))
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--storages", default="postgresql,journal,sqlite")
    args = parser.parse_args()

    X, table = FeatureStore.open(args.store).load("mobilenet_v2")
    y = np.unique(table["dx"], return_inverse=True)[1]
    folds = group_kfold(y, table["lesion_id"].to_numpy(), n_splits=3, seed=0)
    metric = metric_functions(len(np.unique(y)))["balanced_accuracy"]
    print(f"{len(y)} rows x {X.shape[1]} features, 3 lesion-grouped folds, {args.trials} trials per run", flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    kinds = args.storages.split(",")
    with (PostgresServer() if "postgresql" in kinds else nullcontext()) as server, \
            tempfile.TemporaryDirectory() as folder:
        for kind in kinds:
            for workers in map(int, args.workers.split(",")):
                name = f"{kind}_{workers}"
                storage = {"postgresql": lambda: server.database(name),
                           "journal": lambda: f"{folder}/{name}.journal",
                           "sqlite": lambda: f"sqlite:///{folder}/{name}.db"}[kind]()
                t0 = time.perf_counter()
                best, study = tune(KNNHead(), "knn", X, y, folds, metric, args.trials, storage, "bench", seed=0,
                                   workers=workers)
                seconds = time.perf_counter() - t0
                finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
                complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
                row = {"storage": kind, "workers": workers, "seconds": round(seconds, 1), "trials": len(finished),
                       "pruned": len(finished) - len(complete), "best": round(max(t.value for t in complete), 4),
                       "owners": len({t.user_attrs["owner"] for t in finished}), "best_params": best}
                results.append(row)
                print(f"{kind:10s} {workers} worker(s): {seconds:6.1f} s, {len(finished)} trials "
                      f"({row['pruned']} pruned) by {row['owners']} processes, best balanced accuracy {row['best']}",
                      flush=True)
                (OUT / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
