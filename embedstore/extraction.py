"""The extraction engine: images -> encoder -> feature store, batched, streamed, resumable and incremental.

One call of :func:`extract`:

1. checks every option (:mod:`embedstore.extract_options`), reads the
   source's ids and paths and hashes the images (only those whose size or mtime
   differ from what the store recorded: a stat each for the rest), refusing a
   source none of whose images can be read before anything is written;
2. merges the source's table into the store's manifest (new images appended,
   changed ones marked by their new hash, removed ones reported; a first
   extraction's table streamed a chunk at a time, never held whole);
3. under the feature set's lock (exclusive, or shared between the shards of
   one ``shard="i/n"`` run), deletes the row chunks whose checksums fail, so
   their rows become pending, then picks the rows that are not fresh (never
   done, failed on other bytes, computed from an older version of the image);
4. groups them by the store's row chunks, decodes them in DataLoader worker
   processes (:mod:`embedstore.decoding`; uint8, so little crosses the process
   boundary), normalises on the device, runs the encoder (channels_last; bf16
   autocast on CUDA), and writes each chunk-aligned block as soon as it is
   complete, data first and status last.

A full or read-only disk is one line saying what was kept. Killing the
process loses at most the block in flight; rerunning redoes exactly the rows
that are not final, with the same batches, so the result equals an
uninterrupted run of the same command, bit for bit. An incremental run
encodes only the pending rows, so a changed or new image may be encoded in a
batch of another size than a fresh extraction would use; the kernels may then
round its float32 features differently (on a 2-core x86 CPU, MobileNetV2 in a
batch of one differs from any larger batch by up to 7e-7), so an incremental
store and a fresh one agree to about one float16 step, not always bit for bit.
Memory is bounded by one block and the loader's prefetch, however many images
there are.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from embedstore import __version__
from embedstore.clock import utc_now
from embedstore.decoding import DecodedImages, collate_decoded, decode, failure_reason
from embedstore.devices import resolve_device
from embedstore.encoders import Encoder, create_encoder
from embedstore.errors import ConfigError, EncoderError, StoreError
from embedstore.extract_options import (check_options, check_shard_gets_chunks, check_some_readable,
                                        default_batch_size, default_workers)
from embedstore.progress import progress_bar
from embedstore.ray_extraction import ray_session, run_blocks
from embedstore.sources import Source
from embedstore.store import DONE, FAILED, FeatureStore, fingerprint, storage_errors


# --------------------------------------------------------------------- model
class _Runner:
    """The encoder on its device: uint8 batches in, float32 features out."""

    def __init__(self, encoder: Encoder, device: torch.device, tta: bool) -> None:
        self.device, self.tta = device, tta
        self.cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if encoder.channels_last else torch.contiguous_format
        self.model = encoder.model.to(device=device, memory_format=self.memory_format).eval()
        prep = encoder.preprocessing
        std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std  # (x/255 - mean)/std = x*scale - shift
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True).float().mul_(self.scale).sub_(self.shift)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.cuda):
            out = self.model(x).float()
            if self.tta:
                out = (out + self.model(torch.flip(x, dims=[3])).float()) / 2
        return out.cpu().numpy()


# ------------------------------------------------------------------- extract
@dataclass
class ExtractResult:
    """What one extraction did; :meth:`summary` is the one-line report."""

    store: Path
    key: str
    name: str
    n_source: int
    n_written: int = 0
    n_skipped: int = 0
    n_failed: int = 0
    n_repaired: int = 0  # corrupt row chunks found and removed (their rows of this source recomputed)
    n_left_pending: int = 0  # rows of those chunks, final before, whose images this source does not list
    failures: list[tuple[str, str]] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    images_per_s: float = 0.0

    def count_block(self, ids, written: int, reasons: list[str]) -> None:
        """Count a block written (``written`` rows done) whose images are ``ids``, with each one's failure reason."""
        self.n_written += written
        self.failures += [(str(i), r) for i, r in zip(ids, reasons) if r]

    def summary(self) -> str:
        parts = [f"{self.name} ({self.key}): {self.n_written} written", f"{self.n_skipped} up to date",
                 f"{self.n_failed} failed"]
        if self.new or self.changed:
            parts.append(f"{len(self.new)} new, {len(self.changed)} changed")
        if self.removed:
            parts.append(f"{len(self.removed)} no longer in the source (kept)")
        if self.n_repaired and not self.n_left_pending:
            parts.append(f"{self.n_repaired} corrupt chunk(s) recomputed")
        rate = f", {self.images_per_s:.1f} images/s" if self.n_written else ""
        line = ", ".join(parts) + f" in {self.wall_s:.1f} s{rate}"
        if self.n_left_pending:  # a repair cannot recompute rows of another source's images: say so
            line += (f"; {self.n_repaired} corrupt chunk(s) repaired, {self.n_left_pending} row(s) of images this "
                     f"source does not list are pending again: rerun extract with their source")
        return line


def feature_set_config(encoder: Encoder, tta: bool, dtype: str) -> dict:
    """Everything that decides a feature set's values: the input of its fingerprint."""
    return {**encoder.config(), "tta": bool(tta), "dtype": dtype, "decode": "pil-draft"}


def default_name(encoder: Encoder, tta: bool, dtype: str) -> str:
    """The human alias of a feature set: the encoder, then whatever differs from its defaults."""
    parts = [encoder.name]
    if encoder.pooling not in (None, "cls"):
        parts.append(encoder.pooling)
    if "image_size" in encoder.input_options:
        parts.append(f"{encoder.preprocessing.crop}px")
    if "crop_pct" in encoder.input_options:
        parts.append(f"crop{encoder.input_options['crop_pct'] * 100:g}")
    if "crop_mode" in encoder.input_options:
        parts.append(encoder.input_options["crop_mode"])
    if tta:
        parts.append("tta")
    if dtype != "float16":
        parts.append(dtype)
    return "-".join(parts)


def _existing_store(path: str | Path) -> FeatureStore | None:
    """The store at ``path`` if something is there (anything but a store is refused now, before hashing);
    None when it is still to be created, which waits until there is something to write."""
    return FeatureStore.create_or_open(path) if Path(path).exists() else None


def _versions() -> dict:
    import torchvision
    import zarr

    return {"embedstore": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "zarr": zarr.__version__, "python": platform.python_version()}


def extract(
    source: Source,
    encoder: Encoder | str,
    store: FeatureStore | str | Path,
    *,
    name: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
    tta: bool = False,
    rows_per_chunk: int = 1024,
    shard: str | tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    ray: str | None = None,
    ray_workers: int | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Extract ``encoder`` features of every image of ``source`` that the store lacks or holds stale.

    Returns an :class:`ExtractResult`; unreadable images are recorded (see
    ``failures``), not fatal. The feature set records how to rebuild the
    encoder from the encoder itself (its weights file included, see
    :meth:`Encoder.spec`), so ``create_encoder(name, weights=FILE)`` is all a
    notebook passes. ``shard="i/n"`` processes only every n-th row
    chunk, so n processes (or machines sharing the store) can split the work. ``ray`` (``local``, ``auto``,
    ``ray://HOST:PORT`` or a head's ``HOST:PORT``) runs the encoding on ``ray_workers`` Ray workers instead
    (:mod:`embedstore.ray_extraction`; default: one per GPU of the cluster, else one per CPU), each decoding
    in its own process unless ``num_workers`` is given.
    """
    t0 = time.perf_counter()
    dev, batch_size, (shard_index, shard_count) = check_options(
        device=device, batch_size=batch_size, num_workers=num_workers, dtype=dtype, rows_per_chunk=rows_per_chunk,
        shard=shard, ray=ray, ray_workers=ray_workers)
    with ray_session(ray, device, ray_workers) as cluster:  # connected first: a bad address costs nothing
        if cluster is not None:  # the workers' device, its default batch size and decoding processes
            dev, batch_size = cluster.device, batch_size or default_batch_size(cluster.device)
            num_workers = cluster.decoders(num_workers)
        if isinstance(encoder, str):
            encoder = create_encoder(encoder)
        images = source.images  # ids and paths, validated before anything is written (its metadata: update_manifest)
        config = feature_set_config(encoder, tta, dtype)
        key = fingerprint(config)
        name = name or default_name(encoder, tta, dtype)
        existing = store if isinstance(store, FeatureStore) else _existing_store(store)
        check_shard_gets_chunks(existing, images, key, rows_per_chunk, shard_index, shard_count)

        with progress_bar("hashing", len(images), enabled=progress) as advance:  # unchanged images: a stat each
            recorded = existing.recorded_images(images, source.describe()) if existing else None
            state = source.content_hashes(recorded=recorded, progress=advance)
        hashes = state["sha256"].array  # pandas' Arrow strings: 64 B a row, where a list of str holds 120
        check_some_readable(source, images, hashes)
        store = existing or FeatureStore.create_or_open(store)
        attrs = {"encoder": encoder.name, "weights": encoder.weights, "weights_arg": encoder.weights_file,
                 "weights_sha256": encoder.weights_sha256, "preprocessing": encoder.preprocessing.to_dict(),
                 "pooling": encoder.pooling, **encoder.input_options, "tta": tta, "dim": encoder.dim, "dtype": dtype,
                 "config": config, "rows_per_chunk": rows_per_chunk}
        with store.preparing():
            update = store.update_manifest(source, state, source.describe())
            fs = store.require_feature_set(key, name, attrs, encoder.dim, dtype, rows_per_chunk)
        result = ExtractResult(store=store.path, key=key, name=name, n_source=len(images),
                               new=update.new, changed=update.changed, removed=update.removed)

        with store.lock(key, (shard_index, shard_count)):
            rows = update.rows
            rpc, n_set = fs.rows_per_chunk, fs.n_rows

            def final_rows(start: int, stop: int) -> np.ndarray:  # before the repair; unreadable status: final
                try:
                    return np.isin(fs.read("status", slice(start, stop)), (DONE, FAILED))
                except StoreError:  # what FeatureSet.read raises for a damaged chunk
                    if stop - start <= rpc:
                        return np.ones(stop - start, dtype=bool)
                    return np.concatenate([final_rows(c, min(stop, c + rpc)) for c in range(start, stop, rpc)])

            was_final = final_rows(0, n_set)  # one read; chunk by chunk only when a status chunk is damaged
            with storage_errors(store.path, f"repairing feature set {name}"):
                repaired = fs.repair_chunks((shard_index, shard_count))  # their rows become pending
            result.n_repaired = len(repaired)
            if repaired:  # this run recomputes only this source's rows of them; the others stay pending
                left = np.zeros(n_set, dtype=bool)
                for c in repaired:
                    left[c * rpc:(c + 1) * rpc] = was_final[c * rpc:(c + 1) * rpc]
                left[rows[rows < n_set]] = False
                result.n_left_pending = int(left.sum())
            status = fs.read("status", rows)
            same = fs.read("sha256", rows) == np.asarray(hashes, dtype=object)
            final = same & ((status == DONE) | ((status == FAILED) & (not retry_failed)))
            rpc = fs.rows_per_chunk
            todo = np.flatnonzero(~final & ((rows // rpc) % shard_count == shard_index))
            result.n_skipped = int(final.sum())
            todo = todo[np.argsort(rows[todo], kind="stable")]  # store order: chunk-aligned blocks
            blocks = np.split(todo, np.flatnonzero(np.diff(rows[todo] // rpc)) + 1) if len(todo) else []
            with storage_errors(store.path, f"writing feature set {name} to {store.path}",
                                kept=lambda: f"{fs.n_final():,} rows are final and kept"):
                if ray and blocks:
                    with progress_bar(f"extracting {name} on Ray", sum(map(len, blocks)), enabled=progress) as advance:
                        on_ray = run_blocks(cluster, store.path, key, source, encoder, blocks, rows, hashes, tta,
                                            batch_size, num_workers, advance, result)
                else:
                    _run_blocks(source, encoder, fs, rows, hashes, blocks, dev, tta, batch_size,
                                default_workers(dev) if num_workers is None else num_workers, progress, result)

        result.wall_s = time.perf_counter() - t0
        if result.n_written:
            store.append_run(key, {"finished": utc_now(), "device": str(dev), "amp": "bf16" if dev.type == "cuda" else None,
                                   "batch_size": batch_size, "num_workers": num_workers,
                                   "shard": f"{shard_index}/{shard_count}", "n_written": result.n_written,
                                   "n_failed": result.n_failed, "wall_s": round(result.wall_s, 2),
                                   "images_per_s": round(result.images_per_s, 2), "versions": _versions(),
                                   **({"ray": {"address": ray, **on_ray}} if ray else {})})
        return result


class BlockBuffer:
    """The features and failure reasons of one chunk-aligned block while its batches come in, then its write.

    Shared by the single-process loop (:func:`_run_blocks`) and the Ray workers
    (:mod:`embedstore.ray_extraction`), so both write a block the same way: data first, status last.
    """

    def __init__(self, n: int, dim: int) -> None:
        self.features = np.zeros((n, dim), dtype=np.float32)
        self.reasons = [""] * n

    def add(self, positions: np.ndarray, features: np.ndarray | None, failed: list[tuple[int, str]]) -> None:
        """One batch: ``features`` of the block positions ``positions``, ``(position, reason)`` of its failures."""
        if features is not None:
            self.features[positions] = features
        for pos, reason in failed:
            self.reasons[pos] = reason

    def write(self, fs, rows: np.ndarray, hashes: list[str]) -> int:
        """Write the block to store rows ``rows`` (image hashes ``hashes``); returns the rows written as done."""
        status = np.where([r == "" for r in self.reasons], DONE, FAILED)
        fs.write_rows(rows, self.features, hashes, self.reasons, status)
        return int((status == DONE).sum())


def _run_blocks(source, encoder, fs, rows, hashes, blocks, dev, tta, batch_size, num_workers, progress, result) -> None:
    """Encode each block of source positions and write it as soon as all its batches are in."""
    if not blocks:
        return
    order = np.concatenate(blocks)
    paths = source.images["_path"].array[order]  # Arrow strings: a str is made only when a worker reads one
    batches, block_of_batch, start = [], [], 0
    for b, block in enumerate(blocks):
        for s in range(0, len(block), batch_size):
            batches.append(list(range(start + s, start + min(s + batch_size, len(block)))))
            block_of_batch.append(b)
        start += len(block)
    loader = DataLoader(DecodedImages(source, paths, encoder.preprocessing), batch_sampler=batches,
                        num_workers=num_workers, collate_fn=collate_decoded, pin_memory=dev.type == "cuda",
                        prefetch_factor=4 if num_workers else None)
    runner = _Runner(encoder, dev, tta)
    ids = source.images["id"].array
    starts = np.cumsum([0] + [len(b) for b in blocks])
    buffer = None
    t_model = time.perf_counter()
    with progress_bar(f"extracting {result.name}", len(order), enabled=progress) as advance:
        for n, (positions, images, failed) in enumerate(loader):
            b = block_of_batch[n]
            if buffer is None:
                buffer = BlockBuffer(len(blocks[b]), encoder.dim)
            buffer.add(positions.numpy() - starts[b], None if images is None else runner(images),
                       [(pos - starts[b], reason) for pos, reason in failed])
            advance(len(batches[n]))
            if n + 1 == len(batches) or block_of_batch[n + 1] != b:
                block = blocks[b]
                result.count_block(ids[block], buffer.write(fs, rows[block], [hashes[i] for i in block]),
                                   buffer.reasons)
                buffer = None
    result.n_failed = len(result.failures)
    result.images_per_s = len(order) / max(time.perf_counter() - t_model, 1e-9)


# --------------------------------------------------------------- new images
def embed_images(encoder: Encoder, images: list, device: str = "auto", batch_size: int = 32, tta: bool = False) -> np.ndarray:
    """Features of images given as paths or bytes, with the encoder's own preprocessing (``[n, D]`` float32)."""
    runner = _Runner(encoder, resolve_device(device), tta)
    tensors = []
    for item in images:
        try:
            data = item if isinstance(item, (bytes, bytearray)) else Path(item).read_bytes()
            tensors.append(decode(bytes(data), encoder.preprocessing))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"cannot read image {item if not isinstance(item, bytes) else '<bytes>'}: {failure_reason(exc)}") from None
    if not tensors:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.concatenate([runner(torch.stack(tensors[i:i + batch_size])) for i in range(0, len(tensors), batch_size)])


def encoder_for(store: FeatureStore, features: str) -> tuple[Encoder, dict]:
    """Rebuild the encoder a feature set was extracted with; refuse one whose weights hash differs.

    Returns the encoder and the feature set's attributes (for ``tta``).
    """
    attrs = store.feature_set(features).attrs
    if "derived_from" in attrs:
        raise EncoderError(f"feature set {attrs.get('name')} is derived from {attrs['derived_from']} by a trained "
                           f"head; embed new images with the parent feature set and apply the head")
    encoder = create_encoder(attrs["encoder"], weights=attrs.get("weights_arg"), pooling=attrs.get("pooling"),
                             image_size=attrs.get("image_size"), crop_pct=attrs.get("crop_pct"),
                             crop_mode=attrs.get("preprocessing", {}).get("crop_mode", "center"))  # absent: centre-cropped
    if encoder.weights_sha256 != attrs.get("weights_sha256"):
        raise EncoderError(f"the weights of {attrs['encoder']} available now differ from those feature set "
                           f"{attrs.get('name')} was extracted with; pass the same weights file")
    if fingerprint(feature_set_config(encoder, attrs.get("tta", False), attrs["dtype"])) != store.resolve(features):
        raise EncoderError(f"the encoder rebuilt from feature set {attrs.get('name')}'s attributes does not give its "
                           f"fingerprint (its preprocessing differs now); re-extract it into a new feature set")
    return encoder, attrs
