"""`embedstore probe` (classical heads on cached features) and `embedstore predict` (apply a saved head)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedstore.cli.app import app
from embedstore.errors import ConfigError, first_line

_err = Console(stderr=True)


def _load_config(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {first_line(exc, None)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of probe options")
    return raw


def _parse_params(items: list[str]) -> dict:
    """``logreg.C=0.5`` -> ``{"logreg": {"C": "0.5"}}``; the probe's config checks the names and coerces the
    values to each parameter's type (:func:`embedstore.heads.coerce_params`)."""
    params: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        head, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--param takes HEAD.NAME=VALUE (e.g. logreg.C=0.5), got {item!r}")
        params.setdefault(head, {})[name] = value
    return params


def _parse_split_map(items: list[str]) -> dict:
    """``["excluded=drop", "valid=train"]`` (or one comma-separated item) -> ``{"excluded": "drop", "valid": "train"}``."""
    mapping = {}
    for item in (part for entry in items for part in entry.split(",") if part.strip()):
        value, sep, action = item.partition("=")
        if not sep:
            raise ConfigError(f"--split-map takes VALUE=ACTION (e.g. excluded=drop), got {item!r}")
        mapping[value.strip()] = action.strip()
    return mapping


@app.command()
def probe(
    store: Optional[Path] = typer.Argument(None, help="Feature store to read (or `store:` in --config)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe (configs/*.yaml); options given here override it."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Feature set(s): name, key or encoder; `a+b` concatenates (or stacks), `a,b` compares."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Label column of the store's table (e.g. dx)."),
    groups: Optional[str] = typer.Option(None, "--groups", "-g", help="Group column: no group is on both sides of a split (e.g. lesion_id)."),
    head: Optional[str] = typer.Option(None, "--head", help="logreg, knn, svm, lgbm, mlp or stack; several (comma-separated) are compared."),
    stack_heads: Optional[str] = typer.Option(None, "--stack-heads", help="Base heads of a stack, one per feature set each (default logreg)."),
    stack_joint: Optional[str] = typer.Option(None, "--stack-joint", help="Base heads of a stack fitted on all its feature sets at once (e.g. lgbm)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Optuna trials per study (0: no tuning)."),
    metadata: Optional[str] = typer.Option(None, "--metadata", help="Tabular columns for lgbm (e.g. age,sex,localization)."),
    positive: Optional[str] = typer.Option(None, "--positive", help="Make a binary positive-vs-rest problem (e.g. mel)."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Stratified group folds (default 5)."),
    inner_folds: Optional[int] = typer.Option(None, "--inner-folds", help="Inner folds for tuning and stacking (default 3)."),
    split_column: Optional[str] = typer.Option(None, "--split-column", help="Official split column: train, test and validation rows (train/valid/test, training/test, 0/1, dev = validation); validation rows are never scored."),
    split_map: list[str] = typer.Option([], "--split-map", help="VALUE=ACTION for a split-column value (repeatable): ACTION train, valid, test or drop, e.g. excluded=drop, valid=train."),
    holdout: Optional[float] = typer.Option(None, "--holdout", help="Fraction held out as a grouped, stratified test set."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Metric to tune (default balanced_accuracy; roc_auc for binary)."),
    decision: Optional[str] = typer.Option(None, "--decision", help="Predicted class: argmax (default) or balanced, the most probable class after dividing by each class's training frequency (the rule for balanced accuracy; probabilities, and so AUC, unchanged)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Fixed head parameter HEAD.NAME=VALUE (repeatable), e.g. logreg.C=1 or logreg.class_weight=none."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite file beside the store)."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="Prefix of the Optuna study names; a stored study of that name tuned for another problem is refused."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of folds, heads, tuning and bootstrap (default 0)."),
    n_boot: Optional[int] = typer.Option(None, "--n-boot", help="Bootstrap resamples per confidence interval (default 1000)."),
    report: Optional[bool] = typer.Option(None, "--report/--no-report", help="Write report.html and report.md."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder to write (default runs/probe)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run folder at --out if a previous run wrote it (never anything else)."),
) -> None:
    """Train and evaluate classical heads on cached features with group-aware CV, tuning and stacking."""
    from embedstore.probe import ProbeConfig, run_probe

    raw = _load_config(config)
    cli = {
        "store": str(store) if store else None, "features": features, "target": target, "groups": groups,
        "heads": head, "stack_heads": stack_heads, "stack_joint": stack_joint, "trials": trials, "metadata": metadata, "positive": positive,
        "folds": folds, "inner_folds": inner_folds, "split_column": split_column, "holdout": holdout,
        "split_map": _parse_split_map(split_map) or None,
        "metric": metric, "decision": decision, "storage": storage, "study_name": study_name, "seed": seed, "n_boot": n_boot,
        "report": report, "out": str(out) if out else None, "overwrite": overwrite or None,
    }
    raw.update({k: v for k, v in cli.items() if v is not None})
    if param:
        merged = raw.get("params") or {}
        if isinstance(merged, dict):  # anything else is refused, in one line, by the config's validation
            for h, values in _parse_params(param).items():
                merged[h] = {**merged[h], **values} if isinstance(merged.get(h), dict) else values
        raw["params"] = merged
    cfg = ProbeConfig.from_dict(raw)
    n_folds = len(cfg.features) * len(cfg.heads) * cfg.folds
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=_err, transient=True)
    task = bar.add_task("probe", total=n_folds)

    def progress(event: str, message: str) -> None:
        bar.start()  # at the first fold, so that an error in the input before it stays one line
        bar.update(task, description=message, advance=1 if event == "fold" else 0)
        if event == "tuned":
            bar.console.print(message, highlight=False)

    try:
        summary = run_probe(cfg, progress)
    finally:
        if bar.live.is_started:
            bar.stop()
    metrics = summary["metrics"]
    figures = ", ".join(f"{m} {metrics[m]['value']:.3f} [{metrics[m]['ci_low']:.3f}, {metrics[m]['ci_high']:.3f}]"
                        for m in summary["headline"][:3])
    extra = f"; {len(summary['models'])} models compared in comparison.csv/.tex" if len(summary["models"]) > 1 else ""
    typer.echo(f"{summary['model']}: {figures}{extra} -> {summary['out']}")


@app.command()
def predict(
    head_dir: Path = typer.Argument(..., help="A saved head: the head/ folder of a probe run."),
    store: Path = typer.Argument(..., help="Feature store holding the same feature sets (same fingerprint)."),
    out: Path = typer.Option(..., "--out", "-o", help="Predictions file to write (.csv or .parquet)."),
) -> None:
    """Apply a saved head to every image of a store; refuses features of another fingerprint."""
    from embedstore.probe import predict as run_predict

    frame = run_predict(head_dir, store, out)
    counts = frame["y_pred"].value_counts()
    typer.echo(f"{len(frame)} images predicted ({', '.join(f'{k} {v}' for k, v in counts.items())}) -> {out}")
