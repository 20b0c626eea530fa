"""The report of Optuna studies: history, importances, parallel coordinates, slices, best trial, states.

A storage holding several studies (one per head, as ``embedstore probe`` writes them) gives
one report with a section per study; ``--study a,b`` picks some of them. The figures are
drawn by :mod:`embedstore.report.study_figures`.
"""

from __future__ import annotations

import math
import re
import sqlite3
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from embedstore.errors import EmbedstoreError
from embedstore.report.document import Block, Figure, Heading, Note, Paragraph, Report, Table
from embedstore.report.paths import shown_storage
from embedstore.report.study_figures import (
    durations_figure,
    fmt_value,
    history_figure,
    importance_figure,
    parallel_figure,
    slice_figure,
)
from embedstore.runs.comparison import pretty
from embedstore.studies import is_journal, open_storage

MAX_PARALLEL_PARAMS = 10
_SQLITE_MAGIC = b"SQLite format 3\x00"


# ------------------------------------------------------------------- storage


def storage_url(path_or_url: str | Path) -> str:
    """An Optuna storage (:func:`embedstore.studies.open_storage`) for a sqlite file, journal file or URL;
    EmbedstoreError when it holds no Optuna data."""
    text = str(path_or_url)
    if is_journal(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise EmbedstoreError(f"Optuna journal {path} does not exist")
        return str(path.resolve())
    if "://" in text:
        if text.startswith("sqlite:///"):
            _check_sqlite(Path(text[len("sqlite:///"):]))
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise EmbedstoreError(f"{path} is neither a run folder nor an Optuna storage file")
    with path.open("rb") as handle:
        magic = handle.read(len(_SQLITE_MAGIC))
    if magic != _SQLITE_MAGIC:
        raise EmbedstoreError(
            f"{path} is neither a run folder nor an Optuna sqlite storage: pass a run folder, "
            "a .db file written by Optuna, a .journal file, or a storage URL"
        )
    _check_sqlite(path)
    return f"sqlite:///{path.resolve()}"


def _check_sqlite(path: Path) -> None:
    """Refuse sqlite files that are not Optuna storages before Optuna would add its tables to them."""
    if not path.is_file():
        raise EmbedstoreError(f"Optuna storage {path} does not exist")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise EmbedstoreError(f"{path} cannot be read as sqlite ({exc})") from exc
    if "studies" not in tables:
        raise EmbedstoreError(f"{path} is a sqlite database but not an Optuna storage (no studies table)")


def load_studies(path_or_url: str | Path, study: Optional[str] = None) -> list[optuna.Study]:
    """The studies named in ``study`` (comma-separated), or every study in the storage; one clear
    error when there are none or one of the names is not there."""
    url = storage_url(path_or_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.get_storage(open_storage(url))
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # SQLAlchemy and version errors come in many kinds; all mean "cannot read"
        raise EmbedstoreError(f"cannot open Optuna storage {url}: {exc}") from exc
    if not names:
        raise EmbedstoreError(f"Optuna storage {url} holds no studies: run `embedstore probe ... --trials N` first")
    if study is not None:
        wanted = [name.strip() for name in study.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in names]
        if unknown or not wanted:
            what = ", ".join(repr(name) for name in unknown) or repr(study)
            raise EmbedstoreError(f"no study named {what} in {url}; it holds: {', '.join(sorted(names))}")
        names = wanted
    return [optuna.load_study(study_name=name, storage=storage) for name in sorted(names)]


# -------------------------------------------------------------------- report


def build_study_report(studies: list[optuna.Study], storage: str, out: Path) -> Report:
    """The report of ``studies`` of ``storage``, to be written into ``out`` (the storage is named relative to it)."""
    subtitle = f"storage `{shown_storage(storage, out)}`"
    if len(studies) == 1:
        study = studies[0]
        report = Report(title=f"Optuna study: {study.study_name}", subtitle=subtitle)
        report.add(*study_blocks(study, prefix="", level=2))
        return report
    report = Report(title=f"Optuna studies ({len(studies)})", subtitle=subtitle)
    report.add(Heading("Overview"), overview_table(studies))
    for index, study in enumerate(studies):
        report.add(Heading(f"Study: {study.study_name}", 2))
        report.add(*study_blocks(study, prefix=f"s{index}_", level=3))
    return report


def tuning_summary(storage: str, names: str) -> list[Block]:
    """A short account of the studies ``names`` (comma-separated: a stack has one per base) for the
    report of the run they tuned: each one's history and best parameters."""
    blocks: list[Block] = []
    for index, study in enumerate(load_studies(storage, names)):
        trials = study.get_trials(deepcopy=False)
        blocks.append(Paragraph(_summary(study, trials)))
        best = _best_trial(study)
        if best is None:
            continue
        minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
        objective = _objective_name(study)
        blocks.append(Figure("tuning_history" + (f"_{index}" if index else ""), history_figure(trials, objective, minimize),
                             f"Optuna study `{study.study_name}`: every completed trial's {objective} and the best so far."))
        blocks.append(Table(["hyperparameter", "value"], [[k, fmt_value(v)] for k, v in best.params.items()],
                            f"Best trial #{best.number}: {objective} = {fmt_value(best.value)}."))
    return blocks


def overview_table(studies: list[optuna.Study]) -> Table:
    rows = []
    for study in studies:
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        best = _best_trial(study)
        rows.append([
            study.study_name,
            " / ".join(d.name.lower() for d in study.directions),
            str(len(trials)),
            str(states[TrialState.COMPLETE]),
            str(states[TrialState.PRUNED]),
            str(states[TrialState.FAIL]),
            fmt_value(best.value) if best else "–",
            str(best.number) if best else "–",
        ])
    return Table(["study", "direction", "trials", "complete", "pruned", "failed", "best value", "best trial"], rows)


def study_blocks(study: optuna.Study, prefix: str, level: int) -> list[Block]:
    """The sections of one study's report; figure names start with ``prefix``."""
    trials = study.get_trials(deepcopy=False)
    blocks: list[Block] = [Paragraph(_summary(study, trials))]
    if len(study.directions) > 1:
        blocks.append(Note(
            f"study {study.study_name!r} has {len(study.directions)} objectives; this report draws "
            "single-objective studies, so only its trial states are shown"
        ))
        blocks += _states_blocks(trials, prefix, level)
        return blocks
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    objective = _objective_name(study)
    if not complete:
        blocks.append(Note("no trial has completed yet: nothing to plot but the trial states"))
        blocks += _states_blocks(trials, prefix, level)
        return blocks
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    blocks += [
        Heading("Optimization history", level),
        Figure(f"{prefix}history", history_figure(trials, objective, minimize),
               f"Every completed trial's {objective}, the best so far as a line; pruned trials at the last value they reported."),
    ]
    importances = _importances(study, complete)
    blocks.append(Heading("Hyperparameter importances", level))
    if isinstance(importances, str):
        blocks.append(Note(importances))
    else:
        blocks.append(Figure(f"{prefix}importances", importance_figure(importances),
                             "fANOVA importance of each hyperparameter for the objective (seed 0), normalised to sum to 1."))
    params = _param_order(complete, importances)
    if params:
        distributions = _distributions(complete)
        blocks += [
            Heading("Parallel coordinates", level),
            Figure(f"{prefix}parallel", parallel_figure(complete, params[:MAX_PARALLEL_PARAMS], distributions, objective, minimize),
                   "One line per completed trial across its hyperparameters, coloured by the objective; the best trial in bold."),
            Heading("Slice plots", level),
            Figure(f"{prefix}slices", slice_figure(complete, params, distributions, objective),
                   f"The {objective} against each hyperparameter; colour shows the trial number (later trials lighter)."),
        ]
    blocks += _best_trial_blocks(study, level)
    blocks += _states_blocks(trials, prefix, level)
    return blocks


def _summary(study: optuna.Study, trials: list[FrozenTrial]) -> str:
    states = Counter(t.state for t in trials)
    parts = [f"{len(trials)} trials"] + [f"{count} {state.name.lower()}" for state, count in states.most_common()]
    text = f"Study `{study.study_name}`, direction {' / '.join(d.name.lower() for d in study.directions)}: " + ", ".join(parts) + "."
    best = _best_trial(study)
    if best is not None:
        text += f" Best {_objective_name(study)} **{fmt_value(best.value)}** at trial {best.number}."
    return text


def _objective_name(study: optuna.Study) -> str:
    names = study.metric_names
    if names and names[0]:
        return str(names[0])
    metric = study.user_attrs.get("metric") or study.user_attrs.get("objective")
    return str(metric) if metric else "objective value"


def _best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:  # no completed trial
        return None


def _importances(study: optuna.Study, complete: list[FrozenTrial]) -> dict[str, float] | str:
    """Parameter importances, or a sentence saying why the study is too small for them."""
    if len(complete) < 2:
        return f"importances need at least 2 completed trials; this study has {len(complete)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        return f"importances could not be estimated for this study ({exc})"
    if not importances:
        return "no hyperparameter was sampled in every completed trial, so importances are undefined"
    if not all(math.isfinite(v) for v in importances.values()):
        return "the objective did not vary across completed trials, so importances are undefined"
    return importances


def _param_order(complete: list[FrozenTrial], importances: dict[str, float] | str) -> list[str]:
    names = sorted({name for t in complete for name in t.params})
    if isinstance(importances, dict):
        ranked = [n for n in importances if n in names]
        return ranked + [n for n in names if n not in ranked]
    return names


def _distributions(trials: list[FrozenTrial]) -> dict[str, Any]:
    distributions: dict[str, Any] = {}
    for trial in trials:
        for name, distribution in trial.distributions.items():
            distributions.setdefault(name, distribution)
    return distributions


# ------------------------------------------------------------------- tables


def _best_trial_blocks(study: optuna.Study, level: int) -> list[Block]:
    best = _best_trial(study)
    if best is None:
        return []
    blocks: list[Block] = [
        Heading(f"Best trial (#{best.number})", level),
        Table(["hyperparameter", "value"], [[name, fmt_value(value)] for name, value in best.params.items()],
              f"{_objective_name(study)} = {fmt_value(best.value)}"),
    ]
    folds = fold_rows(best, _objective_name(study))
    if folds is not None:
        columns, rows = folds
        blocks.append(Table(columns, rows, "Per-fold metrics of the best trial, as the trial recorded them.", wide=True))
    scalars = {k: v for k, v in best.user_attrs.items()
               if isinstance(v, (str, int, float, bool)) and not _FOLD_ATTR.match(str(k))}
    if scalars:
        blocks.append(Table(["attribute", "value"], [[k, fmt_value(v)] for k, v in scalars.items()], "Other attributes of the best trial."))
    return blocks


_REPORTED = "value reported to the pruner"
_FOLD_ATTR = re.compile(r"^fold[_-]?(\d+)(?:[_-](.+))?$")


def fold_rows(trial: FrozenTrial, objective: str = "objective") -> Optional[tuple[list[str], list[list[str]]]]:
    """Per-fold values recorded by a trial, as table columns and rows.

    Read from user attrs: one scalar per fold (``fold_0``, ``fold_1_auc``, ...), one list per metric
    (``{"balanced_accuracy": [..]}`` or a dict of such lists), or a list of per-fold dicts; and from
    the intermediate values that a pruned-across-folds objective reports after each fold.
    """
    columns: dict[str, list[Any]] = {}
    per_fold: dict[str, dict[int, Any]] = {}
    for key, value in trial.user_attrs.items():
        match = _FOLD_ATTR.match(str(key))
        if match and isinstance(value, (int, float)) and not isinstance(value, bool):
            per_fold.setdefault(match.group(2) or objective, {})[int(match.group(1))] = value
        elif _is_number_list(value):
            columns[key] = list(value)
        elif isinstance(value, dict) and value and all(_is_number_list(v) for v in value.values()):
            columns.update({str(k): list(v) for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            keys = dict.fromkeys(str(k) for record in value for k in record)
            columns.update({k: [record.get(k) for record in value] for k in keys})
    for name, by_fold in per_fold.items():
        columns[name] = [by_fold.get(k) for k in range(max(by_fold) + 1)]
    if trial.intermediate_values:
        steps = sorted(trial.intermediate_values)
        columns.setdefault(_REPORTED, [trial.intermediate_values[s] for s in steps])
    if not columns:
        return None
    length = Counter(len(v) for v in columns.values()).most_common(1)[0][0]
    columns = {k: v for k, v in columns.items() if len(v) == length}
    names = [k for k in columns if k != "fold"]
    folds = columns.get("fold") or list(range(length))
    rows = [[fmt_value(folds[i])] + [fmt_value(columns[k][i]) for k in names] for i in range(length)]
    means = ["mean"] + [
        fmt_value(float(np.mean(columns[k]))) if k != _REPORTED and all(isinstance(v, (int, float)) for v in columns[k]) else ""
        for k in names
    ]
    return ["fold", *[pretty(k) for k in names]], rows + [means]


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _states_blocks(trials: list[FrozenTrial], prefix: str, level: int) -> list[Block]:
    states = Counter(t.state for t in trials)
    seconds = [t.duration.total_seconds() for t in trials if t.duration is not None]
    rows = []
    for state in TrialState:
        if states[state]:
            durations = [t.duration.total_seconds() for t in trials if t.state == state and t.duration is not None]
            rows.append([state.name.lower(), str(states[state]),
                         f"{np.median(durations):.2f}" if durations else "–",
                         f"{np.sum(durations):.1f}" if durations else "–"])
    blocks: list[Block] = [
        Heading("Trial states and durations", level),
        Table(["state", "trials", "median duration (s)", "total (s)"], rows,
              f"{len(trials)} trials, {sum(seconds):.1f} s of trial time in all."),
    ]
    png = durations_figure(trials)
    if png:
        blocks.append(Figure(f"{prefix}durations", png, "Wall time of each trial, coloured by its final state."))
    return blocks
