"""`embedstore report`: HTML + Markdown reports of Optuna studies and run folders, and run comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from embedstore.cli.app import app
from embedstore.cli.options import out_option
from embedstore.errors import EmbedstoreError

ReportOutOpt = out_option("the run folder; <name>-report/ beside a sqlite file; required with --compare")


@app.command()
def report(
    paths: Optional[List[str]] = typer.Argument(
        None,
        help="A probe or match run folder, an Optuna sqlite file, or an Optuna storage URL; "
        "with --compare, several run folders.",
        show_default=False,
    ),
    study: Optional[str] = typer.Option(
        None, "--study", help="Report only these studies of the storage, comma-separated (default: all)."),
    compare: bool = typer.Option(
        False, "--compare", help="Put every model of the run folders side by side in one table (HTML, Markdown, "
        "LaTeX, CSV)."
    ),
    out: ReportOutOpt = None,
) -> None:
    """Write report.html (self-contained, offline) and report.md with figures/ from what is on disk."""
    from embedstore.report import write_comparison, write_report

    paths = paths or []
    if compare:
        if out is None:
            raise EmbedstoreError("--compare needs --out DIR for the comparison table")
        html = write_comparison([Path(p) for p in paths], out)
        typer.echo(f"compared {len(paths)} runs: {html} (+ comparison.md, comparison.tex, comparison.csv)")
        return
    if len(paths) != 1:
        raise EmbedstoreError(
            "pass one run folder or Optuna storage, or --compare RUN_DIR... --out DIR for several runs"
        )
    html = write_report(paths[0], out=out, study=study)
    typer.echo(f"report written: {html} (+ report.md and figures/)")
