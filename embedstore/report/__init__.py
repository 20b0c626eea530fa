"""Reports of Optuna studies and probe/match run folders: one self-contained HTML file and a Markdown twin.

``write_report`` reads what is on disk (a run folder through :func:`embedstore.runs.read_run`,
or an Optuna storage) and never re-runs a model or touches the network; ``write_comparison``
puts every model of several runs side by side with CIs and exports the table as LaTeX
(booktabs) and CSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from embedstore.errors import EmbedstoreError
from embedstore.report.compare import write_comparison
from embedstore.runs import is_run_folder, read_run

__all__ = ["write_report", "write_comparison"]


def write_report(path: str | Path, out: Optional[str | Path] = None, study: Optional[str] = None) -> Path:
    """Write ``report.html``, ``report.md`` and ``figures/`` for a run folder or an Optuna storage.

    ``path`` is a probe, match or audit run folder (dispatched on its record's kind), a sqlite file written
    by Optuna, or any Optuna storage URL. ``out`` defaults to the run folder itself, or to
    ``<name>-report/`` beside a sqlite file. ``study`` names the studies of a storage to report,
    comma-separated (default: all of them, one section each). Returns the path of the HTML file.
    """
    text = str(path)
    if "://" not in text and is_run_folder(Path(text)):
        if study is not None:
            raise EmbedstoreError("--study applies to an Optuna storage, not to a run folder")
        run = read_run(text)
        if run.kind == "probe":
            from embedstore.report.probe_report import build_probe_report as build
        elif run.kind == "audit":
            from embedstore.report.audit_report import build_audit_report as build
        else:
            from embedstore.report.match_report import build_match_report as build
        return build(run).write(Path(out) if out is not None else run.path)
    if "://" not in text and Path(text).is_dir():
        raise EmbedstoreError(
            f"{text} is a folder without run.json: pass a run folder written by `embedstore probe` or "
            "`embedstore match`, or an Optuna storage"
        )
    if "://" not in text and not Path(text).exists():
        raise EmbedstoreError(f"{text} does not exist: pass a run folder or an Optuna storage (sqlite file or URL)")
    from embedstore.report.study_report import build_study_report, load_studies

    studies = load_studies(text, study)
    out = Path(out) if out is not None else _default_study_out(text)
    return build_study_report(studies, text, out).write(out)


def _default_study_out(text: str) -> Path:
    """``<stem>-report/`` beside a sqlite file; storage URLs without a file need ``--out``."""
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
    elif "://" in text:
        raise EmbedstoreError(f"pass --out DIR: the storage {text} is not a file to write the report beside")
    file = Path(text)
    return file.with_name(f"{file.stem}-report")
