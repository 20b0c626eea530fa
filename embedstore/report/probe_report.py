"""The report of a probe run: metrics with CIs, folds, confusion matrix, curves, calibration, maps, samples.

Every figure is computed from the files the probe wrote (``predictions.parquet``,
``embedding_2d.parquet``, ``metrics.json``, ``folds.csv``); no model is re-run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import auc, average_precision_score, confusion_matrix, precision_recall_curve, roc_curve

from embedstore.errors import EmbedstoreError
from embedstore.report import style
from embedstore.report.charts import folds_table, headline_section, interval_figure, models_table
from embedstore.report.document import Figure, Heading, Note, Paragraph, Report
from embedstore.report.runs import Run
from embedstore.report.thumbnails import Tile, draw_sheet, load_thumbnails

SAMPLE_GRID = (4, 6)  # rows x columns of the sample-prediction grid


class Predictions:
    """The evaluated rows of predictions.parquet with labels as class names and a probability matrix."""

    def __init__(self, frame: pd.DataFrame, classes: list[str], split: str):
        self.split = split
        prob_columns = [f"p_{c}" for c in classes]
        if not classes or not all(c in frame.columns for c in prob_columns):
            prob_columns = [c for c in frame.columns if c.startswith("p_")]
            classes = [c[2:] for c in prob_columns]
        self.classes = classes
        self.ids = frame["id"].astype(str).to_numpy()
        self.y_true = _as_names(frame["y_true"], classes)
        self.y_pred = _as_names(frame["y_pred"], classes) if "y_pred" in frame else None
        self.proba = frame[prob_columns].to_numpy(dtype=float) if prob_columns else None
        if self.y_pred is None and self.proba is not None:
            self.y_pred = np.asarray(classes, dtype=object)[self.proba.argmax(axis=1)]

    @classmethod
    def from_run(cls, run: Run) -> "Predictions | None":
        frame = run.table("predictions.parquet")
        if frame is None or frame.empty or "y_true" not in frame or "id" not in frame:
            return None
        split = "oof"
        if "split" in frame:
            splits = set(frame["split"].astype(str))
            split = "test" if "test" in splits else ("oof" if "oof" in splits else sorted(splits)[0])
            frame = frame[frame["split"].astype(str) == split]
        return cls(frame.reset_index(drop=True), run.classes, split)

    @property
    def description(self) -> str:
        n = len(self.ids)
        return f"held-out test predictions, {n} images" if self.split == "test" else f"out-of-fold predictions, {n} images"


def _as_names(values: pd.Series, classes: list[str]) -> np.ndarray:
    """Labels as class-name strings (integer labels are taken as indices into ``classes``)."""
    if pd.api.types.is_integer_dtype(values) and classes and values.between(0, len(classes) - 1).all():
        return np.asarray(classes, dtype=object)[values.to_numpy()]
    return values.astype(str).to_numpy(dtype=object)


def build_probe_report(run: Run) -> Report:
    info = run.info
    report = Report(
        title=f"Probe: {run.label}",
        subtitle=(
            f"target `{info.get('target', '?')}`, groups `{info.get('groups', '?')}`, "
            f"store `{info.get('store', '?')}`, seed {info.get('seed', '?')}, created {info.get('created', '?')}"
        ),
    )
    report.add(*headline_section(run, "95% CIs from a bootstrap resampled by group"))
    _models(report, run)
    folds = _reported_folds(run)
    if folds is not None:
        caption = "Headline metrics on each held-out fold; no group is on both sides. All metrics are in folds.csv."
        if run.metrics_doc.get("evaluated_on") == "test":
            caption = ("Cross-validation folds of the training data (the headline metrics above are on the held-out "
                       "test set); no group is on both sides. All metrics are in folds.csv.")
        report.add(Heading("Per-fold metrics"), folds_table(folds, caption))
    predictions = Predictions.from_run(run)
    if predictions is None:
        report.add(Note("predictions.parquet is missing: no confusion matrix, curves, calibration or samples."))
    else:
        _prediction_figures(report, run, predictions)
    _embedding_map(report, run)
    if predictions is not None:
        _sample_grid(report, run, predictions)
    _study_pointer(report, run)
    return report


def _reported_folds(run: Run) -> pd.DataFrame | None:
    """folds.csv rows of the reported model, with the fold sizes and headline metrics."""
    folds = run.table("folds.csv")
    if folds is None or folds.empty:
        return None
    if "model" in folds.columns:
        reported = run.metrics_doc.get("model")
        if reported in set(folds["model"]):
            folds = folds[folds["model"] == reported]
        folds = folds.drop(columns="model")
    keep = [c for c in ("fold", "n_train", "n_test") if c in folds.columns]
    keep += [c for c in run.headline if c in folds.columns] or [c for c in folds.columns if c not in keep]
    keep += [c for c in ("seconds",) if c in folds.columns and c not in keep]
    return folds[keep].reset_index(drop=True)


def _models(report: Report, run: Run) -> None:
    """The run's models side by side (e.g. a stack beside its base models); skipped for a single model."""
    if len(run.models) < 2:
        return
    reported = run.metrics_doc.get("model")
    series = {f"{name} (reported)" if name == reported else name: values for name, values in run.models.items()}
    names = [n for n in run.headline if any(n in m for m in series.values())]
    report.add(
        Heading("Ensemble beside its base models"),
        models_table(series, names, "Best value of each metric in bold; 95% CIs in brackets."),
    )
    png = interval_figure(series, names, "Base models and ensemble")
    if png:
        report.add(Figure("models", png, "Each base model beside the ensemble, with 95% CIs."))


def _prediction_figures(report: Report, run: Run, pred: Predictions) -> None:
    report.add(Heading("Confusion matrix"))
    report.add(Figure("confusion", confusion_figure(pred), f"Rows: true class, normalised per row; counts in brackets. {pred.description.capitalize()}."))
    if pred.proba is None:
        report.add(Note("predictions.parquet has no probability columns (p_<class>): no ROC, PR or calibration."))
        return
    positive = run.info.get("positive_class")
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
    counts = confusion_matrix(pred.y_true, pred.y_pred, labels=classes)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    k = len(classes)
    with style.styled():
        size = min(3.2 + 0.55 * k, 9.5)
        fig = style.new_figure(size + 1.0, size)
        ax = fig.add_subplot()
        image = ax.imshow(rates, cmap=style.SEQUENTIAL_CMAP, vmin=0, vmax=1)
        ax.grid(False)
        fontsize = 9 if k <= 8 else 7
        for i in range(k):
            for j in range(k):
                ink = "white" if rates[i, j] > 0.6 else "#1f2328"
                ax.text(j, i, f"{rates[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", color=ink, fontsize=fontsize)
        ax.set_xticks(range(k), classes, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        accuracy = float(np.trace(counts) / max(counts.sum(), 1))
        balanced = float(np.mean([rates[i, i] for i in range(k) if totals[i, 0] > 0]))
        ax.set_title(f"Confusion matrix (accuracy {accuracy:.3f}, balanced {balanced:.3f})")
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
        fig = style.new_figure(10.5, 5.6 if len(curves) > 1 else 5.0)
        roc_ax, pr_ax = fig.subplots(1, 2)
        for i, (name, truth, score) in enumerate(curves):
            fpr, tpr, _ = roc_curve(truth, score)
            precision, recall, _ = precision_recall_curve(truth, score)
            label = f"{name}: AUC {auc(fpr, tpr):.3f}, AP {average_precision_score(truth, score):.3f}"
            roc_ax.plot(fpr, tpr, color=style.color(i), lw=1.8, label=label)
            pr_ax.plot(recall, precision, color=style.color(i), lw=1.8, drawstyle="steps-post")
        roc_ax.plot([0, 1], [0, 1], ls="--", color=style.MUTED, lw=1, label="chance")
        if len(curves) == 1:
            pr_ax.axhline(curves[0][1].mean(), ls="--", color=style.MUTED, lw=1)
        for ax, title, xlabel, ylabel in (
            (roc_ax, "ROC curve", "false positive rate (1 − specificity)", "true positive rate (sensitivity)"),
            (pr_ax, "Precision-recall curve", "recall (sensitivity)", "precision (PPV)"),
        ):
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), title=title, xlabel=xlabel, ylabel=ylabel)
            ax.set_aspect("equal")
        # One legend for both panels, below them, so no curve is hidden.
        fig.legend(*roc_ax.get_legend_handles_labels(), loc="outside lower center", ncol=min(4, len(curves) + 1))
        return style.to_png(fig)


def calibration_bins(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = 10):
    """Per equal-width bin: mean confidence, observed frequency, count; and the expected calibration error."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    safe = np.maximum(counts, 1)
    mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / safe
    observed = np.bincount(index, weights=outcome.astype(float), minlength=n_bins) / safe
    ece = float(np.sum(counts * np.abs(mean_conf - observed)) / max(counts.sum(), 1))
    return edges, mean_conf, observed, counts, ece


def calibration_figure(pred: Predictions, positive=None) -> bytes:
    if len(pred.classes) == 2:
        pos = _positive(pred, positive)
        confidence = pred.proba[:, pred.classes.index(pos)]
        outcome = pred.y_true == pos
        xlabel, ylabel = f"predicted probability of {pos}", f"observed frequency of {pos}"
    else:
        top = pred.proba.argmax(axis=1)
        confidence = pred.proba[np.arange(len(top)), top]
        outcome = np.asarray(pred.classes, dtype=object)[top] == pred.y_true
        xlabel, ylabel = "confidence of the predicted class", "accuracy"
    edges, mean_conf, observed, counts, ece = calibration_bins(confidence, outcome)
    filled = counts > 0
    with style.styled():
        fig = style.new_figure(5.8, 6.0)
        grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
        ax = fig.add_subplot(grid[0])
        hist = fig.add_subplot(grid[1], sharex=ax)
        ax.plot([0, 1], [0, 1], ls="--", color=style.MUTED, lw=1, label="perfectly calibrated")
        ax.plot(mean_conf[filled], observed[filled], "o-", color=style.color(0), lw=2, label="this model")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel=ylabel, title=f"Calibration (ECE {ece:.3f})")
        ax.legend(loc="upper left")
        ax.tick_params(labelbottom=False)
        hist.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=style.color(5), edgecolor="white")
        hist.set(xlabel=xlabel, ylabel="predictions")
        return style.to_png(fig)


def _embedding_map(report: Report, run: Run) -> None:
    frame = run.table("embedding_2d.parquet")
    report.add(Heading("Embedding map"))
    if frame is None or frame.empty or not {"x", "y"} <= set(frame.columns):
        report.add(Note("embedding_2d.parquet is missing: the probe did not save a 2-D map of the features."))
        return
    method = str(run.info.get("embedding_method") or "t-SNE")
    report.add(Figure("embedding", embedding_figure(frame, run.classes, method), f"{method} of the features, one point per image, coloured by label."))


def embedding_figure(frame: pd.DataFrame, classes: list[str], method: str = "t-SNE") -> bytes:
    labels = frame["label"].astype(str) if "label" in frame else pd.Series(["all"] * len(frame))
    order = [c for c in classes if c in set(labels)] + sorted(set(labels) - set(classes))
    with style.styled():
        fig = style.new_figure(7.6, 6.0)
        ax = fig.add_subplot()
        size = float(np.clip(6000 / max(len(frame), 1), 4, 36))
        # Largest classes first, so small classes stay visible on top.
        for label in sorted(order, key=lambda c: -(labels == c).sum()):
            i = order.index(label)
            mask = (labels == label).to_numpy()
            ax.scatter(frame["x"][mask], frame["y"][mask], s=size, color=style.color(i), alpha=0.8,
                       linewidths=0.3, edgecolors="white", label=f"{label} ({mask.sum()})", zorder=2 + i / 100)
        handles, names = ax.get_legend_handles_labels()
        ranked = sorted(zip(handles, names), key=lambda hn: order.index(hn[1].rsplit(" (", 1)[0]))
        ax.legend([h for h, _ in ranked], [n for _, n in ranked], loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2)
        ax.set(xlabel=f"{method} 1", ylabel=f"{method} 2", title=f"Embedding map ({len(frame)} images)")
        ax.set_xticks([])
        ax.set_yticks([])
        return style.to_png(fig)


def pick_samples(pred: Predictions, n: int, seed: int = 0) -> list[int]:
    """Rows for the sample grid: the most confident mistakes and random correct ones, classes in turn."""
    rng = np.random.default_rng(seed)
    correct = pred.y_true == pred.y_pred
    confidence = pred.proba.max(axis=1) if pred.proba is not None else np.zeros(len(correct))
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
    picked = pick_samples(pred, rows * cols, seed=int(run.info.get("seed") or 0))
    thumbs = load_thumbnails(run.info.get("store"), run.path, [pred.ids[r] for r in picked])
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
        if pred.proba is not None and pred.y_pred[r] in pred.classes:
            prob = f" ({pred.proba[r, pred.classes.index(pred.y_pred[r])]:.2f})"
        tiles.append(Tile(thumbs[pred.ids[r]], (f"{'✓' if ok else '✗'} true {pred.y_true[r]}", f"pred {pred.y_pred[r]}{prob}"),
                          style.CORRECT if ok else style.WRONG, border=5))
    grid = [tiles[i:i + cols] for i in range(0, len(tiles), cols)]
    return draw_sheet(grid, "Sample predictions")


def _study_pointer(report: Report, run: Run) -> None:
    """The tuning study of the run: its history and best parameters when the storage is readable."""
    study = run.study()
    if not study:
        return
    command = f"embedstore report {study['storage']} --study {study.get('name')}"
    report.add(Heading("Tuning"))
    from embedstore.report.study_report import tuning_summary

    try:
        report.add(*tuning_summary(study["storage"], str(study.get("name"))))
    except EmbedstoreError as exc:
        report.add(Note(f"the tuning study cannot be read ({exc})."))
    report.add(Paragraph(f"The study's full report (importances, parallel coordinates, slices): `{command}`."))
