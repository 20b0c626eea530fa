"""GPU benchmark (issue #12 part 5): every GPU figure in one run, prepared for the day a device is lent.

    python benchmarks/bench_gpu.py [--data DIR] [--out FILE.json]      # on a CUDA machine
    python benchmarks/bench_gpu.py --dry-run                           # CPU, tiny sizes (CI: cannot rot)
    python benchmarks/bench_gpu.py --prepare gpu_data [--images 4000]  # the images that travel to a GPU machine

``--data`` is a folder with ``HAM10000_metadata.csv`` and ``images/`` (default: ``gpu_data/`` in the repository
when it exists, else ../shared/data/ham10000). In one run, on one device:

1. **forward-only limit**: DINOv2 ViT-S/14 (timm's DINOv2 architecture, random weights: the same cost as the real
   ones) on real preprocessed images already on the device, bf16 autocast, batch-size sweep. Every speed below is
   also given as a ratio to the best of these (the baseline);
2. the same model through embedstore's ``_Runner`` from pinned uint8 batches in host memory (copy to the device,
   normalise, model, features back);
3. **embedstore end to end**: ``embedstore.extraction.extract`` from the JPEG files into a new zarr store (hashing,
   decoding in DataLoader workers, model, writes), batch-size and worker sweep;
4. **CPU vs GPU decoding**: embedstore's decode (PIL, DataLoader workers) against batched
   ``torchvision.io.decode_jpeg(device="cuda")`` with resize and centre crop on the GPU, alone and with the model,
   and how far the two inputs and their features differ;
5. **heads**: embedstore's logistic probe (``LogRegHead``) fitted on the CPU against the same head fitted on the
   device (``device="cuda"``: the same preconditioned L-BFGS, products on the GPU), on the same features: time
   and agreement (accuracy, balanced accuracy, macro AUC, largest probability difference);
6. **kNN graph at 1M vectors**: FAISS on the GPU when the installed faiss has GPU support, else an exact torch
   matmul + top-k on the device (fp16 products, then the top 2k candidates re-ranked in fp32), recall against an
   exact fp32 reference, and embedstore's CPU FAISS flat index on a share of the queries for comparison.

The figures go to stdout and, section by section as they are measured, to the ``--out`` JSON file, so a run cut
short still leaves what it measured. ``--only``/``--skip`` pick sections for a rerun.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, ROOT  # noqa: E402

# torchvision >= 0.29 deprecates its image decoders in favour of TorchCodec; decode_jpeg(device="cuda") is what
# issue #12 asks to measure.
warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
SECTIONS = ("forward", "e2e", "decode", "heads", "knn")
SAMPLE = ROOT / "embedstore" / "data" / "sample"
TARGET_IMAGES_PER_S = 3000  # issue #12: DINOv2 ViT-S/14 end to end, bf16, on an H100


# ------------------------------------------------------------------ helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device):
    """(result, seconds) of ``fn()``, the device synchronised on both sides."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


class Results:
    """Figures by section, written to ``path`` after every section."""

    def __init__(self, path: Path, config: dict) -> None:
        self.path, self.data = path, {"config": config, "errors": {}}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def put(self, section: str, figures: dict) -> None:
        self.data[section] = figures
        self.write()

    def error(self, section: str, exc: BaseException) -> None:
        self.data["errors"][section] = f"{type(exc).__name__}: {exc}"
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        tmp.replace(self.path)


def environment(dev: torch.device) -> dict:
    import timm
    import torchvision

    import embedstore

    pkg = Path(embedstore.__file__).resolve().parent
    commit = pkg.parent / "COMMIT"  # an exported copy of the package names its commit here
    env = {"embedstore": str(pkg) + (f" (commit {commit.read_text().strip()})" if commit.is_file() else ""),
           "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "timm": timm.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": str(dev)}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError as exc:
        env["faiss"] = f"not importable ({exc})"
    try:
        import sklearn

        env["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    return env


def load_images(data: Path, n: int | None, dry_run: bool):
    """The metadata rows used (unique images) and their paths; in a dry run a few of each class."""
    import pandas as pd

    meta = pd.read_csv(data / "HAM10000_metadata.csv") if (data / "HAM10000_metadata.csv").is_file() \
        else pd.read_csv(next(data.glob("*.csv")))
    meta = meta[[(data / "images" / f"{i}.jpg").is_file() for i in meta.image_id]]
    if dry_run:
        meta = meta.groupby("dx", group_keys=False).head(max(2, (n or 48) // meta.dx.nunique() + 1))
    meta = (meta if n is None else meta.head(n)).reset_index(drop=True)
    return meta, [data / "images" / f"{i}.jpg" for i in meta.image_id]


def prepare(source: Path, dest: Path, n: int) -> Path:
    """Copy ``n`` images (a seeded sample, sorted by lesion) and their metadata rows from ``source`` into ``dest``:
    the folder that travels to a GPU machine (the full ../shared data set does not)."""
    import shutil

    import pandas as pd

    meta = pd.read_csv(source / "HAM10000_metadata.csv")
    meta = meta.sample(n=min(n, len(meta)), random_state=0).sort_values(["lesion_id", "image_id"])
    (dest / "images").mkdir(parents=True, exist_ok=True)
    meta.to_csv(dest / "HAM10000_metadata.csv", index=False)
    for image_id in meta.image_id:
        shutil.copyfile(source / "images" / f"{image_id}.jpg", dest / "images" / f"{image_id}.jpg")
    return dest


def repeated_csv(meta, copies: int, out: Path) -> Path:
    """The same images listed ``copies`` times under new ids (``<image_id>-<k>``), for runs long enough to time."""
    import pandas as pd

    rows = []
    for k in range(copies):
        part = meta.copy()
        part["file"] = part.image_id + ".jpg"
        part["image_id"] = part.image_id + f"-{k}"
        rows.append(part)
    pd.concat(rows).to_csv(out, index=False)
    return out


def make_encoder(image_size: int | None):
    from embedstore.encoders import create_encoder

    if image_size:
        return create_encoder("dinov2_vits14", pretrained=False, image_size=image_size)
    return create_encoder("dinov2_vits14", pretrained=False)


# ------------------------------------------------------------ 1, 2: forward
def forward_only(runner, raw: torch.Tensor, batch_sizes, seconds: float, dev: torch.device) -> dict:
    """Images/s of the model alone on normalised inputs already on the device, per batch size."""
    out = {}
    for b in batch_sizes:
        reps = math.ceil(b / len(raw))
        x = raw.repeat(reps, 1, 1, 1)[:b].to(dev).float().mul_(runner.scale).sub_(runner.shift)
        x = x.contiguous(memory_format=runner.memory_format)
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=runner.cuda):
            for _ in range(3):
                runner.model(x)
            sync(dev)
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                runner.model(x)
                done += b
                if dev.type == "cuda" and done % (8 * b) == 0:
                    sync(dev)  # keep the queue short so the clock reads what ran
            sync(dev)
            out[b] = done / (time.perf_counter() - t0)
    return out


def runner_rate(runner, raw: torch.Tensor, batch_size: int, seconds: float, dev: torch.device) -> float:
    """Images/s through embedstore's ``_Runner`` from pinned uint8 host batches (copy, normalise, model, copy back)."""
    x = raw.repeat(math.ceil(batch_size / len(raw)), 1, 1, 1)[:batch_size].contiguous()
    if dev.type == "cuda":
        x = x.pin_memory()
    for _ in range(3):
        runner(x)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner(x)  # ends with .cpu(): synchronous
        done += batch_size
    return done / (time.perf_counter() - t0)


# --------------------------------------------------------------- 3: e2e
def end_to_end(csv: Path, images: Path, encoder, dev: torch.device, batch_size: int, workers: int, work: Path) -> dict:
    from embedstore import open_source
    from embedstore.extraction import extract

    source = open_source(csv, images=images, id_col="image_id", path_col="file")
    store = work / f"e2e-b{batch_size}-w{workers}.zarr"
    t0 = time.perf_counter()
    r = extract(source, encoder, store, device=str(dev), batch_size=batch_size, num_workers=workers, progress=False)
    wall = time.perf_counter() - t0
    assert r.n_failed == 0, r.failures[:3]
    return {"batch_size": batch_size, "workers": workers, "images": r.n_written, "wall_s": wall,
            "images_per_s": r.n_written / wall, "loop_images_per_s": r.images_per_s, "store": str(store),
            "name": r.name}


# ------------------------------------------------------------ 4: decode
def gpu_decode_batches(paths, batch_size: int, prep, dev: torch.device):
    """uint8 ``[B, 3, crop, crop]`` batches on ``dev``: file bytes read one batch ahead on a thread,
    ``decode_jpeg`` on the whole batch on the device, bicubic resize of the shorter side and centre crop there."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[prep.interpolation]
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda c: [read_file(str(p)) for p in c], chunks[0])
        for n in range(len(chunks)):
            data = pending.result()
            if n + 1 < len(chunks):
                pending = pool.submit(lambda c: [read_file(str(p)) for p in c], chunks[n + 1])
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
            groups: dict = {}
            for i, img in enumerate(decoded):
                groups.setdefault(tuple(img.shape), []).append(i)
            out = torch.empty((len(decoded), 3, prep.crop, prep.crop), dtype=torch.uint8, device=dev)
            for idx in groups.values():
                x = torch.stack([decoded[i] for i in idx]).float()
                x = TF.resize(x, prep.resize, interpolation=interp, antialias=True)
                x = TF.center_crop(x, prep.crop)
                out[idx] = x.round_().clamp_(0, 255).to(torch.uint8)
            yield out


def cpu_decode_batches(paths, batch_size: int, workers: int, prep, dev: torch.device):
    """embedstore's decoding (PIL, draft mode) in DataLoader workers, pinned batches, as ``extract`` runs it."""
    from torch.utils.data import DataLoader

    from embedstore.decoding import DecodedImages, collate_decoded
    from embedstore.sources import open_source

    source = open_source(paths[0].parent)  # a plain folder source (all the images sit in one folder)
    loader = DataLoader(DecodedImages(source, [p.name for p in paths], prep), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_decoded, pin_memory=dev.type == "cuda",
                        prefetch_factor=4 if workers else None)
    for _, images, failed in loader:
        assert not failed, failed[:3]
        yield images


def decode_rates(paths, prep, runner, dev: torch.device, batch_size: int, workers: int) -> dict:
    """CPU vs GPU decoding: alone, then each feeding the model; inputs and features compared on the first batch."""
    fig = {"images": len(paths), "batch_size": batch_size, "workers": workers}
    # Warm both paths (worker start-up, nvjpeg handles, kernels) on one batch.
    for _ in gpu_decode_batches(paths[:batch_size], batch_size, prep, dev):
        pass
    n, t = timed(lambda: sum(len(b) for b in cpu_decode_batches(paths, batch_size, workers, prep, dev)), dev)
    fig["cpu_decode_only_images_per_s"] = n / t
    n, t = timed(lambda: sum(len(b) for b in gpu_decode_batches(paths, batch_size, prep, dev)), dev)
    fig["gpu_decode_only_images_per_s"] = n / t
    n, t = timed(lambda: sum(len(runner(b)) for b in cpu_decode_batches(paths, batch_size, workers, prep, dev)), dev)
    fig["cpu_decode_model_images_per_s"] = n / t
    n, t = timed(lambda: sum(len(runner(b)) for b in gpu_decode_batches(paths, batch_size, prep, dev)), dev)
    fig["gpu_decode_model_images_per_s"] = n / t

    first = paths[:min(len(paths), 256)]
    a = torch.cat(list(cpu_decode_batches(first, 64, 0, prep, dev))).to(dev)
    b = torch.cat(list(gpu_decode_batches(first, 64, prep, dev)))
    diff = (a.float() - b.float()).abs()
    fig["pixel_mean_abs_diff"] = float(diff.mean())
    fig["pixel_max_abs_diff"] = float(diff.max())
    fa, fb = torch.from_numpy(runner(a)), torch.from_numpy(runner(b))
    cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1)
    fig["feature_cosine_mean"], fig["feature_cosine_min"] = float(cos.mean()), float(cos.min())
    return fig


# ------------------------------------------------------------- 5: heads
def compare_heads(Xtr, ytr, Xte, yte, C: float, dev: torch.device) -> dict:
    """embedstore's logistic probe (``LogRegHead``) fitted on the CPU against the same head fitted on the device
    (``device=``: the matrix on the device, the same preconditioned L-BFGS), same split: time and agreement.
    On a CPU-only dry run the device side runs the torch code on the CPU (``cpu:0``)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    from embedstore.heads.linear import LogRegHead

    classes, codes = np.unique(ytr, return_inverse=True)
    test_codes = np.searchsorted(classes, yte)
    keep = np.isin(yte, classes)
    Xte, test_codes = Xte[keep], test_codes[keep]

    def scores(p):
        out = {"accuracy": accuracy_score(test_codes, p.argmax(1)),
               "balanced_accuracy": balanced_accuracy_score(test_codes, p.argmax(1))}
        try:
            present = np.unique(test_codes)
            if len(classes) == 2:
                out["auc"] = roc_auc_score(test_codes, p[:, 1])
            else:
                out["auc"] = roc_auc_score(test_codes, p[:, present] / p[:, present].sum(1, keepdims=True),
                                           multi_class="ovr", labels=present)
        except ValueError:
            out["auc"] = float("nan")
        return out

    def fit(device: str):
        head = LogRegHead(C=C, device=device).fit(Xtr, codes)
        return head, head.predict_proba(Xte)

    (cpu_head, p_cpu), t_cpu = timed(lambda: fit("cpu"), dev)
    device = "cpu:0" if dev.type == "cpu" else str(dev)
    LogRegHead(C=C, device=device, max_iter=5).fit(Xtr[:64], codes[:64] % 2)  # warm the device's kernels
    (dev_head, p_dev), t_dev = timed(lambda: fit(device), dev)
    cpu, gpu = scores(p_cpu), scores(p_dev)
    return {
        "train": len(Xtr), "test": len(Xte), "dim": Xtr.shape[1], "classes": len(classes), "C": C,
        "cpu_s": t_cpu, "cpu_iterations": cpu_head.n_evals_,
        "device_s": t_dev, "device_iterations": dev_head.n_evals_, "speedup": t_cpu / t_dev,
        "cpu": cpu, "device": gpu, **{f"{k}_diff": gpu[k] - cpu[k] for k in cpu},
        "argmax_agreement": float((p_cpu.argmax(1) == p_dev.argmax(1)).mean()),
        "max_abs_proba_diff": float(np.abs(p_cpu - p_dev).max()),
    }


def real_features(store: Path, name: str, meta):
    """Features of each unique image (ids ``<image_id>-0``) from an end-to-end store, with labels and lesions."""
    from embedstore import FeatureStore

    X, manifest = FeatureStore.open(store).load(name)
    first = manifest["id"].astype(str).str.endswith("-0").to_numpy()
    X, ids = X[first], manifest["id"].astype(str).to_numpy()[first]
    by_id = meta.set_index("image_id")
    base = [i.rsplit("-", 1)[0] for i in ids]
    return X, by_id.loc[base, "dx"].to_numpy(), by_id.loc[base, "lesion_id"].to_numpy()


def synthetic_classes(n: int, d: int, k: int, seed: int = 0):
    """``n`` rows of ``k`` imbalanced Gaussian classes in ``d`` dimensions (means 0.15 apart per axis, unit noise)."""
    rng = np.random.default_rng(seed)
    prior = np.geomspace(1, 0.05, k)
    y = rng.choice(k, size=n, p=prior / prior.sum())
    means = rng.normal(0, 0.15, size=(k, d)).astype(np.float32)
    return (means[y] + rng.normal(size=(n, d)).astype(np.float32)), y


# --------------------------------------------------------------- 6: kNN
def clustered_vectors(n: int, d: int, dev: torch.device, per_cluster: int = 100, noise: float = 0.7) -> torch.Tensor:
    """``n`` unit vectors: ``n / per_cluster`` Gaussian centres plus ``noise``-scaled Gaussian offsets, normalised."""
    g = torch.Generator(device=dev).manual_seed(0)
    centres = torch.randn(max(1, n // per_cluster), d, generator=g, device=dev)
    assign = torch.randint(0, len(centres), (n,), generator=g, device=dev)
    X = centres[assign] + noise * torch.randn(n, d, generator=g, device=dev)
    return torch.nn.functional.normalize(X, dim=1)


def torch_knn_graph(X: torch.Tensor, k: int, chunk: int, rerank: bool, dtype=torch.float16) -> torch.Tensor:
    """Row numbers of each row's ``k`` nearest other rows by cosine (exact search): products in ``dtype``; with
    ``rerank`` the top ``2k`` candidates are re-scored in float32 and the best ``k`` kept."""
    n = len(X)
    Xl = X.to(dtype)
    out = torch.empty((n, k), dtype=torch.long, device=X.device)
    m = 2 * k if rerank else k
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        S = Xl[s:e] @ Xl.T
        S[torch.arange(e - s, device=X.device), torch.arange(s, e, device=X.device)] = float("-inf")
        idx = S.topk(m, dim=1).indices
        del S
        if rerank:
            exact = torch.einsum("qd,qmd->qm", X[s:e], X[idx])
            rows = torch.arange(e - s, device=X.device)
            exact[idx == (rows + s)[:, None]] = float("-inf")
            idx = idx.gather(1, exact.topk(k, dim=1).indices)
        out[s:e] = idx
    return out


def exact_neighbours(X: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """float32 (no TF32) reference top-``k`` (self excluded) for the rows ``queries``."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = []
        for s in range(0, len(queries), chunk):
            q = queries[s:s + chunk]
            S = X[q] @ X.T
            S[torch.arange(len(q), device=X.device), q] = float("-inf")
            out.append(S.topk(k, dim=1).indices)
        return torch.cat(out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def knn_graph(n: int, d: int, k: int, n_cpu_queries: int, n_ref: int, dev: torch.device, chunk: int) -> dict:
    import faiss

    from embedstore.match.index import FeatureIndex, gpu_available

    X = clustered_vectors(n, d, dev)
    sync(dev)
    fig = {"vectors": n, "dim": d, "k": k, "data": f"{n // 100} Gaussian centres x ~100 points, noise 0.7, L2-normalised",
           "faiss": faiss.__version__, "faiss_gpu": bool(gpu_available() and dev.type == "cuda")}
    queries = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:n_ref].to(dev)
    truth, _ = timed(lambda: exact_neighbours(X, queries, k, chunk=min(chunk, 2048)), dev)
    truth = truth.cpu().numpy()
    q_np = queries.cpu().numpy()

    torch_knn_graph(X[:chunk], k, chunk, rerank=True)  # warm-up
    g16, t16 = timed(lambda: torch_knn_graph(X, k, chunk, rerank=False), dev)
    fig["torch_fp16_s"], fig["torch_fp16_recall"] = t16, recall(g16[queries].cpu().numpy(), truth)
    del g16
    g, t = timed(lambda: torch_knn_graph(X, k, chunk, rerank=True), dev)
    fig["torch_fp16_rerank_s"], fig["torch_fp16_rerank_recall"] = t, recall(g[queries].cpu().numpy(), truth)
    del g
    # float32 (no TF32) on a share of the rows, extrapolated to the whole graph.
    share = min(n, 4 * chunk)
    _, t32 = timed(lambda: exact_neighbours(X, torch.arange(share, device=dev), k, chunk=min(chunk, 2048)), dev)
    fig["torch_fp32_s_extrapolated"], fig["torch_fp32_rows_timed"] = t32 * n / share, share

    X_np = X.float().cpu().numpy()
    del X
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if fig["faiss_gpu"]:
        idx, t_build = timed(lambda: FeatureIndex.build(X_np, np.arange(n), key="bench", kind="flat", use_gpu=True), dev)
        (_, rows), t_search = timed(lambda: idx.search(X_np, k + 1), dev)
        fig["faiss_gpu_s"] = t_build + t_search
        fig["faiss_gpu_recall"] = recall(_drop_self(rows, np.arange(n), k)[q_np], truth)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    cpu_idx, t_build = timed(lambda: FeatureIndex.build(X_np, np.arange(n), key="bench", kind="flat", use_gpu=False), dev)
    (_, rows), t_search = timed(lambda: cpu_idx.search(X_np[q_np[:n_cpu_queries]], k + 1), dev)
    fig["faiss_cpu_queries_timed"], fig["faiss_cpu_threads"] = n_cpu_queries, faiss.omp_get_max_threads()
    fig["faiss_cpu_build_s"] = t_build
    fig["faiss_cpu_s_extrapolated"] = t_build + t_search * n / n_cpu_queries
    fig["faiss_cpu_recall"] = recall(_drop_self(rows, q_np[:n_cpu_queries], k), truth[:n_cpu_queries])
    fig["speedup_torch_fp16_rerank_vs_faiss_cpu"] = fig["faiss_cpu_s_extrapolated"] / fig["torch_fp16_rerank_s"]
    return fig


def _drop_self(rows: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    return np.stack([[r for r in row if r != s][:k] for row, s in zip(rows, self_rows)])


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, the bundled sample, tiny sizes: checks the script runs")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --dry-run)")
    ap.add_argument("--data", type=Path, default=None, help="folder with HAM10000_metadata.csv and images/")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_gpu.json")
    ap.add_argument("--images", type=int, default=None, help="unique images used (default: all in --data)")
    ap.add_argument("--e2e-images", type=int, default=16000, help="rows per end-to-end run (images listed repeatedly)")
    ap.add_argument("--batch-sizes", default="32,64,128,256,512,1024", help="forward-only sweep")
    ap.add_argument("--e2e", default="64x8,256x8,1024x8,256x16", help="end-to-end runs as BATCHxWORKERS")
    ap.add_argument("--forward-seconds", type=float, default=2.0)
    ap.add_argument("--image-size", type=int, default=None, help="DINOv2 input size (default 224; dry run 56)")
    ap.add_argument("--heads-synthetic", type=int, default=200_000, help="rows of the synthetic heads problem")
    ap.add_argument("--knn-vectors", type=int, default=1_000_000)
    ap.add_argument("--knn-cpu-queries", type=int, default=10_000, help="queries timed on CPU FAISS (extrapolated)")
    ap.add_argument("--knn-chunk", type=int, default=8192)
    ap.add_argument("--only", default=None, help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--prepare", type=Path, default=None, metavar="DEST",
                    help="only copy --images N (default 4000) images and their metadata from --data into DEST")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="print every thread's traceback and exit after this many seconds (before an outer timeout)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.data = args.data or SAMPLE
        args.images = args.images or 40
        args.e2e_images = min(args.e2e_images, args.images)
        args.batch_sizes, args.e2e = "8,16", "16x1"
        args.forward_seconds = min(args.forward_seconds, 0.2)
        args.image_size = args.image_size or 56
        args.heads_synthetic = min(args.heads_synthetic, 1000)
        args.knn_vectors, args.knn_cpu_queries, args.knn_chunk = min(args.knn_vectors, 2000), 100, 512
    args.device = args.device or "cuda"
    if args.data is None:
        args.data = ROOT / "gpu_data" if (ROOT / "gpu_data" / "HAM10000_metadata.csv").is_file() else HAM
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.prepare:
        source = args.data if args.data != ROOT / "gpu_data" else HAM
        print(f"copied {args.images or 4000} images to {prepare(source, args.prepare, args.images or 4000)}")
        return {}
    if args.deadline_s:
        import faulthandler

        faulthandler.dump_traceback_later(args.deadline_s, exit=True)
    sections = [s for s in (args.only.split(",") if args.only else SECTIONS) if s not in args.skip.split(",")]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run (CPU, tiny sizes) or on a GPU machine")
    torch.manual_seed(0)
    res = Results(args.out, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    res.put("environment", env := environment(dev))
    print(json.dumps(env))
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))

    from embedstore.extraction import _Runner, decode

    meta, paths = load_images(args.data, args.images, args.dry_run)
    encoder = make_encoder(args.image_size)
    prep = encoder.preprocessing
    runner = _Runner(encoder, dev, tta=False)
    raw = torch.stack([decode(p.read_bytes(), prep) for p in paths[:256]])
    print(f"images: {len(paths)} unique from {args.data}, input {prep.crop}px, device {dev}")
    baseline = None

    def section(name, fn):
        if name not in sections:
            return None
        t0 = time.perf_counter()
        try:
            figures = fn()
        except Exception as exc:  # noqa: BLE001 - one failed section must not cost the others' figures
            traceback.print_exc()
            res.error(name, exc)
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
            return None
        figures["section_s"] = time.perf_counter() - t0
        res.put(name, figures)
        return figures

    def run_forward():
        nonlocal baseline
        rates = forward_only(runner, raw, [int(b) for b in args.batch_sizes.split(",")], args.forward_seconds, dev)
        best = max(rates, key=rates.get)
        baseline = rates[best]
        fig = {"images_per_s": rates, "best_batch_size": best, "baseline_images_per_s": baseline}
        for b, r in rates.items():
            print(f"forward-only (bf16 autocast, inputs on device), batch {b:5d}: {r:9.1f} images/s")
        for b in sorted({64, best} & set(rates)):
            r = runner_rate(runner, raw, b, args.forward_seconds, dev)
            fig[f"runner_batch{b}_images_per_s"] = r
            print(f"embedstore _Runner from pinned uint8 host batches, batch {b}: {r:9.1f} images/s "
                  f"= {r / baseline:.2f}x forward-only")
        return fig

    def ratio(rate):
        return rate / baseline if baseline else float("nan")

    e2e_runs = []

    def run_e2e():
        copies = max(1, math.ceil(args.e2e_images / len(meta)))
        csv = repeated_csv(meta, copies, work / "rows.csv")
        fig = {"rows": copies * len(meta), "unique_images": len(meta), "runs": []}
        for spec in args.e2e.split(","):
            b, w = (int(v) for v in spec.split("x"))
            r = end_to_end(csv, args.data / "images", encoder, dev, b, w, work)
            r["ratio_to_forward_only"] = ratio(r["images_per_s"])
            fig["runs"].append(r)
            e2e_runs.append(r)
            print(f"embedstore end to end (hash + decode + model + zarr), batch {b:4d}, workers {w:2d}: "
                  f"{r['images_per_s']:8.1f} images/s ({r['images']} in {r['wall_s']:.1f} s; model loop "
                  f"{r['loop_images_per_s']:.1f}) = {r['ratio_to_forward_only']:.2f}x forward-only"
                  f"{'' if dev.type != 'cuda' else f', target {TARGET_IMAGES_PER_S}'}")
            res.put("e2e", fig)
        return fig

    def run_decode():
        b, w = (int(v) for v in args.e2e.split(",")[1 if "," in args.e2e else 0].split("x"))
        copies = max(1, math.ceil(args.e2e_images / len(paths)))
        fig = decode_rates((paths * copies)[: args.e2e_images], prep, runner, dev, b, w)
        for key in ("cpu_decode_model_images_per_s", "gpu_decode_model_images_per_s"):
            fig[key.replace("images_per_s", "ratio_to_forward_only")] = ratio(fig[key])
        print(f"decode only, CPU (embedstore decode, {w} workers):  {fig['cpu_decode_only_images_per_s']:9.1f} images/s")
        print(f"decode only, {dev.type} decode_jpeg batched + resize/crop: {fig['gpu_decode_only_images_per_s']:9.1f} images/s")
        print(f"decode + model, CPU decoding: {fig['cpu_decode_model_images_per_s']:9.1f} images/s = "
              f"{fig['cpu_decode_model_ratio_to_forward_only']:.2f}x forward-only")
        print(f"decode + model, {dev.type} decoding: {fig['gpu_decode_model_images_per_s']:9.1f} images/s = "
              f"{fig['gpu_decode_model_ratio_to_forward_only']:.2f}x forward-only")
        print(f"inputs differ by {fig['pixel_mean_abs_diff']:.2f} grey levels on average (max {fig['pixel_max_abs_diff']:.0f}); "
              f"feature cosine mean {fig['feature_cosine_mean']:.4f}, min {fig['feature_cosine_min']:.4f}")
        return fig

    def run_heads():
        from sklearn.model_selection import GroupShuffleSplit

        fig = {}
        if e2e_runs:
            X, y, groups = real_features(Path(e2e_runs[0]["store"]), e2e_runs[0]["name"], meta)
            tr, te = next(GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=0).split(X, y, groups))
            fig["real"] = compare_heads(X[tr], y[tr], X[te], y[te], 1.0, dev)
            fig["real"]["features"] = "DINOv2 ViT-S/14 (random weights) CLS of the HAM10000 images, dx labels, lesion-grouped 75/25 split"
        X, y = synthetic_classes(args.heads_synthetic, 384, 7)
        cut = int(0.8 * len(X))
        fig["synthetic"] = compare_heads(X[:cut], y[:cut], X[cut:], y[cut:], 1.0, dev)
        fig["synthetic"]["features"] = f"{args.heads_synthetic} rows, 384-d, 7 imbalanced Gaussian classes, 80/20 split"
        for part, f in fig.items():
            print(f"logistic probe ({part}: {f['train']} train x {f['dim']}-d, {f['classes']} classes, C=1): "
                  f"LogRegHead CPU {f['cpu_s']:.2f} s ({f['cpu_iterations']} evaluations), on {dev.type} "
                  f"{f['device_s']:.2f} s ({f['device_iterations']} evaluations) = {f['speedup']:.1f}x; "
                  f"accuracy {f['cpu']['accuracy']:.4f} vs {f['device']['accuracy']:.4f}, "
                  f"bal. acc. {f['cpu']['balanced_accuracy']:.4f} vs {f['device']['balanced_accuracy']:.4f}, "
                  f"AUC {f['cpu']['auc']:.4f} vs {f['device']['auc']:.4f}, argmax agree {f['argmax_agreement']:.4f}, "
                  f"max |dp| {f['max_abs_proba_diff']:.4f}")
        return fig

    def run_knn():
        n_ref = min(args.knn_cpu_queries, args.knn_vectors)
        fig = knn_graph(args.knn_vectors, 384, 10, min(args.knn_cpu_queries, n_ref), n_ref, dev, args.knn_chunk)
        print(f"kNN graph, {fig['vectors']} x {fig['dim']}-d, k={fig['k']} ({fig['data']}); faiss {fig['faiss']}, "
              f"GPU support: {fig['faiss_gpu']}")
        if fig["faiss_gpu"]:
            print(f"  FAISS GPU flat (embedstore FeatureIndex):  {fig['faiss_gpu_s']:8.2f} s, recall@10 {fig['faiss_gpu_recall']:.4f}")
        print(f"  torch fp16 matmul + top-k ({dev.type}):      {fig['torch_fp16_s']:8.2f} s, recall@10 {fig['torch_fp16_recall']:.4f}")
        print(f"  torch fp16 + fp32 re-rank of top 2k:       {fig['torch_fp16_rerank_s']:8.2f} s, recall@10 {fig['torch_fp16_rerank_recall']:.4f}")
        print(f"  torch fp32 (no TF32), extrapolated:        {fig['torch_fp32_s_extrapolated']:8.2f} s")
        print(f"  FAISS CPU flat, {fig['faiss_cpu_threads']} threads, extrapolated from {fig['faiss_cpu_queries_timed']} "
              f"queries: {fig['faiss_cpu_s_extrapolated']:8.2f} s, recall@10 {fig['faiss_cpu_recall']:.4f} "
              f"(torch fp16+re-rank {fig['speedup_torch_fp16_rerank_vs_faiss_cpu']:.1f}x faster)")
        return fig

    section("forward", run_forward)
    section("e2e", run_e2e)
    section("decode", run_decode)
    section("heads", run_heads)
    section("knn", run_knn)
    print(f"figures in {args.out}; errors: {res.data['errors'] or 'none'}")
    return res.data


if __name__ == "__main__":
    main()
