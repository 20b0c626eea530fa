"""The report of Optuna studies: history, importances, parallel coordinates, slices, best trial, states.

All figures are drawn with matplotlib from the trials in the storage (plotly is
not needed). A storage holding several studies (one per head, as ``embedstore
probe`` writes them) gives one report with a section per study.
"""

from __future__ import annotations

import math
import re
import sqlite3
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import matplotlib
import numpy as np
import optuna
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import NullFormatter
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from embedstore.errors import EmbedstoreError
from embedstore.report import style
from embedstore.report.charts import pretty
from embedstore.report.document import Block, Figure, Heading, Note, Paragraph, Report, Table

MAX_PARALLEL_PARAMS = 10
STATE_COLORS = {
    TrialState.COMPLETE: style.PALETTE[0],
    TrialState.PRUNED: style.PALETTE[1],
    TrialState.FAIL: style.PALETTE[3],
    TrialState.RUNNING: style.MUTED,
    TrialState.WAITING: "#c0c0c0",
}
_SQLITE_MAGIC = b"SQLite format 3\x00"


# ------------------------------------------------------------------- storage


def storage_url(path_or_url: str | Path) -> str:
    """An Optuna storage URL for a sqlite file path or URL; EmbedstoreError when it holds no Optuna data."""
    text = str(path_or_url)
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
            "a .db file written by Optuna, or a storage URL"
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
    """The named study, or every study in the storage; one clear error when there are none."""
    url = storage_url(path_or_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.get_storage(url)
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # SQLAlchemy and version errors come in many kinds; all mean "cannot read"
        raise EmbedstoreError(f"cannot open Optuna storage {url}: {exc}") from exc
    if not names:
        raise EmbedstoreError(f"Optuna storage {url} holds no studies: run `embedstore probe ... --trials N` first")
    if study is not None:
        if study not in names:
            raise EmbedstoreError(f"no study named {study!r} in {url}; it holds: {', '.join(sorted(names))}")
        names = [study]
    return [optuna.load_study(study_name=name, storage=storage) for name in sorted(names)]


# -------------------------------------------------------------------- report


def build_study_report(studies: list[optuna.Study], source: str) -> Report:
    if len(studies) == 1:
        study = studies[0]
        report = Report(title=f"Optuna study: {study.study_name}", subtitle=f"storage `{source}`")
        report.add(*study_blocks(study, prefix="", level=2))
        return report
    report = Report(title=f"Optuna studies ({len(studies)})", subtitle=f"storage `{source}`")
    report.add(Heading("Overview"), overview_table(studies))
    for index, study in enumerate(studies):
        report.add(Heading(f"Study: {study.study_name}", 2))
        report.add(*study_blocks(study, prefix=f"s{index}_", level=3))
    return report


def tuning_summary(storage: str, name: str) -> list[Block]:
    """A short account of one study for the report of the run it tuned: history and best parameters."""
    study = load_studies(storage, name)[0]
    trials = study.get_trials(deepcopy=False)
    blocks: list[Block] = [Paragraph(_summary(study, trials))]
    best = _best_trial(study)
    if best is None:
        return blocks
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    objective = _objective_name(study)
    blocks.append(Figure("tuning_history", history_figure(trials, objective, minimize),
                         f"Optuna study `{name}`: every completed trial's {objective} and the best so far."))
    blocks.append(Table(["hyperparameter", "value"], [[k, _fmt(v)] for k, v in best.params.items()],
                        f"Best trial #{best.number}: {objective} = {_fmt(best.value)}."))
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
            _fmt(best.value) if best else "–",
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
        text += f" Best {_objective_name(study)} **{_fmt(best.value)}** at trial {best.number}."
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


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if (abs(value) < 1e-3 or abs(value) >= 1e4) and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


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


# ------------------------------------------------------------------- figures


def history_figure(trials: list[FrozenTrial], objective: str, minimize: bool) -> bytes:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    numbers = np.array([t.number for t in complete])
    values = np.array([t.value for t in complete], dtype=float)
    best = np.minimum.accumulate(values) if minimize else np.maximum.accumulate(values)
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.state == TrialState.PRUNED and t.intermediate_values]
    with style.styled():
        fig = style.new_figure(8.0, 4.4)
        ax = fig.add_subplot()
        ax.scatter(numbers, values, s=22, color=style.color(0), alpha=0.75, label="completed trial", zorder=3)
        if pruned:
            px, py = zip(*pruned)
            ax.scatter(px, py, s=26, marker="x", color=style.color(1), label="pruned (last reported value)", zorder=3)
        ax.step(numbers, best, where="post", color=style.color(3), lw=2.2, label="best so far", zorder=4)
        i = int(np.argmin(values) if minimize else np.argmax(values))
        ax.scatter([numbers[i]], [values[i]], s=150, marker="*", color=style.color(3), edgecolors="white",
                   linewidths=0.8, zorder=5, label=f"best: {values[i]:.4g} (trial {numbers[i]})")
        ax.set(xlabel="trial number", ylabel=objective, title=f"Optimization history ({'minimize' if minimize else 'maximize'})")
        ax.legend(loc="best")
        return style.to_png(fig)


def importance_figure(importances: dict[str, float]) -> bytes:
    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    with style.styled():
        fig = style.new_figure(7.0, 1.2 + 0.42 * len(names))
        ax = fig.add_subplot()
        bars = ax.barh(names, values, color=style.color(0), height=0.6)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
        ax.set(xlabel="importance (fANOVA, normalised)", title="Hyperparameter importances", xlim=(0, max(values) * 1.18 or 1))
        ax.grid(axis="y", visible=False)
        return style.to_png(fig)


def _axis_position(values: list[Any], distribution: Any) -> tuple[np.ndarray, list[float], list[str]]:
    """Values mapped to [0, 1] on a parameter's axis, with tick positions and labels."""
    if isinstance(distribution, CategoricalDistribution):
        choices = list(distribution.choices)
        span = max(len(choices) - 1, 1)
        positions = np.array([choices.index(v) / span if v in choices else np.nan for v in values], dtype=float)
        return positions, [i / span for i in range(len(choices))], [_fmt(c) for c in choices]
    numeric = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    log = isinstance(distribution, (FloatDistribution, IntDistribution)) and distribution.log
    low = getattr(distribution, "low", np.nanmin(numeric))
    high = getattr(distribution, "high", np.nanmax(numeric))
    transform = np.log10 if log and low > 0 else (lambda x: np.asarray(x, dtype=float))
    lo, hi = float(transform(low)), float(transform(high))
    span = hi - lo if hi > lo else 1.0
    positions = (transform(numeric) - lo) / span
    ticks = np.linspace(lo, hi, 3)
    labels = [_fmt(10 ** t if log and low > 0 else t) for t in ticks]
    if isinstance(distribution, IntDistribution) and not log:
        labels = [str(int(round(t))) for t in ticks]
    return positions, [0.0, 0.5, 1.0], labels


def parallel_figure(complete: list[FrozenTrial], params: list[str], distributions: dict[str, Any],
                    objective: str, minimize: bool) -> bytes:
    values = np.array([t.value for t in complete], dtype=float)
    columns, ticks = [], []
    for name in params:
        positions, tick_pos, tick_labels = _axis_position([t.params.get(name) for t in complete], distributions[name])
        columns.append(positions)
        ticks.append((tick_pos, tick_labels))
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else 1.0
    columns.append((values - lo) / span)
    ticks.append(([0.0, 0.5, 1.0], [_fmt(lo), _fmt(lo + span / 2), _fmt(hi)]))
    matrix = np.vstack(columns).T  # trials x axes
    # Good trials last, so they are drawn on top.
    order = np.argsort(-values if minimize else values, kind="stable")
    labels = [*params, objective]
    with style.styled():
        fig = style.new_figure(max(7.0, 1.35 * len(labels) + 1.5), 4.8)
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps[style.CONTINUOUS_CMAP]
        shade = (values - lo) / span
        if minimize:
            shade = 1 - shade  # bright = good in both directions
        for rank, i in enumerate(order):
            best = rank == len(order) - 1
            ax.plot(range(len(labels)), matrix[i], color=cmap(shade[i]), lw=2.6 if best else 1.0,
                    alpha=1.0 if best else 0.55, zorder=3 if best else 2)
        for x, (tick_pos, tick_labels) in enumerate(ticks):
            ax.axvline(x, color="#444", lw=1, zorder=1)
            for y, text in zip(tick_pos, tick_labels):
                ax.text(x + 0.04, y, text, fontsize=8, va="center", ha="left", color="#333",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5}, zorder=5)
        ax.set_xticks(range(len(labels)), [pretty(label) for label in labels], rotation=20, ha="right")
        ax.set_yticks([])
        ax.set_xlim(-0.15, len(labels) - 0.5)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(False)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"Parallel coordinates ({len(complete)} completed trials)")
        mappable = _colorbar_mappable(cmap, lo, hi, reverse=minimize)
        fig.colorbar(mappable, ax=ax, label=objective, shrink=0.85)
        return style.to_png(fig)


def _colorbar_mappable(cmap, lo: float, hi: float, reverse: bool = False) -> ScalarMappable:
    return ScalarMappable(norm=Normalize(lo, hi), cmap=cmap.reversed() if reverse else cmap)


def slice_figure(complete: list[FrozenTrial], params: list[str], distributions: dict[str, Any], objective: str) -> bytes:
    cols = min(3, len(params))
    rows = -(-len(params) // cols)
    numbers = np.array([t.number for t in complete])
    values = np.array([t.value for t in complete], dtype=float)
    rng = np.random.default_rng(0)
    with style.styled():
        fig = style.new_figure(3.6 * cols + 0.8, 3.0 * rows + 0.4)
        axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True)).ravel()
        scatter = None
        for ax, name in zip(axes, params):
            distribution = distributions[name]
            raw = [t.params.get(name) for t in complete]
            present = np.array([name in t.params for t in complete])  # None can be a real choice
            if isinstance(distribution, CategoricalDistribution):
                choices = list(distribution.choices)
                x = np.array([choices.index(v) if v in choices else np.nan for v in raw], dtype=float)
                x = x + rng.uniform(-0.12, 0.12, size=len(x))
                ax.set_xticks(range(len(choices)), [_fmt(c) for c in choices])
            else:
                x = np.array([np.nan if v is None else float(v) for v in raw], dtype=float)
                if getattr(distribution, "log", False):
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
            scatter = ax.scatter(x[present], values[present], c=numbers[present], cmap=style.CONTINUOUS_CMAP,
                                 vmin=numbers.min(), vmax=max(numbers.max(), numbers.min() + 1),
                                 s=20, alpha=0.85, edgecolors="none")
            ax.set_xlabel(pretty(name))
        for ax in axes[len(params):]:
            ax.set_visible(False)
        for ax in axes[::cols]:
            ax.set_ylabel(objective)
        if scatter is not None:
            fig.colorbar(scatter, ax=axes[: len(params)].tolist(), label="trial number", shrink=0.9)
        fig.suptitle("Slice plots", fontsize=12, fontweight="bold")
        return style.to_png(fig)


def durations_figure(trials: list[FrozenTrial]) -> bytes | None:
    timed = [t for t in trials if t.duration is not None]
    if not timed:
        return None
    with style.styled():
        fig = style.new_figure(8.0, 3.6)
        ax = fig.add_subplot()
        for state in [s for s in STATE_COLORS if any(t.state == s for t in timed)]:
            chosen = [t for t in timed if t.state == state]
            ax.bar([t.number for t in chosen], [t.duration.total_seconds() for t in chosen],
                   color=STATE_COLORS[state], width=0.85, label=f"{state.name.lower()} ({len(chosen)})")
        ax.set(xlabel="trial number", ylabel="duration (s)", title="Trial durations and states")
        ax.legend(loc="upper right", ncol=3)
        return style.to_png(fig)


# ------------------------------------------------------------------- tables


def _best_trial_blocks(study: optuna.Study, level: int) -> list[Block]:
    best = _best_trial(study)
    if best is None:
        return []
    blocks: list[Block] = [
        Heading(f"Best trial (#{best.number})", level),
        Table(["hyperparameter", "value"], [[name, _fmt(value)] for name, value in best.params.items()],
              f"{_objective_name(study)} = {_fmt(best.value)}"),
    ]
    folds = fold_rows(best, _objective_name(study))
    if folds is not None:
        columns, rows = folds
        blocks.append(Table(columns, rows, "Per-fold metrics of the best trial, as the trial recorded them."))
    scalars = {k: v for k, v in best.user_attrs.items()
               if isinstance(v, (str, int, float, bool)) and not _FOLD_ATTR.match(str(k))}
    if scalars:
        blocks.append(Table(["attribute", "value"], [[k, _fmt(v)] for k, v in scalars.items()], "Other attributes of the best trial."))
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
    rows = [[_fmt(folds[i])] + [_fmt(columns[k][i]) for k in names] for i in range(length)]
    means = ["mean"] + [
        _fmt(float(np.mean(columns[k]))) if k != _REPORTED and all(isinstance(v, (int, float)) for v in columns[k]) else ""
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
