"""Probe benchmarks on the full HAM10000 store (10,015 images, offline MobileNetV2 + EfficientNet-Lite0).

Protocol everywhere: 5-fold StratifiedGroupKFold by lesion_id, seed 0, out-of-fold metrics with
grouped bootstrap 95% CIs (1000 resamples by lesion).

    python benchmarks/bench_probe.py                      # every part
    python benchmarks/bench_probe.py --parts plain,study  # some of them

Parts:
  plain  logistic regression (C=1) and kNN (k=20) per encoder through `embedstore probe`, beside the same
         protocol written directly in scikit-learn; wall time against re-extracting the features
  tuned  logistic regression with class weights, C tuned by nested Optuna studies (inner group folds)
  stack  both encoders' stage features (pooling="stages") at two input sizes (the default 224 px crop, and
         320 px keeping the whole shorter side): a logistic probe each + LightGBM on all with
         age/sex/localization, stacked, balanced decision
  mel    melanoma vs rest: the stack and its bases, ROC AUC and partial AUC above 80% TPR
  meltuned  the same with every base tuned for pAUC by nested Optuna studies (--trials per study)
  pooling  each encoder's last-layer features against its stage features (pooling="stages"), logistic probes
  study  wall time of one 50-trial Optuna study (kNN on MobileNetV2, median pruning across folds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, HAM_STORE, ham_store  # noqa: E402
import common  # noqa: E402

from embedstore.probe import ProbeConfig, run_probe  # noqa: E402
from embedstore.runs import Run  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "probe"
ENCODERS = list(common.ENCODERS)  # --encoders narrows it
# Four views: each encoder's stage features at 224 and at 320 px; --stack-features changes it.
STACK_FEATURES = [f"{encoder}-stages{size}" for encoder in common.ENCODERS for size in ("", "-320px-crop100")]
BOOT = 1000


def _needed(parts: list[str]) -> list[str]:
    """The feature sets the chosen parts read (a part never waits for an extraction it does not use)."""
    names = list(ENCODERS)
    if "pooling" in parts:
        names += [f"{encoder}-stages" for encoder in ENCODERS]
    if {"stack", "mel", "meltuned"} & set(parts):
        names += STACK_FEATURES
    return list(dict.fromkeys(names))


def _store(parts: list[str]) -> FeatureStore:
    store = FeatureStore.open(HAM_STORE) if (HAM_STORE / "zarr.json").is_file() else None
    names = _needed(parts)
    if store is None or any(_n_done(store, e) < len(store.manifest) for e in names):
        ham_store(encoders=names)
        store = FeatureStore.open(HAM_STORE)
    return store


def _n_done(store: FeatureStore, name: str) -> int:
    return store.info(name).n_done if name in {i.name for i in store.feature_sets()} else 0


def _show(title: str, run: Run, names: list[str]) -> None:
    print(f"\n{title}")
    for model, metrics in run.metrics.models.items():
        cells = "  ".join(f"{n} {metrics[n].format()}" for n in names)
        print(f"  {model:<70} {cells}")


def _probe(name: str, **options) -> tuple[Run, float]:
    cfg = ProbeConfig.from_dict({"store": str(HAM_STORE), "target": "dx", "groups": "lesion_id", "folds": 5,
                                 "seed": 0, "n_boot": BOOT, "report": False, "out": str(OUT / name), "overwrite": True,
                                 "storage": f"sqlite:///{OUT / 'studies.db'}", **options})
    t0 = time.perf_counter()
    run = run_probe(cfg)
    return run, time.perf_counter() - t0


def sklearn_direct(store: FeatureStore, encoder: str) -> dict:
    """The plain probe written directly in scikit-learn: same folds, scaler and solver, nothing of embedstore."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, table = store.load(encoder)
    y, groups = table["dx"].to_numpy(), table["lesion_id"].to_numpy()
    classes = np.unique(y)
    oof = np.zeros((len(y), len(classes)))
    t0 = time.perf_counter()
    for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(X, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(X[train], y[train])
        oof[test] = model.predict_proba(X[test])
    return {"balanced_accuracy": balanced_accuracy_score(y, classes[oof.argmax(1)]),
            "roc_auc": roc_auc_score(y, oof, multi_class="ovr", average="macro"),
            "seconds": time.perf_counter() - t0}


def reextract_seconds(store: FeatureStore, encoder: str, n: int = 256) -> float:
    """Seconds to re-extract ``encoder`` features of all images, from a timed sample of ``n`` (CPU, this machine)."""
    from embedstore.encoders import create_encoder
    from embedstore.extraction import embed_images

    enc = create_encoder(encoder)
    paths = [HAM / "images" / f"{i}.jpg" for i in store.manifest["id"].iloc[:n]]
    embed_images(enc, paths[:16], device="cpu")  # warm-up
    t0 = time.perf_counter()
    embed_images(enc, paths, device="cpu")
    return (time.perf_counter() - t0) / n * len(store.manifest)


def part_plain(store: FeatureStore) -> None:
    run, seconds = _probe("plain", features=list(ENCODERS), heads=["logreg", "knn"],
                          params={"logreg": {"C": 1.0, "norm": "standard"}, "knn": {"k": 20}})
    _show(f"plain probes, 5-fold OOF ({seconds:.0f} s for {len(run.metrics.models)} models, incl. CIs and t-SNE)",
          run, ["balanced_accuracy", "roc_auc"])
    print("\nsame protocol directly in scikit-learn (logistic regression, C=1, standardised):")
    for encoder in ENCODERS:
        ref = sklearn_direct(store, encoder)
        ours = run.metrics.models[f"{encoder} × logreg"]
        diffs = {m: abs(ours[m].value - ref[m]) for m in ("balanced_accuracy", "roc_auc")}
        print(f"  {encoder:<20} sklearn bal.acc {ref['balanced_accuracy']:.4f} AUC {ref['roc_auc']:.4f} "
              f"| embedstore {ours['balanced_accuracy'].value:.4f} / {ours['roc_auc'].value:.4f} "
              f"| max |diff| {max(diffs.values()):.2e} | sklearn fits {ref['seconds']:.0f} s")
    _, one = _probe("plain_one", features=[ENCODERS[0]], heads=["logreg"], params={"logreg": {"C": 1.0}})
    extract = reextract_seconds(store, ENCODERS[0])
    print(f"\nwall time, {ENCODERS[0]} 5-fold logreg probe from the store: {one:.0f} s; re-extracting its features "
          f"(estimated from 256 images): {extract:.0f} s; extract+probe / probe = {(extract + one) / one:.1f}x")


def part_tuned(store: FeatureStore, trials: int) -> None:
    for encoder in ENCODERS:
        run, seconds = _probe(f"tuned_{encoder}", features=[encoder], heads=["logreg"], trials=trials,
                              inner_folds=3, params={"logreg": {"class_weight": "balanced"}})
        _show(f"tuned logreg ({trials} trials per nested study, {seconds:.0f} s)", run,
              ["balanced_accuracy", "roc_auc"])


def _stack_options() -> dict:
    return {"features": ["+".join(STACK_FEATURES)], **STACK}


STACK = {"heads": ["stack"], "stack_heads": ["logreg"], "stack_joint": ["lgbm"],
         "metadata": ["age", "sex", "localization"], "inner_folds": 3,
         "params": {"logreg": {"C": 0.01, "class_weight": "balanced"}, "lgbm": {"class_weight": "balanced"}},
         "decision": "balanced"}


def part_stack(store: FeatureStore) -> None:
    run, seconds = _probe("stack", **_stack_options())
    _show(f"stack of {' + '.join(STACK_FEATURES)}: logreg each + LightGBM on all with age/sex/localization, "
          f"balanced decision ({seconds:.0f} s)",
          run, ["balanced_accuracy", "roc_auc"])


def part_mel(store: FeatureStore) -> None:
    # A ranking metric: the logistic bases go without class weights (they would only distort the scores the
    # meta-learner ranks by); everything else is the stack recipe above.
    options = _stack_options()
    options["params"] = {**options["params"], "logreg": {"C": STACK["params"]["logreg"]["C"]}}
    run, seconds = _probe("mel", positive="mel", metric="pauc_80", **options)
    _show(f"melanoma vs rest ({seconds:.0f} s)", run, ["roc_auc", "pauc_80"])


def part_meltuned(store: FeatureStore, trials: int) -> None:
    options = {**_stack_options(), "params": {}, "trials": trials}  # every base's parameters searched, nested
    run, seconds = _probe("meltuned", positive="mel", metric="pauc_80", **options)
    _show(f"melanoma vs rest, stack with every base tuned for pauc_80 ({trials} trials per nested study, "
          f"{seconds:.0f} s)", run, ["roc_auc", "pauc_80"])


def part_pooling(store: FeatureStore) -> None:
    sets = [name for encoder in ENCODERS for name in (encoder, f"{encoder}-stages")]
    for title, options in (
        ("7-class, logreg C=0.01 balanced, balanced accuracy", {"params": {"logreg": {"C": 0.01, "class_weight": "balanced"}}}),
        ("melanoma vs rest, logreg C=0.01", {"positive": "mel", "params": {"logreg": {"C": 0.01}}}),
    ):
        run, seconds = _probe(f"pooling_{options.get('positive', 'dx')}", features=sets, heads=["logreg"],
                              tsne_max=200, **options)
        _show(f"last layer vs stages: {title} ({seconds:.0f} s)", run,
              ["balanced_accuracy", "roc_auc"] if "positive" not in options else ["roc_auc", "pauc_80"])


def part_study(store: FeatureStore) -> None:
    from embedstore.heads import KNNHead
    from embedstore.metrics import metric_functions
    from embedstore.splits import group_kfold
    from embedstore.tune import tune

    X, table = store.load(ENCODERS[0])
    y = np.unique(table["dx"], return_inverse=True)[1]
    folds = group_kfold(y, table["lesion_id"].to_numpy(), 5, seed=0)
    t0 = time.perf_counter()
    balanced_accuracy = metric_functions(7)["balanced_accuracy"]
    best, study = tune(KNNHead(), "knn", X, y, folds, balanced_accuracy, 50, f"sqlite:///{OUT / 'study50.db'}",
                       f"knn50-{time.time():.0f}", seed=0)
    seconds = time.perf_counter() - t0
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    print(f"\n50-trial Optuna study (kNN, {ENCODERS[0]}, 5 group folds): {seconds:.0f} s, {pruned} trials pruned, "
          f"best balanced accuracy {study.best_value:.3f} with {best}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="plain,tuned,stack,mel,pooling,study")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--encoders", default=",".join(common.ENCODERS))
    parser.add_argument("--stack-features", default=",".join(STACK_FEATURES))
    args = parser.parse_args()
    ENCODERS[:] = args.encoders.split(",")
    STACK_FEATURES[:] = args.stack_features.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    from threadpoolctl import threadpool_limits

    store = _store(args.parts.split(","))
    print(f"store {HAM_STORE}: {len(store.manifest)} images; encoders {', '.join(ENCODERS)}")
    with threadpool_limits(limits=1, user_api="blas"):  # as the probe runs, so the sklearn baseline is comparable
        for part in args.parts.split(","):
            t0 = time.perf_counter()
            if part in ("tuned", "meltuned"):
                globals()[f"part_{part}"](store, args.trials)
            else:
                globals()[f"part_{part}"](store)
            print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
