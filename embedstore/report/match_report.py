"""The report of a match run: metrics with CIs, folds, the parameter sweep, cluster sizes, pair sheets.

Reads the run through :func:`embedstore.runs.read_run` and the files :mod:`embedstore.match.run`
writes beside its record, with the columns it writes: ``folds.csv`` (one row per fold: sizes,
the chosen parameter, the pairwise and retrieval metrics), ``sweep.csv`` (``fold, candidate,
param, value, precision, recall, f1, n_clusters, chosen``), ``clusters.csv`` (``id, group, fold,
cv_cluster, cluster``) and ``pairs.csv`` (``id_a, id_b, group_a, group_b, similarity,
same_group, same_cluster, outcome`` with outcome TP, FP or FN).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pandas as pd

from embedstore.report import style
from embedstore.report.charts import folds_table, headline_names, headline_section
from embedstore.report.document import Figure, Heading, Note, Report
from embedstore.report.paths import shown_path
from embedstore.report.thumbnails import Header, Tile, draw_sheet, load_thumbnails
from embedstore.runs import Run
from embedstore.runs.comparison import pretty

SWEEP_COLUMNS = ("fold", "candidate", "param", "value", "precision", "recall", "f1", "chosen")
PAIR_COLUMNS = ("id_a", "id_b", "group_a", "group_b", "similarity", "outcome")
CLUSTER_COLUMNS = ("group", "cv_cluster")
SHEET_PAIRS = 6  # pairs per column of the pair sheet


def build_match_report(run: Run) -> Report:
    record = run.record
    report = Report(
        title=f"Match: {run.label}",
        subtitle=(
            f"groups `{record.groups}`, projection `{record.projection}`, "
            f"store `{shown_path(record.store, run.path)}`, seed {record.seed}, created {record.created}"
        ),
    )
    report.add(*headline_section(
        run, "Pairwise metrics count every pair of images (same group = positive pair); 95% CIs from a bootstrap by group"))
    folds = run.table("folds.csv")
    if folds is not None and not folds.empty:
        keep = [c for c in ("fold", "n_train", "n_test", *record.parameter, *headline_names(run.metrics), "n_clusters")
                if c in folds.columns]
        report.add(Heading("Per-fold metrics"), folds_table(
            folds[keep], "Each fold's parameter was chosen on the other folds' pairs. All per-fold metrics are in folds.csv."))
    sweep = _table(run, "sweep.csv", SWEEP_COLUMNS, report)
    if sweep is not None:
        report.add(Heading("Parameter sweep"), Figure("sweep", sweep_figure(sweep, record.parameter), (
            "Pairwise metrics against the grouping parameter on the training folds: mean over folds (thick) "
            "and each fold (thin).")))
    clusters = _table(run, "clusters.csv", CLUSTER_COLUMNS, report)
    if clusters is not None:
        report.add(Heading("Cluster sizes"), Figure("clusters", cluster_size_figure(clusters, record.groups or "group"), (
            "How many images each predicted cluster of the held-out folds holds, beside the true groups.")))
    _pair_sheet(report, run)
    return report


def _table(run: Run, name: str, columns: tuple[str, ...], report: Report, absent: str = "") -> Optional[pd.DataFrame]:
    """The run's table ``name`` when it is there with rows; else None, and a note in ``report`` when
    it lacks ``columns`` (or, given ``absent``, that note when it is missing or empty)."""
    table = run.table(name)
    if table is None or table.empty:
        if absent:
            report.add(Note(absent))
        return None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        report.add(Note(f"{name} lacks {', '.join(missing)} (the run folder is damaged): it is not drawn."))
        return None
    return table


def _chosen_candidates(sweep: pd.DataFrame) -> pd.DataFrame:
    """With projection-head candidates, keep per fold only the candidate that was chosen."""
    if sweep["candidate"].dropna().nunique() <= 1:  # frozen features: no candidate (empty cells)
        return sweep
    chosen = sweep[sweep["chosen"].astype(bool)][["fold", "candidate"]].drop_duplicates("fold")
    return sweep.merge(chosen, on=["fold", "candidate"])


def sweep_figure(sweep: pd.DataFrame, parameter: Mapping[str, float]) -> bytes:
    """Pairwise metrics against the swept parameter: mean over folds and each fold; the final value marked."""
    sweep = _chosen_candidates(sweep)
    name = str(sweep["param"].iloc[0])
    metrics = ["f1", "precision", "recall"]
    mean = sweep.groupby("value")[metrics].mean().sort_index()
    with style.styled():
        fig = style.new_figure(7.6, 4.8)
        ax = fig.add_subplot()
        for i, metric in enumerate(metrics):
            for _, fold in sweep.groupby("fold"):
                fold = fold.sort_values("value")
                ax.plot(fold["value"], fold[metric], color=style.color(i), lw=0.8, alpha=0.35)
            ax.plot(mean.index, mean[metric], color=style.color(i), lw=2.4, label=f"pairwise {pretty(metric)}")
        if name in parameter:
            ax.axvline(parameter[name], ls="--", color=style.MUTED, lw=1.2,
                       label=f"final {name} = {parameter[name]:.3g} (mean of the folds' choices)")
        ax.set(xlabel=pretty(name), ylabel="pairwise metric (training folds)", ylim=(0, 1.02),
               title=f"Sweep of the {pretty(name)}")
        fig.legend(loc="outside lower center", ncol=2)
        return style.to_png(fig)


def cluster_size_figure(clusters: pd.DataFrame, groups: str) -> bytes:
    """How many clusters of each size the held-out folds were grouped into, beside the true groups."""
    series = {"predicted clusters (held-out folds)": clusters["cv_cluster"].value_counts(),
              f"true {groups} groups": clusters["group"].value_counts()}
    top = int(max(s.max() for s in series.values()))
    sizes = np.arange(1, min(top, 12) + 1)
    with style.styled():
        fig = style.new_figure(7.6, 4.0)
        ax = fig.add_subplot()
        width = 0.8 / len(series)
        for i, (name, counts) in enumerate(series.items()):
            histogram = counts.clip(upper=sizes[-1]).value_counts().reindex(sizes, fill_value=0)
            ax.bar(sizes + (i - (len(series) - 1) / 2) * width, histogram.to_numpy(), width=width,
                   color=style.color(i), label=f"{name}: {len(counts)}")
        ax.set_xticks(sizes, [str(s) if s < sizes[-1] or s == top else f"{s}+" for s in sizes])
        ax.set(xlabel="images per cluster", ylabel="clusters", title="Cluster sizes")
        ax.legend()
        return style.to_png(fig)


def _pair_sheet(report: Report, run: Run) -> None:
    report.add(Heading("Worst false matches and missed matches"))
    pairs = _table(run, "pairs.csv", PAIR_COLUMNS, report, absent="pairs.csv is missing or empty: no pair sheet.")
    if pairs is None:
        return
    false_matches, missed = worst_pairs(pairs)
    if false_matches.empty and missed.empty:
        report.add(Note("no false or missed matches in pairs.csv."))
        return
    ids = [*false_matches["id_a"], *false_matches["id_b"], *missed["id_a"], *missed["id_b"]]
    thumbs = load_thumbnails(run.record.store, run.path, ids)
    if isinstance(thumbs, str):
        report.add(Note(f"No pair sheet: {thumbs}."))
        return
    groups = run.record.groups or "group"
    report.add(Figure(
        "pairs", pair_sheet_figure(false_matches, missed, thumbs, groups),
        "Left: pairs of different lesions matched with the highest similarity (false matches). "
        "Right: pairs of the same lesion left apart with the lowest similarity (missed matches). "
        f"Under each image: its image id and its `{groups}`; under the first image of a pair, the pair's similarity.",
    ))


def worst_pairs(pairs: pd.DataFrame, n: int = SHEET_PAIRS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``n`` most similar false matches (outcome FP) and the ``n`` least similar missed matches (FN)
    of pairs.csv, ids and groups as text."""
    pairs = pairs.astype({"id_a": str, "id_b": str, "group_a": str, "group_b": str})
    false_matches = pairs[pairs["outcome"] == "FP"].nlargest(n, "similarity")
    missed = pairs[pairs["outcome"] == "FN"].nsmallest(n, "similarity")
    return false_matches, missed


def pair_sheet_figure(false_matches: pd.DataFrame, missed: pd.DataFrame, thumbs: dict, groups: str) -> bytes:
    """Two columns of pairs: false matches (most similar first) and missed matches (least similar first),
    each image captioned with its id and group."""
    grid = []
    for r in range(max(len(false_matches), len(missed))):
        row = []
        for frame, color in ((false_matches, style.WRONG), (missed, style.color(0))):
            if r >= len(frame):
                row += [None, None]
            else:
                pair = frame.iloc[r]
                row += [Tile(thumbs.get(pair["id_a"]), (pair["id_a"], f"{groups} {pair['group_a']}",
                                                        f"similarity {pair['similarity']:.3f}"), color),
                        Tile(thumbs.get(pair["id_b"]), (pair["id_b"], f"{groups} {pair['group_b']}", ""), color)]
            row.append(None)
        grid.append(row[:-1])
    headers = [Header("✗ false matches (different lesions)", 0, 2, style.WRONG),
               Header("○ missed matches (same lesion)", 3, 2, style.color(0))]
    return draw_sheet(grid, "Worst false and missed matches", headers, gaps=(2,))
