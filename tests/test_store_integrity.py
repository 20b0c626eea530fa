"""The feature set's integrity: growth a kill cannot half-do, checksummed chunks that repair themselves, locks
between runs, and one line for damaged metadata, a full disk or a read-only store (issue #10: 3, 6, 10, 14).

Real HAM10000 images and the real offline MobileNetV2, 8 rows per chunk so a few images make several chunks.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage._local as zarr_local

from embedstore import FeatureStore, create_encoder, extract, open_source
from embedstore.errors import ConfigError, StoreError
from embedstore.columns import RESERVED_COLUMNS
from embedstore.store import DONE
from embedstore.store.manifest import read_manifest
from processes import run_embedstore

ENCODER = "mobilenet_v2"
ARRAYS = ("emb", "sha256", "error", "status")
OPTS = {"rows_per_chunk": 8, "batch_size": 8, "num_workers": 0, "progress": False}
CLI_OPTS = ("--encoder", ENCODER, "--id-col", "image_id", "--rows-per-chunk", "8", "--batch-size", "8",
            "--workers", "0", "--quiet")


@pytest.fixture(scope="module")
def encoder():
    return create_encoder(ENCODER)


@pytest.fixture(scope="module")
def data(ham_root, ham_subset, tmp_path_factory, encoder):
    """CSVs of 16 and 24 real images, ``base`` (the 16 extracted) and ``ref`` (then grown to 24, uninterrupted)."""
    folder = tmp_path_factory.mktemp("integrity")
    rows = ham_subset.iloc[::9].head(24)
    rows.head(16).to_csv(folder / "first.csv", index=False)
    rows.to_csv(folder / "grown.csv", index=False)
    out = {"folder": folder, "first": folder / "first.csv", "grown": folder / "grown.csv", "images": ham_root / "images"}
    extract(source(out, "first"), encoder, folder / "base.zarr", **OPTS)
    shutil.copytree(folder / "base.zarr", folder / "ref.zarr")
    extract(source(out, "grown"), encoder, folder / "ref.zarr", **OPTS)
    return out


def source(data, which: str):
    return open_source(data[which], images=data["images"], id_col="image_id")


def copy(data, which: str, tmp_path: Path) -> Path:
    dest = tmp_path / f"{which}.zarr"
    shutil.copytree(data["folder"] / f"{which}.zarr", dest)
    return dest


def arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")["features"]
    (key,) = list(group.group_keys())
    return {name: np.asarray(group[key][name][:]) for name in ARRAYS}


def assert_same_features(a: Path, b: Path) -> None:
    fa, fb = arrays(a), arrays(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------- item 3
def test_a_growth_killed_between_arrays_is_read_and_then_finished_bit_for_bit(data, encoder, tmp_path, cli):
    store = copy(data, "base", tmp_path)
    proc = run_embedstore("extract", data["grown"], "--images", data["images"], "--store", store, *CLI_OPTS,
                          fault="resize:2")
    assert proc.returncode == -9, proc.stderr[-1500:]  # killed with emb and sha256 grown, error and status not
    group = zarr.open_group(str(store), mode="r+")["features"]
    fs_group = group[next(iter(group.group_keys()))]
    fs_group["status"].resize((24,))  # and status grown too, as an older embedstore grew it second
    assert sorted(fs_group[name].shape[0] for name in ARRAYS) == [16, 24, 24, 24]

    code, out, err = cli("ls", store)
    assert code == 0, err
    assert "16" in out and "24 images" in out
    X, table = FeatureStore.open(store).load(ENCODER)
    assert len(X) == 16
    result = extract(source(data, "grown"), encoder, store, **OPTS)
    assert (result.n_written, result.n_skipped) == (8, 16)
    assert_same_features(store, data["folder"] / "ref.zarr")


# ------------------------------------------------------------------------------------------- item 6
def _damage(store: Path) -> None:
    """Flip one byte of an emb chunk and cut an sha256 chunk in half."""
    fs = FeatureStore.open(store).feature_set(ENCODER)
    emb = fs.path / "emb" / "c" / "0" / "0"
    raw = bytearray(emb.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    emb.write_bytes(bytes(raw))
    sha = fs.path / "sha256" / "c" / "2"
    sha.write_bytes(sha.read_bytes()[: sha.stat().st_size // 2])


def test_corrupt_chunks_are_refused_reported_and_recomputed_bit_for_bit(data, encoder, tmp_path, cli):
    store = copy(data, "ref", tmp_path)
    original, _ = FeatureStore.open(store).load(ENCODER)
    _damage(store)
    assert FeatureStore.open(store).feature_set(ENCODER).corrupt_chunks() == [0, 2]

    with pytest.raises(StoreError) as err:
        FeatureStore.open(store).load(ENCODER)
    message = str(err.value)
    assert "\n" not in message and "rows 0-23 (2 corrupt chunk(s))" in message
    assert f"extract again with encoder mobilenet_v2 into {store} to recompute them" in message
    code, out, _ = cli("ls", store)
    assert code == 0 and "2 corrupt" in out and "rows 0-23" in out

    result = extract(source(data, "grown"), encoder, store, **OPTS)
    assert (result.n_repaired, result.n_written) == (2, 16)
    assert FeatureStore.open(store).feature_set(ENCODER).corrupt_chunks() == []
    X, _ = FeatureStore.open(store).load(ENCODER)
    np.testing.assert_array_equal(X, original)
    assert_same_features(store, data["folder"] / "ref.zarr")
    code, out, _ = cli("ls", store)
    assert code == 0 and " ok" in out


def test_a_chunk_file_missing_beside_its_status_is_corrupt_not_zeros(data, tmp_path):
    store = copy(data, "ref", tmp_path)
    fs = FeatureStore.open(store).feature_set(ENCODER)
    (fs.path / "emb" / "c" / "1" / "0").unlink()
    assert fs.corrupt_chunks() == [1]
    with pytest.raises(StoreError, match="rows 8-15"):
        FeatureStore.open(store).load(ENCODER)


def test_a_feature_set_without_checksums_is_read_as_before(data, tmp_path, cli):
    store = copy(data, "ref", tmp_path)
    fs = FeatureStore.open(store).feature_set(ENCODER)
    for name in ARRAYS:  # rewrite each array as embedstore wrote it before checksums
        old = fs.group[name]
        values = old[:]
        compressors = [c for c in old.compressors if type(c).__name__ != "Crc32cCodec"]
        fs.group.create_array(name, shape=old.shape, dtype=old.dtype, chunks=old.chunks, fill_value=old.fill_value,
                              compressors=compressors, dimension_names=old.metadata.dimension_names, overwrite=True)
        fs.group[name][:] = values
    fresh = FeatureStore.open(store).feature_set(ENCODER)
    assert not fresh.has_checksums and fresh.corrupt_chunks() is None
    code, out, _ = cli("ls", store)
    assert code == 0 and "no checksums" in out
    X, _ = FeatureStore.open(store).load(ENCODER)
    assert len(X) == 24


def test_summary_and_failures_are_what_ls_prints_and_skip_corrupt_chunks(ham_subset, data, encoder, tmp_path, cli):
    """The store API gives what `ls` shows: images, sources, the sources' columns, counts per set, and the failed
    images with their reason; a failed row whose chunk is corrupt is pending (not listed), and nothing raises."""
    store = copy(data, "ref", tmp_path)
    rows = ham_subset.iloc[::9].head(26).copy()
    rows.iloc[24:, rows.columns.get_loc("image_id")] = ["ISIC_ghost_1", "ISIC_ghost_2"]  # no such image files
    rows.to_csv(tmp_path / "ghosts.csv", index=False)
    extract(open_source(tmp_path / "ghosts.csv", images=data["images"], id_col="image_id"), encoder, store, **OPTS)

    summary = FeatureStore.open(store).summary()
    assert (summary.n_images, summary.n_sources) == (26, 3)
    assert summary.columns == [c for c in ham_subset.columns if c != "image_id"]
    (info,) = summary.feature_sets
    assert (info.n_done, info.n_failed, info.n_missing, info.n_corrupt_chunks) == (24, 2, 0, 0)
    opened = FeatureStore.open(store)
    full = opened.manifest  # a store that holds its whole manifest counts from it: the same summary
    assert opened.summary() == summary
    own = read_manifest(store, reserved_only=True)  # what a fresh summary reads: embedstore's columns only
    assert list(own.columns) == list(RESERVED_COLUMNS) and own.equals(full[list(RESERVED_COLUMNS)])
    failed = FeatureStore.open(store).failures(ENCODER)
    assert failed["id"].tolist() == ["ISIC_ghost_1", "ISIC_ghost_2"] and set(failed["error"]) == {"missing file"}
    code, out, _ = cli("ls", store, "--failures")
    assert code == 0 and "26 images from 3 source(s)" in out and "mobilenet_v2: 2 failed" in out
    assert [line.split() for line in out.splitlines()[-2:]] == [["ISIC_ghost_1", "missing", "file"],
                                                               ["ISIC_ghost_2", "missing", "file"]]

    status = FeatureStore.open(store).feature_set(ENCODER).path / "status" / "c" / "3"  # rows 24-31
    status.write_bytes(status.read_bytes()[:3])
    summary = FeatureStore.open(store).summary()
    (info,) = summary.feature_sets
    assert (info.n_failed, info.n_missing, info.n_corrupt_chunks, info.corrupt_rows) == (0, 2, 1, (24, 25))
    assert FeatureStore.open(store).failures(ENCODER).empty


# ------------------------------------------------------------------------------------------ item 10
def test_sharded_and_unsharded_runs_exclude_each_other(data, tmp_path):
    store = FeatureStore.open(copy(data, "ref", tmp_path))
    key = store.resolve(ENCODER)
    with store.lock(key):
        with pytest.raises(StoreError, match=r"is being written by an extraction \(pid"):
            with store.lock(key, (0, 2)):
                pass
    with store.lock(key, (0, 2)), store.lock(key, (1, 2)):  # shards of one run share the set
        with pytest.raises(StoreError, match=r"is being written by shard [01]/2 of an extraction \(pid"):
            with store.lock(key):
                pass
        with pytest.raises(StoreError, match="is being written by"):
            with store.lock(key, (1, 2)):  # the same shard twice
                pass
        with pytest.raises(StoreError, match="shards of one extraction must all be split 2 ways.*split this one 2 ways too"):
            with store.lock(key, (2, 3)):
                pass
    with store.lock(key, (2, 3)):  # free again once the 2-shard run is over
        pass


def test_a_shard_that_gets_no_chunk_fails_before_any_work(data, encoder, tmp_path):
    with pytest.raises(ConfigError) as err:
        extract(source(data, "grown"), encoder, tmp_path / "new.zarr", shard="1/3", progress=False)
    assert str(err.value) == ("shard 1/3: the 24 images of this source fill 1 row chunk(s) of 1,024 rows, so shard 1 "
                              "would get none; use fewer shards, or rows_per_chunk 8")
    assert not (tmp_path / "new.zarr").exists()
    store = copy(data, "ref", tmp_path)  # an existing set keeps its chunking: 3 chunks of 8
    with pytest.raises(ConfigError, match="fill 3 row chunk.*fewer shards \\(the feature set's chunking is fixed\\)"):
        extract(source(data, "grown"), encoder, store, shard="3/4", **OPTS)


def test_concurrent_run_records_are_all_kept(data, tmp_path):
    path = copy(data, "ref", tmp_path)
    a, b = FeatureStore.open(path), FeatureStore.open(path)
    key = a.resolve(ENCODER)
    b.feature_set(key)  # b has read the attributes before a writes its record
    a.append_run(key, {"shard": "0/2"})
    b.append_run(key, {"shard": "1/2"})
    runs = FeatureStore.open(path).feature_set(key).attrs["runs"]
    assert [r["shard"] for r in runs[-2:]] == ["0/2", "1/2"]


# ------------------------------------------------------------------------------------------ item 14
@pytest.mark.parametrize("damaged", ["zarr.json", "emb/zarr.json"])
def test_corrupt_metadata_of_a_feature_set_is_one_line(damaged, data, tmp_path, cli):
    store = copy(data, "ref", tmp_path)
    folder = FeatureStore.open(store).feature_set(ENCODER).path
    (folder / damaged).write_text('{"zarr_format": 3, "node_type": ')
    expected = f"delete the folder {folder} and extract again to recompute it"
    code, _, err = cli("ls", store)
    assert code == 2 and expected in one_line(err)
    with pytest.raises(StoreError, match="has unreadable metadata"):
        FeatureStore.open(store).load(ENCODER)
    code, _, err = cli("extract", data["grown"], "--images", data["images"], "--store", store, *CLI_OPTS)
    assert code == 2 and expected in one_line(err)


def test_a_full_disk_keeps_what_is_final_and_a_rerun_resumes(data, encoder, tmp_path, monkeypatch):
    store = copy(data, "base", tmp_path)
    put = zarr_local._put

    def full_for_chunks(path, value, exclusive=False):
        if "/c/" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", full_for_chunks)
    with pytest.raises(StoreError) as err:
        extract(source(data, "grown"), encoder, store, **OPTS)
    assert str(err.value) == (f"disk full while writing feature set mobilenet_v2 to {store}: 16 rows are final and "
                              f"kept; free space and rerun the same command to resume")
    monkeypatch.setattr(zarr_local, "_put", put)
    assert extract(source(data, "grown"), encoder, store, **OPTS).n_written == 8
    assert_same_features(store, data["folder"] / "ref.zarr")


def test_a_read_only_store_or_parent_folder_is_one_line(data, tmp_path, monkeypatch, cli):
    store = copy(data, "ref", tmp_path)
    args = ("extract", data["grown"], "--images", data["images"], *CLI_OPTS)

    def read_only(file, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))

    monkeypatch.setattr("embedstore.store.locks.open", read_only, raising=False)  # the store's lock files
    code, _, err = cli(*args, "--store", store)
    assert code == 2 and f"feature store {store} is not writable (Read-only file system" in one_line(err)
    monkeypatch.undo()

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(zarr_local, "_put", denied)  # a new store in a folder we may not write
    code, _, err = cli(*args, "--store", tmp_path / "new.zarr")
    assert code == 2 and "is not writable (Permission denied" in one_line(err)
    assert arrays(store)["status"].tolist() == [DONE] * 24  # and the existing store is untouched


def test_a_feature_set_is_created_whole_and_a_killed_creation_leaves_nothing_in_the_way(data, tmp_path):
    """A new set is built under a hidden name and renamed into place; what a killed creation left is skipped by
    readers and removed by the next creation of that set."""
    store_path = copy(data, "base", tmp_path)
    store = FeatureStore.open(store_path)
    key = store.resolve(ENCODER)
    info = store.info(key)
    attrs = {k: v for k, v in info.attrs.items() if k not in ("name", "key", "dim", "dtype", "rows_per_chunk", "runs")}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    features = store_path / "features"
    leftover = features / f".other.embedstore-tmp-{int(dead.stdout)}-abc123"
    shutil.copytree(features / key, leftover)
    (leftover / "emb" / "zarr.json").unlink()  # a creation killed half-way
    assert [i.key for i in FeatureStore.open(store_path).feature_sets()] == [key]  # readers skip it
    fs = FeatureStore.open(store_path).require_feature_set("other", "other-set", attrs, info.dim, info.dtype, 8)
    assert fs.n_rows == info.n_rows and not leftover.exists()
    assert sorted(p.name for p in features.iterdir() if p.is_dir()) == sorted([key, "other"])


# ----------------------------------------------------------------- damaged manifest and group metadata
def test_a_damaged_manifest_is_one_line_naming_it(data, tmp_path, cli):
    store = copy(data, "ref", tmp_path)
    manifest = store / "manifest.parquet"
    with open(manifest, "r+b") as fh:
        fh.truncate(5000)
    code, _, err = cli("ls", store)
    line = one_line(err)
    assert code == 2 and f"the manifest of {store} (manifest.parquet) is damaged" in line
    assert "restore it from a backup, or extract into a new store" in line
    code, _, err = cli("extract", data["grown"], "--images", data["images"], *CLI_OPTS, "--store", store)
    assert code == 2 and "(manifest.parquet) is damaged" in one_line(err)
    with pytest.raises(StoreError, match="is damaged"):
        FeatureStore.open(store).load(ENCODER)


def test_a_parquet_of_another_table_as_manifest_is_one_line(data, tmp_path, cli):
    import pandas as pd

    store = copy(data, "ref", tmp_path)
    pd.DataFrame({"id": ["a", "b"], "pred": ["nv", "mel"], "prob": [0.9, 0.6]}).to_parquet(store / "manifest.parquet")
    code, _, err = cli("ls", store)
    line = one_line(err)
    assert code == 2 and "(manifest.parquet) lacks the column(s) sha256, _path, _source" in line
    code, _, err = cli("extract", data["grown"], "--images", data["images"], *CLI_OPTS, "--store", store)
    assert code == 2 and "lacks the column(s)" in one_line(err)


@pytest.mark.parametrize("text", ["{not json", "", "null", '{"zarr_format": 3, "node_type": "array"}'])
def test_corrupt_group_metadata_is_one_line(data, tmp_path, cli, text):
    store = copy(data, "ref", tmp_path)
    (store / "features" / "zarr.json").write_text(text)
    code, _, err = cli("ls", store)
    line = one_line(err)
    assert code == 2 and f"{store / 'features' / 'zarr.json'}" in line and "delete" in line
    code, _, err = cli("extract", data["grown"], "--images", data["images"], *CLI_OPTS, "--store", store)
    assert code == 2 and "the group of all feature sets" in one_line(err)
    (store / "features" / "zarr.json").unlink()  # what the line says: it is recreated, nothing is lost
    code, out, _ = cli("ls", store)
    assert code == 0 and " ok" in out

    (store / "zarr.json").write_text(text)
    code, _, err = cli("ls", store)
    assert code == 2 and "restore it from a backup" in one_line(err)


# ------------------------------------------------------------- a repair that cannot recompute every row
def test_a_repaired_chunk_shared_with_another_source_says_which_rows_stay_pending(ham_subset, data, encoder,
                                                                                  tmp_path, cli):
    """Two sources share one chunk; a flipped byte there makes the first source's extract delete the chunk. Its
    rows of the second source are pending again: the summary says so, and the second source brings them back
    bit for bit."""
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    ham_subset.iloc[1::9].head(20).to_csv(first, index=False)
    ham_subset.iloc[2::9].head(20).to_csv(second, index=False)
    opts = {**OPTS, "rows_per_chunk": 64}
    store = tmp_path / "two.zarr"
    for csv in (first, second):
        extract(open_source(csv, images=data["images"], id_col="image_id"), encoder, store, **opts)
    shutil.copytree(store, tmp_path / "ref.zarr")
    (key,) = [p.name for p in (store / "features").iterdir() if p.is_dir()]
    chunk = store / "features" / key / "emb" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))

    result = extract(open_source(first, images=data["images"], id_col="image_id"), encoder, store, **opts)
    assert (result.n_repaired, result.n_written, result.n_left_pending) == (1, 20, 20)
    summary = result.summary()
    assert "recomputed" not in summary
    assert ("1 corrupt chunk(s) repaired, 20 row(s) of images this source does not list are pending again: "
            "rerun extract with their source") in summary
    info = FeatureStore.open(store).info(key)
    assert (info.n_done, info.n_missing) == (20, 20)
    code, out, _ = cli("ls", store)
    assert code == 0 and " 20 " in out

    result = extract(open_source(second, images=data["images"], id_col="image_id"), encoder, store, **opts)
    assert (result.n_repaired, result.n_written, result.n_skipped, result.n_left_pending) == (0, 20, 0, 0)
    assert_same_features(store, tmp_path / "ref.zarr")


def test_a_store_another_process_creates_meanwhile_is_opened_and_nothing_is_left(tmp_path, monkeypatch):
    """Two `extract --shard i/n` started together on a new store: the one whose rename comes second opens the
    store the first made (before, it could open a half-made one and stop: "not an embedstore feature store")."""
    from embedstore.store import store as store_module

    path = tmp_path / "s.zarr"
    rename = store_module.rename_into_place

    def the_other_process_wins(staging, target):
        monkeypatch.setattr(store_module, "rename_into_place", rename)
        FeatureStore.create_or_open(path)  # made whole by the other process, meanwhile
        rename(staging, target)  # fails: the path holds a store now

    monkeypatch.setattr(store_module, "rename_into_place", the_other_process_wins)
    store = FeatureStore.create_or_open(path)
    assert store.feature_sets() == [] and (path / "zarr.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # our staging copy is gone
