"""Extraction on a real local Ray cluster (a head without CPUs and two one-CPU worker nodes, as Ray's own tests
start one): it equals a single-process extraction bit for bit, a worker killed mid-block is restarted and its
block run again, a killed driver is resumed by a rerun, and a node that cannot see the store is refused.

CPU features depend on the number of torch threads (the kernels split their sums by thread), so the
single-process reference runs with one thread, as each one-CPU Ray worker does.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from embedstore import extract, open_source
from embedstore.errors import ConfigError, SourceError, StoreError
from embedstore.faults import ENV, ONCE
from embedstore.encoders import create_encoder
from embedstore.ray_extraction import _get, _Worker, check_token, cpus_per_worker, token_file
from embedstore.store import DONE, FeatureStore
from processes import run_embedstore
from test_faults import assert_same_store

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

N_IMAGES, ROWS_PER_CHUNK = 160, 32  # five blocks, so each of two workers writes several


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def images(ham_root, ham_subset, tmp_path_factory) -> Path:
    csv = tmp_path_factory.mktemp("ray") / "images.csv"
    ham_subset.head(N_IMAGES).to_csv(csv, index=False)
    return csv


def source_of(images: Path, ham_root: Path):
    return open_source(images, images=ham_root / "images", id_col="image_id")


@pytest.fixture(scope="module")
def reference(images, ham_root, tmp_path_factory) -> Path:
    """A single-process extraction with one torch thread, like each Ray worker."""
    path = tmp_path_factory.mktemp("ray") / "single.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(source_of(images, ham_root), "mobilenet_v2", path, rows_per_chunk=ROWS_PER_CHUNK, progress=False)
    finally:
        torch.set_num_threads(threads)
    return path


def ray_runs(store: Path) -> list[dict]:
    fs = FeatureStore.open(store).feature_set("mobilenet_v2")
    return [run["ray"] for run in fs.attrs["runs"]]


def test_a_worker_that_does_not_see_the_store_or_the_images_stops_the_driver_in_one_line(cluster, images, ham_root,
                                                                                        tmp_path):
    """Real workers, set up as run_blocks sets them up, on a node that sees another store or other images.

    First in this module: after three extractions and a killed driver on the module's cluster, an actor this test
    process creates itself can die at its first call (a test-process effect: five extractions in a row from one
    process all succeed, and run_blocks replaces a worker that dies)."""
    store = tmp_path / "elsewhere.zarr"
    (store / ".locks").mkdir(parents=True)
    token_file(store, "abc").write_text("token-of-the-driver")
    source = source_of(images, ham_root).anchored()
    first = source.table["_path"].iloc[0]
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        shared = [ray.put(create_encoder("mobilenet_v2")), ray.put(source)]
        actor = ray.remote(max_restarts=0, num_cpus=1)(_Worker).remote(
            str(store), "abc", "token-of-another-driver", "cpu", False, 8, 0, 1, (first, "0" * 64))
        with pytest.raises(StoreError, match="cannot reach the store .* another store") as info:
            _get(ray, actor.where.remote(shared))  # raised in the worker, re-raised here without Ray's traceback
        assert "\n" not in str(info.value)
        worker = _Worker(str(store), "abc", "token-of-the-driver", "cpu", False, 8, 0, 1, (first, "0" * 64))
        with pytest.raises(SourceError, match="cannot read the images as the driver does"):
            worker.where(shared)  # the store is seen, but the image read here is not the one the driver hashed
        with pytest.raises(ConfigError, match="cannot load the encoder or the source .* on every node") as info:
            worker.where([shared[0]])  # what it was sent cannot be used here (a node with other packages)
        assert "\n" not in str(info.value)
    finally:
        ray.shutdown()


def test_ray_extraction_equals_single_process_bit_for_bit(cluster, images, ham_root, reference, tmp_path):
    store = tmp_path / "ray.zarr"
    result = extract(source_of(images, ham_root), "mobilenet_v2", store, rows_per_chunk=ROWS_PER_CHUNK,
                     ray=cluster.address, progress=False)
    assert (result.n_written, result.n_failed) == (N_IMAGES, 0)
    assert_same_store(reference, store)
    [run] = ray_runs(store)
    assert run["address"] == cluster.address
    assert len({w["pid"] for w in run["workers"]}) == 2 and run["retried_blocks"] == 0
    assert all(w["device"] == "cpu" for w in run["workers"])
    assert not token_file(store, result.key).exists()  # the driver cleans its token up

    again = extract(source_of(images, ham_root), "mobilenet_v2", store, rows_per_chunk=ROWS_PER_CHUNK,
                    ray=cluster.address, progress=False)
    assert (again.n_written, again.n_skipped) == (0, N_IMAGES)


def test_a_worker_killed_mid_block_is_restarted_and_its_block_run_again(cluster, images, ham_root, reference,
                                                                        tmp_path, monkeypatch):
    once = tmp_path / "killed"
    monkeypatch.setenv(ENV, "status-write:2")  # a worker's second block: features written, status not yet
    monkeypatch.setenv(ONCE, str(once))  # only the first worker to get there dies; its restart passes
    store = tmp_path / "ray.zarr"
    result = extract(source_of(images, ham_root), "mobilenet_v2", store, rows_per_chunk=ROWS_PER_CHUNK,
                     ray=cluster.address, progress=False)
    assert once.exists(), "no worker was killed"
    assert (result.n_written, result.n_failed) == (N_IMAGES, 0)
    assert_same_store(reference, store)
    [run] = ray_runs(store)
    assert run["retried_blocks"] == 1  # the killed worker's block, run again by another
    assert len(run["workers"]) >= 2


def test_a_killed_driver_is_resumed_by_a_rerun(cluster, images, ham_root, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    store = tmp_path / "ray.zarr"
    args = ("extract", images, "--images", ham_root / "images", "--id-col", "image_id", "-s", store,
            "--rows-per-chunk", ROWS_PER_CHUNK, "--ray", "auto", "-q")
    killed = run_embedstore(*args, fault="ray-collect:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-1500:]
    fs = FeatureStore.open(store).feature_set("mobilenet_v2")
    final = int((fs.read("status", slice(0, N_IMAGES)) == DONE).sum())
    assert ROWS_PER_CHUNK <= final < N_IMAGES  # some blocks final, not all

    rerun = run_embedstore(*args)
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    written = int(rerun.stdout.split(" written")[0].rsplit(" ", 1)[1])
    assert written <= N_IMAGES - ROWS_PER_CHUNK  # resumed: the blocks done before the kill are kept
    assert_same_store(reference, store)


def test_a_node_that_does_not_see_the_store_is_refused_in_one_line(tmp_path):
    store = tmp_path / "elsewhere.zarr"
    (store / ".locks").mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot reach the store .* no store at that path") as info:
        check_token(store, "abc", "token-of-the-driver")
    assert "\n" not in str(info.value)
    token_file(store, "abc").write_text("token-of-another-driver")
    with pytest.raises(StoreError, match="another store, or a newer extraction of it, at that path"):
        check_token(store, "abc", "token-of-the-driver")
    token_file(store, "abc").write_text("token-of-the-driver")
    check_token(store, "abc", "token-of-the-driver")


@pytest.mark.parametrize("args, message", [
    (("--ray", "nonsense"), "--ray takes local, auto"),
    (("--ray", "local", "--shard", "0/2"), "ray drives every row chunk itself"),
    (("--ray-workers", "2"), "ray_workers needs ray"),
    (("--ray", "127.0.0.1:1"), "cannot connect to the Ray cluster at '127.0.0.1:1'"),
    (("--ray", "local", "--ray-workers", "0"), "ray_workers must be at least 1"),
    (("--ray", "local", "--device", "cuda:1"), "Ray gives each worker a GPU of its own"),
    (("--ray", "local", "--device", "cuda"), "the Ray cluster has no GPU"),
])
def test_bad_ray_options_are_one_line_before_any_work(cli, images, ham_root, tmp_path, args, message):
    store = tmp_path / "new.zarr"
    code, _, err = cli("extract", images, "--images", ham_root / "images", "--id-col", "image_id", "-s", store,
                       *args, "-q")
    assert code == 2 and message in err and err.count("\n") == 1
    assert not store.exists()  # nothing written, not even an empty store


@pytest.mark.parametrize("nodes, workers, each", [
    ([2], 1, 2.0), ([2], 2, 1.0), ([2], 4, 0.5), ([1, 1], 3, 0.5), ([8, 8], 3, 4.0), ([0, 1, 1], 2, 1.0)])
def test_each_worker_gets_the_most_cpus_that_still_place_every_worker(nodes, workers, each):
    assert cpus_per_worker(nodes, workers) == each
    assert sum(int(c // each) if each >= 1 else int(c / each + 1e-9) for c in nodes) >= workers
