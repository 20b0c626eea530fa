"""Figures and tables shared by every report kind: metrics with CIs, per-fold tables."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from embedstore.report import style
from embedstore.report.document import Block, Cell, Figure, Heading, Note, Table
from embedstore.report.runs import Estimate, Run

# Metrics where smaller is better; every other metric is taken as larger-is-better.
_LOWER_IS_BETTER = ("loss", "brier", "ece", "error")


def lower_is_better(metric: str) -> bool:
    return any(token in metric.lower() for token in _LOWER_IS_BETTER)


def is_count(metric: str) -> bool:
    """Counts (numbers of clusters, images, ...) are shown but never ranked."""
    name = metric.lower()
    return name.startswith("n_") or name.endswith("_count") or "clusters" in name


def pretty(metric: str) -> str:
    """``balanced_accuracy`` -> ``balanced accuracy``; keeps acronyms such as AUC readable."""
    words = metric.replace("_", " ").split()
    spelled = {"auc": "AUC", "pauc": "pAUC", "roc": "ROC", "pr": "PR", "ap": "AP", "map": "mAP",
               "f1": "F1", "tpr": "TPR", "fpr": "FPR", "ece": "ECE", "ci": "CI"}
    return " ".join(spelled.get(w.lower(), w) for w in words)


def metrics_table(estimates: Mapping[str, Estimate], names: Sequence[str], caption: str = "") -> Table:
    rows = []
    for name in names:
        est = estimates[name]
        ci = f"[{est.ci_low:.3f}, {est.ci_high:.3f}]" if est.has_ci else "–"
        value = est.format().split(" [")[0]
        rows.append([pretty(name), value, ci])
    return Table(["metric", "value", "95% CI"], rows, caption)


def models_table(models: Mapping[str, Mapping[str, Estimate]], names: Sequence[str], caption: str = "") -> Table:
    """One row per model, one column per metric, the best of each column in bold."""
    model_names = list(models)
    best = {name: best_rows([models[m].get(name) for m in model_names], name) for name in names}
    rows = []
    for i, model in enumerate(model_names):
        row: list = [model]
        for name in names:
            est = models[model].get(name)
            row.append(estimate_cell(est, bold=i in best[name]))
        rows.append(row)
    return Table(["model", *[pretty(n) for n in names]], rows, caption)


def estimate_cell(est: Estimate | None, bold: bool = False) -> Cell:
    """A table cell with the point estimate (bold if best) and its CI as a note."""
    if est is None:
        return Cell("–")
    value, _, ci = est.format().partition(" ")
    return Cell(value, bold=bold, note=ci)


def best_rows(estimates: Sequence[Estimate | None], metric: str) -> set[int]:
    """Indices of the best point estimate (ties included); empty for counts or with < 2 values."""
    values = [e.value if e is not None else math.nan for e in estimates]
    finite = [v for v in values if not math.isnan(v)]
    if is_count(metric) or len(finite) < 2:
        return set()
    target = min(finite) if lower_is_better(metric) else max(finite)
    return {i for i, v in enumerate(values) if not math.isnan(v) and math.isclose(v, target, abs_tol=1e-12)}


def folds_table(folds: pd.DataFrame, caption: str = "") -> Table:
    """The per-fold metrics with a mean ± sd row; counts shown as integers, empty columns left out."""
    folds = folds.dropna(axis=1, how="all")
    columns = list(folds.columns)
    rows = []
    for _, record in folds.iterrows():
        rows.append([_fmt(record[c], c) for c in columns])
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(folds[c])]
    summary = []
    for c in columns:
        if c == columns[0]:
            summary.append(Cell("mean ± sd", bold=True))
        elif c in numeric and not _is_count_column(c):
            summary.append(Cell(f"{folds[c].mean():.3f} ± {folds[c].std(ddof=1):.3f}", bold=True))
        else:
            summary.append("")
    rows.append(summary)
    return Table([pretty(c) if c not in ("fold", "n_train", "n_test") else c for c in columns], rows, caption)


def _is_count_column(column: str) -> bool:
    return column in ("fold", "n_train", "n_test") or is_count(column)


def _fmt(value, column: str) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        if _is_count_column(column) and float(value).is_integer():
            return str(int(value))
        return f"{value:.3f}"
    return str(value)


def interval_figure(
    series: Mapping[str, Mapping[str, Estimate]],
    names: Sequence[str],
    title: str,
) -> bytes | None:
    """Point estimates with 95% CIs: one panel row per metric, one marker per series (model or run).

    Only metrics with values in [0, 1] are drawn (they share an axis); returns None if none qualify.
    """
    names = [
        n for n in names
        if not is_count(n)
        and any(n in s for s in series.values())
        and all(0.0 <= s[n].value <= 1.0 for s in series.values() if n in s and not math.isnan(s[n].value))
    ]
    if not names:
        return None
    labels = list(series)
    with style.styled():
        height = 1.0 + 0.42 * len(names) * max(1, len(labels)) ** 0.75 + (0.3 * len(labels) if len(labels) > 1 else 0)
        fig = style.new_figure(7.2, min(max(2.6, height), 13))
        ax = fig.add_subplot()
        step = 0.8 / max(1, len(labels))
        for j, label in enumerate(labels):
            ys, xs, lo, hi = [], [], [], []
            for i, name in enumerate(names):
                est = series[label].get(name)
                if est is None or math.isnan(est.value):
                    continue
                ys.append(i + (j - (len(labels) - 1) / 2) * step)
                xs.append(est.value)
                lo.append(est.value - est.ci_low if est.has_ci else 0.0)
                hi.append(est.ci_high - est.value if est.has_ci else 0.0)
            ax.errorbar(
                xs, ys, xerr=[lo, hi], fmt="o", color=style.color(j), ecolor=style.color(j),
                elinewidth=2, capsize=3, markersize=6, label=label,
            )
        ax.set_yticks(range(len(names)), [pretty(n) for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("value (point estimate and 95% bootstrap CI)")
        ax.set_title(title)
        ax.grid(axis="y", visible=False)
        if len(labels) > 1:
            fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=1)
        return style.to_png(fig)


def headline_section(run: Run, caption: str) -> list[Block]:
    """A run report's "Headline metrics" section: every metric (headline first) with its CI, and their chart.

    ``caption`` says how the intervals were made; the image and group counts are appended to it.
    """
    blocks: list[Block] = [Heading("Headline metrics")]
    if not run.metrics:
        return blocks + [Note("metrics.json is missing or empty.")]
    n, groups = run.metrics_doc.get("n"), run.metrics_doc.get("n_groups")
    if n is not None:
        caption += f"; {n} images" + (f" in {groups} groups" if groups is not None else "")
    names = run.headline + [n for n in run.metrics if n not in run.headline]
    blocks.append(metrics_table(run.metrics, names, caption + ". Headline metrics first."))
    png = interval_figure({run.model_label: run.metrics}, run.headline, "Headline metrics with 95% CIs")
    if png:
        blocks.append(Figure("headline", png, "Point estimates and 95% bootstrap confidence intervals."))
    return blocks
