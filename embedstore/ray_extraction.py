"""Extraction on a Ray cluster: the single-process engine's blocks, encoded and written by Ray workers.

:func:`embedstore.extraction.extract` with ``ray=ADDRESS`` prepares everything as it always does (options,
hashes, the manifest merge, the feature set, its repair, the rows to do, the writer lock), then hands the
chunk-aligned blocks to :func:`run_blocks`. Each worker is a Ray actor that holds the encoder on its device
(a GPU where the cluster has them, a share of the CPUs otherwise), decodes a block's images itself, runs
them in the same batches as the single-process engine, and writes the block straight into the store through
:class:`embedstore.extraction.BlockBuffer` (data first, status last). So the store equals a single-process
run's bit for bit where both run the same kernels (on CPUs: the same number of torch threads, since CPU kernels
split their sums by thread; a worker runs one per whole CPU it is given), and a killed driver is resumed by a
rerun exactly as a killed single process is.

A worker that dies (its process killed, out of memory, its node lost) has its block put back in the queue by
the driver, for the other workers and a new one started in its place, at most :data:`RETRIES` times per block;
the run goes on while any worker lives, so a lost node never stalls it. The store must be on a filesystem every
node mounts at the same path: each worker first reads a token the driver wrote into the store and one image the
driver hashed, so a node that sees another folder (or none) at the store's path, or not the images, is refused
in one line before it writes a row. Workers check the token again, under the feature set's ``writers`` lock,
before each block they write, so the workers of a killed driver never write beside a new driver's.

Ray is an optional extra (``pip install 'embedstore[ray]'``), imported only here.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedstore import faults
from embedstore.errors import ConfigError, EmbedstoreError, SourceError, StoreError, first_line
from embedstore.store.disk import storage_errors
from embedstore.store.locks import block_writers_lock

#: How often a block whose worker died is run again before the extraction stops.
RETRIES = 3
#: How long the driver waits for a new worker to start when no block is being encoded (seconds).
START_TIMEOUT = 300
#: The environment variables a worker inherits from the driver (the fault-injection tests' crash points).
FORWARDED_ENV = (faults.ENV, faults.ONCE)


def check_address(address: str) -> str:
    """Refuse an address that is none of ``local``, ``auto``, ``ray://HOST:PORT`` or a head's ``HOST:PORT``."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("local", "auto") or (host and port.isdigit()):
        return address
    raise ConfigError(f"--ray takes local, auto, ray://HOST:PORT or a head's HOST:PORT, not {address!r}")


def import_ray():
    """The ray module, or a one-line ConfigError naming the extra that installs it."""
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

    def decoders(self, num_workers: int | None) -> int:
        """Decoding processes per worker: as asked, else none on a CPU worker (its share of the cores decodes
        between batches) and 4 beside a GPU, which one process could not keep busy."""
        return num_workers if num_workers is not None else (4 if self.device.type == "cuda" else 0)


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
    method's error as itself, a constructor's only as text. The encoder and the source come by reference and
    are fetched once per process.
    """

    def __init__(self, store: str, key: str, token: str, device: str, tta: bool, batch_size: int, num_workers: int,
                 threads: int, probe: tuple[str, str] | None) -> None:
        self.store, self.key, self.token, self.device, self.tta = Path(store), key, token, device, tta
        self.batch_size, self.num_workers, self.threads, self.probe = batch_size, num_workers, threads, probe
        self.fs = self.encoder = self.source = self.runner = None

    def where(self, shared: list) -> dict:
        """Set up (once per process), refusing a node that does not see the driver's store or images; returns this
        worker's node, process and device for the provenance record. ``shared``: the encoder's and the source's
        references."""
        if self.fs is None:
            try:
                self._set_up(shared)
            except EmbedstoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - a node without the driver's packages (or their versions)
                raise ConfigError(f"the Ray worker on {socket.gethostname()} cannot load the encoder or the source "
                                  f"({first_line(exc, 160)}); install the same embedstore and packages on every "
                                  "node") from None
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device)}

    def _set_up(self, shared: list) -> None:
        import ray

        from embedstore.devices import resolve_device
        from embedstore.extraction import _Runner
        from embedstore.store import FeatureStore

        check_token(self.store, self.key, self.token)
        self.encoder, self.source = ray.get(shared)
        if self.probe is not None:
            check_images(self.source, *self.probe)
        torch.set_num_threads(self.threads)
        self.device = resolve_device(self.device)
        self.runner = _Runner(self.encoder, self.device, self.tta)
        self.fs = FeatureStore.open(self.store).feature_set(self.key)

    def encode(self, index: int, rows: np.ndarray, paths: list[str], hashes: list[str]) -> dict:
        """Decode, encode and write block ``index`` (store rows ``rows``), if this worker's driver is still the
        store's; returns its counts and failures."""
        from torch.utils.data import DataLoader

        from embedstore.decoding import DecodedImages, collate_decoded
        from embedstore.extraction import BlockBuffer

        loader = DataLoader(DecodedImages(self.source, paths, self.encoder.preprocessing), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=collate_decoded,
                            pin_memory=self.device.type == "cuda")
        buffer = BlockBuffer(len(paths), self.encoder.dim)
        for positions, images, failed in loader:
            buffer.add(positions.numpy(), None if images is None else self.runner(images), failed)
        with block_writers_lock(self.store, self.key, exclusive=False):
            check_token(self.store, self.key, self.token)
            with storage_errors(self.store, f"writing feature set {self.key} to {self.store}"):
                written = buffer.write(self.fs, rows, hashes)
        return {"index": index, "written": written, "reasons": buffer.reasons}


def token_file(store: Path, key: str) -> Path:
    """Where the driver leaves the token its workers read to prove they see its store."""
    return store / ".locks" / f"{key}.ray-token"


def check_token(store: Path, key: str, token: str) -> None:
    """StoreError unless this node reads ``token`` in the store at ``store``: the same filesystem as the driver,
    and a driver that is still the store's (a new one replaces the token)."""
    try:
        seen = token_file(store, key).read_text()
    except OSError:
        seen = None
    if seen != token:
        raise StoreError(f"the Ray worker on {socket.gethostname()} cannot reach the store {store} (it sees "
                         f"{'no store' if seen is None else 'another store, or a newer extraction of it,'} at that "
                         f"path); put the store on a filesystem every node mounts at the same path")


def check_images(source, path: str, sha256: str) -> None:
    """SourceError unless this node reads the image ``path`` of ``source`` with the hash the driver read."""
    if source.content_hashes([path])["sha256"].iloc[0] != sha256:  # '' where it cannot be read
        raise SourceError(f"the Ray worker on {socket.gethostname()} cannot read the images as the driver does "
                          f"(first: {source.where(path)}); put them on a filesystem every node mounts at the same path")


def run_blocks(cluster: RayCluster, store: Path, key: str, source, encoder, blocks, rows, hashes, tta: bool,
               batch_size: int, num_workers: int, progress, result) -> dict:
    """Encode and write ``blocks`` (lists of source positions, chunk-aligned) of feature set ``key`` of the store at
    ``store`` on the cluster's workers, as :func:`embedstore.extraction._run_blocks` does in one process; returns
    the provenance: each worker process and the number of blocks run again.

    ``progress`` is the progress bar's ``advance``; ``result`` (an ``ExtractResult``) receives the counts and
    the failures, in block order.
    """
    ray, store = cluster.ray, Path(store).absolute()
    source = source.anchored()
    token = token_file(store, key)
    first = next((i for block in blocks for i in block if hashes[i]), None)  # an image the driver could read
    probe = None if first is None else (source.images["_path"].iloc[first], hashes[first])
    starting, running, free, started = {}, {}, [], []
    start_deaths, start_budget = 0, RETRIES * cluster.workers
    try:
        with block_writers_lock(store, key, exclusive=True):  # a killed driver's workers finish their block first
            token.write_text(secret := uuid.uuid4().hex)
        shared = [ray.put(encoder), ray.put(source)]  # held here until the end, for every worker started
        worker = ray.remote(max_restarts=0, **cluster.resources)(_Worker)

        def start() -> None:
            actor = worker.remote(str(store), key, secret, str(cluster.device), tta, batch_size, num_workers,
                                  cluster.threads, probe)
            starting[actor.where.remote(shared)] = actor

        wanted = min(cluster.workers, len(blocks))
        for _ in range(wanted):
            start()
        paths, ids = source.images["_path"].to_numpy(), source.images["id"].to_numpy()
        t0 = time.perf_counter()
        queue, tries, done = deque(enumerate(blocks)), Counter(), {}
        while queue or running:
            while queue and free:  # one block per worker: a death loses only its own block
                b, block = queue.popleft()
                actor = free.pop()
                running[actor.encode.remote(b, rows[block], paths[block].tolist(), [hashes[i] for i in block])] = b, actor
            ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=None if running else START_TIMEOUT)
            if not ready:
                raise StoreError(f"no Ray extraction worker started in {START_TIMEOUT} s (the cluster has "
                                 f"{ray.available_resources()} free); {len(done)} block(s) are final and kept")
            ref = ready[0]
            if ref in starting:
                actor = starting[ref]
                where = _get(ray, ref, setting_up=True)
                del starting[ref]
                if where is not None:
                    started.append(where)
                    free.append(actor)
                    continue
                start_deaths += 1  # a worker that died while starting is replaced too, within a budget
                if start_deaths > start_budget:
                    raise StoreError(f"{start_deaths} Ray extraction workers died while starting; see the Ray logs "
                                     f"of the nodes; the {len(done)} block(s) final are kept")
                start()
                continue
            b, actor = running[ref]
            out = _get(ray, ref)
            del running[ref]
            if out is None:  # the worker died: its block goes back in the queue, a new worker takes its place
                tries[b] += 1
                if tries[b] > RETRIES:
                    raise StoreError(f"block {b} (first image {ids[blocks[b][0]]}) lost its Ray worker {tries[b]} "
                                     f"times; the {len(done)} block(s) final are kept")
                _kill(ray, actor)
                free = _alive(ray, free, shared)  # idle workers on a lost node would each cost a block a try
                queue.appendleft((b, blocks[b]))
                for _ in range(wanted - len(free) - len(running) - len(starting)):
                    start()
                continue
            faults.point("ray-collect")
            done[b] = out
            free.append(actor)
            progress(len(blocks[b]))
        for b in sorted(done):
            result.count_block(ids[blocks[b]], done[b]["written"], done[b]["reasons"])
        result.n_failed = len(result.failures)
        result.images_per_s = sum(map(len, blocks)) / max(time.perf_counter() - t0, 1e-9)
        return {"workers": started, "retried_blocks": sum(tries.values())}
    finally:
        for actor in [*free, *starting.values(), *(a for _, a in running.values())]:
            _kill(ray, actor)
        token.unlink(missing_ok=True)


def _alive(ray, actors: list, shared: list, timeout: float = 30.0) -> list:
    """Those of the idle ``actors`` that answer within ``timeout`` seconds; the others are killed."""
    pings = {actor.where.remote(shared): actor for actor in actors}
    ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout) if pings else ([], [])
    alive = [pings[ref] for ref in ready if _get(ray, ref, setting_up=True) is not None]
    for actor in actors:
        if actor not in alive:
            _kill(ray, actor)
    return alive


def _kill(ray, actor) -> None:
    """Stop a worker; one that cannot be reached any more (its node, or the client connection, gone) is let be."""
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - nothing to stop, and the error being reported matters more
        pass


def _get(ray, ref, setting_up: bool = False):
    """The result of ``ref``, or None when its worker died (killed, out of memory, its node lost); an embedstore
    error raised in the worker is re-raised as itself, in one line. Any other error is one line too while the
    worker sets up (``setting_up``: a node that cannot import embedstore gets a stand-in whose methods all fail),
    and a bug that keeps its traceback once it encodes."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, EmbedstoreError):  # the worker's own exception, without Ray's traceback
            raise type(exc.cause)(first_line(exc.cause, 300)) from None
        if setting_up:
            raise ConfigError(f"a Ray extraction worker cannot start ({first_line(exc.cause or exc, 160)}); install "
                              "the same embedstore and packages on every node") from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError):
        return None
