"""Grouped bootstrap CIs of the probe's headline metrics: one bootstrap_ci per metric against one bootstrap_metrics.

    python benchmarks/bench_bootstrap.py [--n-boot 1000] [--rows N]

On the full HAM10000 store (MobileNetV2 features, 10,015 rows, groups = lesion_id), in one process: a logistic
regression (C=1) fitted on all rows gives the probabilities (7 classes, and melanoma vs rest), the decision is
the argmax. Then the four multiclass headline CIs and the five binary ones, 1,000 resamples by lesion, seed 0,
first as the probe computes them today (``bootstrap_ci`` once per metric), then with ``bootstrap_metrics``
(all at once). Prints both times (wall and CPU seconds; the machine may be shared) and the largest difference
between the two sets of intervals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM_STORE, timed  # noqa: E402

from embedstore.metrics import bootstrap_ci, bootstrap_metrics, metric_functions  # noqa: E402
from embedstore.probe.protocol import BINARY_HEADLINE, MULTICLASS_HEADLINE  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402


def problems(rows: int | None) -> dict[str, tuple]:
    """(headline names, y, proba, y_pred, groups) of the multiclass dx problem and of melanoma vs rest."""
    X, table = FeatureStore.open(HAM_STORE).load("mobilenet_v2")
    if rows:
        X, table = X[:rows], table.iloc[:rows]
    classes = sorted(table["dx"].unique())
    y = table["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    groups = table["lesion_id"].to_numpy()
    out = {}
    for name, target, headline in (("multiclass", y, MULTICLASS_HEADLINE),
                                   ("melanoma", (y == classes.index("mel")).astype(int), BINARY_HEADLINE)):
        proba = LogisticRegression(C=1.0, max_iter=300).fit(X, target).predict_proba(X)
        out[name] = (headline, target, proba, proba.argmax(1), groups)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows of the store")
    args = parser.parse_args()
    with threadpool_limits(limits=1):
        for name, (headline, y, proba, pred, groups) in problems(args.rows).items():
            table = metric_functions(proba.shape[1])
            (old, old_wall, old_cpu), (new, new_wall, new_cpu) = timed(
                lambda: {m: bootstrap_ci(table[m], y, proba, pred, groups=groups, n_boot=args.n_boot) for m in headline}
            ), timed(lambda: bootstrap_metrics(headline, y, proba, pred, groups=groups, n_boot=args.n_boot))
            diff = max(abs(a - b) for m in headline for a, b in zip(old[m], new[m]))
            print(f"{name}: {len(y)} rows, {len(headline)} CIs x {args.n_boot} resamples: bootstrap_ci {old_wall:.2f} s "
                  f"({old_cpu:.2f} CPU-s), bootstrap_metrics {new_wall:.2f} s ({new_cpu:.2f} CPU-s): "
                  f"{old_wall / new_wall:.0f}x; largest difference {diff:.1e}")
            for m in headline:
                print(f"  {m}: {new[m].value:.4f} [{new[m].low:.4f}, {new[m].high:.4f}]")


if __name__ == "__main__":
    main()
