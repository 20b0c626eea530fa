"""`embedstore demo`: the whole pipeline on the bundled sample, offline, in a few minutes on a laptop CPU."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from embedstore.atomic import check_replaceable
from embedstore.cli.app import app
from embedstore.cli.ls import ls
from embedstore.demo import SAMPLE_DIR, sample_source
from embedstore.errors import ConfigError


@app.command()
def demo(
    store: Path = typer.Option(Path("stores/demo.zarr"), "--store", help="Where to write the demo feature store."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to write the probe and match run folders."),
    encoder: str = typer.Option("mobilenet_v2", "--encoder", help="An offline encoder: mobilenet_v2 or efficientnet_lite0."),
    trials: int = typer.Option(10, "--trials", help="Optuna trials of the probe's tuning study (stored in sqlite beside the store)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run the whole pipeline on the bundled 200-image HAM10000 sample, offline.

    1. extract: the offline encoder's features into a local zarr store (a rerun does no model work);
    2. probe: a tuned linear probe of the 7 diagnoses with lesion-grouped 5-fold CV, its Optuna study in sqlite;
    3. match: group the images of the same lesion with a FAISS kNN graph and a cosine threshold;
    4. report: HTML and Markdown reports of both runs and of the study.
    """
    from embedstore.extraction import extract as run_extract
    from embedstore.match.config import MatchConfig
    from embedstore.match.run import run_match
    from embedstore.probe import ProbeConfig, run_probe
    from embedstore.report import write_report

    # Every option is checked before the extraction starts, so a mistake costs no model work.
    _check_offline(encoder)
    probe_cfg = ProbeConfig.from_dict({
        "store": str(store), "features": [encoder], "target": "dx", "groups": "lesion_id",
        "heads": ["logreg"], "trials": trials, "out": str(runs / "demo-probe"), "overwrite": True,
    })
    match_cfg = MatchConfig.from_dict({"store": str(store), "features": encoder, "groups": "lesion_id", "folds": 3,
                                       "out": str(runs / "demo-match"), "overwrite": True})
    for run in ("demo-probe", "demo-match"):
        check_replaceable(runs / run, overwrite=True)

    typer.echo(f"sample: {SAMPLE_DIR} (200 HAM10000 images, CC BY-NC 4.0, Tschandl et al. 2018)")
    typer.echo("1/4 extract")
    result = run_extract(sample_source(), encoder, store, progress=not quiet)
    typer.echo(result.summary())
    ls(store, failures=False)
    probe_cfg.features, match_cfg.features = [result.name], [result.name]

    typer.echo(f"2/4 probe: logistic regression on dx, 5 folds grouped by lesion_id, {trials} Optuna trials")
    summary = run_probe(probe_cfg)
    metrics = summary["metrics"]
    typer.echo("   " + ", ".join(f"{m} {metrics[m]['value']:.3f} [{metrics[m]['ci_low']:.3f}, {metrics[m]['ci_high']:.3f}]"
                                  for m in summary["headline"][:3]))

    typer.echo("3/4 match: images of the same lesion, cosine threshold chosen on training folds")
    match_dir = run_match(match_cfg).path
    matched = json.loads((match_dir / "metrics.json").read_text())["metrics"]
    typer.echo("   " + ", ".join(f"{m} {matched[m]['value']:.3f}" for m in ("pairwise_f1", "recall@1", "mAP")))

    typer.echo("4/4 reports")
    study = json.loads((Path(summary["out"]) / "run.json").read_text()).get("study")
    reports = [Path(summary["out"]) / "report.html", match_dir / "report.html"]
    if study:
        reports.append(write_report(study["storage"], study=study.get("name")))
    for path in reports:
        typer.echo(f"   {path}")


def _check_offline(encoder: str) -> None:
    """The demo runs offline: refuse an encoder whose weights would have to be downloaded."""
    from embedstore.encoders import list_encoders

    offline = [e["name"] for e in list_encoders() if e["offline"] and ":" not in e["name"]]
    if encoder not in offline:
        raise ConfigError(f"the demo runs offline: --encoder must be one of {', '.join(offline)}, not {encoder!r}")
