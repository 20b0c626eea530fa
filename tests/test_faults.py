"""Fault injection: kill a real `embedstore` process (SIGKILL) at each named crash point, rerun, and check.

For every point of :data:`embedstore.faults.POINTS` the same three checks (docs/RELIABILITY.md):

1. the killed command died at that point (exit by SIGKILL), so the test cannot pass vacuously;
2. right after the kill, every command still works on what is there (``ls``, ``load``, ``query``, reading
   the previous run folder): nothing final was lost;
3. rerunning the same command succeeds, leaves no hidden leftovers, and its result equals an uninterrupted
   run of the same command, bit for bit for stored features and to the last digit for metrics.

Everything runs on real HAM10000 images and the real offline MobileNetV2 weights, in subprocesses, so a
kill is a kill (no ``finally`` runs).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from embedstore.encoders import create_encoder
from embedstore.extraction import embed_images
from embedstore.faults import POINTS
from embedstore.store import FeatureStore
from processes import run_embedstore

KILLED = -signal.SIGKILL


def ok(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = run_embedstore(*args, **kwargs)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def killed(point: str, *args, **kwargs) -> None:
    proc = run_embedstore(*args, fault=point, **kwargs)
    assert proc.returncode == KILLED, f"not killed at {point}: rc={proc.returncode} {proc.stderr[-1500:]}"


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".embedstore-tmp-" in p.name or ".embedstore-old-" in p.name
                  or p.name.endswith(".tmp"))


def feature_arrays(store: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every array of every feature set, as numpy (emb, status, sha256, error), keyed by feature-set key."""
    root = zarr.open_group(str(store), mode="r")
    return {key: {name: np.asarray(arr[:]) for name, arr in grp.arrays()} for key, grp in root["features"].groups()}


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = feature_arrays(a), feature_arrays(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        for name in ("emb", "status", "sha256", "error"):
            np.testing.assert_array_equal(fa[key][name], fb[key][name], err_msg=f"{key}/{name}")
    ma = pd.read_parquet(a / "manifest.parquet").drop(columns=["_mtime_ns"], errors="ignore")
    mb = pd.read_parquet(b / "manifest.parquet").drop(columns=["_mtime_ns"], errors="ignore")
    pd.testing.assert_frame_equal(ma, mb)


# --------------------------------------------------------------------------------------------- extract

EXTRACT_OPTS = ("--encoder", "mobilenet_v2", "--id-col", "image_id", "--rows-per-chunk", "16", "--batch-size", "8",
                "--workers", "0", "--quiet")


@pytest.fixture(scope="module")
def sources(ham_root, ham_subset, tmp_path_factory):
    """Two CSVs over real images: ``first`` (48 rows) and ``grown`` (the same plus 24 new ones)."""
    folder = tmp_path_factory.mktemp("fault-sources")
    rows = ham_subset.iloc[::5].head(72)
    first, grown = folder / "first.csv", folder / "grown.csv"
    rows.head(48).to_csv(first, index=False)
    rows.to_csv(grown, index=False)
    return {"first": first, "grown": grown, "images": ham_root / "images"}


def extract(sources, which: str, store: Path, fault: str | None = None):
    args = ("extract", sources[which], "--images", sources["images"], "--store", store, *EXTRACT_OPTS)
    return killed(fault, *args) if fault else ok(*args)


@pytest.fixture(scope="module")
def reference_store(sources, tmp_path_factory) -> Path:
    """The uninterrupted run: extract ``first``, then ``grown``."""
    store = tmp_path_factory.mktemp("fault-ref") / "ref.zarr"
    extract(sources, "first", store)
    extract(sources, "grown", store)
    return store


@pytest.mark.parametrize("point", ["resize", "manifest-replace", "status-write", "status-write:2"])
def test_extract_killed_while_growing_resumes_bit_for_bit(point, sources, reference_store, tmp_path):
    store = tmp_path / "s.zarr"
    extract(sources, "first", store)
    killed(point, "extract", sources["grown"], "--images", sources["images"], "--store", store, *EXTRACT_OPTS)
    listing = ok("ls", store)  # usable right after the kill
    assert "mobilenet_v2" in listing.stdout
    X, table = FeatureStore.open(store).load("mobilenet_v2")  # every row final before the kill is served
    assert len(X) >= 48 and np.isfinite(X).all()
    extract(sources, "grown", store)
    assert_same_store(store, reference_store)
    assert hidden_leftovers(store) == []


@pytest.mark.parametrize("point", ["manifest-replace", "status-write"])
def test_first_extract_killed_resumes_bit_for_bit(point, sources, tmp_path):
    fresh, ref = tmp_path / "fresh.zarr", tmp_path / "ref.zarr"
    extract(sources, "first", ref)
    extract(sources, "first", fresh, fault=point)
    extract(sources, "first", fresh)
    assert_same_store(fresh, ref)


@pytest.mark.parametrize("edit", ["another photo", "junk bytes"])
def test_extract_killed_while_rewriting_changed_images_never_serves_half_new_rows(edit, sources, tmp_path):
    """Rows that were final are pending while their new data is written: a kill there (after the new hash and
    features, or the zeros and error of an image that no longer decodes, before the status) leaves them pending,
    never served; the rerun recomputes them as an uninterrupted run of the same command on the same store does.

    The reference is that uninterrupted run, not a fresh extraction: an incremental run encodes the edited image
    alone (the only pending row), a fresh one in a batch of 8, and CPU kernels may round the two differently."""
    table = pd.read_csv(sources["first"])
    images = tmp_path / "images"
    images.mkdir()
    for image_id in table["image_id"]:
        shutil.copy(sources["images"] / f"{image_id}.jpg", images / f"{image_id}.jpg")
    edited, other = table["image_id"].iloc[0], table["image_id"].iloc[1]
    args = ("extract", sources["first"], "--images", images, *EXTRACT_OPTS)
    store, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    ok(*args, "--store", store)
    shutil.copytree(store, ref)  # the same store, to be updated without a kill
    if edit == "junk bytes":
        (images / f"{edited}.jpg").write_bytes(b"no longer an image")
    else:
        shutil.copy(sources["images"] / f"{other}.jpg", images / f"{edited}.jpg")
    killed("status-write", *args, "--store", store)
    assert edited not in set(FeatureStore.open(store).load("mobilenet_v2")[1]["id"])  # pending, not served
    ok(*args, "--store", store)
    ok(*args, "--store", ref)
    assert_same_store(store, ref)
    X, t = FeatureStore.open(store).load("mobilenet_v2")
    if edit == "junk bytes":
        assert edited not in set(t["id"])  # failed, with its reason
    else:  # the edited row holds the new photo's features, encoded as the rerun encodes it: alone
        new_photo = embed_images(create_encoder("mobilenet_v2"), [images / f"{edited}.jpg"], batch_size=1)
        np.testing.assert_array_equal(X[np.flatnonzero(t["id"] == edited)[0]],
                                      new_photo[0].astype(np.float16).astype(np.float32))


# ----------------------------------------------------------------------------------------------- probe

PROBE_OPTS = ("-f", "mobilenet_v2", "-t", "dx", "-g", "lesion_id", "--folds", "3", "--n-boot", "50", "--no-report")


@pytest.fixture
def store_copy(ham_store, tmp_path) -> Path:
    dest = tmp_path / "store.zarr"
    shutil.copytree(ham_store, dest)
    return dest


def run_files(run: Path) -> dict:
    return {"metrics": json.loads((run / "metrics.json").read_text())["metrics"],
            "predictions": pd.read_parquet(run / "predictions.parquet")}


def test_probe_killed_while_replacing_its_run_folder_keeps_the_old_run(store_copy, tmp_path):
    out = tmp_path / "runs" / "probe"
    ok("probe", store_copy, *PROBE_OPTS, "-p", "logreg.C=1", "--out", out)
    before = run_files(out)
    killed("folder-replace", "probe", store_copy, *PROBE_OPTS, "-p", "logreg.C=0.1", "--out", out, "--overwrite")
    still = run_files(out)  # the old run, whole and readable
    assert still["metrics"] == before["metrics"]
    pd.testing.assert_frame_equal(still["predictions"], before["predictions"])
    ok("probe", store_copy, *PROBE_OPTS, "-p", "logreg.C=0.1", "--out", out, "--overwrite")
    ref = tmp_path / "runs" / "reference"
    ok("probe", store_copy, *PROBE_OPTS, "-p", "logreg.C=0.1", "--out", ref)
    assert run_files(out)["metrics"] == run_files(ref)["metrics"]
    assert hidden_leftovers(out.parent) == []


def test_probe_killed_at_a_trial_commit_resumes_to_the_uninterrupted_result(store_copy, tmp_path):
    args = (*PROBE_OPTS, "--folds", "2", "--trials", "4")
    ref = tmp_path / "ref"
    ok("probe", store_copy, *args, "--storage", f"sqlite:///{tmp_path / 'ref.db'}", "--out", ref)
    out, storage = tmp_path / "resumed", f"sqlite:///{tmp_path / 'resumed.db'}"
    killed("trial-commit:3", "probe", store_copy, *args, "--storage", storage, "--out", out)
    assert not out.exists()
    ok("probe", store_copy, *args, "--storage", storage, "--out", out)
    a, b = run_files(out), run_files(ref)
    assert a["metrics"] == b["metrics"]
    pd.testing.assert_frame_equal(a["predictions"], b["predictions"])


# ----------------------------------------------------------------------------------------------- match

MATCH_OPTS = ("-f", "mobilenet_v2", "-g", "lesion_id", "--folds", "2", "--n-boot", "20", "--no-report",
              "--projection", "contrastive", "--epochs", "2", "--grid", "0.6,0.8")


def projected_sets(store: Path) -> list[str]:
    return [i.key for i in FeatureStore.open(store).feature_sets() if i.name == "mobilenet_v2+contrastive"]


def test_match_killed_while_replacing_its_projected_set_loses_neither(store_copy, tmp_path):
    ok("match", store_copy, *MATCH_OPTS, "--seed", "0", "--out", tmp_path / "m0")
    [old] = projected_sets(store_copy)
    killed("projected-set-replace", "match", store_copy, *MATCH_OPTS, "--seed", "1", "--out", tmp_path / "m1")
    assert old in projected_sets(store_copy)  # the previous projected set is still there and readable
    some_id = FeatureStore.open(store_copy).manifest["id"].iloc[0]
    ok("query", store_copy, some_id, "-f", "mobilenet_v2+contrastive", "-k", "2")
    ok("ls", store_copy)
    ok("match", store_copy, *MATCH_OPTS, "--seed", "1", "--out", tmp_path / "m1")
    [new] = projected_sets(store_copy)
    ref = tmp_path / "ref.zarr"
    shutil.copytree(store_copy, ref)
    ok("match", ref, *MATCH_OPTS, "--seed", "1", "--out", tmp_path / "m1-ref", "--overwrite")
    assert projected_sets(ref) == [new]
    store = FeatureStore.open(store_copy)
    np.testing.assert_array_equal(store.load(new)[0], FeatureStore.open(ref).load(new)[0])


def test_query_killed_while_saving_its_index_answers_after_a_rerun(store_copy):
    some_id = FeatureStore.open(store_copy).manifest["id"].iloc[3]
    killed("index-save", "query", store_copy, some_id, "-f", "mobilenet_v2", "-k", "3", "--json")
    after = ok("query", store_copy, some_id, "-f", "mobilenet_v2", "-k", "3", "--json")
    again = ok("query", store_copy, some_id, "-f", "mobilenet_v2", "-k", "3", "--json")  # from the saved index
    assert json.loads(after.stdout) == json.loads(again.stdout)


def test_every_crash_point_is_placed_in_the_code_and_killed_at_here():
    """Each point of faults.POINTS is called in the package, and a test of this module (or, for the points inside
    one of several tuning workers, of tests/test_tune_workers.py; for the Ray driver's, of tests/test_ray_extract.py)
    kills a process there."""
    import re

    package = Path(__file__).resolve().parents[1] / "embedstore"
    placed = {m for f in package.rglob("*.py") for m in re.findall(r'faults\.point\("([a-z-]+)"\)', f.read_text())}
    here = Path(__file__).read_text()
    killed_at = set(re.findall(r'killed\("([a-z-]+)', here)) | set(re.findall(r'fault="([a-z-]+)', here))
    killed_at |= set(re.findall(r'"(status-write|resize|manifest-replace)(?::\d)?"', here))
    workers = Path(__file__).with_name("test_tune_workers.py").read_text()
    killed_at |= set(re.findall(r'setenv\("EMBEDSTORE_FAULT", "([a-z-]+):\d+@\d+"\)', workers))
    killed_at |= set(re.findall(r'fault="([a-z-]+)', Path(__file__).with_name("test_ray_extract.py").read_text()))
    assert set(POINTS) == placed, f"points declared vs placed in the code: {sorted(set(POINTS) ^ placed)}"
    assert set(POINTS) <= killed_at, f"crash points without a fault-injection test: {sorted(set(POINTS) - killed_at)}"
