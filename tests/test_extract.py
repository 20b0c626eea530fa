"""Extraction and cache semantics on real HAM10000 images with the real offline MobileNetV2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import zarr

from embedstore import FeatureStore, create_encoder, extract, open_source
from embedstore.errors import StoreError
from embedstore.extraction import embed_images
from embedstore.store import DONE, FAILED

ENCODER = "mobilenet_v2"


@pytest.fixture(scope="module")
def encoder():
    return create_encoder(ENCODER)


def _copy_images(ham_root: Path, table: pd.DataFrame, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for image_id in table["image_id"]:
        shutil.copy(ham_root / "images" / f"{image_id}.jpg", dest / f"{image_id}.jpg")
    return dest


@pytest.fixture
def workdir(tmp_path, ham_root, ham_subset):
    """48 real images copied into a folder the test may change, with their CSV."""
    table = ham_subset.iloc[::8].head(48).reset_index(drop=True)
    _copy_images(ham_root, table, tmp_path / "images")
    table.to_csv(tmp_path / "meta.csv", index=False)
    return tmp_path, table


def _source(workdir):
    path, _ = workdir
    return open_source(path / "meta.csv", images=path / "images", id_col="image_id")


def test_features_match_direct_forward_and_rerun_does_no_model_work(workdir, encoder):
    path, table = workdir
    first = extract(_source(workdir), encoder, path / "s.zarr", batch_size=16, rows_per_chunk=32, progress=False)
    assert (first.n_written, first.n_skipped, first.n_failed) == (48, 0, 0)
    X, meta = FeatureStore.open(path / "s.zarr").load(ENCODER)
    assert meta["id"].tolist() == table["image_id"].tolist()
    assert {"dx", "lesion_id", "age", "sex", "localization"} <= set(meta.columns)
    direct = embed_images(encoder, [path / "images" / f"{i}.jpg" for i in table["image_id"][:8]], device="cpu")
    np.testing.assert_allclose(X[:8], direct, rtol=2e-3, atol=2e-3)  # stored as float16
    again = extract(_source(workdir), encoder, path / "s.zarr", progress=False)
    assert (again.n_written, again.n_skipped) == (0, 48)


def test_new_changed_and_removed_images(workdir, encoder, ham_root, ham_subset):
    path, table = workdir
    store_path = path / "s.zarr"
    extract(_source(workdir), encoder, store_path, rows_per_chunk=32, progress=False)
    extra = ham_subset.iloc[1::8].head(5)
    _copy_images(ham_root, extra, path / "images")
    changed_id, donor_id = table["image_id"][3], extra["image_id"].iloc[0]
    shutil.copy(ham_root / "images" / f"{donor_id}.jpg", path / "images" / f"{changed_id}.jpg")
    pd.concat([table.iloc[1:], extra]).to_csv(path / "meta.csv", index=False)  # first image dropped

    result = extract(_source(workdir), encoder, store_path, rows_per_chunk=32, progress=False)
    assert sorted(result.new) == sorted(extra["image_id"])
    assert result.changed == [changed_id]
    assert result.removed == [table["image_id"][0]]
    assert result.n_written == 6 and result.n_skipped == 46
    store = FeatureStore.open(store_path)
    assert len(store.manifest) == 53 and store.manifest["id"].is_unique
    X, _ = store.load(ENCODER, ids=[changed_id])
    # re-extracted from the new bytes: the only pending row of its chunk, so encoded alone (a batch of one, which
    # CPU kernels may round differently from the donor's batch of five new rows), as embed_images encodes it here
    alone = embed_images(encoder, [path / "images" / f"{changed_id}.jpg"], batch_size=1)
    np.testing.assert_array_equal(X[0], alone[0].astype(np.float16).astype(np.float32))


def test_reading_features_of_a_changed_image_is_refused(workdir, encoder, ham_root, ham_subset):
    path, table = workdir
    store_path = path / "s.zarr"
    extract(_source(workdir), encoder, store_path, progress=False)
    extract(_source(workdir), "efficientnet_lite0", store_path, progress=False)
    shutil.copy(ham_root / "images" / f"{ham_subset['image_id'].iloc[1]}.jpg", path / "images" / f"{table['image_id'][5]}.jpg")
    extract(_source(workdir), encoder, store_path, progress=False)  # refreshes mobilenet_v2 only
    store = FeatureStore.open(store_path)
    assert len(store.load(ENCODER)[0]) == 48
    with pytest.raises(StoreError, match="1 images changed since feature set efficientnet_lite0 was extracted"):
        store.load("efficientnet_lite0")
    info = {i.name: i for i in store.feature_sets()}
    assert info["efficientnet_lite0"].n_stale == 1 and info[ENCODER].n_stale == 0


def test_fingerprint_separates_configurations_and_names_cannot_be_reused(workdir, encoder, tmp_path):
    path, _ = workdir
    store_path = path / "s.zarr"
    src = _source(workdir)
    a = extract(src, encoder, store_path, name="plain", progress=False)
    b = extract(src, encoder, store_path, tta=True, progress=False)
    c = extract(src, encoder, store_path, dtype="float32", progress=False)
    assert len({a.key, b.key, c.key}) == 3
    assert [b.name, c.name] == ["mobilenet_v2-tta", "mobilenet_v2-float32"]
    store = FeatureStore.open(store_path)
    assert store.feature_set(c.key).emb.dtype == np.float32
    assert store.resolve("plain") == a.key and store.resolve(c.key[:6]) == c.key
    with pytest.raises(StoreError, match="names several feature sets"):
        store.load("mobilenet_v2")  # the encoder of all three, the name of none
    with pytest.raises(StoreError, match="already holds another configuration"):
        extract(src, encoder, store_path, tta=True, name="plain", progress=False)


def test_unreadable_images_are_recorded_and_the_run_succeeds(workdir, encoder):
    path, table = workdir
    images = path / "images"
    good = (images / f"{table['image_id'][0]}.jpg").read_bytes()
    (images / f"{table['image_id'][1]}.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (images / f"{table['image_id'][2]}.jpg").write_bytes(b"")  # empty
    (images / f"{table['image_id'][3]}.jpg").write_bytes(b"id,label\n1,nv\n")  # not an image
    (images / f"{table['image_id'][4]}.jpg").unlink()  # missing
    from PIL import Image

    Image.new("1", (11000, 10000)).save(images / "huge.png")  # 110 megapixels
    rows = pd.concat([table, pd.DataFrame({"image_id": ["huge"], "path": ["huge.png"]})], ignore_index=True)
    rows["path"] = rows["path"].fillna(rows["image_id"] + ".jpg")
    rows.to_csv(path / "meta.csv", index=False)
    src = open_source(path / "meta.csv", images=images, id_col="image_id", path_col="path")

    result = extract(src, encoder, path / "s.zarr", progress=False)
    reasons = dict(result.failures)
    assert result.n_written == 44 and result.n_failed == 5
    assert reasons[table["image_id"][1]] == "truncated image"
    assert reasons[table["image_id"][2]] == "empty file"
    assert reasons[table["image_id"][3]] == "not an image"
    assert reasons[table["image_id"][4]] == "missing file"
    assert reasons["huge"].startswith("image too large")
    store = FeatureStore.open(path / "s.zarr")
    X, meta = store.load(ENCODER)
    assert len(X) == 44 and not set(reasons) & set(meta["id"])
    assert store.info(ENCODER).n_failed == 5
    rerun = extract(src, encoder, path / "s.zarr", progress=False)
    assert rerun.n_written == 0 and rerun.n_failed == 0  # known failures are not retried on the same bytes
    (images / f"{table['image_id'][2]}.jpg").write_bytes(good)  # repaired: new bytes, retried
    assert extract(src, encoder, path / "s.zarr", progress=False).n_written == 1


def _extract_cmd(path: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedstore.cli", "extract", str(path / "meta.csv"), "--images", str(path / "images"),
            "--encoder", ENCODER, "--store", str(store), "--batch-size", "8", "--rows-per-chunk", "8", "-j", "0",
            "--quiet", *extra]


def test_sigkill_then_rerun_equals_an_uninterrupted_run(workdir):
    path, _ = workdir
    killed = path / "killed.zarr"
    proc = subprocess.Popen(_extract_cmd(path, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once some, but not all, chunks are final
        try:
            group = zarr.open_group(str(killed), mode="r")
            key = next(iter(group["features"].group_keys()))
            done = int((group[f"features/{key}/status"][:] == DONE).sum())
        except Exception:  # noqa: BLE001 - the store is still being created
            done = 0
        if 8 <= done < 40:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 8 <= done < 48, "the run was not interrupted part-way"
    subprocess.run(_extract_cmd(path, killed), check=True, capture_output=True)
    subprocess.run(_extract_cmd(path, path / "clean.zarr"), check=True, capture_output=True)
    a, b = FeatureStore.open(killed), FeatureStore.open(path / "clean.zarr")
    Xa, ta = a.load(ENCODER)
    Xb, tb = b.load(ENCODER)
    assert ta["id"].tolist() == tb["id"].tolist() and len(ta) == 48 and ta["id"].is_unique
    np.testing.assert_array_equal(Xa, Xb)
    assert (a.feature_set(ENCODER).status[:] == DONE).all()


def test_disjoint_shards_written_concurrently_equal_one_run(workdir):
    path, _ = workdir
    procs = [subprocess.Popen(_extract_cmd(path, path / "sharded.zarr", "--shard", f"{i}/2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    assert all(p.wait() == 0 for p in procs), [p.stderr.read() for p in procs]
    subprocess.run(_extract_cmd(path, path / "one.zarr"), check=True, capture_output=True)
    Xs, ts = FeatureStore.open(path / "sharded.zarr").load(ENCODER)
    X1, t1 = FeatureStore.open(path / "one.zarr").load(ENCODER)
    assert ts["id"].tolist() == t1["id"].tolist()
    np.testing.assert_array_equal(Xs, X1)


def test_hdf5_source_gives_the_same_features_as_the_files(workdir, encoder):
    path, table = workdir
    with h5py.File(path / "train-image.hdf5", "w") as f:
        for image_id in table["image_id"][:12]:
            f[image_id] = np.void((path / "images" / f"{image_id}.jpg").read_bytes())
    table.head(12).rename(columns={"image_id": "isic_id"}).to_csv(path / "train-metadata.csv", index=False)
    h5 = open_source(path / "train-image.hdf5", metadata=path / "train-metadata.csv")
    extract(h5, encoder, path / "h5.zarr", progress=False)
    extract(_source(workdir), encoder, path / "files.zarr", progress=False)
    X_h5, t_h5 = FeatureStore.open(path / "h5.zarr").load(ENCODER)
    X_files, _ = FeatureStore.open(path / "files.zarr").load(ENCODER, ids=t_h5["id"])
    np.testing.assert_array_equal(X_h5, X_files)
    assert FeatureStore.open(path / "h5.zarr").open_image(t_h5["id"][0]).size == (200, 150)


def test_another_process_writing_the_same_feature_set_is_refused(workdir, encoder):
    path, _ = workdir
    store = FeatureStore.create_or_open(path / "s.zarr")
    first = extract(_source(workdir), encoder, store, progress=False)
    with store.lock(first.key):
        proc = subprocess.run(_extract_cmd(path, path / "s.zarr", "--retry-failed"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "is being written by an extraction (pid" in proc.stderr


def test_bad_input_is_one_line_with_nothing_written(workdir, cli):
    path, table = workdir
    csv = str(path / "meta.csv")
    images = str(path / "images")
    cases = [
        (["extract", csv, "--images", images, "--encoder", "nope", "--store", "a.zarr"], "unknown encoder 'nope'"),
        (["extract", csv, "--images", images, "--id-col", "isic_id", "--store", "b.zarr"], "column 'isic_id' not in meta.csv"),
        (["extract", str(path / "dup.csv"), "--images", images, "--store", "c.zarr"], "occur more than once"),
        (["extract", str(path / "escape.csv"), "--images", images, "--path-col", "p", "--store", "d.zarr"], "escape the image folder"),
        (["extract", csv, "--images", images, "--store", "meta.csv"], "exists and is not a feature store"),
        (["ls", "nowhere.zarr"], "no feature store at nowhere.zarr"),
    ]
    pd.concat([table.head(2), table.head(1)]).to_csv(path / "dup.csv", index=False)
    table.head(2).assign(p=["../meta.csv", "x.jpg"]).to_csv(path / "escape.csv", index=False)
    for args, message in cases:
        code, _, err = cli(*args, cwd=path)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, err)
    assert not any((path / f"{c}.zarr").exists() for c in "abcd")


def test_cli_extract_and_ls(workdir, cli):
    path, _ = workdir
    code, out, err = cli("extract", "meta.csv", "--images", "images", "--quiet", "--store", "cli.zarr", cwd=path)
    assert code == 0, err
    assert "mobilenet_v2" in out and "48 written" in out
    code, out, _ = cli("ls", "cli.zarr")
    assert code == 0 and "48 images" in out and "mobilenet_v2" in out and "1280" in out


def test_cli_image_size_names_the_set_and_query_rebuilds_the_same_input(workdir, cli):
    from embedstore.extraction import encoder_for

    path, _ = workdir
    code, out, err = cli("extract", "meta.csv", "--images", "images", "--quiet", "--store", "s.zarr",
                         "--image-size", "160", "--crop-pct", "1.0", cwd=path)
    assert code == 0, err
    assert "mobilenet_v2-160px-crop100" in out and "48 written" in out
    store = FeatureStore.open(path / "s.zarr")
    encoder, attrs = encoder_for(store, "mobilenet_v2-160px-crop100")
    assert attrs["preprocessing"] == encoder.preprocessing.to_dict() and encoder.preprocessing.crop == 160
    X, table = store.load("mobilenet_v2-160px-crop100")
    files = [path / "images" / f"{i}.jpg" for i in table["id"][:2]]
    np.testing.assert_allclose(X[:2], embed_images(encoder, files, device="cpu"), rtol=1e-2, atol=1e-2)  # float16 store
    code, _, err = cli("extract", "meta.csv", "--images", "images", "--quiet", "--store", "s.zarr",
                       "--image-size", "16", cwd=path)
    assert code != 0 and "too small" in err and "\n" not in err.strip()
