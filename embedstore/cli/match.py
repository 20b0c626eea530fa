"""`embedstore match` (group images of the same lesion) and `embedstore query` (nearest lesions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from embedstore.cli.app import app
from embedstore.cli.options import (ConfigOpt, DeviceOpt, FoldsOpt, MergeOpt, NBootOpt, OverwriteOpt, QuietOpt,
                                    ReportOpt, SeedOpt, StoreArg, out_option, run_overrides)
from embedstore.errors import ConfigError
from embedstore.progress import progress_bar

_out = Console()
MatchOutOpt = out_option("runs/match")
#: What --index ivfpq is and the recall it was measured at (BENCHMARKS.md, "FAISS indices beyond memory").
IVFPQ_HELP = ("ivfpq: IVF with PQ codes of dim/4 bytes per vector, its 20 x k PQ candidates re-ranked by their exact "
              "vectors (read back from the store by query); recall@10 0.997 against exact search on 10M synthetic 384-d "
              "vectors (0.54 by PQ codes alone).")
FeatureOpt = Annotated[Optional[str], typer.Option("--features", "-f", help="Feature set: name, key or encoder.")]


@app.command()
def match(
    store: StoreArg = None,
    config: ConfigOpt = None,
    features: FeatureOpt = None,
    groups: Optional[str] = typer.Option(None, "--groups", "-g", help="Column naming each image's lesion: the "
                                         "groups to recover, kept whole by the folds (required, e.g. lesion_id)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="threshold, dbscan or agglomerative (default threshold)."),
    projection: Optional[str] = typer.Option(None, "--projection", help="none, contrastive, triplet or infonce (default none)."),
    folds: FoldsOpt = None,
    min_group_size: Optional[int] = typer.Option(None, "--min-group-size", help="Leave out lesions with fewer images (default 2)."),
    neighbors: Optional[int] = typer.Option(None, "--neighbors", help="Candidate pairs per image from the kNN search (default 64)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Values to sweep, comma-separated (default 0.50-0.99; eps 0.10-0.90)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Projection head epochs (default 30)."),
    device: DeviceOpt = None,
    index: Optional[str] = typer.Option(None, "--index", help="FAISS index: auto, flat, ivf, ivfpq or hnsw "
                                        "(default auto). " + IVFPQ_HELP),
    n_boot: NBootOpt = None,
    seed: SeedOpt = None,
    write_features: Optional[bool] = typer.Option(None, "--write-features/--no-write-features", help="Store the final projected features as a new feature set (default: store them)."),
    merge_near_duplicates: MergeOpt = None,
    report: ReportOpt = None,
    out: MatchOutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Group images of the same lesion (FAISS kNN graph + threshold, DBSCAN or average linkage),
    optionally through a trained projection head, with lesion-grouped CV."""
    from embedstore.match.config import MatchConfig
    from embedstore.match.run import load_inputs, run_match
    from embedstore.runs import check_out

    cfg = MatchConfig.from_yaml(config, **run_overrides(
        store=store, features=features, groups=groups, method=method, projection=projection, folds=folds,
        min_group_size=min_group_size, neighbors=neighbors, grid=_parse_grid(grid), index=index, n_boot=n_boot,
        seed=seed, write_features=write_features, merge_near_duplicates=merge_near_duplicates, report=report,
        out=out, overwrite=overwrite or None,
    ))
    head = {k: v for k, v in {"epochs": epochs, "device": device}.items() if v is not None}
    if head:  # on top of the recipe's head options, not instead of them
        cfg = MatchConfig.from_dict(cfg.to_dict() | {"head": cfg.head | head})
    check_out(cfg)
    inputs = load_inputs(cfg)
    steps = cfg.folds * (len(cfg.head_candidates) + 1 if cfg.projection != "none" else 1) + 1
    with progress_bar(f"match {cfg.method}", steps, enabled=not quiet, unit="steps") as advance:
        run = run_match(cfg, progress=advance, inputs=inputs)
    metrics, record = run.metrics.metrics, run.record
    figures = ", ".join(f"{name} {metrics[name].format()}" for name in run.metrics.headline)
    param = ", ".join(f"{k} {v}" for k, v in record.parameter.items())
    stored = f"; projected features stored as {record.projected_features}" if record.projected_features else ""
    typer.echo(f"{record.method} ({param}): {figures}; {metrics['n_clusters'].format()} clusters for "
               f"{metrics['n_groups_true'].format()} lesions{stored} -> {run.path}")
    for line in run.record.notes():
        typer.echo(line)


@app.command()
def query(
    store: Path = typer.Argument(..., help="Feature store to search."),
    items: list[str] = typer.Argument(..., help="Image ids already in the store, or image files to embed."),
    features: str = typer.Option(..., "--features", "-f", help="Feature set to search (name, key or encoder)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Nearest groups to list per query."),
    groups: Optional[str] = typer.Option(None, "--groups", "-g", help="Column whose values are ranked (e.g. "
                                         "lesion_id); default none: single images are ranked."),
    show: Optional[str] = typer.Option(None, "--show", help="Store columns of each image found to list too, "
                                       "comma-separated (e.g. dx); default none."),
    index: str = typer.Option("auto", "--index", help="FAISS index to build (from the store, a block of rows at a "
                              "time) when none is saved: auto, flat, ivf, ivfpq or hnsw. " + IVFPQ_HELP),
    rebuild_index: bool = typer.Option(False, "--rebuild-index", help="Rebuild the saved index."),
    device: DeviceOpt = "auto",
    as_json: bool = typer.Option(False, "--json", help="Print JSON records instead of a table."),
) -> None:
    """The top-k nearest groups (with cosine similarities) to each image or id."""
    from embedstore.match.query import query as run_query
    from embedstore.store import FeatureStore

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    columns = tuple(c.strip() for c in (show or "").split(",") if c.strip())
    fs = FeatureStore.open(store)
    result = run_query(fs, items, features, top_k=top_k, groups=groups, kind=index,
                       rebuild=rebuild_index, device=device, show=columns, progress=True)
    if as_json:
        typer.echo(result.to_json(orient="records", indent=2))
        return
    table = Table(title=f"nearest {groups or 'images'} ({fs.resolve(features)})")
    for column in result.columns:
        table.add_column(column, justify="right" if column in ("rank", "similarity", "n_images") else "left",
                         no_wrap=column != "query", overflow="fold")
    for row in result.assign(query=result["query"].map(lambda q: Path(q).name)).itertuples(index=False):
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    _out.print(table)
    typer.echo(f"{len(items)} queries, top {top_k} each, searched {fs.info(features).n_done} images")


def _parse_grid(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--grid takes comma-separated numbers, got {text!r}") from None
