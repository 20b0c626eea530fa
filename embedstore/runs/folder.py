"""The run folder: written by :func:`write_run` (probe and match alike), read by :func:`read_run`.

Layout every run has (docs/ARCHITECTURE.md): ``run.json`` (:class:`ProbeRecord` or
:class:`MatchRecord`), ``metrics.json`` (:class:`Metrics`), ``config.yaml`` (the resolved
config, which reruns the run); then the kind's own files (``folds.csv``, ``predictions.parquet``,
``head/``, ``clusters.csv``, ...), and the report. The folder is built aside and replaces ``out``
in one step (:func:`embedstore.atomic.replacing_folder`): one overwrite rule for every command,
checked by :func:`check_out` before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from embedstore.atomic import check_replaceable, replacing_folder
from embedstore.errors import EmbedstoreError
from embedstore.runs.config import RunConfig
from embedstore.runs.record import AuditRecord, MatchRecord, Metrics, ProbeRecord, RunRecord

RUN_FILE, METRICS_FILE, CONFIG_FILE = "run.json", "metrics.json", "config.yaml"
#: Columns of a run's CSV files that hold image ids or group names: text, whatever they look like.
TEXT_COLUMNS = ("id", "id_a", "id_b", "group", "group_a", "group_b")


def check_out(config: RunConfig) -> Path:
    """``config.out`` as a Path, refused in one line unless a run may be written there (before any work)."""
    out = Path(config.out)
    check_replaceable(out, config.overwrite)
    return out


def write_run(config: RunConfig, record: RunRecord, metrics: Metrics, write_files: Callable[[Path], None]) -> "Run":
    """Write the run folder ``config.out``: the record, metrics and config, then ``write_files(folder)``
    for the kind's own files; all of it appears at once or not at all. Then, with ``config.report``, the
    report (:func:`embedstore.report.write_report`, which reads the folder back). Returns the run written."""
    out = Path(config.out)
    with replacing_folder(out, overwrite=config.overwrite, kind=record.kind) as staging:
        (staging / RUN_FILE).write_text(json.dumps(record.to_dict(), indent=2))
        (staging / METRICS_FILE).write_text(json.dumps(metrics.to_dict(), indent=2))
        (staging / CONFIG_FILE).write_text(config.to_yaml())
        write_files(staging)
    if config.report:
        from embedstore.report import write_report  # the report reads runs: imported when a run is written

        write_report(out)
    return Run(out, record, metrics)


@dataclass(frozen=True)
class Run:
    """A run folder as read back: its typed record, its metrics, and its other files on request."""

    path: Path
    record: ProbeRecord | MatchRecord | AuditRecord
    metrics: Metrics

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def features_label(self) -> str:
        return " + ".join(self.record.feature_names or self.record.features) or "?"

    @property
    def model_label(self) -> str:
        """The head of a probe; the method of a match run, with its projection if it has one; ``audit``."""
        r = self.record
        if isinstance(r, MatchRecord):
            return f"{r.method} + {r.projection} projection" if r.projection != "none" else r.method
        if isinstance(r, AuditRecord):
            return "audit"
        return r.head

    @property
    def label(self) -> str:
        """``features × head`` (probe) or ``features × method`` (match)."""
        return f"{self.features_label} × {self.model_label}"

    def table(self, name: str) -> pd.DataFrame | None:
        """A CSV or parquet file of the run as a DataFrame, or None when the run has none. Image ids and group
        names in a CSV (:data:`TEXT_COLUMNS`) are read as text: an id ``0007`` stays ``0007``."""
        path = self.path / name
        if not path.is_file():
            return None
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})


def is_run_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / RUN_FILE).is_file()


def read_run(path: str | Path) -> Run:
    """The run folder at ``path``, typed; EmbedstoreError (one line) when it is none or is damaged."""
    path = Path(path)
    if not is_run_folder(path):
        raise EmbedstoreError(f"{path} is not a run folder (no {RUN_FILE}): pass a folder written by "
                              "`embedstore probe`, `embedstore match` or `embedstore audit`")
    record = RunRecord.from_dict(_json(path / RUN_FILE), where=str(path / RUN_FILE))
    metrics_file = path / METRICS_FILE
    if not metrics_file.is_file():
        raise EmbedstoreError(f"{path} has no {METRICS_FILE}: the run folder is damaged; rerun the run")
    return Run(path, record, Metrics.from_dict(_json(metrics_file)))


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise EmbedstoreError(f"{file} is not valid JSON ({exc}): the run folder is damaged") from None
    if not isinstance(data, dict):
        raise EmbedstoreError(f"{file} does not hold a JSON object: the run folder is damaged")
    return data
