"""Report benchmark: the report of a 100-trial Optuna study and a 5-run comparison, timed (target < 10 s).

Inputs are real and built once into benchmarks/out/report/ (``--rebuild`` redoes them):
* a 100-trial study of the probe's own tuning (``embedstore.tune.tune``, kNN head search space:
  k, temperature, class weight) on 3 lesion-grouped folds of 3,000 HAM10000 images'
  MobileNetV2 features (first 64 principal components);
* 5 match run folders (``embedstore.match.run.run_match``): encoders x grouping methods.

Then it times, in one process, ``write_report`` of the study and ``write_comparison`` of the 5 runs
(the issue's target), and, for orientation, the report of each match run, the start-up of the
command line alone (a fresh Python process: the baseline the reports are compared with, as this
machine's timings are noisy) and the same two reports through the command line.

    .venv/bin/python benchmarks/bench_report.py [--store stores/ham10000.zarr] [--rebuild]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import HAM_STORE, ROOT  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "report"
STUDY = "bench:dx:knn:100"
MATCH_RUNS = [  # (feature set, method)
    ("mobilenet_v2", "threshold"),
    ("mobilenet_v2", "dbscan"),
    ("mobilenet_v2", "agglomerative"),
    ("efficientnet_lite0", "threshold"),
    ("efficientnet_lite0", "dbscan"),
]


def build_study(store: Path, storage: str, n_trials: int = 100, max_rows: int = 3000) -> None:
    from sklearn.decomposition import PCA
    from sklearn.metrics import balanced_accuracy_score

    from embedstore.heads.knn import KNNHead
    from embedstore.splits import group_kfold
    from embedstore.store import FeatureStore
    from embedstore.tune import tune

    X, table = FeatureStore.open(store).load("mobilenet_v2")
    rows = np.random.default_rng(0).permutation(len(X))[:max_rows]
    X, table = X[rows], table.iloc[rows].reset_index(drop=True)
    # One PCA up front keeps the 300 fits cheap; the study only has to be real, not leak-free.
    X = PCA(n_components=64, svd_solver="randomized", random_state=0).fit_transform(X).astype(np.float32)
    classes, y = np.unique(table["dx"].astype(str), return_inverse=True)
    folds = group_kfold(y, table["lesion_id"].astype(str).to_numpy(), n_splits=3, seed=0)

    def balanced_accuracy(y_true, proba, y_pred):
        return balanced_accuracy_score(y_true, y_pred)

    start = time.perf_counter()
    tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, n_trials=n_trials,
         storage=storage, study_name=STUDY, seed=0)
    print(f"built study {STUDY}: {n_trials} trials on {len(X)} images in {time.perf_counter() - start:.0f} s")


def build_runs(store: Path) -> list[Path]:
    from embedstore.match.config import MatchConfig
    from embedstore.match.run import run_match
    from embedstore.store import FeatureStore

    available = {info.name for info in FeatureStore.open(store).feature_sets() if info.n_done}
    runs = []
    for features, method in MATCH_RUNS:
        centre = True
        if features not in available:  # a store with one encoder: vary the centring instead
            features, centre = "mobilenet_v2", False
        out = OUT / (f"match-{features}-{method}" + ("" if centre else "-uncentred"))
        if not (out / "run.json").is_file():
            start = time.perf_counter()
            config = MatchConfig(store=str(store), features=[features], groups="lesion_id", method=method, n_boot=200,
                                 centre=centre, report=False, write_features=False, out=str(out), overwrite=True)
            run_match(config)
            print(f"built {out.name} in {time.perf_counter() - start:.0f} s")
        runs.append(out)
    return runs


def timed(label: str, fn) -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"{label:<58} {seconds:6.2f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=HAM_STORE)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    if args.rebuild and OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True, exist_ok=True)
    db = OUT / "studies.db"
    storage = f"sqlite:///{db}"
    build_study(args.store, storage)  # resumes: a finished study runs no trial
    runs = build_runs(args.store)

    from embedstore.report import write_comparison, write_report

    print()
    study_s = timed("report of the 100-trial study (write_report)", lambda: write_report(db, out=OUT / "study-report", study=STUDY))
    compare_s = timed("comparison of 5 runs (write_comparison)", lambda: write_comparison(runs, OUT / "comparison"))
    print(f"{'TOTAL (target < 10 s)':<58} {study_s + compare_s:6.2f} s")
    print()
    for run in runs:
        timed(f"match run report ({run.name})", lambda run=run: write_report(run))
    cli = [sys.executable, "-m", "embedstore.cli"] if (ROOT / "embedstore" / "cli" / "__main__.py").exists() else [
        sys.executable, "-c", "from embedstore.cli import main; main()"]
    startup = timed("baseline: CLI start-up alone (embedstore --help, new process)", lambda: subprocess.run(
        [*cli, "--help"], check=True, capture_output=True))
    print(f"{'in-process reports / CLI start-up':<58} {(study_s + compare_s) / startup:6.2f} x")
    timed("CLI: embedstore report studies.db --study ... (new process)", lambda: subprocess.run(
        [*cli, "report", str(db), "--study", STUDY, "--out", str(OUT / "study-report-cli")], check=True,
        capture_output=True))
    timed("CLI: embedstore report --compare 5 runs (new process)", lambda: subprocess.run(
        [*cli, "report", "--compare", *map(str, runs), "--out", str(OUT / "comparison-cli")], check=True,
        capture_output=True))


if __name__ == "__main__":
    main()
