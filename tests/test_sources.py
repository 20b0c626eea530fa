"""Image sources on real data: HAM10000 CSV + folder, the ISIC 2024 HDF5 layout, class folders, plain folders."""

from __future__ import annotations

import io
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embedstore.errors import SourceError
from embedstore.sources import ClassFolderSource, CsvFolderSource, FolderSource, Hdf5Source, open_source


@pytest.fixture(scope="module")
def isic2024(ham_root):
    root = ham_root.parent / "isic2024-format"
    if not (root / "test-image.hdf5").is_file():
        pytest.skip(f"ISIC 2024 sample not found at {root}")
    return root


def test_csv_source_keeps_metadata_columns(ham_root, ham_subset_csv, ham_subset):
    src = open_source(ham_subset_csv, images=ham_root / "images", id_col="image_id")
    assert isinstance(src, CsvFolderSource)
    table = src.table
    assert list(table.columns[:2]) == ["id", "_path"]
    assert {"lesion_id", "dx", "age", "sex", "localization"} <= set(table.columns)
    assert table["id"].tolist() == ham_subset["image_id"].tolist()
    assert table["_path"].iloc[0] == f"{table['id'].iloc[0]}.jpg"
    Image.open(io.BytesIO(src.read_bytes(table["_path"].iloc[0]))).verify()


def test_csv_source_errors_are_one_line(ham_root, ham_subset, tmp_path):
    csv = tmp_path / "t.csv"
    ham_subset.head(5).to_csv(csv, index=False)
    with pytest.raises(SourceError, match="column 'isic_id' not in t.csv; its columns are: lesion_id, image_id"):
        _ = CsvFolderSource(csv, ham_root / "images", id_col="isic_id").table
    pd.concat([ham_subset.head(3), ham_subset.head(1)]).to_csv(csv, index=False)
    with pytest.raises(SourceError, match="occur more than once"):
        _ = CsvFolderSource(csv, ham_root / "images").table
    ham_subset.head(2).assign(path=["../../etc/passwd", "ok.jpg"]).to_csv(csv, index=False)
    with pytest.raises(SourceError, match="escape the image folder"):
        _ = CsvFolderSource(csv, ham_root / "images", path_col="path").table
    with pytest.raises(SourceError, match="not found"):
        open_source(tmp_path / "missing.csv")


def test_isic2024_hdf5_layout_reads_lazily(isic2024):
    src = open_source(isic2024 / "test-image.hdf5", metadata=isic2024 / "test-metadata.csv")
    assert isinstance(src, Hdf5Source)
    assert len(src) == 3 and "patient_id" in src.table.columns
    for path in src.table["_path"]:
        img = Image.open(io.BytesIO(src.read_bytes(path)))
        assert img.format == "JPEG" and min(img.size) > 50
    hashes = src.content_hashes()
    assert len(set(hashes["sha256"])) == 3 and all(len(h) == 64 for h in hashes["sha256"])
    st = (isic2024 / "test-image.hdf5").stat()
    assert (hashes["_size"] == st.st_size).all()  # one stat of the HDF5 file stands for all its images
    with pytest.raises(SourceError, match="column 'image_id' not in test-metadata.csv"):
        _ = Hdf5Source(isic2024 / "test-image.hdf5", isic2024 / "test-metadata.csv", id_col="image_id").table


def test_hdf5_without_metadata_lists_its_datasets(ham_root, ham_subset, tmp_path):
    ids = ham_subset["image_id"].head(5).tolist()
    with h5py.File(tmp_path / "x.hdf5", "w") as f:
        for i in ids:
            f[i] = np.void((ham_root / "images" / f"{i}.jpg").read_bytes())
    src = open_source(tmp_path / "x.hdf5")
    assert sorted(src.table["id"]) == sorted(ids)
    assert src.read_bytes(ids[0]) == (ham_root / "images" / f"{ids[0]}.jpg").read_bytes()


def test_class_folders_and_plain_folders(ham_root, ham_subset, tmp_path):
    for _, row in ham_subset.groupby("dx").head(2).iterrows():
        (tmp_path / "tree" / row.dx).mkdir(parents=True, exist_ok=True)
        shutil.copy(ham_root / "images" / f"{row.image_id}.jpg", tmp_path / "tree" / row.dx)
    tree = open_source(tmp_path / "tree")
    assert isinstance(tree, ClassFolderSource)
    assert sorted(tree.table["label"].unique()) == sorted(ham_subset["dx"].unique())
    flat = open_source(tmp_path / "tree" / "mel")
    assert isinstance(flat, FolderSource) and len(flat) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        _ = open_source(tmp_path / "empty").table
