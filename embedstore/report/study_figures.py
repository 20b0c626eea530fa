"""The figures of an Optuna study's report: history, importances, parallel coordinates, slices, durations.

Drawn with matplotlib from the trials (plotly is not needed), in the report style
(:mod:`embedstore.report.style`); :mod:`embedstore.report.study_report` lays them out.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import NullFormatter
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from embedstore.report import style
from embedstore.runs.comparison import pretty

STATE_COLORS = {
    TrialState.COMPLETE: style.PALETTE[0],
    TrialState.PRUNED: style.PALETTE[1],
    TrialState.FAIL: style.PALETTE[3],
    TrialState.RUNNING: style.MUTED,
    TrialState.WAITING: "#c0c0c0",
}


def fmt_value(value: Any) -> str:
    """A hyperparameter or objective value as a table or axis shows it (4 significant digits, None as None)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if (abs(value) < 1e-3 or abs(value) >= 1e4) and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


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
        return positions, [i / span for i in range(len(choices))], [fmt_value(c) for c in choices]
    numeric = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    log = isinstance(distribution, (FloatDistribution, IntDistribution)) and distribution.log
    low = getattr(distribution, "low", np.nanmin(numeric))
    high = getattr(distribution, "high", np.nanmax(numeric))
    transform = np.log10 if log and low > 0 else (lambda x: np.asarray(x, dtype=float))
    lo, hi = float(transform(low)), float(transform(high))
    span = hi - lo if hi > lo else 1.0
    positions = (transform(numeric) - lo) / span
    ticks = np.linspace(lo, hi, 3)
    labels = [fmt_value(10 ** t if log and low > 0 else t) for t in ticks]
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
    ticks.append(([0.0, 0.5, 1.0], [fmt_value(lo), fmt_value(lo + span / 2), fmt_value(hi)]))
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
                # Every choice gets its tick, also one no trial took (None included), so the limits are fixed.
                ax.set_xticks(range(len(choices)), [fmt_value(c) for c in choices])
                ax.set_xlim(-0.5, len(choices) - 0.5)
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
