"""`embedstore demo`: the whole pipeline on the bundled sample, offline, in a few minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from embedstore.cli.app import app
from embedstore.cli.options import QuietOpt
from embedstore.cli.ls import ls
from embedstore.demo import SAMPLE_DIR, sample_source
from embedstore.errors import ConfigError


@app.command()
def demo(
    store: Path = typer.Option(Path("stores/demo.zarr"), "--store", help="Where to write the demo feature store."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to write the probe and match run folders."),
    encoder: str = typer.Option("mobilenet_v2", "--encoder", help="An offline encoder: mobilenet_v2 or efficientnet_lite0."),
    trials: int = typer.Option(10, "--trials", help="Values of C the probe's nested studies sweep, per class weight (stored in sqlite beside the store)."),
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline on the bundled 200-image HAM10000 sample, offline.

    1. extract: the offline encoder's features into a local zarr store (a rerun does no model work);
    2. audit: identical and near-duplicate images across lesions and the probe's folds, beside the store;
    3. probe: a tuned linear probe of the 7 diagnoses with lesion-grouped 5-fold CV, its Optuna study in sqlite;
    4. match: group the images of the same lesion with a FAISS kNN graph and a cosine threshold;
    5. report: HTML and Markdown reports of the audit, both runs and the study.
    """
    from embedstore.audit import AuditConfig, run_audit
    from embedstore.extraction import extract as run_extract
    from embedstore.match.config import MatchConfig
    from embedstore.match.run import run_match
    from embedstore.probe import ProbeConfig, run_probe
    from embedstore.report import write_report
    from embedstore.runs import check_out

    # Every option is checked before the extraction starts, so a mistake costs no model work.
    _check_offline(encoder)
    probe_cfg = ProbeConfig.from_dict({
        "store": str(store), "features": [encoder], "target": "dx", "groups": "lesion_id",
        "heads": ["logreg"], "trials": trials, "out": str(runs / "demo-probe"), "overwrite": True,
    })
    match_cfg = MatchConfig.from_dict({"store": str(store), "features": encoder, "groups": "lesion_id", "folds": 3,
                                       "out": str(runs / "demo-match"), "overwrite": True})
    audit_cfg = AuditConfig.from_dict({"store": str(store), "features": [encoder], "groups": "lesion_id",
                                       "target": "dx", "overwrite": True})
    for cfg in (audit_cfg, probe_cfg, match_cfg):
        check_out(cfg)

    typer.echo(f"sample: {SAMPLE_DIR} (200 HAM10000 images, CC BY-NC 4.0, Tschandl et al. 2018)")
    typer.echo("1/5 extract")
    result = run_extract(sample_source(), encoder, store, progress=not quiet)
    typer.echo(result.summary())
    ls(store, failures=False)
    audit_cfg.features, probe_cfg.features, match_cfg.features = [result.name], [result.name], [result.name]

    typer.echo("2/5 audit: identical and near-duplicate images across lesions and the probe's folds")
    audit_run = run_audit(audit_cfg)
    counts = {k: int(v.value) for k, v in audit_run.metrics.metrics.items()}
    typer.echo(f"   threshold {audit_run.record.threshold:.4f} (calibrated on lesion_id): {counts['n_exact_duplicate_pairs']} "
               f"identical pairs, {counts['n_cross_group_pairs']} near-duplicate pairs across lesions")

    typer.echo(f"3/5 probe: logistic regression on dx, 5 folds grouped by lesion_id, C tuned over {trials} values per class weight")
    probe_run = run_probe(probe_cfg)
    typer.echo("   " + _figures(probe_run, probe_run.metrics.headline[:3]))
    for line in probe_run.record.notes():
        typer.echo(f"   {line}")

    typer.echo("4/5 match: images of the same lesion, cosine threshold chosen on training folds")
    match_run = run_match(match_cfg)
    typer.echo("   " + _figures(match_run, ("pairwise_f1", "recall@1", "mAP"), intervals=False))

    typer.echo("5/5 reports")
    reports = [audit_run.path / "report.html", probe_run.path / "report.html", match_run.path / "report.html"]
    if probe_run.record.study is not None:  # every study of the probe: one per outer fold, and the final one
        reports.append(write_report(probe_run.record.study.storage))
    for path in reports:
        typer.echo(f"   {path}")


def _figures(run, names, intervals: bool = True) -> str:
    """``name value [low, high]`` of the run's metrics ``names``, as the probe and match commands print them."""
    estimates = run.metrics.metrics
    return ", ".join(f"{name} {estimates[name].format() if intervals else f'{estimates[name].value:.3f}'}"
                     for name in names)


def _check_offline(encoder: str) -> None:
    """The demo runs offline: refuse an encoder whose weights would have to be downloaded."""
    from embedstore.encoders import list_encoders

    offline = [e["name"] for e in list_encoders() if e["offline"] and ":" not in e["name"]]
    if encoder not in offline:
        raise ConfigError(f"the demo runs offline: --encoder must be one of {', '.join(offline)}, not {encoder!r}")
