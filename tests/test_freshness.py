"""Never silently stale, nothing half-written, no hang: freshness by size + mtime + sha256, 16-bit images, hostile
files in a source, options checked before any work, and runs that cannot succeed refused in one line.

Real HAM10000 images (copied so the tests may change them) and the real offline MobileNetV2.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embedstore import FeatureStore, extract, open_source
from embedstore.encoders import Preprocessing
from embedstore.errors import SourceError, StoreError
from embedstore.extraction import decode
from embedstore.images import read_regular_file
from embedstore.sources import CsvFolderSource, unchanged_since

ENCODER = "mobilenet_v2"
N = 12
AN_HOUR_AGO = 3600


def _age(files, seconds: int = AN_HOUR_AGO) -> None:
    """Set the files' mtimes in the past, as images that were not just copied have."""
    for f in files:
        st = os.stat(f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, ham_root, ham_subset):
    """N real images (an hour old), their CSV, and a store of their MobileNetV2 features."""
    base = tmp_path_factory.mktemp("fresh")
    table = ham_subset.iloc[::30].head(N).reset_index(drop=True)
    (base / "images").mkdir()
    for image_id in table["image_id"]:
        shutil.copy(ham_root / "images" / f"{image_id}.jpg", base / "images")
    _age((base / "images").iterdir())
    table.to_csv(base / "meta.csv", index=False)
    result = extract(_source(base), ENCODER, base / "s.zarr", rows_per_chunk=8, progress=False)
    assert result.n_written == N
    return base, table


@pytest.fixture
def work(extracted, tmp_path):
    """A private copy of the images, CSV and store (the store's source points at the copy)."""
    base, table = extracted
    for name in ("images", "s.zarr"):
        shutil.copytree(base / name, tmp_path / name, copy_function=shutil.copy2)
    shutil.copy(base / "meta.csv", tmp_path / "meta.csv")
    import zarr

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    root.attrs["sources"] = [_source(tmp_path).describe()]
    return tmp_path, table


def _source(path: Path):
    return open_source(path / "meta.csv", images=path / "images", id_col="image_id")


def _count_reads(monkeypatch) -> list[str]:
    """Record every image the file sources read from now on."""
    reads: list[str] = []
    original = CsvFolderSource.read_bytes

    def counting(self, path):
        reads.append(path)
        return original(self, path)

    monkeypatch.setattr(CsvFolderSource, "read_bytes", counting)
    return reads


def _edit(file: Path) -> None:
    """Change one byte in the middle of a JPEG's entropy-coded data: same size, other content."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


# ------------------------------------------------------------------ item 7: never silently stale
def test_an_edited_image_is_refused_by_load_and_probe_counted_by_ls_and_refreshed_by_extract(work, cli):
    path, table = work
    edited = table["image_id"][5]
    _edit(path / "images" / f"{edited}.jpg")
    with pytest.raises(StoreError, match=f"1 images changed since feature set {ENCODER} was extracted "
                                         f"\\(first: {edited}\\); extract again with encoder {ENCODER} into "):
        FeatureStore.open(path / "s.zarr").load(ENCODER)
    with pytest.raises(StoreError, match="1 images changed"):
        FeatureStore.open(path / "s.zarr").load(ENCODER, ids=[edited])
    code, _, err = cli("probe", path / "s.zarr", "-f", ENCODER, "--target", "dx", "--groups", "lesion_id",
                       "--out", path / "run", cwd=path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"first: {edited}" in err
    assert FeatureStore.open(path / "s.zarr").info(ENCODER).n_stale == 1  # what `embedstore ls` shows

    result = extract(_source(path), ENCODER, path / "s.zarr", progress=False)
    assert result.changed == [edited] and result.n_written == 1 and result.n_skipped == N - 1
    X, meta = FeatureStore.open(path / "s.zarr").load(ENCODER)
    assert len(X) == N and FeatureStore.open(path / "s.zarr").info(ENCODER).n_stale == 0


def test_a_touched_image_is_hashed_again_and_still_served(work, monkeypatch):
    path, table = work
    touched = path / "images" / f"{table['image_id'][2]}.jpg"
    os.utime(touched)  # new mtime, same bytes
    reads = _count_reads(monkeypatch)
    store = FeatureStore.open(path / "s.zarr")
    X, _ = store.load(ENCODER)
    assert len(X) == N and reads == [touched.name]  # only the touched image was read
    store.load(ENCODER, ids=[table["image_id"][2]])
    assert reads == [touched.name]  # checked once per FeatureStore


def test_rerun_over_unchanged_images_reads_none_of_them(work, monkeypatch):
    path, _ = work
    reads = _count_reads(monkeypatch)
    result = extract(_source(path), ENCODER, path / "s.zarr", progress=False)
    assert (result.n_written, result.n_skipped) == (0, N)
    FeatureStore.open(path / "s.zarr").load(ENCODER)
    assert reads == []  # a stat per image, no image read, at extract and at load


def test_manifest_records_size_and_mtime_and_old_manifests_are_checked_by_hashing(work, monkeypatch):
    path, table = work
    manifest = pd.read_parquet(path / "s.zarr" / "manifest.parquet")
    assert list(manifest.columns[:6]) == ["id", "sha256", "_path", "_source", "_size", "_mtime_ns"]
    first = path / "images" / f"{table['image_id'][0]}.jpg"
    st = first.stat()
    assert (manifest["_size"].iloc[0], manifest["_mtime_ns"].iloc[0]) == (st.st_size, st.st_mtime_ns)

    manifest.drop(columns=["_size", "_mtime_ns"]).to_parquet(path / "s.zarr" / "manifest.parquet")  # an older store
    reads = _count_reads(monkeypatch)
    assert len(FeatureStore.open(path / "s.zarr").load(ENCODER)[0]) == N
    assert len(reads) == N  # no recorded stat: every image is hashed
    _edit(path / "images" / f"{table['image_id'][7]}.jpg")
    with pytest.raises(StoreError, match="1 images changed"):
        FeatureStore.open(path / "s.zarr").load(ENCODER)


def test_a_store_without_its_images_is_served_unchecked(work):
    path, _ = work
    shutil.move(path / "images", path / "elsewhere")
    X, _ = FeatureStore.open(path / "s.zarr").load(ENCODER)
    assert len(X) == N


def test_only_known_equal_stats_with_a_recorded_hash_spare_an_image_from_hashing():
    recorded = pd.DataFrame({"sha256": pd.Series(["ab", "", None, "cd", "ef"], dtype="str"),
                             "_size": [10, 10, 10, 10, -1], "_mtime_ns": [5, 5, 5, 6, 5]})
    now = np.array([[10, 5], [10, 5], [10, 5], [10, 5], [-1, 5]], dtype=np.int64)
    # unchanged; empty hash; missing hash; other mtime; size unknown
    assert unchanged_since(now, recorded).tolist() == [True, False, False, False, False]


def _write_h5(file: Path, images: dict[str, Path]) -> None:
    """An ISIC 2024-style HDF5 file (one JPEG bytes dataset per id), written aside and renamed over ``file``."""
    with h5py.File(file.with_suffix(".tmp"), "w") as f:
        for image_id, jpeg in images.items():
            f[image_id] = np.void(jpeg.read_bytes())
    os.replace(file.with_suffix(".tmp"), file)


def test_hdf5_source_stats_its_file_once_and_rehashes_when_it_changed(work, monkeypatch):
    path, table = work
    h5 = path / "images.hdf5"
    images = {i: path / "images" / f"{i}.jpg" for i in table["image_id"][:6]}
    _write_h5(h5, images)
    _age([h5])
    table.head(6).rename(columns={"image_id": "isic_id"}).to_csv(path / "h5meta.csv", index=False)
    extract(open_source(h5, metadata=path / "h5meta.csv"), ENCODER, path / "h5.zarr", progress=False)
    source = open_source(h5, metadata=path / "h5meta.csv")
    hashed = []
    original = type(source).read_bytes
    monkeypatch.setattr(type(source), "read_bytes", lambda self, p: hashed.append(p) or original(self, p))
    assert extract(source, ENCODER, path / "h5.zarr", progress=False).n_skipped == 6 and hashed == []

    changed = table["image_id"][1]
    _write_h5(h5, {**images, changed: path / "images" / f"{table['image_id'][8]}.jpg"})
    with pytest.raises(StoreError, match=f"1 images changed .* \\(first: {changed}\\)"):
        FeatureStore.open(path / "h5.zarr").load(ENCODER)
    assert len(hashed) == 6  # the file changed: each asked image hashed again


# ------------------------------------------------------------------ item 8: 16-bit images
def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for [h, w], RGB for [h, w, 3]) written by hand: PIL cannot write 16-bit RGB."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _png8(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_16_bit_grey_and_rgb_pngs_decode_like_their_8_bit_originals(ham_root, ham_subset):
    prep = Preprocessing(resize=160, crop=144)
    for mode, pil_mode in (("L", "I;16"), ("RGB", "RGB")):
        original = Image.open(ham_root / "images" / f"{ham_subset['image_id'].iloc[0]}.jpg").convert(mode)
        sixteen = _png16(np.asarray(original).astype(np.uint16) * 257)
        assert Image.open(io.BytesIO(sixteen)).mode == pil_mode
        got = decode(sixteen, prep).numpy().astype(int)
        want = decode(_png8(original), prep).numpy().astype(int)
        assert np.abs(got - want).max() <= 1, mode
        assert got.mean() < 200, mode  # a dermoscopy image, not a white square


# ------------------------------------------------------------------ item 11: hostile files
def test_a_fifo_is_a_failed_row_and_never_hangs(work):
    path, table = work
    fifo = path / "images" / f"{table['image_id'][4]}.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "embedstore.cli", "extract", str(path / "meta.csv"), "--images", str(path / "images"),
           "--encoder", ENCODER, "--store", str(path / "fifo.zarr"), "-j", "0", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a regression fails here, not hangs
    assert proc.returncode == 0, proc.stderr
    assert f"{N - 1} written" in proc.stdout and "1 failed" in proc.stdout
    assert f"{table['image_id'][4]} (not a regular file (fifo))" in " ".join(proc.stderr.split())


def test_devices_are_refused_before_they_are_read():
    with pytest.raises(SourceError, match=r"not a regular file \(character device\)"):
        read_regular_file("/dev/zero")


def test_symlinks_leading_out_of_the_image_folder_are_refused_like_dotdot(work, ham_root, ham_subset):
    path, table = work
    images = path / "images"
    inside = images / "alias.jpg"
    inside.symlink_to(images / f"{table['image_id'][0]}.jpg")  # inside the folder: fine
    rows = table.head(3).assign(path=lambda t: t["image_id"] + ".jpg")
    rows.loc[0, "path"] = "alias.jpg"
    rows.to_csv(path / "links.csv", index=False)
    assert open_source(path / "links.csv", images=images, path_col="path").table["_path"][0] == "alias.jpg"

    (images / "zero.jpg").symlink_to("/dev/zero")
    (images / "outside.jpg").symlink_to(ham_root / "images" / f"{ham_subset['image_id'].iloc[-1]}.jpg")
    for link in ("zero.jpg", "outside.jpg"):
        rows.loc[1, "path"] = link
        rows.to_csv(path / "links.csv", index=False)
        with pytest.raises(SourceError, match=f"1 image paths escape the image folder {images} "
                                              f"\\(first: '{link}' -> "):
            _ = open_source(path / "links.csv", images=images, path_col="path").table
    with pytest.raises(SourceError, match="escape the image folder"):
        _ = open_source(images).table  # a plain folder holding the same links


# ------------------------------------------------------------------ item 15: options before any work
@pytest.mark.parametrize("option, message", [
    (["--dtype", "float61"], "dtype must be one of float16, float32, not 'float61'"),
    (["--batch-size", "0"], "batch_size must be at least 1, not 0"),
    (["--rows-per-chunk", "0"], "rows_per_chunk must be at least 1, not 0"),
    (["--workers", "-1"], "num_workers must be 0 (decode in the main process) or more, not -1"),
    (["--shard", "2/2"], "shard 2/2: I must be in 0..N-1"),
    (["--shard", "half"], "shard must be I/N (e.g. 0/4), not 'half'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_options_fail_in_one_line_before_any_work(work, cli, monkeypatch, option, message):
    path, _ = work

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr("embedstore.encoders.create_encoder", no_work)
    monkeypatch.setattr(CsvFolderSource, "content_hashes", no_work)
    code, _, err = cli("extract", "meta.csv", "--images", "images", "--quiet", "--store", "new.zarr", *option, cwd=path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (path / "new.zarr").exists()


# ------------------------------------------------------------------ item 16: runs that cannot succeed, leftovers
def test_a_source_with_no_readable_image_fails_in_one_line_and_writes_nothing(work, cli):
    path, table = work
    (path / "empty").mkdir()
    code, out, err = cli("extract", "meta.csv", "--images", "empty", "--quiet", "--store", "new.zarr", cwd=path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"none of the {N} images of the source can be read (first: empty/{table['image_id'][0]}.jpg: "
            f"missing file); check the source's image folder and path template") in err
    assert not (path / "new.zarr").exists()
    before = sorted(p.name for p in (path / "s.zarr").rglob("*"))
    code, _, err = cli("extract", "meta.csv", "--images", "empty", "--quiet", "--store", "s.zarr", cwd=path)
    assert code == 2 and "none of the" in err
    assert sorted(p.name for p in (path / "s.zarr").rglob("*")) == before  # the existing store untouched


def test_a_run_in_which_every_image_fails_exits_2_in_one_line(work, cli):
    """Bytes that are there but no image (every file junk): the failures are recorded, and the run fails."""
    path, table = work
    junk = path / "junk"
    junk.mkdir()
    for image_id in table["image_id"]:
        (junk / f"{image_id}.jpg").write_bytes(b"not a jpeg at all")
    code, out, err = cli("extract", "meta.csv", "--images", "junk", "--quiet", "--store", "junk.zarr", cwd=path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"every image this run tried failed ({N}; first: " in err and ": not an image)" in err
    code, out, _ = cli("ls", "junk.zarr", "--failures", cwd=path)
    assert code == 0 and "not an image" in out


def test_a_header_only_csv_fails_in_one_line_and_creates_no_store(work, cli):
    path, table = work
    table.head(0).to_csv(path / "header.csv", index=False)
    code, _, err = cli("extract", "header.csv", "--images", "images", "--quiet", "--store", "new.zarr", cwd=path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "header.csv has a header but no rows: no images to extract" in err
    assert not (path / "new.zarr").exists()


def test_manifest_leftovers_of_killed_runs_are_removed_on_the_next_write(work, ham_root, ham_subset):
    path, table = work
    store = path / "s.zarr"
    legacy = store / ".manifest.parquet.4194301.tmp"  # an older embedstore's temporary manifest
    aside = store / ".manifest.parquet.embedstore-tmp-4194302-abc123"  # a killed writer's (its pid is gone)
    for f in (legacy, aside):
        f.write_bytes(b"half a parquet file")
    extra = ham_subset[~ham_subset["image_id"].isin(table["image_id"])].head(1)
    shutil.copy(ham_root / "images" / f"{extra['image_id'].iloc[0]}.jpg", path / "images")
    pd.concat([table, extra]).to_csv(path / "meta.csv", index=False)
    result = extract(_source(path), ENCODER, store, progress=False)
    assert result.new == extra["image_id"].tolist()
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".manifest")) == []
    assert len(FeatureStore.open(store).manifest) == N + 1
