"""Figures and tables shared by every report kind: metrics with CIs, models side by side, per-fold tables.

Which metric is better, how a metric is spelled and which models a run compared come from
:mod:`embedstore.runs.comparison`, the one place a comparison is laid out; this module only
turns them into report blocks and charts.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from embedstore.report import style
from embedstore.report.document import Block, Cell, Figure, Heading, Note, Table
from embedstore.runs import Run
from embedstore.runs.comparison import ComparisonRow, comparison_frame, is_count, pretty
from embedstore.runs.record import Estimate, Metrics


def headline_names(metrics: Metrics) -> list[str]:
    """The run's headline metrics that it has values for (every metric when it names none)."""
    names = [name for name in metrics.headline if name in metrics.metrics]
    return names or list(metrics.metrics)


def metrics_table(estimates: Mapping[str, Estimate], names: Sequence[str], caption: str = "") -> Table:
    rows = []
    for name in names:
        est = estimates[name]
        ci = f"[{est.ci_low:.3f}, {est.ci_high:.3f}]" if est.has_ci else "–"
        value = est.format().split(" [")[0]
        rows.append([pretty(name), value, ci])
    return Table(["metric", "value", "95% CI"], rows, caption)


def row_labels(rows: Sequence[ComparisonRow], reported: str | None = None) -> list[str]:
    """``features × head`` per row as the comparison table shows it (the run added where two rows
    would read the same), ``(reported)`` after the model a run reports."""
    models = comparison_frame(rows, [])["model"]
    return [f"{row.features} × {model}" + (" (reported)" if row.label == reported else "")
            for row, model in zip(rows, models)]


def comparison_table(rows: Sequence[ComparisonRow], names: Sequence[str], caption: str = "",
                     reported: str | None = None) -> Table:
    """One row per model (:func:`embedstore.runs.comparison.comparison_frame`), each metric's value
    with its CI under it, the best of each column in bold; ``reported`` marks the run's own model."""
    frame = comparison_frame(rows, names)
    body = []
    for i, row in enumerate(rows):
        model = frame["model"][i] + (" (reported)" if row.label == reported else "")
        body.append([row.features, model, *[estimate_cell(row.estimates.get(name), bold=bool(frame[f"{name}_best"][i]))
                                            for name in names]])
    return Table(["features", "head / method", *[pretty(n) for n in names]], body, caption)


def estimate_cell(est: Estimate | None, bold: bool = False) -> Cell:
    """A table cell with the point estimate (bold if best) and its CI as a note."""
    if est is None:
        return Cell("–")
    value, _, ci = est.format().partition(" ")
    return Cell(value, bold=bold, note=ci)


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
    metrics = run.metrics
    blocks: list[Block] = [Heading("Headline metrics"), *(Note(line) for line in run.record.notes())]
    if not metrics.metrics:
        return blocks + [Note("metrics.json holds no metric.")]
    caption += f"; {metrics.n} images" + (f" in {metrics.n_groups} groups" if metrics.n_groups is not None else "")
    headline = headline_names(metrics)
    names = headline + [n for n in metrics.metrics if n not in headline]
    blocks.append(metrics_table(metrics.metrics, names, caption + ". Headline metrics first."))
    png = interval_figure({run.model_label: metrics.metrics}, headline, "Headline metrics with 95% CIs")
    if png:
        blocks.append(Figure("headline", png, "Point estimates and 95% bootstrap confidence intervals."))
    return blocks
