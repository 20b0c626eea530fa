"""`embedstore audit`: exact and near-duplicate images that leak across groups, the official split or the folds."""

from __future__ import annotations

from typing import Optional

import typer

from embedstore.cli.app import app
from embedstore.cli.options import (ConfigOpt, FoldsOpt, GroupsOpt, OverwriteOpt, QuietOpt, ReportOpt, SeedOpt,
                                    StoreArg, out_option, parse_split_map, run_overrides)
from embedstore.cli.probe import FeaturesOpt, TargetOpt

AuditOutOpt = out_option("<store>.audit/<features>, where probe and match find it")


@app.command()
def audit(
    store: StoreArg = None,
    config: ConfigOpt = None,
    features: FeaturesOpt = None,
    groups: GroupsOpt = None,
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Cosine similarity from which two images are near-duplicates (default: calibrated on --groups)."),
    precision: Optional[float] = typer.Option(None, "--precision", help="Calibrate the threshold where this share of the pairs above it are of one group (default 0.99)."),
    neighbors: Optional[int] = typer.Option(None, "--neighbors", help="Nearest neighbours compared per image (default 10)."),
    target: TargetOpt = None,
    positive: Optional[str] = typer.Option(None, "--positive", help="Folds of a positive-vs-rest probe of --target (e.g. mel)."),
    folds: FoldsOpt = None,
    split_column: Optional[str] = typer.Option(None, "--split-column", help="Official split column whose sides are checked (as in probe)."),
    split_map: list[str] = typer.Option([], "--split-map", help="VALUE=ACTION for a split-column value (repeatable), as in probe."),
    seed: SeedOpt = None,
    report: ReportOpt = None,
    out: AuditOutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Find leakage before it inflates a result: identical images under two ids, and near-duplicates (FAISS
    kNN graph) across groups, the official split, or the folds a probe of --target makes."""
    from embedstore.audit import AuditConfig, run_audit

    cfg = AuditConfig.from_yaml(config, **run_overrides(
        store=store, features=features, groups=groups, threshold=threshold, precision=precision, neighbors=neighbors,
        target=target, positive=positive, folds=folds, split_column=split_column,
        split_map=parse_split_map(split_map) or None, seed=seed, report=report, out=out, overwrite=overwrite or None,
    ))
    run = run_audit(cfg, progress=not quiet)
    m = {k: int(v.value) for k, v in run.metrics.metrics.items()}
    splits = f", {m['n_cross_split_pairs']} across the split" if cfg.split_column else ""
    typer.echo(f"threshold {run.record.threshold:.4f}: {m['n_exact_duplicate_pairs']} exact duplicate pairs, "
               f"{m['n_near_duplicate_pairs']} near-duplicate pairs; flagged {m['n_cross_group_pairs']} across "
               f"{cfg.groups or 'images'}{splits}, {m['n_cross_fold_pairs']} across folds, in "
               f"{m['n_duplicate_clusters']} clusters -> {run.path}")
