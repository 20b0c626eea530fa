"""The ISIC-2024-like generator (benchmarks/make_isic2024_like.py) writes the challenge's layout from HAM10000 images:
the real sample's CSV columns and HDF5 dataset kind, JPEGs of about 133 px, positives cut from melanoma images only,
patients that own their lesions, the same bytes for a seed whatever the workers and blocks, and a data set that
`embedstore extract` reads whole."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embedstore import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_isic2024_like as gen  # noqa: E402

N, PATIENTS, RATE, SEED = 300, 20, 0.05, 3


def _generate(out: Path, ham_root: Path, *extra: str, n: int = N, patients: int = PATIENTS, seed: int = SEED) -> dict:
    return gen.main(["--out", str(out), "--ham", str(ham_root), "--n", str(n), "--patients", str(patients),
                     "--positive-rate", str(RATE), "--seed", str(seed), "--quiet", *extra])


@pytest.fixture(scope="module")
def dataset(ham_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("isic2024_like") / "data"
    _generate(out, ham_root, "--workers", "2", "--block", "64")
    return out


@pytest.fixture(scope="module")
def rows(dataset, ham_meta) -> pd.DataFrame:
    """The metadata CSV joined with the HAM10000 image each row names as its source (and that image's dx, lesion)."""
    meta = pd.read_csv(dataset / gen.METADATA)
    sources = pd.read_csv(dataset / gen.SOURCES)
    assert sources["isic_id"].tolist() == meta["isic_id"].tolist()
    ham = ham_meta[["image_id", "dx", "lesion_id"]].rename(columns={"image_id": "ham_image_id"})
    return meta.merge(sources, on="isic_id", validate="1:1").merge(ham, on="ham_image_id", validate="m:1")


def test_layout_is_the_challenges(dataset, ham_root):
    real_root = ham_root.parent / "isic2024-format"
    real = pd.read_csv(real_root / "test-metadata.csv")
    ours = pd.read_csv(dataset / gen.METADATA)
    assert list(ours.columns) == [real.columns[0], "target", *real.columns[1:]]
    assert {c: real[c].dtype.kind for c in real.columns} == {c: ours[c].dtype.kind for c in real.columns}
    assert ours["target"].dtype.kind == "i" and set(ours["target"]) <= {0, 1}
    assert len(ours) == N and ours["isic_id"].is_unique
    assert ours["isic_id"].str.fullmatch(r"ISIC_\d{7}").all() and ours["patient_id"].str.fullmatch(r"IP_\d{7}").all()

    with h5py.File(real_root / "test-image.hdf5") as f:
        real_kind = {(d.shape, d.dtype.kind, d.chunks, d.compression) for d in f.values()}
    sizes, lengths = set(), []
    with h5py.File(dataset / gen.IMAGES) as f:
        assert set(f.keys()) == set(ours["isic_id"])
        assert {(d.shape, d.dtype.kind, d.chunks, d.compression) for d in f.values()} == real_kind
        for name in f:
            data = io.BytesIO(f[name][()])
            lengths.append(len(data.getvalue()))
            with Image.open(data) as image:
                image.load()
                assert (image.format, image.mode) == ("JPEG", "RGB")
                sizes.add(image.size)
    assert all(w == h and 119 <= w <= 147 for w, h in sizes)
    assert 125 <= np.mean([w for w, _ in sizes]) <= 141
    assert 1500 < np.mean(lengths) < 5000  # the real crops: 2.1-3.3 kB


def test_positives_come_from_melanoma_images_only(rows):
    assert rows["target"].sum() == round(N * RATE)
    np.testing.assert_array_equal(rows["target"] == 1, rows["dx"] == "mel")


def test_each_row_is_cut_from_the_image_its_source_names(dataset, rows, ham_root):
    with h5py.File(dataset / gen.IMAGES) as f:
        for row, (isic_id, ham_id) in enumerate(zip(rows["isic_id"], rows["ham_image_id"])):
            ham_jpeg = (ham_root / "images" / f"{ham_id}.jpg").read_bytes()
            assert gen.render_image(ham_jpeg, SEED, row, 133, 85) == f[isic_id][()], isic_id


def test_patients_own_their_lesions_and_constants(rows):
    assert rows["patient_id"].nunique() == PATIENTS
    per_patient = rows.groupby("patient_id")[["age_approx", "sex", "attribution", "copyright_license", "tbp_tile_type"]]
    assert (per_patient.nunique(dropna=False) == 1).all().all()
    assert rows.groupby("lesion_id")["patient_id"].nunique().max() == 1  # no lesion under two patients: no leak
    assert (rows["age_approx"].dropna() % 5 == 0).all()


def test_metadata_is_consistent(rows):
    np.testing.assert_allclose(rows["tbp_lv_C"], np.hypot(rows["tbp_lv_A"], rows["tbp_lv_B"]))
    np.testing.assert_allclose(rows["tbp_lv_deltaL"], rows["tbp_lv_L"] - rows["tbp_lv_Lext"])
    np.testing.assert_allclose(rows["tbp_lv_areaMM2"], math.pi / 4 * rows["clin_size_long_diam_mm"]
                               * rows["tbp_lv_minorAxisMM"], rtol=0.01)
    assert rows["tbp_lv_eccentricity"].between(0, 1).all() and rows["tbp_lv_nevi_confidence"].between(0, 100).all()
    assert (rows["tbp_lv_L"] < rows["tbp_lv_Lext"]).all()  # lesions are darker than the skin around them
    simple = dict(zip(rows["tbp_lv_location"], rows["tbp_lv_location_simple"]))
    assert all(location.startswith(simple[location]) for location in simple)
    assert set(rows["anatom_site_general"].dropna()) <= set(s for s in gen.SITES if s)


def test_same_seed_same_bytes_whatever_the_workers_and_blocks(dataset, ham_root, tmp_path):
    again = tmp_path / "again"
    _generate(again, ham_root, "--workers", "1", "--block", "37")
    for name in (gen.METADATA, gen.SOURCES, gen.SETTINGS):
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name
    with h5py.File(dataset / gen.IMAGES) as first, h5py.File(again / gen.IMAGES) as second:
        assert list(first) == list(second)
        assert all(first[name][()] == second[name][()] for name in first)


def test_another_seed_another_data_set(ham_meta, ham_root):
    first, other = (gen.make_plan(ham_meta, N, PATIENTS, RATE, seed) for seed in (SEED, SEED + 1))
    assert not np.array_equal(first.source, other.source)
    jpeg = (ham_root / "images" / f"{ham_meta['image_id'][0]}.jpg").read_bytes()
    assert gen.render_image(jpeg, SEED, 0, 133, 85) != gen.render_image(jpeg, SEED + 1, 0, 133, 85)


def test_an_existing_output_is_replaced_only_with_overwrite(ham_root, tmp_path, capsys):
    out = tmp_path / "data"
    _generate(out, ham_root, n=40, patients=5)
    fresh = tmp_path / "fresh"
    for target, args, message in (
        (out, [], "already exists; pass --overwrite"),
        (fresh, ["--patients", "50"], "--patients 50 is more than --n 40"),
        (fresh, ["--positive-rate", "1.5"], "--positive-rate must be in [0, 1)"),
        (fresh, ["--ham", str(tmp_path)], "does not hold HAM10000_metadata.csv"),
        (fresh, ["--size", "big"], "argument --size: invalid int value: 'big'"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            _generate(target, ham_root, *args, n=40, patients=5)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not fresh.exists()
    _generate(out, ham_root, "--overwrite", n=30, patients=5, seed=SEED + 1)
    assert len(pd.read_csv(out / gen.METADATA)) == 30

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        _generate(theirs, ham_root, "--overwrite", n=40, patients=5)
    assert exit_info.value.code == 2 and "embedstore did not write" in capsys.readouterr().err
    assert (theirs / "notes.txt").read_text() == "mine"


def test_embedstore_extracts_every_row(dataset, tmp_path, cli):
    store_path = tmp_path / "isic.zarr"
    code, _, err = cli("extract", dataset / gen.IMAGES, "--metadata", dataset / gen.METADATA, "--encoder",
                       "mobilenet_v2", "--image-size", "128", "--store", store_path, "--quiet")
    assert code == 0, err
    store = FeatureStore.open(store_path)
    (info,) = store.feature_sets()
    assert (info.n_done, info.n_failed) == (N, 0)
    X, table = store.load(info.key)
    meta = pd.read_csv(dataset / gen.METADATA)
    assert X.shape == (N, 1280) and np.isfinite(X).all()
    assert sorted(table["id"]) == sorted(meta["isic_id"])
    assert {"target", "patient_id", "age_approx", "sex", "anatom_site_general"} <= set(table.columns)
