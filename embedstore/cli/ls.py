"""`embedstore ls` and `embedstore encoders`: what a store holds, and what can fill one."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from embedstore.cli.app import app
from embedstore.store import FeatureSetInfo, FeatureStore

_out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _checks(info: FeatureSetInfo) -> str:
    """The chunk-integrity cell: ok, how many chunks are corrupt, or that the set predates checksums."""
    if not info.checksums:
        return "no checksums"
    return f"{info.n_corrupt_chunks} corrupt" if info.n_corrupt_chunks else "ok"


@app.command()
def ls(
    store: Path = typer.Argument(..., help="A feature store (the --store of `embedstore extract`)."),
    failures: bool = typer.Option(False, "--failures", help="List the images that could not be read, with the reason."),
) -> None:
    """Show a store's images, sources and feature sets (rows done, failed, stale, size on disk, chunk checks).

    Every chunk file's checksum is verified; corrupt chunks are reported (exit 0) with the command that recomputes them.
    """
    st = FeatureStore.open(store)
    summary = st.summary(verify=True)
    _out.print(f"[bold]{store}[/]: {summary.n_images:,} images from {summary.n_sources} source(s); "
               f"columns: {', '.join(summary.columns) or '(none)'}")
    table = Table(show_lines=False)
    for col in ("name", "key", "encoder", "dim", "dtype", "done", "failed", "stale", "missing", "on disk", "chunks"):
        table.add_column(col, justify="right" if col in ("dim", "done", "failed", "stale", "missing", "on disk") else "left")
    infos = summary.feature_sets
    for info in infos:
        table.add_row(info.name, info.key, info.encoder, str(info.dim), info.dtype, f"{info.n_done:,}",
                      f"{info.n_failed:,}", f"{info.n_stale:,}", f"{info.n_missing:,}", _size(info.nbytes_stored),
                      _checks(info))
    _out.print(table if infos else "no feature sets yet")
    for info in infos:
        if info.n_corrupt_chunks:
            _out.print(f"[bold red]{info.name}[/]: {info.n_corrupt_chunks} corrupt chunk(s), rows "
                       f"{info.corrupt_rows[0]}-{info.corrupt_rows[1]} (counted as missing); rerun `embedstore extract` "
                       f"with encoder {info.encoder} on {store} to recompute them")
    if failures:
        for info in infos:
            failed = st.failures(info.key)
            if len(failed):
                _out.print(f"\n[bold]{info.name}[/]: {len(failed)} failed")
                for image_id, reason in zip(failed["id"], failed["error"]):
                    _out.print(f"  {image_id}\t{reason}")


@app.command()
def encoders() -> None:
    """List the registered encoders (offline ones work with no network)."""
    from embedstore.encoders import list_encoders

    table = Table()
    table.add_column("name")
    table.add_column("offline")
    table.add_column("description")
    for row in list_encoders():
        table.add_row(row["name"], "yes" if row["offline"] else "", row["description"])
    _out.print(table)
