"""Heads that travel (issue #15), on real HAM10000 images: crop modes, per-store normalisation, --test-store,
--select-on-store and predict --split.

The "other clinic" is a second set of HAM10000 images, none of them in the training store's subset."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embedstore import create_encoder, extract, open_source
from embedstore.decoding import decode
from embedstore.extraction import default_name, encoder_for, feature_set_config
from embedstore.probe.normalize import store_statistics
from embedstore.store import FeatureStore, fingerprint

MEAN_FILL = (124, 116, 104)  # ImageNet's mean colour in 8 bits: what border mode pads with


def _ham_image(ham_root, ham_subset) -> tuple[bytes, Image.Image]:
    path = ham_root / "images" / f"{ham_subset['image_id'].iloc[0]}.jpg"
    data = path.read_bytes()
    with Image.open(path) as image:
        return data, image.convert("RGB")


def _centre(image: Image.Image, size: int) -> Image.Image:
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_crop_modes_give_the_pixels_of_a_hand_made_resize(ham_root, ham_subset, mode):
    data, image = _ham_image(ham_root, ham_subset)
    assert image.size == (200, 150)  # HAM10000's 4:3 frames: the modes differ
    prep = create_encoder("mobilenet_v2", crop_mode=mode, crop_pct=1.0).preprocessing
    assert (prep.resize, prep.crop, prep.crop_mode) == (224, 224, mode)
    if mode == "center":  # the shorter side to 224, the centre 224 x 224: a quarter of the width is lost
        expected = _centre(image.resize((298, 224), Image.Resampling.BILINEAR), 224)
    elif mode == "squash":  # the whole image, stretched to a square
        expected = image.resize((224, 224), Image.Resampling.BILINEAR)
    else:  # the whole image, ratio kept (224 x 168), centred on a square of the mean colour
        expected = Image.new("RGB", (224, 224), MEAN_FILL)
        expected.paste(image.resize((224, 168), Image.Resampling.BILINEAR), (0, 28))
    got = decode(data, prep)
    assert tuple(got.shape) == (3, 224, 224)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), np.asarray(expected))


def test_border_pads_only_the_shorter_side_and_crops_at_the_default_crop_pct(ham_root, ham_subset):
    data, image = _ham_image(ham_root, ham_subset)
    prep = create_encoder("mobilenet_v2", crop_mode="border").preprocessing  # crop_pct 0.875: 256, then 224
    expected = Image.new("RGB", (256, 256), MEAN_FILL)
    expected.paste(image.resize((256, 192), Image.Resampling.BILINEAR), (0, 32))
    np.testing.assert_array_equal(decode(data, prep).permute(1, 2, 0).numpy(), np.asarray(_centre(expected, 224)))


def test_crop_mode_is_in_the_fingerprint_and_the_name_and_center_keeps_old_ones():
    names, keys = {}, {}
    for mode in (None, "center", "squash", "border"):
        encoder = create_encoder("mobilenet_v2", crop_mode=mode)
        names[mode] = default_name(encoder, False, "float16")
        keys[mode] = fingerprint(feature_set_config(encoder, False, "float16"))
    assert names == {None: "mobilenet_v2", "center": "mobilenet_v2", "squash": "mobilenet_v2-squash",
                     "border": "mobilenet_v2-border"}
    assert keys[None] == keys["center"] and len({keys[None], keys["squash"], keys["border"]}) == 3
    assert "crop_mode" not in create_encoder("mobilenet_v2").preprocessing.to_dict()  # old fingerprints hold


def test_an_unknown_crop_mode_is_one_line(cli, ham_subset_csv, ham_root, tmp_path):
    code, out, err = cli("extract", ham_subset_csv, "--images", ham_root / "images", "--id-col", "image_id",
                         "-s", tmp_path / "s.zarr", "--crop-mode", "stretch", "-q")
    assert code == 2 and "unknown crop mode 'stretch'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()


@pytest.fixture(scope="module")
def clinic(ham_meta, ham_subset, ham_root, tmp_path_factory):
    """A second "clinic": 150 HAM10000 images outside the training subset (35 melanomas), a lesion-level
    ``split`` of valid / test rows, extracted with mobilenet_v2 (centre crop) into ``clinic.zarr``; the same
    images with their dx shuffled in ``relabelled.zarr``; ten of them extracted with squash only in ``squash.zarr``;
    in ``overlap.zarr`` the clinic's images plus 12 of the training subset's (test rows, under new ids)."""
    folder = tmp_path_factory.mktemp("clinic")
    rest = ham_meta[~ham_meta["lesion_id"].isin(set(ham_subset["lesion_id"]))]
    picked = pd.concat([rest[rest.dx == "mel"].sample(35, random_state=1),
                        rest[rest.dx != "mel"].sample(115, random_state=1)])
    lesions = sorted(picked["lesion_id"].unique())
    valid = set(np.random.default_rng(1).permutation(lesions)[: int(0.4 * len(lesions))])
    picked = picked.assign(split=np.where(picked["lesion_id"].isin(valid), "valid", "test"))
    relabelled = picked.assign(dx=np.random.default_rng(2).permutation(picked["dx"].to_numpy()))
    shared = ham_subset.head(12).assign(split="test", path=lambda t: t["image_id"] + ".jpg",
                                        image_id=lambda t: "copy_" + t["image_id"])
    overlap = pd.concat([picked.assign(path=picked["image_id"] + ".jpg"), shared], ignore_index=True)
    stores = {}
    for name, table in (("clinic", picked), ("relabelled", relabelled), ("squash", picked.head(10)),
                        ("overlap", overlap)):
        csv = folder / f"{name}.csv"
        table.to_csv(csv, index=False)
        source = open_source(csv, images=ham_root / "images", id_col="image_id",
                             path_col="path" if "path" in table else None)
        stores[name] = folder / f"{name}.zarr"
        encoder = create_encoder("mobilenet_v2", crop_mode="squash" if name == "squash" else None)
        assert extract(source, encoder, stores[name], progress=False).n_failed == 0
    return stores


def _transfer(cli, ham_store, clinic_store, out, *extra):
    return cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--positive", "mel", "-g", "lesion_id",
               "--test-store", clinic_store, "--test-split-column", "split", "--n-boot", "50", "--no-report",
               "-p", "logreg.C=0.01", "-o", out, "-q", *extra)


def test_a_squash_store_has_its_crop_mode_and_query_rebuilds_it(clinic):
    store = FeatureStore.open(clinic["squash"])
    info = store.info("mobilenet_v2-squash")
    encoder, attrs = encoder_for(store, info.key)
    assert attrs["crop_mode"] == "squash" and encoder.preprocessing.crop_mode == "squash"
    assert fingerprint(feature_set_config(encoder, False, "float16")) == info.key


def test_test_store_scores_the_other_stores_test_rows_and_predict_split_gives_the_same(cli, ham_store, clinic,
                                                                                          tmp_path):
    code, out, err = _transfer(cli, ham_store, clinic["clinic"], tmp_path / "run", "--normalize", "per-store")
    assert code == 0, err
    assert "scored on" in out and "clinic.zarr (split=test)" in out and "per-store" in out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    table = pd.read_csv(clinic["clinic"].with_suffix(".csv"))
    n_test = int((table["split"] == "test").sum())
    assert run["transfer"]["n_test"] == n_test and run["transfer"]["groups"] == "lesion_id"
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    test = predictions[predictions["split"] == "test"].set_index("id")
    assert set(test.index) == set(table.loc[table["split"] == "test", "image_id"])
    assert (test["store"] == str(clinic["clinic"].resolve())).all()
    assert (predictions.loc[predictions["split"] == "oof", "store"] == str(ham_store.resolve())).all()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test" and metrics["n"] == n_test
    card = json.loads((tmp_path / "run" / "head" / "model_card.json").read_text())
    assert card["normalize"] == "per-store" and card["trained_on"]["n_rows"] == 400  # no row of the clinic

    code, out, err = cli("predict", tmp_path / "run" / "head", clinic["clinic"], "--split", "split=test",
                         "-o", tmp_path / "p.csv")
    assert code == 0, err
    again = pd.read_csv(tmp_path / "p.csv").set_index("id")
    assert set(again.index) == set(test.index) and "y_true" in again.columns
    np.testing.assert_allclose(again.loc[test.index, "p_mel"], test["p_mel"], rtol=1e-5, atol=1e-6)
    assert (again.loc[test.index, "y_true"] == test["y_true"]).all()

    code, _, err = cli("report", tmp_path / "run")
    assert code == 0, err
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "clinic.zarr (split=test)" in markdown and "Sample predictions" in markdown
    assert "No sample grid" not in markdown  # the thumbnails of the scored rows come from the test store


def test_test_store_images_identical_to_training_images_are_left_out_and_counted(cli, ham_store, clinic, tmp_path,
                                                                                 ham_subset):
    code, out, err = _transfer(cli, ham_store, clinic["overlap"], tmp_path / "run")
    assert code == 0, err
    assert "12 byte-identical to images fitted or tuned on were left out" in out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    table = pd.read_csv(clinic["overlap"].with_suffix(".csv"))
    assert run["transfer"]["identical_left_out"] == 12
    assert run["transfer"]["n_test"] == int((table["split"] == "test").sum()) - 12
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    scored = set(predictions.loc[predictions["split"] == "test", "id"])
    assert not any(i.startswith("copy_") for i in scored)


def test_per_store_normalisation_reads_no_label_of_the_test_store(cli, ham_store, clinic, tmp_path):
    store = FeatureStore.open(clinic["clinic"])
    stats = store_statistics(store, store.resolve("mobilenet_v2"))
    X, _ = store.load("mobilenet_v2")
    np.testing.assert_allclose(stats.mean, X.mean(0), rtol=1e-4, atol=1e-5)
    std = X.std(0)
    np.testing.assert_allclose(stats.std, np.where(std < 1e-6, 1.0, std), rtol=1e-3, atol=1e-5)
    assert stats.n == len(X)  # every row, valid and test alike

    probabilities = {}
    for name in ("clinic", "relabelled"):  # the same images, their dx shuffled
        code, _, err = _transfer(cli, ham_store, clinic[name], tmp_path / name, "--normalize", "per-store")
        assert code == 0, err
        frame = pd.read_parquet(tmp_path / name / "predictions.parquet")
        probabilities[name] = frame[frame["split"] == "test"].set_index("id")["p_mel"].sort_index()
    pd.testing.assert_series_equal(probabilities["clinic"], probabilities["relabelled"])
    assert _transfer(cli, ham_store, clinic["clinic"], tmp_path / "plain")[0] == 0
    plain = pd.read_parquet(tmp_path / "plain" / "predictions.parquet")
    plain = plain[plain["split"] == "test"].set_index("id")["p_mel"].sort_index()
    assert not np.allclose(plain, probabilities["clinic"])  # the normalisation changes the scores


def test_select_on_store_chooses_on_its_valid_rows_and_never_fits_them(cli, ham_store, clinic, tmp_path):
    code, out, err = _transfer(cli, ham_store, clinic["clinic"], tmp_path / "run", "--trials", "3",
                               "--select-on-store", clinic["clinic"])
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    table = pd.read_csv(clinic["clinic"].with_suffix(".csv"))
    assert run["transfer"]["n_select"] == int((table["split"] == "valid").sum())
    assert run["transfer"]["select_split"] == "valid" and "fitted on train alone" in run["split"]["validation"]
    card = json.loads((tmp_path / "run" / "head" / "model_card.json").read_text())
    assert card["trained_on"]["n_rows"] == 400
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    scored = set(predictions.loc[predictions["split"] == "test", "id"])
    assert scored.isdisjoint(table.loc[table["split"] == "valid", "image_id"])


def test_transfer_mistakes_end_in_one_line(cli, ham_store, clinic, tmp_path):
    cases = [
        (_transfer, (clinic["squash"],), "has no features of fingerprint"),
        (_transfer, (clinic["clinic"], "--select-on-store", clinic["clinic"]), "--select-on-store chooses tuned"),
        (_transfer, (clinic["clinic"], "--trials", "2", "--select-on-store", clinic["clinic"], "--select-split",
                     "test"), "never chosen on the rows that are scored"),
        (_transfer, (clinic["clinic"], "--holdout", "0.2"), "a --holdout of this store"),
        (_transfer, (clinic["clinic"], "--normalize", "clinic"), "unknown normalize 'clinic'"),
        (_transfer, (clinic["clinic"], "--test-split", "nope"), "split=nope"),
        (_transfer, (clinic["clinic"], "--test-groups", "nope"), "group column 'nope' is not in the table of"),
        (_transfer, (ham_store,), "--test-store is the store the head is fitted on"),
        (_transfer, (clinic["clinic"], "--trials", "2", "--select-on-store", ham_store),
         "--select-on-store is the store the head is fitted on"),
        (_transfer, (clinic["clinic"], "--select-split", "valid"), "give --select-on-store"),
    ]
    for run, args, message in cases:
        code, out, err = run(cli, ham_store, *args[:1], tmp_path / "x", *args[1:])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "x").exists()
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--test-split-column", "split",
                       "-o", tmp_path / "x")
    assert code == 2 and "give --test-store" in err
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--test-store", clinic["clinic"],
                       "--test-positive", "mel", "-o", tmp_path / "x")
    assert code == 2 and "give --positive" in err
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--test-store", clinic["clinic"],
                       "--test-split", "test", "-o", tmp_path / "x")
    assert code == 2 and "give --test-split-column" in err
    code, _, err = cli("predict", tmp_path / "nohead", clinic["clinic"], "--split", "split")
    assert code == 2 and "COLUMN=VALUE" in err
    from embedstore.errors import ConfigError
    from embedstore.probe import ProbeConfig

    with pytest.raises(ConfigError, match="test_groups names a column"):  # a recipe's `test_groups: no` is False
        ProbeConfig.from_dict({"store": str(ham_store), "features": "mobilenet_v2", "target": "dx",
                               "test_store": str(clinic["clinic"]), "test_groups": False})


def test_a_split_column_without_test_rows_is_refused_unless_the_test_rows_come_from_elsewhere():
    from embedstore.errors import ConfigError
    from embedstore.splits import column_split

    values = ["train", "valid", "excluded", "train"]
    with pytest.raises(ConfigError, match="no row on the train or on the test side"):
        column_split(values, {"excluded": "drop"})
    split = column_split(values, {"excluded": "drop"}, needs_test=False)
    assert split.train.tolist() == [0, 3] and split.valid.tolist() == [1] and not len(split.test)


def test_predict_labels_rows_as_the_head_and_leaves_a_foreign_target_out(clinic):
    from embedstore.probe.predict import _labels

    store = FeatureStore.open(clinic["clinic"])
    ids = store.manifest["id"]
    card = {"target": "dx", "positive_class": "mel", "classes": ["not_mel", "mel"]}
    truth = _labels(store, card, ids)
    expected = np.where(store.manifest["dx"].to_numpy() == "mel", "mel", "not_mel")
    assert (truth == expected).all()
    assert _labels(store, card | {"positive_class": "melanoma"}, ids) is None  # not a value of dx there
    assert _labels(store, card | {"target": "diagnosis"}, ids) is None
