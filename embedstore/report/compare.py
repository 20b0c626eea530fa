"""Several runs side by side (``embedstore report --compare``): every model of every run in one table with
95% CIs, the best per metric marked, exported as LaTeX (booktabs) and CSV.

This is the encoders x heads table of a paper (e.g. ImageNet CNNs against DINOv2), produced
from run folders in one call; nothing is re-run. The table itself is laid out by
:mod:`embedstore.runs.comparison`, as is each probe run's own ``comparison.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from embedstore.errors import EmbedstoreError
from embedstore.report.charts import comparison_table, headline_names, interval_figure, row_labels
from embedstore.report.document import Figure, Heading, Paragraph, Report, Table
from embedstore.report.paths import shown_path
from embedstore.runs import Run, read_run
from embedstore.runs.comparison import ComparisonRow, rows_of_metrics, write_comparison_tables


def comparison_rows(runs: Sequence[Run]) -> list[ComparisonRow]:
    """Every model of every run: each model a probe compared (its stack's bases too), or the run's own."""
    return [row for run in runs
            for row in rows_of_metrics(run.metrics, run.name, run.features_label, run.model_label)]


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``comparison.{html,md,tex,csv}`` and ``figures/`` into ``out``; return the HTML path."""
    if not run_dirs:
        raise EmbedstoreError("--compare needs at least one run folder")
    runs = [read_run(p) for p in run_dirs]
    out = Path(out)
    rows = comparison_rows(runs)
    names = list(dict.fromkeys(name for run in runs for name in headline_names(run.metrics)))
    kinds = " and ".join(sorted({run.kind for run in runs}))
    caption = (
        f"{len(rows)} models of {len(runs)} {kinds} runs; point estimates with 95% bootstrap confidence intervals "
        "(resampled by group); best value per metric in bold."
    )
    report = Report(title=f"Comparison of {len(runs)} runs", subtitle=caption)
    report.add(Heading("Results"), comparison_table(rows, names, caption))
    series = {label: row.estimates for label, row in zip(row_labels(rows), rows)}
    png = interval_figure(series, names, "Models side by side")
    if png:
        report.add(Figure("comparison", png, "Each model's point estimate and 95% CI, metric by metric."))
    report.add(
        Heading("Runs"),
        Table(["run", "kind", "reported model", "folder", "store", "created"],
              [[run.name, run.kind, run.label, shown_path(run.path, out), shown_path(run.record.store, out),
                run.record.created] for run in runs],
              "Folders relative to this comparison; each store by its name when it lies further away."),
        Paragraph("The same table is in `comparison.tex` (LaTeX, booktabs) and `comparison.csv`."),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_comparison_tables(out, rows, names, caption)
    return report.write(out, stem="comparison")
