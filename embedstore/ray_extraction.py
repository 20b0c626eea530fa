"""Extraction on a Ray cluster: the single-process engine's blocks, encoded and written by Ray workers.

:func:`embedstore.extraction.extract` with ``ray=ADDRESS`` prepares everything as it always does (options,
hashes, the manifest merge, the feature set, its repair, the rows to do, the writer lock), then hands the
chunk-aligned blocks to :func:`run_blocks`. Each worker is a Ray actor that holds the encoder on its device
(a GPU where the cluster has them, a share of the CPUs otherwise), decodes a block's images itself, runs
them in the same batches as the single-process engine, and writes the block straight into the store through
:class:`embedstore.extraction.BlockBuffer` (data first, status last). So the store equals a single-process
run's bit for bit, and a killed driver is resumed by a rerun exactly as a killed single process is.

A worker that dies (its process killed, its node lost) is restarted by Ray and its block run again
(``max_restarts`` / ``max_task_retries``). The store must be on a filesystem every node mounts at the same
path: each worker first reads a token the driver wrote into the store, so a node that sees another folder
(or none) at that path is refused in one line before anything is written.

Ray is an optional extra (``pip install 'embedstore[ray]'``), imported only here.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedstore import faults
from embedstore.errors import ConfigError, EmbedstoreError, StoreError, first_line

#: How often Ray restarts a dead worker, and runs its block again, before the extraction stops.
RETRIES = 3
#: The environment variables a worker inherits from the driver (the fault-injection tests' crash points).
FORWARDED_ENV = (faults.ENV, faults.ONCE)


def check_address(address: str) -> str:
    """Refuse an address that is none of ``local``, ``auto``, ``ray://HOST:PORT`` or a head's ``HOST:PORT``."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("local", "auto") or (host and port.isdigit()):
        return address
    raise ConfigError(f"--ray takes local, auto, ray://HOST:PORT or a head's HOST:PORT, not {address!r}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("extraction on Ray needs Ray: pip install 'embedstore[ray]'") from None
    return ray


@dataclass(frozen=True)
class RayCluster:
    """A connected Ray cluster and how an extraction uses it: the workers' device, their number and each one's
    Ray resources (one GPU each where the cluster has GPUs, else an equal share of its CPUs)."""

    ray: object
    device: torch.device
    workers: int
    resources: dict

    @property
    def threads(self) -> int:
        """torch threads per worker: its whole CPUs (CPU results depend on it: see the module's doc)."""
        return max(1, int(self.resources["num_cpus"]))


@contextmanager
def ray_session(address: str | None, device: str = "auto", workers: int | None = None):
    """Join (``auto``, ``ray://``, ``HOST:PORT``) or start (``local``) a Ray cluster for the duration, yielding a
    :class:`RayCluster` (None without an address). A cluster this process was already connected to (a
    notebook's) is used and left connected."""
    if address is None:
        yield None
        return
    ray = import_ray()
    connected = not ray.is_initialized()
    if connected:
        _check_reachable(address)
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     runtime_env={"env_vars": env} if env else None)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
            raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {first_line(exc, 200)}") from None
    try:
        yield _plan(ray, device, workers)
    finally:
        if connected:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse in seconds a ``HOST:PORT`` (or ``ray://``) address where nothing listens, which Ray itself would
    retry for minutes."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {exc.strerror or exc}") from None


def _plan(ray, device: str, workers: int | None) -> RayCluster:
    """The workers' device, number and resources on this cluster, refusing what it cannot give (a worker Ray
    cannot place would wait for ever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    if gpus and device != "cpu":
        if (workers or gpus) > gpus:
            raise ConfigError(f"the Ray cluster has {gpus} GPU(s), one per worker: ask for at most {gpus} workers, "
                              "or extract on CPUs with device cpu")
        return RayCluster(ray, torch.device(device if device.startswith("cuda") else "cuda"), workers or gpus,
                          {"num_gpus": 1, "num_cpus": 1})
    if device.startswith("cuda"):
        raise ConfigError(f"device {device!r} asked for, but the Ray cluster has no GPU; use cpu or auto")
    node_cpus = [int(n.get("CPU", 0)) for n in nodes]
    if sum(node_cpus) <= 0:
        raise ConfigError("the Ray cluster has no CPUs for extraction workers; start some with ray start --address")
    workers = workers or sum(node_cpus)
    return RayCluster(ray, torch.device("cpu"), workers, {"num_cpus": cpus_per_worker(node_cpus, workers)})


def cpus_per_worker(node_cpus: list[int], workers: int) -> float:
    """The most CPUs each of ``workers`` can have with every one of them placed on the nodes: whole CPUs where
    they fit (two workers on a two-CPU machine get one each, one worker gets both), an equal fraction of a
    CPU where there are more workers than CPUs."""
    for cpus in range(max(node_cpus), 0, -1):
        if sum(c // cpus for c in node_cpus) >= workers:
            return float(cpus)
    return 1 / math.ceil(workers / sum(node_cpus))


class _Worker:
    """One Ray worker (a Ray actor): the encoder on its device, writing whole blocks into the store.

    Everything that can fail is done by its methods (:meth:`where` first), not by its constructor: Ray reports a
    method's error as itself, a constructor's only as text. The encoder and the source come by reference with
    each block and are fetched once per process, not as constructor arguments, which a restarted worker could
    not get back once the object store dropped them.
    """

    def __init__(self, store: str, key: str, token: str, device: str, tta: bool, batch_size: int, num_workers: int,
                 threads: int) -> None:
        self.store, self.key, self.token, self.device, self.tta = store, key, token, device, tta
        self.batch_size, self.num_workers, self.threads = batch_size, num_workers, threads
        self.fs = self.encoder = self.source = self.runner = None

    def _open(self) -> None:
        """Check that this node sees the driver's store, then open it and take the device (once per process)."""
        if self.fs is not None:
            return
        from embedstore.devices import resolve_device
        from embedstore.store import FeatureStore

        check_token(Path(self.store), self.key, self.token)
        torch.set_num_threads(self.threads)
        self.device = resolve_device(self.device)
        self.fs = FeatureStore.open(self.store).feature_set(self.key)

    def where(self) -> dict:
        """This worker's node, process and device, for the provenance record (refusing a node without the store)."""
        self._open()
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device)}

    def encode(self, shared: list, index: int, rows: np.ndarray, paths: list[str], hashes: list[str]) -> dict:
        """Decode, encode and write block ``index`` (store rows ``rows``); returns its counts and failures.

        ``shared`` holds the references of the encoder and the source."""
        from torch.utils.data import DataLoader

        from embedstore.decoding import DecodedImages, collate_decoded
        from embedstore.extraction import BlockBuffer, _Runner

        self._open()
        if self.runner is None:
            import ray

            self.encoder, self.source = ray.get(shared)
            self.runner = _Runner(self.encoder, self.device, self.tta)
        loader = DataLoader(DecodedImages(self.source, paths, self.encoder.preprocessing), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=collate_decoded,
                            pin_memory=self.device.type == "cuda")
        buffer = BlockBuffer(len(paths), self.encoder.dim)
        for positions, images, failed in loader:
            buffer.add(positions.numpy(), None if images is None else self.runner(images), failed)
        written = buffer.write(self.fs, rows, hashes)
        return {"index": index, "written": written, "reasons": buffer.reasons, **self.where()}


def token_file(store: Path, key: str) -> Path:
    """Where the driver leaves the token its workers read to prove they see its store."""
    return store / ".locks" / f"{key}.ray-token"


def check_token(store: Path, key: str, token: str) -> None:
    """StoreError unless this node reads ``token`` in the store at ``store``: the same filesystem as the driver."""
    try:
        seen = token_file(store, key).read_text()
    except OSError:
        seen = None
    if seen != token:
        raise StoreError(f"the Ray worker on {socket.gethostname()} cannot reach the store {store} (it sees "
                         f"{'no store' if seen is None else 'another store'} at that path); put the store on a "
                         f"filesystem every node mounts at the same path")


def run_blocks(cluster: RayCluster, store: Path, key: str, source, encoder, blocks, rows, hashes, tta: bool,
               batch_size: int, num_workers: int, progress, result) -> list[dict]:
    """Encode and write ``blocks`` (lists of source positions, chunk-aligned) of feature set ``key`` of the store at
    ``store`` on the cluster's workers, as :func:`embedstore.extraction._run_blocks` does in one process; returns
    one provenance entry per worker process.

    ``progress`` is the progress bar's ``advance``; ``result`` (an ``ExtractResult``) receives the counts and
    the failures, in block order.
    """
    ray = cluster.ray
    store = Path(store).resolve()
    token = token_file(store, key)
    actors = []
    try:
        token.write_text(secret := uuid.uuid4().hex)
        actor = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES, **cluster.resources)(_Worker)
        shared = [ray.put(encoder), ray.put(source)]  # held here until the end, so a restarted worker finds them
        actors = [actor.remote(str(store), key, secret, str(cluster.device), tta, batch_size, num_workers,
                               cluster.threads) for _ in range(min(cluster.workers, len(blocks)))]
        started = _gather(ray, [a.where.remote() for a in actors])
        paths, ids = source.table["_path"].to_numpy(), source.table["id"].to_numpy()
        t0 = time.perf_counter()
        queue, pending, done = list(enumerate(blocks)), {}, {}
        while queue or pending:
            while queue and len(pending) < len(actors):  # one block per worker: a death loses only its own block
                b, block = queue.pop(0)
                worker = next(a for a in actors if a not in pending.values())
                ref = worker.encode.remote(shared, b, rows[block], paths[block].tolist(), [hashes[i] for i in block])
                pending[ref] = worker
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            out = _gather(ray, ready)[0]
            faults.point("ray-collect")
            done[out["index"]] = out
            progress(len(blocks[out["index"]]))
        for b in sorted(done):
            result.n_written += done[b]["written"]
            result.failures += [(str(ids[i]), r) for i, r in zip(blocks[b], done[b]["reasons"]) if r]
        result.n_failed = len(result.failures)
        result.images_per_s = sum(map(len, blocks)) / max(time.perf_counter() - t0, 1e-9)
        return _provenance(started, done.values())
    finally:
        for a in actors:
            ray.kill(a)
        token.unlink(missing_ok=True)


def _gather(ray, refs) -> list:
    """``ray.get``, with an embedstore error raised in a worker re-raised as itself (one line), and a worker
    that died more than :data:`RETRIES` times as a StoreError."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, EmbedstoreError):  # the worker's own exception, without Ray's traceback
            raise type(exc.cause)(first_line(exc.cause, 300)) from None
        raise StoreError(f"a Ray extraction worker failed: {first_line(exc.cause or exc, 200)}") from None
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
        raise StoreError(f"a Ray extraction worker died {RETRIES + 1} times ({first_line(exc, 160)}); the blocks "
                         "written so far are kept: rerun the same command to finish") from None


def _provenance(started: list[dict], outputs) -> list[dict]:
    """One entry per worker process (a restarted worker is a new process): host, pid, device, blocks, images."""
    blocks, images = Counter(), Counter()
    for out in outputs:
        blocks[out["host"], out["pid"]] += 1
        images[out["host"], out["pid"]] += len(out["reasons"])
    seen = {(w["host"], w["pid"]): w for w in started}
    for out in outputs:
        seen.setdefault((out["host"], out["pid"]), {k: out[k] for k in ("host", "pid", "device")})
    return [{**w, "blocks": blocks[k], "images": images[k]} for k, w in seen.items()]
