"""`embedstore probe` (classical heads on cached features) and `embedstore predict` (apply a saved head)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from embedstore.cli.app import app
from embedstore.cli.options import (
    ConfigOpt,
    DeviceOpt,
    FoldsOpt,
    GroupsOpt,
    MergeOpt,
    NBootOpt,
    OverwriteOpt,
    QuietOpt,
    ReportOpt,
    SeedOpt,
    StoreArg,
    out_option,
    parse_split_map,
    run_overrides,
)
from embedstore.errors import ConfigError

ProbeOutOpt = out_option("runs/probe")
PREDICTIONS = "predictions.csv"
PredictOutOpt = out_option(PREDICTIONS)
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", "-f", help="Feature set(s): name, key or encoder; "
                                                    "`a+b` concatenates (or stacks), `a,b` compares.")]
TargetOpt = Annotated[Optional[str], typer.Option("--target", "-t", help="Label column of the store's table (e.g. dx).")]


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


@app.command()
def probe(
    store: StoreArg = None,
    config: ConfigOpt = None,
    features: FeaturesOpt = None,
    target: TargetOpt = None,
    groups: GroupsOpt = None,
    head: Optional[str] = typer.Option(None, "--head", help="logreg, knn, svm, lgbm, mlp or stack; several (comma-separated) are compared (default logreg)."),
    stack_heads: Optional[str] = typer.Option(None, "--stack-heads", help="Base heads of a stack, one per feature set each (default logreg)."),
    stack_joint: Optional[str] = typer.Option(None, "--stack-joint", help="Base heads of a stack fitted on all its feature sets at once (e.g. lgbm)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Optuna trials per study (default 0: no tuning)."),
    metadata: Optional[str] = typer.Option(None, "--metadata", help="Tabular columns for lgbm (e.g. age,sex,localization)."),
    patient_features: Optional[str] = typer.Option(None, "--patient-features", help="Patient id column: lgbm also reads each image's standing among its patient's other images (distance to their mean, rank, per-patient z-scores), and binary runs report top-15 sensitivity."),
    positive: Optional[str] = typer.Option(None, "--positive", help="Make a binary positive-vs-rest problem (e.g. mel)."),
    folds: FoldsOpt = None,
    inner_folds: Optional[int] = typer.Option(None, "--inner-folds", help="Inner folds for tuning, and for stacking with --stack-folds inner (default 3)."),
    stack_folds: Optional[str] = typer.Option(None, "--stack-folds", help="A stack's inner folds: outer (default without --trials, with 3 folds or more), the other outer folds, so that its base models are shared between the folds (16 fits per base for 5 folds instead of 24); inner, --inner-folds group folds of its own rows (fewer fits where tuned bases differ per fold)."),
    split_column: Optional[str] = typer.Option(None, "--split-column", help="Official split column: train, test and validation rows (train/valid/test, training/test, 0/1, dev = validation); validation rows are never scored."),
    split_map: list[str] = typer.Option([], "--split-map", help="VALUE=ACTION for a split-column value (repeatable): ACTION train, valid, test or drop, e.g. excluded=drop, valid=train."),
    holdout: Optional[float] = typer.Option(None, "--holdout", help="Fraction held out as a grouped, stratified test set (default 0: none)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Metric to tune (default balanced_accuracy; roc_auc for binary)."),
    decision: Optional[str] = typer.Option(None, "--decision", help="Predicted class: argmax (default) or balanced, the most probable class after dividing by each class's training frequency (the rule for balanced accuracy; probabilities, and so AUC, unchanged)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Fixed head parameter HEAD.NAME=VALUE (repeatable), e.g. logreg.C=1 or logreg.class_weight=none."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage: a URL (sqlite:///..., postgresql://user@host/db) or a file ending in .journal (default: sqlite file beside the store)."),
    tune_workers: Optional[int] = typer.Option(None, "--tune-workers", help="Processes computing each study's trials at once (default 1), each with its own copy of the features; the same command on other machines with the same server --storage joins them."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="tpe (default) or random: each trial's parameters fixed by its place in the study and no pruning, so workers sharing a study find what one finds."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="Prefix of the Optuna study names; a stored study of that name tuned for another problem is refused."),
    seed: SeedOpt = None,
    n_boot: NBootOpt = None,
    device: DeviceOpt = None,
    merge_near_duplicates: MergeOpt = None,
    normalize: Optional[str] = typer.Option(None, "--normalize", help="train (default): features standardised by the training rows; per-store: each store first re-centred and re-scaled on all of its own rows (no label read), which may help a head travel between clinics; predict applies it."),
    test_store: Optional[Path] = typer.Option(None, "--test-store", help="Another store (another clinic): fit on this one, score that one's rows, with CIs; it needs the same feature sets (same fingerprints)."),
    test_target: Optional[str] = typer.Option(None, "--test-target", help="Label column of the test store (default: --target)."),
    test_positive: Optional[str] = typer.Option(None, "--test-positive", help="Positive class in the test store (default: --positive)."),
    test_groups: Optional[str] = typer.Option(None, "--test-groups", help="Group column of the test store for its CIs (default: --groups; none: each image)."),
    test_split_column: Optional[str] = typer.Option(None, "--test-split-column", help="Split column of the test store: only its --test-split rows are scored."),
    test_split: Optional[str] = typer.Option(None, "--test-split", help="Value of --test-split-column whose rows are scored, as the table writes it (default test)."),
    select_on_store: Optional[Path] = typer.Option(None, "--select-on-store", help="Choose the final head's tuned hyperparameters on this store's --select-split rows (of --test-split-column), never on scored rows; needs --trials."),
    select_split: Optional[str] = typer.Option(None, "--select-split", help="Value of --test-split-column in --select-on-store whose rows choose the hyperparameters (default valid)."),
    report: ReportOpt = None,
    out: ProbeOutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train and evaluate classical heads on cached features with group-aware CV, tuning and stacking."""
    from embedstore.probe import ProbeConfig, run_probe

    cfg = ProbeConfig.from_yaml(config, **run_overrides(
        store=store, features=features, target=target, groups=groups, heads=head, stack_heads=stack_heads,
        stack_joint=stack_joint, trials=trials, metadata=metadata, patient_features=patient_features, positive=positive, folds=folds,
        inner_folds=inner_folds, stack_folds=stack_folds, split_column=split_column, holdout=holdout, split_map=parse_split_map(split_map) or None,
        metric=metric, decision=decision, storage=storage, study_name=study_name, tune_workers=tune_workers,
        sampler=sampler, seed=seed, n_boot=n_boot,
        device=device, merge_near_duplicates=merge_near_duplicates, report=report, out=out, overwrite=overwrite or None,
        normalize=normalize, test_store=test_store, test_target=test_target, test_positive=test_positive,
        test_groups=test_groups, test_split_column=test_split_column, test_split=test_split,
        select_on_store=select_on_store, select_split=select_split,
    ))
    if param:  # on top of the recipe's parameters of each head, not instead of them
        params = dict(cfg.params)
        for name, values in _parse_params(param).items():
            params[name] = {**params.get(name, {}), **values}
        cfg = ProbeConfig.from_dict(cfg.to_dict() | {"params": params})
    with _progress(len(cfg.features) * len(cfg.heads) * cfg.folds, quiet) as progress:
        run = run_probe(cfg, progress)
    metrics = run.metrics
    figures = ", ".join(f"{name} {metrics.metrics[name].format()}" for name in metrics.headline[:3])
    extra = f"; {len(metrics.models)} models compared in comparison.csv/.tex" if len(metrics.models) > 1 else ""
    typer.echo(f"{metrics.model}: {figures}{extra} -> {run.path}")
    for line in run.record.notes():
        typer.echo(line)


@contextmanager
def _progress(folds: int, quiet: bool) -> Iterator[Callable[[str, str], None]]:
    """``progress(event, message)`` for :func:`run_probe`: a bar over the folds, which appears at the first event
    (so that an error in the input before it stays one line) and shows each event's message; what tuning chose
    is also printed as a line that stays."""
    from embedstore.progress import note, progress_bar

    with ExitStack() as stack:
        advance = []

        def progress(event: str, message: str) -> None:
            if not advance:
                advance.append(stack.enter_context(progress_bar("probe", folds, enabled=not quiet, unit="folds")))
            advance[0](1 if event == "fold" else 0, message)
            if event == "tuned" and not quiet:
                note(message)

        yield progress


@app.command()
def predict(
    head_dir: Path = typer.Argument(..., help="A saved head: the head/ folder of a probe run."),
    store: Path = typer.Argument(..., help="Feature store holding the same feature sets (same fingerprint)."),
    split: Optional[str] = typer.Option(None, "--split", help="COLUMN=VALUE: predict only the rows whose COLUMN is VALUE (e.g. split=test)."),
    out: PredictOutOpt = None,
) -> None:
    """Apply a saved head to every image of a store (predictions as .csv or .parquet, with the label column where
    the store has it); refuses features of another fingerprint."""
    from embedstore.probe import predict as run_predict

    out = out or Path(PREDICTIONS)
    column, sep, value = (split or "").partition("=")
    if split is not None and not (sep and column and value):
        raise ConfigError(f"--split takes COLUMN=VALUE (e.g. split=test), got {split!r}")
    frame = run_predict(head_dir, store, out, (column, value) if split is not None else None)
    counts = frame["y_pred"].value_counts()
    typer.echo(f"{len(frame)} images predicted ({', '.join(f'{k} {v}' for k, v in counts.items())}) -> {out}")
