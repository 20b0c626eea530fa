"""The report of a probe run: metrics with CIs, folds, confusion matrix, curves, calibration, maps, samples.

Every figure is computed from the run as :func:`embedstore.runs.read_run` gives it: its record
and metrics, and the files the probe wrote (``predictions.parquet``, ``embedding_2d.parquet``,
``folds.csv``); every figure of predictions comes from :mod:`embedstore.metrics`. No model is re-run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from embedstore.errors import EmbedstoreError
from embedstore.metrics import (
    accuracy,
    balanced_accuracy,
    binary_auc,
    binary_average_precision,
    calibration,
    confusion,
    precision_recall_points,
    roc_points,
)
from embedstore.report import style
from embedstore.report.charts import (
    comparison_table,
    folds_table,
    headline_names,
    headline_section,
    interval_figure,
    row_labels,
)
from embedstore.report.document import Figure, Heading, Note, Paragraph, Report
from embedstore.report.paths import shown_path, shown_storage
from embedstore.report.thumbnails import Tile, draw_sheet, load_thumbnails
from embedstore.runs import Run
from embedstore.runs.comparison import pretty, rows_of_metrics

SAMPLE_GRID = (4, 6)  # rows x columns of the sample-prediction grid
RANKING_METRICS = ("roc_auc", "average_precision", "pauc_80")  # pooled out of fold, they are not fold means


class Predictions:
    """The evaluated rows of predictions.parquet: true and predicted class names, the probability matrix."""

    def __init__(self, frame: pd.DataFrame, classes: list[str], split: str):
        self.split = split
        self.classes = list(classes)
        self.ids = frame["id"].astype(str).to_numpy()
        self.y_true = frame["y_true"].astype(str).to_numpy(dtype=object)
        self.y_pred = frame["y_pred"].astype(str).to_numpy(dtype=object)
        self.proba = frame[[f"p_{c}" for c in classes]].to_numpy(dtype=float)

    @classmethod
    def from_run(cls, run: Run) -> "Predictions | str":
        """The test rows of the run's predictions (its out-of-fold rows without a test split), or why there are none."""
        frame = run.table("predictions.parquet")
        if frame is None or frame.empty:
            return "predictions.parquet is missing"
        classes = list(run.record.classes)
        missing = [c for c in ("id", "split", "y_true", "y_pred", *(f"p_{c}" for c in classes)) if c not in frame]
        if missing:
            return f"predictions.parquet lacks {', '.join(missing)} (the run folder is damaged)"
        split = "test" if (frame["split"] == "test").any() else "oof"
        return cls(frame[frame["split"] == split].reset_index(drop=True), classes, split)

    def codes(self, labels: np.ndarray) -> np.ndarray:
        """Class names as class codes (positions in :attr:`classes`), as :mod:`embedstore.metrics` takes them."""
        return pd.Categorical(labels, categories=self.classes).codes.astype(int)

    @property
    def description(self) -> str:
        n = len(self.ids)
        return f"held-out test predictions, {n} images" if self.split == "test" else f"out-of-fold predictions, {n} images"


def build_probe_report(run: Run) -> Report:
    record = run.record
    report = Report(
        title=f"Probe: {run.label}",
        subtitle=(
            f"target `{record.target}`, groups `{record.groups}`, store `{shown_path(record.store, run.path)}`, "
            f"seed {record.seed}, created {record.created}"
        ),
    )
    resampled = "95% CIs from a bootstrap resampled by group" + (
        " (top-15 sensitivity: by patient with a malignant lesion)" if "top15_sensitivity" in run.metrics.metrics else "")
    report.add(*headline_section(run, resampled))
    _models(report, run)
    folds = _reported_folds(run)
    if folds is not None:
        report.add(Heading("Per-fold metrics"), folds_table(folds, _folds_caption(run, folds)))
    predictions = Predictions.from_run(run)
    if isinstance(predictions, str):
        report.add(Note(f"{predictions}: no confusion matrix, curves, calibration or samples."))
    else:
        _prediction_figures(report, run, predictions)
    _embedding_map(report, run)
    if not isinstance(predictions, str):
        _sample_grid(report, run, predictions)
    _study_pointer(report, run)
    return report


def _reported_folds(run: Run) -> pd.DataFrame | None:
    """folds.csv rows of the reported model, with the fold sizes and headline metrics."""
    folds = run.table("folds.csv")
    if folds is None or folds.empty:
        return None
    if "model" in folds.columns:
        folds = folds[folds["model"] == run.metrics.model].drop(columns="model")
    keep = [c for c in ("fold", "n_train", "n_test") if c in folds.columns]
    keep += [c for c in headline_names(run.metrics) if c in folds.columns] or [c for c in folds.columns if c not in keep]
    keep += [c for c in ("seconds",) if c in folds.columns and c not in keep]
    return folds[keep].reset_index(drop=True)


def _folds_caption(run: Run, folds: pd.DataFrame) -> str:
    """What the folds are, and, for out-of-fold headline metrics, why a pooled ranking metric is no fold mean."""
    if run.metrics.evaluated_on == "test":
        scored = "rows of another store (see above)" if run.record.transfer else "held-out test set"
        return (f"Cross-validation folds of the training data (the headline metrics above are on the {scored}); "
                "no group is on both sides. All metrics are in folds.csv.")
    caption = "Headline metrics on each held-out fold; no group is on both sides. All metrics are in folds.csv."
    ranking = [pretty(n) for n in RANKING_METRICS if n in folds.columns and n in run.metrics.metrics]
    if ranking:
        caption += (f" The headline {' and '.join(ranking)} {'is' if len(ranking) == 1 else 'are'} computed on the "
                    "pooled out-of-fold scores: pooled, the scores of all folds are ranked together although each "
                    "fold's head is calibrated differently, so a pooled value can be below every fold's value.")
    return caption


def _models(report: Report, run: Run) -> None:
    """The run's models side by side (a stack beside its bases, or the models compared); skipped for a single model."""
    if len(run.metrics.models) < 2:
        return
    rows = rows_of_metrics(run.metrics, run.name)
    names = [n for n in headline_names(run.metrics) if any(n in row.estimates for row in rows)]
    stacked = any(row.model == "stack" or " (in " in row.model for row in rows)
    title, chart, caption = (
        ("Ensemble beside its base models", "Base models and ensemble", "Each base model beside the ensemble, with 95% CIs.")
        if stacked else ("Models compared", "Models compared", "Each model the probe compared, with 95% CIs."))
    report.add(Heading(title), comparison_table(
        rows, names, "Best value of each metric in bold; 95% CIs under the values.", reported=run.metrics.model))
    series = {label: row.estimates for label, row in zip(row_labels(rows, reported=run.metrics.model), rows)}
    png = interval_figure(series, names, chart)
    if png:
        report.add(Figure("models", png, caption))


def _prediction_figures(report: Report, run: Run, pred: Predictions) -> None:
    report.add(Heading("Confusion matrix"))
    report.add(Figure("confusion", confusion_figure(pred), f"Rows: true class, normalised per row; counts in brackets. {pred.description.capitalize()}."))
    positive = run.record.positive_class
    report.add(Heading("ROC and precision-recall curves"))
    report.add(Figure("roc_pr", roc_pr_figure(pred, positive), _curve_caption(pred, positive)))
    report.add(Heading("Calibration"))
    report.add(Figure("calibration", calibration_figure(pred, positive), _calibration_caption(pred, positive)))


def _curve_caption(pred: Predictions, positive) -> str:
    if len(pred.classes) == 2:
        return f"Positive class `{_positive(pred, positive)}`; dashed: chance. {pred.description.capitalize()}."
    return f"One-vs-rest curve per class; AUC and average precision (AP) in the legend. {pred.description.capitalize()}."


def _calibration_caption(pred: Predictions, positive) -> str:
    if len(pred.classes) == 2:
        what = f"predicted probability of `{_positive(pred, positive)}` against its observed frequency"
    else:
        what = "confidence of the top class against its accuracy (top-label calibration)"
    return f"Reliability diagram: {what}, 10 equal-width bins; below, how many predictions fall in each bin."


def _positive(pred: Predictions, positive) -> str:
    return str(positive) if positive is not None and str(positive) in pred.classes else pred.classes[-1]


def confusion_figure(pred: Predictions) -> bytes:
    classes = pred.classes
    true_codes, pred_codes = pred.codes(pred.y_true), pred.codes(pred.y_pred)
    counts = confusion(true_codes, pred_codes, len(classes))
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    k = len(classes)
    with style.styled():
        size = min(3.2 + 0.55 * k, 9.5)
        fig = style.new_figure(max(size + 1.0, 6.0), size)  # 6 inches at least: room for the title
        ax = fig.add_subplot()
        # aspect="auto": constrained layout cuts the axis labels of equal-aspect axes it must shrink.
        image = ax.imshow(rates, cmap=style.SEQUENTIAL_CMAP, vmin=0, vmax=1, aspect="auto")
        ax.grid(False)
        fontsize = 9 if k <= 8 else 7
        for i in range(k):
            for j in range(k):
                ink = "white" if rates[i, j] > 0.6 else "#1f2328"
                ax.text(j, i, f"{rates[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", color=ink, fontsize=fontsize)
        labels = [style.short(c) for c in classes]
        ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        fig.suptitle(f"Confusion matrix (accuracy {accuracy(true_codes, pred_codes):.3f}, "
                     f"balanced {balanced_accuracy(true_codes, pred_codes):.3f})", fontsize=12, fontweight="bold")
        fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
        return style.to_png(fig)


def _one_vs_rest(pred: Predictions, positive) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(class, binary truth, score) per curve: one for binary problems, one per class otherwise."""
    if len(pred.classes) == 2:
        pos = _positive(pred, positive)
        col = pred.classes.index(pos)
        return [(pos, (pred.y_true == pos).astype(int), pred.proba[:, col])]
    return [(c, (pred.y_true == c).astype(int), pred.proba[:, i]) for i, c in enumerate(pred.classes)]


def roc_pr_figure(pred: Predictions, positive=None) -> bytes:
    curves = [c for c in _one_vs_rest(pred, positive) if 0 < c[1].sum() < len(c[1])]
    with style.styled():
        legend_rows = -(-(len(curves) + 1) // 4)
        fig = style.new_figure(10.5, 5.0 + 0.25 * legend_rows)
        roc_ax, pr_ax = fig.subplots(1, 2)
        for i, (name, truth, score) in enumerate(curves):
            label = f"{style.short(name)}: AUC {binary_auc(truth, score):.3f}, AP {binary_average_precision(truth, score):.3f}"
            roc_ax.plot(*roc_points(truth, score), color=style.color(i), lw=1.8, label=label)
            pr_ax.plot(*precision_recall_points(truth, score), color=style.color(i), lw=1.8, drawstyle="steps-post")
        roc_ax.plot([0, 1], [0, 1], ls="--", color=style.MUTED, lw=1, label="chance")
        if len(curves) == 1:
            pr_ax.axhline(curves[0][1].mean(), ls="--", color=style.MUTED, lw=1)
        for ax, title, xlabel, ylabel in (
            (roc_ax, "ROC curve", "false positive rate (1 − specificity)", "true positive rate (sensitivity)"),
            (pr_ax, "Precision-recall curve", "recall (sensitivity)", "precision (PPV)"),
        ):
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), title=title, xlabel=xlabel, ylabel=ylabel)
        # One legend for both panels, below them, so no curve is hidden. No fixed aspect: constrained
        # layout cannot place titles and the outside legend around equal-aspect axes (they were clipped).
        fig.legend(*roc_ax.get_legend_handles_labels(), loc="outside lower center", ncol=min(4, len(curves) + 1))
        return style.to_png(fig)


def calibration_figure(pred: Predictions, positive=None) -> bytes:
    if len(pred.classes) == 2:
        pos = _positive(pred, positive)
        confidence = pred.proba[:, pred.classes.index(pos)]
        outcome = pred.y_true == pos
        xlabel, ylabel = f"predicted probability of {style.short(pos)}", f"observed frequency of {style.short(pos)}"
    else:
        top = pred.proba.argmax(axis=1)
        confidence = pred.proba[np.arange(len(top)), top]
        outcome = np.asarray(pred.classes, dtype=object)[top] == pred.y_true
        xlabel, ylabel = "confidence of the predicted class", "accuracy"
    bins = calibration(confidence, outcome)
    filled = bins.counts > 0
    with style.styled():
        fig = style.new_figure(5.8, 6.0)
        grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
        ax = fig.add_subplot(grid[0])
        hist = fig.add_subplot(grid[1], sharex=ax)
        ax.plot([0, 1], [0, 1], ls="--", color=style.MUTED, lw=1, label="perfectly calibrated")
        ax.plot(bins.confidence[filled], bins.observed[filled], "o-", color=style.color(0), lw=2, label="this model")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel=ylabel, title=f"Calibration (ECE {bins.ece:.3f})")
        ax.legend(loc="upper left")
        ax.tick_params(labelbottom=False)
        hist.bar(bins.edges[:-1], bins.counts, width=np.diff(bins.edges), align="edge", color=style.color(5), edgecolor="white")
        hist.set(xlabel=xlabel, ylabel="predictions")
        return style.to_png(fig)


def _embedding_map(report: Report, run: Run) -> None:
    frame = run.table("embedding_2d.parquet")
    report.add(Heading("Embedding map"))
    if frame is None or frame.empty or not {"x", "y", "label"} <= set(frame.columns):
        report.add(Note("embedding_2d.parquet is missing: the probe did not save a 2-D map of the features."))
        return
    report.add(Figure("embedding", embedding_figure(frame, list(run.record.classes)),
                      "t-SNE of the features, one point per image, coloured by label."))


def embedding_figure(frame: pd.DataFrame, classes: list[str]) -> bytes:
    labels = frame["label"].astype(str)
    order = [c for c in classes if c in set(labels)] + sorted(set(labels) - set(classes))
    with style.styled():
        fig = style.new_figure(7.6, 6.0)
        ax = fig.add_subplot()
        size = float(np.clip(6000 / max(len(frame), 1), 4, 36))
        drawing = sorted(order, key=lambda c: -(labels == c).sum())  # largest first: small classes stay on top
        for label in drawing:
            i = order.index(label)
            mask = (labels == label).to_numpy()
            ax.scatter(frame["x"][mask], frame["y"][mask], s=size, color=style.color(i), alpha=0.8,
                       linewidths=0.3, edgecolors="white", label=f"{style.short(label)} ({mask.sum()})", zorder=2 + i / 100)
        handles = dict(zip(drawing, ax.get_legend_handles_labels()[0]))  # the legend in class order
        ax.legend([handles[c] for c in order], [handles[c].get_label() for c in order], loc="center left",
                  bbox_to_anchor=(1.0, 0.5), markerscale=2)
        ax.set(xlabel="t-SNE 1", ylabel="t-SNE 2", title=f"Embedding map ({len(frame)} images)")
        ax.set_xticks([])
        ax.set_yticks([])
        return style.to_png(fig)


def pick_samples(pred: Predictions, n: int, seed: int = 0) -> list[int]:
    """Rows for the sample grid: the most confident mistakes and random correct ones, classes in turn."""
    rng = np.random.default_rng(seed)
    correct = pred.y_true == pred.y_pred
    confidence = pred.proba.max(axis=1)
    n_wrong = min(int((~correct).sum()), n // 2)
    n_right = min(int(correct.sum()), n - n_wrong)
    wrong_rows = _round_robin(pred, np.flatnonzero(~correct)[np.argsort(-confidence[~correct], kind="stable")], n_wrong)
    right_pool = np.flatnonzero(correct)
    right_rows = _round_robin(pred, rng.permutation(right_pool), n_right)
    return right_rows + wrong_rows


def _round_robin(pred: Predictions, rows: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` of ``rows`` (kept in order within a class), taking true classes in turn."""
    queues = {c: [r for r in rows if pred.y_true[r] == c] for c in pred.classes}
    queues.update({c: [r for r in rows if pred.y_true[r] == c] for c in set(pred.y_true[rows]) - set(queues)})
    picked: list[int] = []
    while len(picked) < n and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return picked


def _sample_grid(report: Report, run: Run, pred: Predictions) -> None:
    report.add(Heading("Sample predictions"))
    rows, cols = SAMPLE_GRID
    picked = pick_samples(pred, rows * cols, seed=run.record.seed)
    transfer = run.record.transfer
    store = transfer.test_store if transfer and pred.split == "test" else run.record.store
    thumbs = load_thumbnails(store, run.path, [pred.ids[r] for r in picked])
    if isinstance(thumbs, str):
        report.add(Note(f"No sample grid: {thumbs}."))
        return
    picked = [r for r in picked if pred.ids[r] in thumbs]
    report.add(Figure(
        "samples", sample_grid_figure(pred, picked, thumbs, cols),
        "Green border and ✓: correct; red border and ✗: wrong (the most confident mistakes). "
        "Caption: true class, predicted class and its probability.",
    ))


def sample_grid_figure(pred: Predictions, rows: list[int], thumbs: dict, cols: int) -> bytes:
    tiles = []
    for r in rows:
        ok = pred.y_true[r] == pred.y_pred[r]
        prob = ""
        if pred.y_pred[r] in pred.classes:
            prob = f" ({pred.proba[r, pred.classes.index(pred.y_pred[r])]:.2f})"
        tiles.append(Tile(thumbs[pred.ids[r]], (f"{'✓' if ok else '✗'} true {pred.y_true[r]}", f"pred {pred.y_pred[r]}{prob}"),
                          style.CORRECT if ok else style.WRONG, border=5))
    grid = [tiles[i:i + cols] for i in range(0, len(tiles), cols)]
    return draw_sheet(grid, "Sample predictions")


def _study_pointer(report: Report, run: Run) -> None:
    """The tuning study of the run: its history and best parameters when the storage is readable."""
    study = run.record.study
    if study is None:
        return
    command = f"embedstore report {shown_storage(study.storage, run.path)} --study {study.name}"
    report.add(Heading("Tuning"))
    from embedstore.report.study_report import tuning_summary

    try:
        report.add(*tuning_summary(study.storage, study.name))
    except EmbedstoreError as exc:
        report.add(Note(f"the tuning study cannot be read ({exc})."))
    report.add(Paragraph(f"The study's full report (importances, parallel coordinates, slices): `{command}` "
                         "(the storage named as seen from this run folder)."))
