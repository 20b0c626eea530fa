"""Heads at the speed of the cache (issue #12): probes from the HAM10000 store against extracting its features.

    python benchmarks/bench_heads.py                         # plain, tuned and stack, with their baselines
    python benchmarks/bench_heads.py --parts plain,tuned     # some of them

Every ratio's two sides are measured in the same run (the machine is shared; single times vary a lot):

- the baseline: ``embedstore.extract`` of MobileNetV2 from all 10,015 HAM10000 JPEGs into a new store (the
  features the plain and tuned probes read); for the four-view stack, each of its four feature sets extracted
  from the first ``--stack-sample`` images and scaled to 10,015 (a full run of all four takes the better part of
  an hour here; the scaling is stated with the figures);
- ``plain``: a 5-fold lesion-grouped logistic probe (C=1, standardised) of those features, everything included
  (folds, final refit, 1,000-resample CIs, 2-D map, run folder), the report timed apart; beside it the same
  protocol written directly in scikit-learn, at its default tolerance (what a notebook gets) and, with
  ``--converged-reference``, converged;
- ``tuned``: the same with C tuned (class weights balanced) over ``--trials`` values per study, nested (a study
  per outer fold on 3 inner folds, one for the final head);
- ``stack``: the four-view stack of benchmarks/bench_probe.py (each encoder's stage features at 224 px and at
  320 px keeping the whole shorter side; logistic bases + LightGBM with age/sex/localization; balanced decision).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, HAM_STORE, encoder_options, ham_store  # noqa: E402

from embedstore.probe import ProbeConfig, run_probe  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "heads"
STACK_FEATURES = [f"{e}-stages{size}" for e in ("mobilenet_v2", "efficientnet_lite0") for size in ("", "-320px-crop100")]
STACK = {"heads": ["stack"], "stack_heads": ["logreg"], "stack_joint": ["lgbm"],
         "metadata": ["age", "sex", "localization"], "inner_folds": 3,
         "params": {"logreg": {"C": 0.01, "class_weight": "balanced"}, "lgbm": {"class_weight": "balanced"}},
         "decision": "balanced"}


def extract_seconds(name: str, rows: int | None = None) -> float:
    """Seconds ``embedstore.extract`` takes for feature set ``name`` of the first ``rows`` HAM10000 images (all:
    None) into a new store, scaled to all 10,015 images."""
    import pandas as pd

    from embedstore import create_encoder, extract, open_source

    table = pd.read_csv(HAM / "HAM10000_metadata.csv")
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "images.csv"
        table.iloc[:rows].to_csv(csv, index=False)
        source = open_source(csv, images=HAM / "images", id_col="image_id")
        encoder = create_encoder(**encoder_options(name))
        t0 = time.perf_counter()
        extract(source, encoder, Path(tmp) / "store.zarr", progress=False)
        seconds = time.perf_counter() - t0
    return seconds * len(table) / len(table.iloc[:rows])


def probe(name: str, **options):
    """A probe of the full HAM10000 store with the benchmark protocol; returns (run, seconds, report seconds)."""
    from embedstore.report import write_report

    cfg = ProbeConfig.from_dict({"store": str(HAM_STORE), "target": "dx", "groups": "lesion_id", "folds": 5,
                                 "seed": 0, "n_boot": 1000, "report": False, "out": str(OUT / name),
                                 "overwrite": True, "storage": f"sqlite:///{OUT / name}.optuna.db", **options})
    Path(f"{OUT / name}.optuna.db").unlink(missing_ok=True)  # a fresh study: the tuning is timed, not reused
    t0 = time.perf_counter()
    run = run_probe(cfg)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_report(run.path)
    return run, seconds, time.perf_counter() - t0


def sklearn_reference(encoder: str, tol: float) -> dict:
    """The plain probe written directly in scikit-learn on embedstore's folds: StandardScaler + LogisticRegression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from embedstore.splits import group_kfold

    X, table = FeatureStore.open(HAM_STORE).load(encoder)
    classes, y = np.unique(table["dx"].to_numpy(), return_inverse=True)
    oof = np.zeros((len(y), len(classes)))
    t0 = time.perf_counter()
    for train, test in group_kfold(y, table["lesion_id"].to_numpy(), 5, 0):
        scaler = StandardScaler().fit(X[train])
        model = LogisticRegression(C=1.0, tol=tol, max_iter=10000).fit(scaler.transform(X[train]), y[train])
        oof[test] = model.predict_proba(scaler.transform(X[test]))
    return {"balanced_accuracy": balanced_accuracy_score(y, oof.argmax(1)),
            "roc_auc": roc_auc_score(y, oof, multi_class="ovr"), "seconds": time.perf_counter() - t0}


def show(title: str, run, seconds: float, report: float, baseline: float) -> None:
    m = run.metrics.metrics
    print(f"{title}: {seconds:.1f} s = {seconds / baseline:.3f}x the extraction ({baseline:.0f} s); report {report:.1f} s")
    print(f"  balanced accuracy {m['balanced_accuracy'].format()}, macro AUC {m['roc_auc'].format()}", flush=True)


def part_plain(baseline: float, converged: bool) -> None:
    run, seconds, report = probe("plain", features=["mobilenet_v2"], heads=["logreg"],
                                 params={"logreg": {"C": 1.0}})
    show("plain logistic probe (C=1), mobilenet_v2", run, seconds, report, baseline)
    for tol in (1e-4, 1e-6) if converged else (1e-4,):
        ref = sklearn_reference("mobilenet_v2", tol)
        print(f"  scikit-learn directly, tol={tol:g}: balanced accuracy {ref['balanced_accuracy']:.4f}, macro AUC "
              f"{ref['roc_auc']:.4f} ({ref['seconds']:.1f} s for the five fold fits)", flush=True)


def part_tuned(baseline: float, trials: int) -> None:
    run, seconds, report = probe("tuned", features=["mobilenet_v2"], heads=["logreg"], trials=trials,
                                 inner_folds=3, params={"logreg": {"class_weight": "balanced"}})
    show(f"tuned logistic probe ({trials} values of C per nested study), mobilenet_v2", run, seconds, report, baseline)


def part_stack(sample: int) -> None:
    baseline = sum(extract_seconds(name, sample) for name in STACK_FEATURES)
    run, seconds, report = probe("stack", features=["+".join(STACK_FEATURES)], **STACK)
    show(f"four-view stack (extraction of its four sets scaled from {sample} images)", run, seconds, report, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="plain,tuned,stack")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--stack-sample", type=int, default=1000)
    parser.add_argument("--converged-reference", action="store_true",
                        help="also scikit-learn at tol 1e-6 beside the plain probe (about 2 min per fold)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    ham_store(encoders=["mobilenet_v2", *(STACK_FEATURES if "stack" in parts else [])])
    if {"plain", "tuned"} & set(parts):
        baseline = extract_seconds("mobilenet_v2")
        print(f"baseline: embedstore extract of mobilenet_v2, all 10,015 images: {baseline:.1f} s", flush=True)
        if "plain" in parts:
            part_plain(baseline, args.converged_reference)
        if "tuned" in parts:
            part_tuned(baseline, args.trials)
    if "stack" in parts:
        part_stack(args.stack_sample)


if __name__ == "__main__":
    main()
