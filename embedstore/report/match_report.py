"""The report of a match run: metrics with CIs, folds, the parameter sweep, cluster sizes, pair sheets.

Reads ``metrics.json``, ``folds.csv``, ``sweep.csv``, ``clusters.csv`` and ``pairs.csv``.
The column spellings the match engine writes are documented in :data:`PAIR_COLUMNS`
and :data:`SWEEP_PARAMETERS`; a few synonyms are accepted so the report stays
readable when a run adds columns.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from embedstore.report import style
from embedstore.report.charts import folds_table, headline_section, pretty
from embedstore.report.document import Figure, Heading, Note, Report
from embedstore.report.runs import Run
from embedstore.report.thumbnails import Header, Tile, draw_sheet, load_thumbnails

PAIR_COLUMNS = {
    "id_a": ("id_a", "a", "id1", "image_a"),
    "id_b": ("id_b", "b", "id2", "image_b"),
    "score": ("similarity", "score", "cosine"),
    "same": ("same_group", "same_lesion", "true_match", "is_match", "same"),
    "decided": ("same_cluster", "decided", "predicted", "matched"),
}
SWEEP_PARAMETERS = ("threshold", "eps", "distance_threshold", "param", "value")
SHEET_PAIRS = 6  # pairs per column of the pair sheet


def normalise_pairs(frame: pd.DataFrame) -> Optional[pd.DataFrame]:
    """pairs.csv as ``id_a, id_b, score, outcome`` (tp, fp, fn, tn), or None if it cannot be read."""
    found = {}
    for role, names in PAIR_COLUMNS.items():
        found[role] = next((n for n in names if n in frame.columns), None)
    if not (found["id_a"] and found["id_b"] and found["score"]):
        return None
    out = pd.DataFrame({
        "id_a": frame[found["id_a"]].astype(str),
        "id_b": frame[found["id_b"]].astype(str),
        "score": frame[found["score"]].astype(float),
    })
    outcome_column = next((c for c in ("outcome", "kind", "status") if c in frame.columns), None)
    if outcome_column is not None:
        out["outcome"] = frame[outcome_column].astype(str).str.lower().map(_OUTCOME_SYNONYMS).fillna("other")
    elif found["same"] and found["decided"]:
        same = frame[found["same"]].astype(bool).to_numpy()
        decided = frame[found["decided"]].astype(bool).to_numpy()
        out["outcome"] = np.select([same & decided, ~same & decided, same & ~decided], ["tp", "fp", "fn"], "tn")
    else:
        return None
    return out


_OUTCOME_SYNONYMS = {
    "tp": "tp", "true_match": "tp", "true_positive": "tp", "correct": "tp",
    "fp": "fp", "false_match": "fp", "false_positive": "fp",
    "fn": "fn", "missed": "fn", "missed_match": "fn", "false_negative": "fn",
    "tn": "tn", "true_negative": "tn",
}


def build_match_report(run: Run) -> Report:
    info = run.info
    report = Report(
        title=f"Match: {run.label}",
        subtitle=(
            f"groups `{info.get('groups', '?')}`, projection `{info.get('projection', 'none')}`, "
            f"store `{info.get('store', '?')}`, seed {info.get('seed', '?')}, created {info.get('created', '?')}"
        ),
    )
    report.add(*headline_section(
        run, "Pairwise metrics count every pair of images (same group = positive pair); 95% CIs from a bootstrap by group"))
    folds = run.table("folds.csv")
    if folds is not None and not folds.empty:
        parameter = list(info["parameter"]) if isinstance(info.get("parameter"), dict) else []
        keep = [c for c in ("fold", "n_train", "n_test", *parameter, *run.headline, "n_clusters") if c in folds.columns]
        report.add(Heading("Per-fold metrics"), folds_table(
            folds[keep] if len(keep) > 3 else folds,
            "Each fold's parameter was chosen on the other folds' pairs. All per-fold metrics are in folds.csv."))
    sweep = run.table("sweep.csv")
    if sweep is not None and not sweep.empty:
        png = sweep_figure(sweep, run.info)
        if png:
            report.add(Heading("Parameter sweep"), Figure("sweep", png, "Pairwise metrics against the grouping parameter on the training folds: mean over folds (thick) and each fold (thin)."))
    clusters = run.table("clusters.csv")
    if clusters is not None and not clusters.empty:
        png = cluster_size_figure(clusters, str(info.get("groups") or "group"))
        if png:
            report.add(Heading("Cluster sizes"), Figure("clusters", png, "How many images each predicted cluster holds, beside the true groups."))
    _pair_sheet(report, run)
    return report


def _sweep_parameter(sweep: pd.DataFrame) -> Optional[str]:
    for name in SWEEP_PARAMETERS:
        if name in sweep.columns and _is_number(sweep[name]):
            return name
    numeric = [c for c in sweep.columns if _is_number(sweep[c]) and c != "fold"]
    return numeric[0] if numeric else None


def _is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _chosen_candidates(sweep: pd.DataFrame) -> pd.DataFrame:
    """With projection-head candidates, keep per fold only the candidate that was chosen."""
    if not {"candidate", "chosen"} <= set(sweep.columns) or sweep["candidate"].astype(str).replace("nan", "").nunique() <= 1:
        return sweep
    chosen = sweep[sweep["chosen"].astype(bool)][["fold", "candidate"]].drop_duplicates("fold")
    return sweep.merge(chosen, on=["fold", "candidate"])


def sweep_figure(sweep: pd.DataFrame, info: dict) -> Optional[bytes]:
    """Pairwise metrics against the swept parameter: mean over folds and each fold; the chosen value marked."""
    parameter = _sweep_parameter(sweep)
    if parameter is None:
        return None
    sweep = _chosen_candidates(sweep)
    name = str(sweep["param"].iloc[0]) if "param" in sweep.columns and parameter == "value" else parameter
    metrics = [c for c in sweep.columns if c not in (parameter, "fold") and not c.startswith("n_") and _is_number(sweep[c])]
    preferred = [m for m in ("f1", "precision", "recall") if m in metrics]
    metrics = preferred or metrics[:4]
    if not metrics:
        return None
    mean = sweep.groupby(parameter)[metrics].mean().sort_index()
    with style.styled():
        fig = style.new_figure(7.6, 4.8)
        ax = fig.add_subplot()
        for i, metric in enumerate(metrics):
            if "fold" in sweep.columns:
                for _, fold in sweep.groupby("fold"):
                    fold = fold.sort_values(parameter)
                    ax.plot(fold[parameter], fold[metric], color=style.color(i), lw=0.8, alpha=0.35)
            ax.plot(mean.index, mean[metric], color=style.color(i), lw=2.4, label=f"pairwise {pretty(metric)}")
        chosen = (info.get("parameter") or {}).get(name) if isinstance(info.get("parameter"), dict) else None
        target = "f1" if "f1" in metrics else metrics[0]
        if isinstance(chosen, (int, float)):
            label = f"final {name} = {chosen:.3g} (mean of the folds' choices)"
        else:
            chosen = float(mean[target].idxmax())
            label = f"best mean {pretty(target)}: {name} = {chosen:.3g}"
        ax.axvline(chosen, ls="--", color=style.MUTED, lw=1.2, label=label)
        ax.set(xlabel=pretty(name), ylabel="pairwise metric (training folds)", ylim=(0, 1.02),
               title=f"Sweep of the {pretty(name)}")
        fig.legend(loc="outside lower center", ncol=2)
        return style.to_png(fig)


def cluster_size_figure(clusters: pd.DataFrame, groups: str) -> Optional[bytes]:
    cluster_column = next((c for c in ("cv_cluster", "cluster", "cluster_id") if c in clusters.columns), None)
    if cluster_column is None:
        return None
    what = "predicted clusters (held-out folds)" if cluster_column == "cv_cluster" else "predicted clusters"
    series = {what: clusters[cluster_column].value_counts()}
    true_column = next((c for c in (groups, "group", "lesion_id", "true_group") if c in clusters.columns), None)
    if true_column is not None:
        series[f"true {groups} groups"] = clusters[true_column].value_counts()
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
    raw = run.table("pairs.csv")
    report.add(Heading("Worst false matches and missed matches"))
    if raw is None or raw.empty:
        report.add(Note("pairs.csv is missing: no pair sheet."))
        return
    pairs = normalise_pairs(raw)
    if pairs is None:
        report.add(Note(f"pairs.csv has columns {list(raw.columns)}; the report needs id_a, id_b, score and an outcome."))
        return
    false_matches, missed = worst_pairs(pairs)
    if false_matches.empty and missed.empty:
        report.add(Note("no false or missed matches in pairs.csv."))
        return
    ids = [*false_matches["id_a"], *false_matches["id_b"], *missed["id_a"], *missed["id_b"]]
    thumbs = load_thumbnails(run.info.get("store"), run.path, ids)
    if isinstance(thumbs, str):
        report.add(Note(f"No pair sheet: {thumbs}."))
        return
    report.add(Figure(
        "pairs", pair_sheet_figure(false_matches, missed, thumbs),
        "Left: pairs of different lesions matched with the highest similarity (false matches). "
        "Right: pairs of the same lesion left apart with the lowest similarity (missed matches).",
    ))


def worst_pairs(pairs: pd.DataFrame, n: int = SHEET_PAIRS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``n`` most similar false matches and the ``n`` least similar missed matches."""
    false_matches = pairs[pairs["outcome"] == "fp"].nlargest(n, "score")
    missed = pairs[pairs["outcome"] == "fn"].nsmallest(n, "score")
    return false_matches, missed


def pair_sheet_figure(false_matches: pd.DataFrame, missed: pd.DataFrame, thumbs: dict) -> bytes:
    """Two columns of pairs: false matches (most similar first) and missed matches (least similar first)."""
    grid = []
    for r in range(max(len(false_matches), len(missed))):
        row = []
        for frame, color in ((false_matches, style.WRONG), (missed, style.color(0))):
            if r >= len(frame):
                row += [None, None]
            else:
                pair = frame.iloc[r]
                row += [Tile(thumbs.get(pair["id_a"]), (str(pair["id_a"]), f"similarity {pair['score']:.3f}"), color),
                        Tile(thumbs.get(pair["id_b"]), (str(pair["id_b"]), ""), color)]
            row.append(None)
        grid.append(row[:-1])
    headers = [Header("✗ false matches (different lesions)", 0, 2, style.WRONG),
               Header("○ missed matches (same lesion)", 3, 2, style.color(0))]
    return draw_sheet(grid, "Worst false and missed matches", headers, gaps=(2,))
