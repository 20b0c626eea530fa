"""A first extraction's table is read and written in chunks (memory flat in N): the same table and manifest as
reading it whole and merging it in memory, on real HAM10000 metadata."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from embedstore import extract, metadata_csv
from embedstore.sources import CsvFolderSource, Hdf5Source
from embedstore.errors import SourceError
from embedstore.store import FeatureStore
from embedstore.store import store as store_module
from embedstore.store.manifest import append_manifest, read_manifest


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(metadata_csv, "CHUNK_ROWS", 150)


@pytest.fixture
def uneven_csv(ham_subset, tmp_path):
    """The subset's CSV with columns that a chunked read types differently from chunk to chunk: a number
    column empty in its first rows, a text column empty in its first rows, a column of integers with a gap in
    its last rows, one of integers in some rows and text in others."""
    table = ham_subset.reset_index(drop=True).copy()
    n = len(table)
    table["age"] = table["age"].where(np.arange(n) >= 200)
    table["site_note"] = np.where(np.arange(n) >= 300, table["localization"], None)
    table["visits"] = pd.array(np.arange(n) % 5, dtype="Int64")
    table.loc[n - 3:, "visits"] = pd.NA
    table["code"] = np.where(np.arange(n) < 160, (np.arange(n) % 7).astype(str), "x" + table["lesion_id"])
    csv = tmp_path / "uneven.csv"
    table.to_csv(csv, index=False)
    return csv


def test_chunks_are_typed_as_a_whole_file_read(ham_root, uneven_csv, small_chunks):
    source = CsvFolderSource(uneven_csv, ham_root / "images")
    chunks = list(source.table_chunks())
    assert len(chunks) > 2 and all(list(c.columns) == list(chunks[0].columns) for c in chunks)
    whole = pd.read_csv(uneven_csv, dtype={"image_id": str}, low_memory=False)
    for col in ("age", "site_note", "visits", "code"):  # each chunk has the whole file's type
        assert {str(c[col].dtype) for c in chunks} == {str(whole[col].dtype)}, col
    table = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(table.drop(columns=["id", "_path"]),
                                  whole.drop(columns=["image_id"]).astype({"code": str}), check_dtype=False)
    assert table["id"].tolist() == whole["image_id"].tolist()
    assert source.images["id"].tolist() == table["id"].tolist()
    assert source._table is None  # the images and the chunks are read without the whole table
    pd.testing.assert_frame_equal(source.table, table)


def test_streamed_manifest_equals_the_merge_in_memory(ham_root, ham_subset, uneven_csv, tmp_path, small_chunks,
                                                      monkeypatch):
    """A store's manifest after a first source and then a second one with other columns: streamed (a Source)
    and merged in memory (its table) give the same frame."""
    second = ham_subset.tail(120).assign(image_id=lambda t: "copy_" + t["image_id"], reader="B")[
        ["image_id", "dx", "reader"]]
    second_csv = tmp_path / "second.csv"
    second.to_csv(second_csv, index=False)
    merges = []
    merge = store_module.merge_manifest
    monkeypatch.setattr(store_module, "merge_manifest", lambda *args: merges.append(1) or merge(*args))
    manifests = []
    # streamed twice; merged twice; the first merged (a store of an earlier embedstore) and the second streamed
    for mode, streamed in (("stream", (True, True)), ("memory", (False, False)), ("mixed", (False, True))):
        store = FeatureStore.create_or_open(tmp_path / f"{mode}.zarr")
        offset, merges[:] = 0, []
        for csv, stream in zip((uneven_csv, second_csv), streamed):
            source = CsvFolderSource(csv, ham_root / "images")
            if csv == second_csv:  # the copies' paths do not exist: hashes stand in (empty where unreadable)
                hashes = pd.DataFrame({"sha256": "", "_size": -1, "_mtime_ns": -1}, index=range(len(source)))
            else:
                hashes = source.content_hashes()
            with store.preparing():
                update = store.update_manifest(source if stream else source.table, hashes, source.describe())
            assert update.rows.tolist() == list(range(offset, offset + len(source)))  # appended after the first
            assert update.new == source.images["id"].tolist() and not update.changed
            offset += len(source)
        assert len(merges) == streamed.count(False)  # a streamed source never fell back to the merge
        manifests.append(read_manifest(store.path))
    streamed, merged, mixed = manifests
    assert len(streamed) == len(ham_subset) + len(second)
    assert streamed["reader"].isna().sum() == len(ham_subset) and streamed["age"].isna().sum() > len(second)
    pd.testing.assert_frame_equal(streamed, merged)
    pd.testing.assert_frame_equal(mixed, merged)


def test_first_extraction_never_reads_the_whole_table(ham_root, ham_subset, tmp_path, small_chunks):
    """Extraction holds ids and paths only; the metadata reaches the manifest chunk by chunk. A rerun over a
    changed label merges in memory and updates the row in place."""
    ids = ham_subset["image_id"].head(40).tolist()
    import h5py

    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        for i in ids:
            f[i] = np.void((ham_root / "images" / f"{i}.jpg").read_bytes())
    meta = ham_subset.head(40).rename(columns={"image_id": "isic_id"})
    meta.to_csv(tmp_path / "meta.csv", index=False)
    source = Hdf5Source(tmp_path / "x.hdf5", tmp_path / "meta.csv")
    result = extract(source, "mobilenet_v2", tmp_path / "s.zarr", progress=False, rows_per_chunk=16)
    assert result.n_written == 40 and source._table is None
    manifest = read_manifest(tmp_path / "s.zarr")
    assert manifest["id"].tolist() == ids and manifest["dx"].tolist() == meta["dx"].tolist()

    meta.loc[5, "dx"] = "relabelled"
    meta.to_csv(tmp_path / "meta.csv", index=False)
    again = extract(Hdf5Source(tmp_path / "x.hdf5", tmp_path / "meta.csv"), "mobilenet_v2", tmp_path / "s.zarr",
                    progress=False)
    assert again.n_written == 0 and again.n_skipped == 40
    manifest = read_manifest(tmp_path / "s.zarr")
    assert manifest["id"].tolist() == ids and manifest.loc[5, "dx"] == "relabelled"


def test_a_csv_is_checked_whole_before_hashing_and_again_when_streamed(ham_root, ham_subset, tmp_path, small_chunks):
    """A row that does not parse is refused when the ids are read (before any image is hashed or store made);
    a CSV edited between that read and the manifest's is refused in one line, never misaligned."""
    csv = tmp_path / "t.csv"
    ham_subset.to_csv(csv, index=False)
    lines = csv.read_text().splitlines()
    lines[300] += ",an extra field"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match="cannot read .* as CSV"):
        _ = CsvFolderSource(csv, ham_root / "images").images

    ham_subset.to_csv(csv, index=False)
    source = CsvFolderSource(csv, ham_root / "images")
    assert len(source.images) == len(ham_subset)
    ham_subset.iloc[::-1].to_csv(csv, index=False)  # the same rows, in another order
    with pytest.raises(SourceError, match="changed while it was read"):
        list(source.table_chunks())
    ham_subset.head(200).to_csv(csv, index=False)  # fewer rows
    with pytest.raises(SourceError, match="changed while it was read"):
        list(source.table_chunks())
    ham_subset.assign(age=ham_subset["age"].fillna(0).astype(int)).to_csv(csv, index=False)
    source = CsvFolderSource(csv, ham_root / "images")
    assert len(source.images) == len(ham_subset)
    ham_subset.assign(age="unknown").to_csv(csv, index=False)  # text where the scan found integers
    with pytest.raises(SourceError, match="changed while it was read"):
        list(source.table_chunks())


def test_a_source_copied_for_a_worker_leaves_its_tables_and_the_driver_keeps_them(ham_root, ham_subset_csv):
    source = CsvFolderSource(ham_subset_csv, ham_root / "images")
    images = source.images
    anchored = source.anchored()  # the driver's copy with absolute paths (Ray): its scan kept
    assert anchored._images is images and anchored._metadata is source._metadata
    worker = pickle.loads(pickle.dumps(source))
    assert worker._images is None and worker._table is None and "_metadata" not in vars(worker)
    pd.testing.assert_frame_equal(pd.concat(list(worker.table_chunks()), ignore_index=True), source.table)


def test_a_column_of_no_plain_type_is_merged_in_memory_instead(ham_root, ham_subset_csv, tmp_path):
    """append_manifest writes nothing (and says so) for a table with a pandas extension type; the store then
    merges it in memory, as before."""
    table = CsvFolderSource(ham_subset_csv, ham_root / "images").table.assign(dx=lambda t: t["dx"].astype("category"))
    hashes = pd.DataFrame({"sha256": "", "_size": -1, "_mtime_ns": -1}, index=range(len(table)))
    store = FeatureStore.create_or_open(tmp_path / "s.zarr")
    known = read_manifest(store.path, reserved_only=True)
    assert append_manifest(store.path, known, [table], hashes, 0) is None
    assert not (store.path / "manifest.parquet").exists()
    with store.preparing():
        store.update_manifest(table, hashes, {"kind": "test"})
    assert read_manifest(store.path)["dx"].astype(str).tolist() == table["dx"].astype(str).tolist()
