"""Extraction benchmark on the real HAM10000 images with the offline MobileNetV2.

    python benchmarks/bench_extract.py [--limit N] [--batch-size 64] [--workers 1]

In one run, on the same images, batch size and workers:

1. forward-only limit: the model's forward pass on preprocessed tensors already in memory, channels_last as
   embedstore runs it (the most this machine can do);
2. plain PyTorch loop: a DataLoader with torchvision transforms, NCHW float32, features kept in a list, no store;
3. the research notebooks' loop: one image at a time, PIL -> transform -> model;
4. embedstore end to end: ``embedstore.extract`` into a new store (hashing, decoding, model, zarr writes);
5. a rerun over the unchanged images (no model work) as a fraction of the first run's wall time;
6. peak memory of extracting 1,000 images against all of them (each in a fresh process);
7. the store's size on disk against the same features as float32 .npy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, peak_rss_mb  # noqa: E402

from embedstore import FeatureStore, create_encoder, extract, open_source  # noqa: E402
from embedstore.decoding import decode  # noqa: E402


def subset_csv(limit: int | None, out: Path) -> Path:
    import pandas as pd

    meta = pd.read_csv(HAM / "HAM10000_metadata.csv")
    (meta if limit is None else meta.head(limit)).to_csv(out, index=False)
    return out


def forward_only(model, images: list[Path], batch_size: int, seconds: float = 20.0) -> float:
    """Images/s of the forward pass alone on real preprocessed tensors held in memory (channels_last).

    Runs for at least ``seconds`` after a warm-up over every batch, so one-off kernel set-up does not count.
    """
    prep = create_encoder("mobilenet_v2").preprocessing
    raw = torch.stack([decode(p.read_bytes(), prep) for p in images[:128]]).float() / 255
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    batches = [((raw[i:i + batch_size] - mean) / std).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(raw) - batch_size + 1, batch_size)]
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for x in batches:  # warm-up
            model(x)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for x in batches:
                model(x)
                done += len(x)
        return done / (time.perf_counter() - t0)


class PlainDataset(Dataset):
    """What a typical notebook writes: torchvision transforms in the workers, float32 NCHW out."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                             T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.tf(Image.open(self.paths[i]).convert("RGB"))


def plain_loop(model, paths: list[Path], batch_size: int, workers: int) -> float:
    model = model.to(memory_format=torch.contiguous_format)
    loader = DataLoader(PlainDataset(paths), batch_size=batch_size, num_workers=workers)
    feats = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            feats.append(model(x).numpy())
    return len(paths) / (time.perf_counter() - t0)


def per_image_loop(model, paths: list[Path]) -> float:
    tf = PlainDataset(paths).tf
    model = model.to(memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = [model(tf(Image.open(p).convert("RGB")).unsqueeze(0)).numpy() for p in paths]
    assert len(feats) == len(paths)
    return len(paths) / (time.perf_counter() - t0)


def memory_probe(n: int, workers: int, batch_size: int) -> dict:
    """Extract the first ``n`` images into a fresh store in a fresh process; report its peak RSS."""
    code = (
        "import json, sys, tempfile; sys.path.insert(0, 'benchmarks');"
        "from pathlib import Path; from common import HAM, peak_rss_mb;"
        "from bench_extract import subset_csv; from embedstore import extract, open_source;"
        f"d = Path(tempfile.mkdtemp()); csv = subset_csv({n}, d / 'm.csv');"
        "src = open_source(csv, images=HAM / 'images', id_col='image_id');"
        f"r = extract(src, 'mobilenet_v2', d / 's.zarr', num_workers={workers}, batch_size={batch_size}, progress=False);"
        "print(json.dumps({'n': r.n_written, 'peak_rss_mb': peak_rss_mb(), 'images_per_s': r.images_per_s}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="use the first N images (default: all 10,015)")
    ap.add_argument("--batch-size", type=int, default=8, help="embedstore's CPU default")
    ap.add_argument("--workers", type=int, default=1, help="decoding workers (embedstore's CPU default on 2 cores)")
    ap.add_argument("--plain-images", type=int, default=2000, help="images for the plain loop's rate")
    ap.add_argument("--notebook-images", type=int, default=200, help="images for the per-image loop's rate")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1k-vs-all peak-memory processes")
    ap.add_argument("--memory-only", action="store_true", help="only the 1k-vs-all peak-memory processes")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    csv = subset_csv(args.limit, work / "meta.csv")
    source = open_source(csv, images=HAM / "images", id_col="image_id")
    paths = [HAM / "images" / p for p in source.table["_path"]]
    n = len(paths)
    print(f"images: {n}, batch size {args.batch_size}, workers {args.workers}, torch threads {torch.get_num_threads()}")
    if args.memory_only:
        report_memory(n, args)
        return

    model = create_encoder("mobilenet_v2").model
    limit = forward_only(model, paths, args.batch_size)
    print(f"forward-only limit (channels_last, tensors in memory): {limit:7.1f} images/s")
    plain = plain_loop(create_encoder("mobilenet_v2").model, paths[: args.plain_images], args.batch_size, args.workers)
    print(f"plain PyTorch loop (DataLoader, NCHW float32, no store):   {plain:7.1f} images/s  ({args.plain_images} images)")
    notebook = per_image_loop(create_encoder("mobilenet_v2").model, paths[: args.notebook_images])
    print(f"per-image notebook loop:                                   {notebook:7.1f} images/s  ({args.notebook_images} images)")

    t0 = time.perf_counter()
    first = extract(source, "mobilenet_v2", work / "ham.zarr", batch_size=args.batch_size,
                    num_workers=args.workers, progress=False)
    first_wall = time.perf_counter() - t0
    e2e = first.n_written / first_wall
    print(f"embedstore end to end (hash + decode + model + zarr):      {e2e:7.1f} images/s  "
          f"({first.n_written} images in {first_wall:.1f} s)")
    print(f"  ratio to forward-only limit: {e2e / limit:.2f}x (target >= 0.85)")
    print(f"  ratio to plain loop:         {e2e / plain:.2f}x (target >= 1.3)")
    print(f"  ratio to per-image loop:     {e2e / notebook:.2f}x")

    t0 = time.perf_counter()
    again = extract(source, "mobilenet_v2", work / "ham.zarr", progress=False)
    rerun_wall = time.perf_counter() - t0
    assert again.n_written == 0
    print(f"rerun over unchanged images: {rerun_wall:.2f} s = {100 * rerun_wall / first_wall:.2f}% of the first run (target < 3%)")

    store = FeatureStore.open(work / "ham.zarr")
    X, _ = store.load("mobilenet_v2")
    np.save(work / "features.npy", X.astype(np.float32))
    npy = (work / "features.npy").stat().st_size
    info = store.info("mobilenet_v2")
    print(f"store size on disk: {info.nbytes_stored / 2**20:.1f} MiB (float16, blosc-zstd) vs float32 .npy "
          f"{npy / 2**20:.1f} MiB = {info.nbytes_stored / npy:.2f}x")

    if not args.no_memory:
        report_memory(n, args)
    print(f"(this process peaked at {peak_rss_mb():.0f} MiB)")


def report_memory(n: int, args) -> None:
    small = memory_probe(1000, args.workers, args.batch_size)
    full = memory_probe(n, args.workers, args.batch_size)
    print(f"peak memory: {small['n']} images {small['peak_rss_mb']:.0f} MiB, {full['n']} images "
          f"{full['peak_rss_mb']:.0f} MiB = {full['peak_rss_mb'] / small['peak_rss_mb']:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
