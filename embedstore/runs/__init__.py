"""Runs: the one engine behind ``probe`` and ``match`` (config → execute → run folder → report).

- :mod:`embedstore.runs.config`: :class:`RunConfig`, the options every run shares, read from YAML
  and the command line in one way and validated in one place; ``ProbeConfig`` and
  ``MatchConfig`` extend it.
- :mod:`embedstore.runs.record`: the typed run record (:class:`ProbeRecord`, :class:`MatchRecord`, :class:`AuditRecord`),
  :class:`Metrics` and :class:`Estimate`, each with ``to_dict``/``from_dict`` and a format version.
- :mod:`embedstore.runs.folder`: :func:`write_run` (the one writer, one overwrite rule) and
  :func:`read_run`, the only way the report and the CLI read a run folder.
- :mod:`embedstore.runs.comparison`: the model-per-row comparison table and its LaTeX, for one run or several.
"""

from embedstore.runs.config import RunConfig
from embedstore.runs.folder import Run, check_out, is_run_folder, read_run, write_run
from embedstore.runs.record import (RUN_FORMAT, AuditRecord, Estimate, GroupMerge, Leakage, MatchRecord, Metrics,
                                    ProbeRecord, RunRecord, StudyRef, Transfer)

__all__ = ["RUN_FORMAT", "AuditRecord", "Estimate", "GroupMerge", "Leakage", "MatchRecord", "Metrics", "ProbeRecord", "Run", "RunConfig", "RunRecord",
           "StudyRef", "Transfer", "check_out", "is_run_folder", "read_run", "write_run"]
