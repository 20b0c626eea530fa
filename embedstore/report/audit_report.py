"""The report of a leakage audit: the counts, the similarity histogram with the threshold, sheets of the most
similar pairs that cross a group, the split or the folds, and the largest suspected duplicate clusters.

Reads the audit through :func:`embedstore.runs.read_run` and the files :mod:`embedstore.audit.run` writes:
``histogram.csv`` (``low, high`` and ``same_group, different_group`` or ``pairs``), ``nearest_pairs.csv``
(``id_a, id_b, similarity, exact, kind, flagged``, each image's ``group_*``, ``split_*``, ``fold_*`` and
``label_*``) and ``clusters.csv`` (``id, group, cluster, cluster_size``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from embedstore.report import style
from embedstore.report.charts import headline_section
from embedstore.report.document import Figure, Heading, Note, Paragraph, Report, Table
from embedstore.report.match_report import _table
from embedstore.report.paths import shown_path
from embedstore.report.thumbnails import Tile, draw_sheet, load_thumbnails
from embedstore.runs import Run

PAIRS_PER_ROW = 3
CLUSTERS_LISTED = 20
KIND_TITLES = {
    "cross_group": "Most similar pairs of two {groups} groups",
    "cross_split": "Most similar pairs across the official split",
    "cross_fold": "Most similar pairs in two folds",
}


def build_audit_report(run: Run) -> Report:
    record, groups = run.record, run.record.groups or "group"
    grouped = f"groups `{record.groups}`" if record.groups else "every image its own group"
    split = f", split column `{record.split_column}`" if record.split_column else ""
    folds = f"{record.folds} folds" + (f" stratified by `{record.target}`" if record.target else "")
    report = Report(
        title=f"Leakage audit: {run.features_label}",
        subtitle=(f"{grouped}{split}, {folds}, seed {record.seed}, "
                  f"store `{shown_path(record.store, run.path)}`, created {record.created}"),
    )
    report.add(*headline_section(run, "Pairs flagged by the audit: identical bytes under two ids, or near-duplicates "
                                      "that cross a group, the split or the folds"))
    report.add(Paragraph(
        f"Two images are near-duplicates at cosine similarity {record.threshold:.4f} or more; the threshold was "
        f"{record.threshold_from}. Pairs come from each image's {record.neighbors} nearest neighbours (FAISS), plus "
        "every pair of identical bytes. Every flagged pair is in pairs.csv, the clusters in clusters.csv."))
    hist = _table(run, "histogram.csv", ("low", "high"), report)
    if hist is not None:
        report.add(Heading("Similarity of same-group and different-group pairs"), Figure(
            "similarity", histogram_figure(hist, record.threshold, groups),
            f"Cosine similarity of nearest-neighbour pairs of one `{groups}` and of two (log scale); the dashed line "
            "is the near-duplicate threshold. Different-group pairs right of it are suspected missed duplicates."))
    nearest = _table(run, "nearest_pairs.csv", ("id_a", "id_b", "similarity", "kind", "flagged"), report)
    if nearest is not None:
        _pair_sheets(report, run, nearest, groups)
    _clusters(report, run, groups)
    return report


def histogram_figure(hist: pd.DataFrame, threshold: float, groups: str) -> bytes:
    """Counts of pair similarities per bin, same-group and different-group as two step lines; the threshold."""
    series = ({f"same {groups}": "same_group", f"different {groups}": "different_group"}
              if "same_group" in hist.columns else {"pairs": "pairs"})
    centre = (hist["low"] + hist["high"]) / 2
    with style.styled():
        fig = style.new_figure(7.6, 4.2)
        ax = fig.add_subplot()
        for k, (label, column) in enumerate(series.items()):
            counts = hist[column].to_numpy()
            ax.step(centre, np.where(counts > 0, counts, np.nan), where="mid", color=style.color(k), lw=1.6,
                    label=f"{label}: {int(counts.sum()):,} pairs")
        ax.axvline(threshold, ls="--", color=style.WRONG, lw=1.4, label=f"threshold {threshold:.4f}")
        ax.set_yscale("log")
        occupied = hist.loc[hist[list(series.values())].sum(axis=1) > 0, "low"]
        ax.set_xlim(float(occupied.min()) if len(occupied) else -1.0, 1.005)
        ax.set(xlabel="cosine similarity", ylabel="pairs per bin", title="Nearest-neighbour pairs by similarity")
        ax.legend(loc="upper left")
        return style.to_png(fig)


def _pair_sheets(report: Report, run: Run, nearest: pd.DataFrame, groups: str) -> None:
    nearest = nearest.astype({"id_a": str, "id_b": str})
    thumbs = load_thumbnails(run.record.store, run.path, [*nearest["id_a"], *nearest["id_b"]])
    for kind, pairs in nearest.groupby("kind", sort=False):
        title = KIND_TITLES.get(kind, kind).format(groups=groups)
        report.add(Heading(title))
        if isinstance(thumbs, str):
            report.add(Note(f"No pair sheet: {thumbs}."))
            continue
        n_flagged = int(pairs["flagged"].astype(bool).sum())
        report.add(Figure(f"pairs_{kind}", pair_sheet(pairs, thumbs, title, groups), (
            f"The {len(pairs)} most similar pairs of this kind, most similar first, flagged or not ({n_flagged} "
            f"flagged, in vermillion). Under each image: its id, its `{groups}`, its label and fold; under the first "
            "image of a pair, the pair's similarity. Look for the same lesion under two ids.")))


def _caption(pair: pd.Series, side: str, groups: str) -> tuple[str, ...]:
    label = f"{pair.get(f'label_{side}', '')} · " if f"label_{side}" in pair else ""
    fold = pair.get(f"fold_{side}", -1)
    where = f"fold {int(fold)}" if fold >= 0 else str(pair.get(f"split_{side}", ""))
    return (str(pair[f"id_{side}"]), f"{groups} {pair[f'group_{side}']}", f"{label}{where}")


def pair_sheet(pairs: pd.DataFrame, thumbs: dict, title: str, groups: str) -> bytes:
    """Pairs side by side, :data:`PAIRS_PER_ROW` to a row, flagged pairs in the colour of a wrong match."""
    grid, row = [], []
    for rank, (_, pair) in enumerate(pairs.iterrows(), start=1):
        color = style.WRONG if bool(pair["flagged"]) else "#333333"
        mark = "identical bytes" if bool(pair.get("exact", False)) else f"similarity {pair['similarity']:.4f}"
        row += [Tile(thumbs.get(pair["id_a"]), (*_caption(pair, "a", groups), f"#{rank} {mark}"), color, 2 * bool(pair["flagged"])),
                Tile(thumbs.get(pair["id_b"]), (*_caption(pair, "b", groups), ""), color, 2 * bool(pair["flagged"])), None]
        if len(row) == 3 * PAIRS_PER_ROW:
            grid.append(row[:-1])
            row = []
    if row:
        grid.append(row[:-1])
    gaps = tuple(range(2, 3 * PAIRS_PER_ROW - 1, 3))
    return draw_sheet(grid, title, gaps=gaps)


def _clusters(report: Report, run: Run, groups: str) -> None:
    table = _table(run, "clusters.csv", ("id", "group", "cluster", "cluster_size"), report)
    report.add(Heading("Suspected duplicate clusters"))
    if table is None:
        report.add(Note("no flagged pair: no cluster."))
        return
    listed = table.astype({"id": str, "group": str}).groupby("cluster", sort=True).agg(
        size=("id", "size"), ids=("id", lambda s: ", ".join(s)), groups=("group", lambda s: ", ".join(sorted(set(s)))))
    shown = listed.head(CLUSTERS_LISTED)
    report.add(Table(["cluster", "images", "ids", groups], [
        [str(c), str(r["size"]), r["ids"], r["groups"]] for c, r in shown.iterrows()],
        f"The connected components of the flagged pairs, largest first ({len(shown)} of {len(listed)} shown; "
        "all in clusters.csv)."))
