"""The comparison table: one row per model, each headline metric with its 95% CI, the best of a column marked.

The one place that lays out a comparison, for the models inside one probe run (its
``comparison.csv`` / ``comparison.tex``) and for several run folders side by side
(``embedstore report --compare``): a paper's encoders × heads table, produced from run records,
with nothing re-run.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from embedstore.atomic import write_text
from embedstore.runs.record import Estimate, Metrics

_LOWER_IS_BETTER = ("loss", "brier", "ece", "error")
_SPELLED = {"auc": "AUC", "pauc": "pAUC", "roc": "ROC", "pr": "PR", "ap": "AP", "map": "mAP",
            "f1": "F1", "tpr": "TPR", "fpr": "FPR", "ece": "ECE", "ci": "CI"}


def lower_is_better(metric: str) -> bool:
    return any(token in metric.lower() for token in _LOWER_IS_BETTER)


def is_count(metric: str) -> bool:
    """Counts (numbers of clusters, images, ...) are shown but never ranked."""
    name = metric.lower()
    return name.startswith("n_") or name.endswith("_count") or "clusters" in name


def pretty(metric: str) -> str:
    """``balanced_accuracy`` -> ``balanced accuracy``; keeps acronyms such as AUC readable."""
    return " ".join(_SPELLED.get(w.lower(), w) for w in metric.replace("_", " ").split())


def best_rows(estimates: Sequence[Estimate | None], metric: str) -> set[int]:
    """Indices of the best point estimate (ties included); empty for counts or with fewer than 2 values."""
    values = [e.value if e is not None and e.value is not None else math.nan for e in estimates]
    finite = [v for v in values if not math.isnan(v)]
    if is_count(metric) or len(finite) < 2:
        return set()
    target = min(finite) if lower_is_better(metric) else max(finite)
    return {i for i, v in enumerate(values) if not math.isnan(v) and math.isclose(v, target, abs_tol=1e-12)}


@dataclass(frozen=True)
class ComparisonRow:
    """One model: its features and head (or matching method), the run it is from, its metrics."""

    features: str
    model: str
    run: str
    estimates: Mapping[str, Estimate]

    @property
    def label(self) -> str:
        return f"{self.features} × {self.model}"


def rows_of_metrics(metrics: Metrics, run: str = "", features: str = "", model: str = "") -> list[ComparisonRow]:
    """Every model in ``metrics``: each compared model of a probe (a stack's bases as ``head (in stack)``),
    or, for a run that compared none (match), the run's own model named by ``features`` and ``model``."""
    if not metrics.models:
        return [ComparisonRow(features, model, run, metrics.metrics)]
    rows = []
    for name, estimates in metrics.models.items():
        own, _, within = name.partition(" (in ")
        entry, _, head = own.rpartition(" × ")
        head = f"{head} (in {within}" if within else head  # the stack's entry too: two stacks may share a base
        rows.append(ComparisonRow(entry or own, head, run, estimates))
    return rows


def metric_names(rows: Sequence[ComparisonRow], headline: Sequence[str] = ()) -> list[str]:
    """``headline`` first, then every other metric with an interval in some row, in first-seen order."""
    names = dict.fromkeys(headline)
    for row in rows:
        for name, est in row.estimates.items():
            if est.has_ci:
                names.setdefault(name)
    return list(names)


def _model_cells(rows: Sequence[ComparisonRow]) -> list[str]:
    """The head column, with the run folder added where two rows would otherwise read the same."""
    counts = Counter(row.label for row in rows)
    return [f"{row.model} ({row.run})" if counts[row.label] > 1 and row.run else row.model for row in rows]


def comparison_frame(rows: Sequence[ComparisonRow], names: Sequence[str]) -> pd.DataFrame:
    """One row per model: features, head, run, then ``<metric>``, ``_ci_low``, ``_ci_high``, ``_best`` per metric."""
    frame = pd.DataFrame({"features": [r.features for r in rows], "model": _model_cells(rows),
                          "run": [r.run for r in rows]})
    for name in names:
        estimates = [r.estimates.get(name) for r in rows]
        best = best_rows(estimates, name)
        frame[name] = [e.value if e else None for e in estimates]
        frame[f"{name}_ci_low"] = [e.ci_low if e else None for e in estimates]
        frame[f"{name}_ci_high"] = [e.ci_high if e else None for e in estimates]
        frame[f"{name}_best"] = [i in best for i in range(len(rows))]
    return frame


def comparison_latex(rows: Sequence[ComparisonRow], names: Sequence[str], caption: str) -> str:
    """A booktabs table: the value in bold where it is the best of its column, the CI in smaller type."""
    best = {name: best_rows([r.estimates.get(name) for r in rows], name) for name in names}
    lines = [
        "% Generated by embedstore; needs \\usepackage{booktabs}.",
        "\\begin{table}[t]", "\\centering", f"\\caption{{{tex(caption)}}}", "\\label{tab:embedstore-comparison}",
        "\\begin{tabular}{ll" + "c" * len(names) + "}", "\\toprule",
        "Features & Head & " + " & ".join(tex(pretty(n)) for n in names) + " \\\\", "\\midrule",
    ]
    for i, (row, model) in enumerate(zip(rows, _model_cells(rows))):
        cells = [tex(row.features), tex(model)]
        cells += [_tex_estimate(row.estimates.get(name), i in best[name]) for name in names]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_comparison_tables(folder: Path, rows: Sequence[ComparisonRow], names: Sequence[str], caption: str) -> None:
    """``comparison.csv`` and ``comparison.tex`` in ``folder``, each replaced in one step."""
    write_text(Path(folder) / "comparison.csv", comparison_frame(rows, names).to_csv(index=False))
    write_text(Path(folder) / "comparison.tex", comparison_latex(rows, names, caption))


def _tex_estimate(est: Estimate | None, bold: bool) -> str:
    if est is None:
        return "--"
    value = est.format().split(" [")[0]
    text = f"\\textbf{{{value}}}" if bold else value
    if est.has_ci:
        text += f" {{\\footnotesize [{est.ci_low:.3f}, {est.ci_high:.3f}]}}"
    return text


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$",
}


def tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))
