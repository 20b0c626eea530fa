"""`embedstore extract`: images -> frozen embeddings in a zarr feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from embedstore.cli.app import app
from embedstore.cli.options import DeviceOpt, QuietOpt
from embedstore.errors import SourceError

_err = Console(stderr=True)


@app.command()
def extract(
    source: Path = typer.Argument(..., help="A folder of images (or of class sub-folders), a CSV (with --images), or an HDF5 file of encoded images (with --metadata)."),
    encoder: str = typer.Option("mobilenet_v2", "--encoder", "-e", help="Encoder name (`embedstore encoders` lists them; timm:<model>, torchvision:<model>, open_clip:<model>/<tag> too)."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="Feature store to write (created if missing). Default: stores/<source name>.zarr"),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder of a CSV source (default: the CSV's folder)."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="Metadata CSV of an HDF5 source (one row per image)."),
    id_col: Optional[str] = typer.Option(None, "--id-col", help="Id column of the CSV (default: image_id for CSV sources, isic_id for HDF5)."),
    path_col: Optional[str] = typer.Option(None, "--path-col", help="CSV column holding each image's path relative to --images."),
    template: str = typer.Option("{id}.jpg", "--template", help="Image file name from the id, when there is no --path-col."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local weights file (safetensors or torch checkpoint) instead of downloading."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Pooling where the encoder offers a choice: DINOv2 cls, mean or cls+mean; CNNs `stages` (every stage's pooled output, concatenated: finer texture than the last layer alone); timm:<model> timm's global_pool (avg, max, avgmax, catavgmax; token for ViTs). open_clip towers take none."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Square input size in pixels instead of the encoder's (CNNs take any size; another scale is another view to stack)."),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", help="Centre crop's share of the resized image (timm's crop_pct): 0.875 is ImageNet's 256->224, 1.0 keeps the whole shorter side."),
    crop_mode: Optional[str] = typer.Option(None, "--crop-mode", help="How a non-square image becomes the square input (timm's crop_mode): center (default; shorter side resized, the centre kept), squash (stretched to square), border (ratio kept, padded with the mean colour); with --crop-pct 1.0 squash and border keep the whole image."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the feature set in the store (default: the encoder and its non-default options)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per forward pass (default: 64 on a GPU, 8 on a CPU, where small batches stay in cache)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Decoding worker processes (default: half the cores on CPU, 8 beside a GPU; with --ray, per Ray worker: none on a CPU worker, 4 beside a GPU)."),
    device: DeviceOpt = "auto",
    dtype: str = typer.Option("float16", "--dtype", help="Stored precision: float16 or float32."),
    tta: bool = typer.Option(False, "--tta", help="Average the features of the image and its horizontal flip."),
    rows_per_chunk: int = typer.Option(1024, "--rows-per-chunk", help="Rows per zarr chunk: the unit of resume and of parallel writers."),
    shard: str = typer.Option("0/1", "--shard", help="I/N: process only every N-th row chunk, so N processes can share the work."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try again the images that failed before (by default they are skipped until their bytes change)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Encode on a Ray cluster: local (start one on this machine), auto (the cluster RAY_ADDRESS or a running head names), ray://HOST:PORT, or a head's HOST:PORT. The store must be on a filesystem every node mounts at the same path. Needs pip install 'embedstore[ray]'."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="Ray workers (default: one per GPU of the cluster, else one per CPU)."),
    quiet: QuietOpt = False,
) -> None:
    """Extract frozen embeddings of every new or changed image into a zarr feature store.

    Reruns are incremental: images whose bytes have not changed are skipped,
    new ones appended, changed ones re-extracted. A killed run resumes where it
    stopped. Unreadable images are recorded (see `embedstore ls --failures`),
    not fatal.
    """
    from embedstore.encoders import create_encoder
    from embedstore.extraction import check_options
    from embedstore.extraction import extract as run_extract
    from embedstore.sources import open_source

    check_options(device=device, batch_size=batch_size, num_workers=workers, dtype=dtype,
                  rows_per_chunk=rows_per_chunk, shard=shard, ray=ray, ray_workers=ray_workers)  # before any work
    src = open_source(source, images=images, metadata=metadata, id_col=id_col, path_col=path_col, template=template)
    store = store or Path("stores") / f"{source.stem}.zarr"
    enc = create_encoder(encoder, weights=weights, pooling=pooling,
                         image_size=image_size, crop_pct=crop_pct, crop_mode=crop_mode)
    result = run_extract(src, enc, store, name=name, batch_size=batch_size,
                         num_workers=workers, device=device, dtype=dtype, tta=tta, rows_per_chunk=rows_per_chunk,
                         shard=shard, retry_failed=retry_failed, ray=ray, ray_workers=ray_workers, progress=not quiet)
    typer.echo(result.summary())
    if result.n_failed and not result.n_written and not result.n_skipped:
        first, reason = result.failures[0]
        raise SourceError(f"every image this run tried failed ({result.n_failed}; first: {first}: {reason}), so nothing "
                          f"was extracted; `embedstore ls {store} --failures` lists them")
    if result.failures:
        shown = "; ".join(f"{i} ({r})" for i, r in result.failures[:5])
        more = f" and {len(result.failures) - 5} more" if len(result.failures) > 5 else ""
        _err.print(f"[yellow]{len(result.failures)} images could not be read and were skipped:[/] {shown}{more}. "
                   f"`embedstore ls {store} --failures` lists them.", highlight=False)
    typer.echo(f"store: {store}")
