"""`embedstore query`: nearest lesions for ids in the store and for image files, via the saved index."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from embedstore.errors import StoreError
from embedstore.layout import index_file, projection_head_folder
from embedstore.match.index import FeatureIndex
from embedstore.match.projection import ProjectionHead
from embedstore.match.query import query
from embedstore.store import FeatureStore


@pytest.fixture
def store_copy(ham_store, tmp_path):
    path = tmp_path / "ham.zarr"
    shutil.copytree(ham_store, path)
    return path


@pytest.fixture
def multi_ids(ham_store):
    _, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    sizes = table["lesion_id"].map(table["lesion_id"].value_counts())
    return table.loc[sizes >= 2, ["id", "lesion_id", "_path"]].head(6).reset_index(drop=True)


def test_query_by_id_ranks_distinct_lesions_and_never_the_image_itself(store_copy, multi_ids):
    store = FeatureStore.open(store_copy)
    result = query(store, multi_ids["id"].tolist(), "mobilenet_v2", top_k=5)
    assert len(result) == 5 * len(multi_ids)
    for item, hits in result.groupby("query"):
        assert hits["rank"].tolist() == [1, 2, 3, 4, 5]
        assert hits["group"].is_unique
        assert (np.diff(hits["similarity"]) <= 1e-6).all()
        assert item not in set(hits["image"])
    assert index_file(store_copy, store.resolve("mobilenet_v2")).is_file()  # saved beside the store


def test_image_file_is_embedded_with_the_same_encoder_and_finds_itself(cli, store_copy, multi_ids, ham_root):
    files = [str(ham_root / "images" / f"{i}.jpg") for i in multi_ids["id"][:2]]
    code, out, err = cli("query", store_copy, *files, "--features", "mobilenet_v2", "-g", "lesion_id", "--top-k", "3",
                         "--json")
    assert code == 0, err
    result = pd.DataFrame(json.loads(out))
    top = result[result["rank"] == 1].set_index("query")
    for f, lesion, image in zip(files, multi_ids["lesion_id"], multi_ids["id"]):
        assert top.loc[f, "group"] == lesion and top.loc[f, "image"] == image
        assert top.loc[f, "similarity"] > 0.99


def test_table_output_and_bad_items(cli, store_copy, multi_ids):
    code, out, err = cli("query", store_copy, multi_ids["id"][0], "-f", "mobilenet_v2", "-k", "2")
    assert code == 0, err
    assert "similarity" in out and "1 queries, top 2 each" in out
    code, _, err = cli("query", store_copy, "ISIC_missing", "-f", "mobilenet_v2")
    assert code == 2 and "neither an image id" in err and len(err.strip().splitlines()) == 1


def _truncate(path, other):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_sidecar(path, other):
    path.with_suffix(".json").write_text('{"key": "0123", "ids": [')


def _sidecar_of_another_set(path, other):
    shutil.copy(other.with_suffix(".json"), path.with_suffix(".json"))


def _index_and_sidecar_of_another_set(path, other):
    shutil.copy(other, path)
    shutil.copy(other.with_suffix(".json"), path.with_suffix(".json"))


def _sidecar_of_another_build(path, other):
    """The index file of an exact build beside the sidecar of an IVF build over the same ids."""
    side = json.loads(path.with_suffix(".json").read_text())
    X = np.random.default_rng(0).normal(size=(side["n"], side["dim"]))
    FeatureIndex.build(X, np.arange(side["n"]), key=side["key"], kind="ivf").save(path.parent / "ivf.faiss")
    ivf_side = json.loads((path.parent / "ivf.json").read_text())
    path.with_suffix(".json").write_text(json.dumps(ivf_side | {"ids_sha256": side["ids_sha256"]}))  # same ids


@pytest.mark.parametrize("damage", [_truncate, _garbage_sidecar, _sidecar_of_another_set,
                                    _index_and_sidecar_of_another_set, _sidecar_of_another_build])
def test_damaged_or_mismatched_index_is_rebuilt(damage, cli, store_copy, multi_ids):
    """The index is a cache: whatever is wrong with the saved one, query rebuilds it and answers as before."""
    store = FeatureStore.open(store_copy)
    item = multi_ids["id"][0]
    expected = query(store, [item], "mobilenet_v2", top_k=3, groups="lesion_id")
    path = index_file(store_copy, store.resolve("mobilenet_v2"))
    other = index_file(store_copy, store.resolve("efficientnet_lite0"))
    query(store, [item], "efficientnet_lite0", top_k=1)
    damage(path, other)
    code, out, err = cli("query", store_copy, item, "-f", "mobilenet_v2", "-g", "lesion_id", "-k", "3", "--json")
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.DataFrame(json.loads(out)), expected, check_dtype=False)
    FeatureIndex.load(path, key=store.resolve("mobilenet_v2"))  # the rebuilt index was saved, whole


def test_group_column_must_exist(cli, store_copy, multi_ids):
    code, _, err = cli("query", store_copy, multi_ids["id"][0], "-f", "mobilenet_v2", "-g", "patient_id")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no column 'patient_id'" in err and "lesion_id" in err  # the columns to choose from
    store = FeatureStore.open(store_copy)
    images = query(store, [multi_ids["id"][0]], "mobilenet_v2", top_k=3)  # no groups: single images are ranked
    assert (images["group"] == images["image"]).all()


def test_cli_ranks_single_images_unless_given_groups_and_shows_only_the_columns_asked_for(cli, store_copy, multi_ids):
    """Nothing of a particular dataset is assumed: no --groups ranks images, no --show adds no column."""
    item = multi_ids["id"][0]
    code, out, err = cli("query", store_copy, item, "-f", "mobilenet_v2", "-k", "3", "--json")
    assert code == 0, err
    images = pd.DataFrame(json.loads(out))
    assert list(images.columns) == ["query", "rank", "group", "similarity", "image", "n_images"]
    assert (images["group"] == images["image"]).all() and (images["n_images"] == 1).all()
    code, out, err = cli("query", store_copy, item, "-f", "mobilenet_v2", "-g", "lesion_id", "--show", "dx,lesion_id",
                         "-k", "3", "--json")
    assert code == 0, err
    lesions = pd.DataFrame(json.loads(out))
    _, table = FeatureStore.open(store_copy).load("mobilenet_v2")
    truth = table.set_index("id").loc[lesions["image"]]
    assert (lesions["dx"] == truth["dx"].to_numpy()).all() and (lesions["lesion_id"] == lesions["group"]).all()
    code, _, err = cli("query", store_copy, item, "-f", "mobilenet_v2", "--show", "diagnosis")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no column 'diagnosis' to show" in err


def test_projected_feature_set_embeds_files_through_the_saved_head(store_copy, multi_ids, ham_root):
    store = FeatureStore.open(store_copy)
    X, table = store.load("mobilenet_v2")
    head = ProjectionHead(epochs=2, hidden_dim=64, out_dim=16).fit(X, table["lesion_id"].to_numpy())
    key = store.put_features("mobilenet_v2+infonce", head.transform(X), table["id"].tolist(),
                             parent="mobilenet_v2", config={"kind": "infonce"})
    file = str(ham_root / "images" / f"{multi_ids['id'][0]}.jpg")
    with pytest.raises(StoreError, match="not saved"):
        query(store, [file], "mobilenet_v2+infonce")
    head.save(projection_head_folder(store.path, key))
    result = query(store, [file], "mobilenet_v2+infonce", top_k=1)
    assert result["image"].iloc[0] == multi_ids["id"][0] and result["similarity"].iloc[0] > 0.99
