"""`embedstore match` (group images of the same lesion) and `embedstore query` (nearest lesions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from embedstore.cli.app import app
from embedstore.errors import ConfigError
from embedstore.progress import progress_bar

_out = Console()
DEFAULT_GROUPS = "lesion_id"  # what `query` ranks when the store has that column and no --groups is given


@app.command()
def match(
    store: Optional[Path] = typer.Argument(None, help="Feature store to read (or `store:` in --config)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe (configs/match_*.yaml); options here override it."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Feature set: name, key or encoder."),
    groups: Optional[str] = typer.Option(None, "--groups", "-g", help="Column naming the true group of each image (default lesion_id)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="threshold, dbscan or agglomerative."),
    projection: Optional[str] = typer.Option(None, "--projection", "-p", help="none, contrastive, triplet or infonce."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Lesion-grouped folds (default 5)."),
    min_group_size: Optional[int] = typer.Option(None, "--min-group-size", help="Leave out lesions with fewer images (default 2)."),
    neighbors: Optional[int] = typer.Option(None, "--neighbors", help="Candidate pairs per image from the kNN search (default 64)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Values to sweep, comma-separated (default 0.50-0.99; eps 0.10-0.90)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Projection head epochs (default 30)."),
    device: Optional[str] = typer.Option(None, "--device", help="Projection head device: auto, cpu or cuda."),
    index: Optional[str] = typer.Option(None, "--index", help="FAISS index: auto, flat, ivf or hnsw."),
    n_boot: Optional[int] = typer.Option(None, "--n-boot", help="Lesion bootstrap resamples per CI (default 1000)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of folds, heads and bootstrap (default 0)."),
    write_features: Optional[bool] = typer.Option(None, "--write-features/--no-write-features", help="Store the final projected features as a new feature set."),
    report: Optional[bool] = typer.Option(None, "--report/--no-report", help="Render report.html and report.md."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder (one that embedstore wrote)."),
) -> None:
    """Group images of the same lesion (FAISS kNN graph + threshold, DBSCAN or average linkage),
    optionally through a trained projection head, with lesion-grouped CV."""
    from embedstore.match.config import MatchConfig
    from embedstore.atomic import check_replaceable
    from embedstore.match.run import load_inputs, run_match

    head = None
    if epochs is not None or device is not None:
        head = {k: v for k, v in {"epochs": epochs, "device": device}.items() if v is not None}
    cfg = MatchConfig.from_yaml(
        config, store=str(store) if store else None, features=features, groups=groups, method=method,
        projection=projection, folds=folds, min_group_size=min_group_size, neighbors=neighbors,
        grid=_parse_grid(grid), index=index, bootstrap=n_boot, seed=seed, write_features=write_features,
        report=report,
    )
    if head:
        cfg.head = cfg.head | head
    if not cfg.store or not cfg.features:
        raise ConfigError("give a STORE and --features (or store: and features: in --config)")
    check_replaceable(out, overwrite)
    inputs = load_inputs(cfg)
    steps = cfg.folds * (len(cfg.head_candidates) + 1 if cfg.projection != "none" else 1) + 1
    with progress_bar(f"match {cfg.method}", steps, unit="steps") as advance:
        run_dir = run_match(cfg, out, overwrite=overwrite, progress=advance, inputs=inputs)
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    run = json.loads((run_dir / "run.json").read_text())
    figures = ", ".join(f"{m} {metrics[m]['value']:.3f} [{metrics[m]['ci_low']:.3f}, {metrics[m]['ci_high']:.3f}]"
                        for m in ("pairwise_f1", "recall@1", "mAP"))
    param = ", ".join(f"{k} {v}" for k, v in run["parameter"].items())
    stored = f"; projected features stored as {run['projected_features']}" if run["projected_features"] else ""
    typer.echo(f"{cfg.method} ({param}): {figures}; {metrics['n_clusters']['value']} clusters for "
               f"{metrics['n_groups_true']['value']} lesions{stored} -> {run_dir}")


@app.command()
def query(
    store: Path = typer.Argument(..., help="Feature store to search."),
    items: list[str] = typer.Argument(..., help="Image ids already in the store, or image files to embed."),
    features: str = typer.Option(..., "--features", "-f", help="Feature set to search (name, key or encoder)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Nearest lesions to list per query."),
    groups: Optional[str] = typer.Option(None, "--groups", "-g", help="Column whose values are ranked (default: lesion_id when the store has it, else single images)."),
    index: str = typer.Option("auto", "--index", help="FAISS index to build when none is saved: auto, flat, ivf or hnsw."),
    rebuild_index: bool = typer.Option(False, "--rebuild-index", help="Rebuild the saved index."),
    device: str = typer.Option("auto", "--device", help="Device for embedding image files."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON records instead of a table."),
) -> None:
    """The top-k nearest lesions (with cosine similarities) to each image or id."""
    from embedstore.match.query import query as run_query
    from embedstore.store import FeatureStore

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    fs = FeatureStore.open(store)
    if groups is None and DEFAULT_GROUPS in fs.manifest.columns:
        groups = DEFAULT_GROUPS
    result = run_query(fs, items, features, top_k=top_k, groups=groups, kind=index,
                       rebuild=rebuild_index, device=device)
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


