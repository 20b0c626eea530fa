"""`embedstore query`: nearest lesions for ids in the store and for image files, via the saved index."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from embedstore.errors import StoreError
from embedstore.match.index import index_path
from embedstore.match.projection import ProjectionHead
from embedstore.match.query import head_path, query
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
    assert index_path(store_copy, store.resolve("mobilenet_v2")).is_file()  # saved beside the store


def test_image_file_is_embedded_with_the_same_encoder_and_finds_itself(cli, store_copy, multi_ids, ham_root):
    files = [str(ham_root / "images" / f"{i}.jpg") for i in multi_ids["id"][:2]]
    code, out, err = cli("query", store_copy, *files, "--features", "mobilenet_v2", "--top-k", "3", "--json")
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


def test_index_of_another_feature_set_is_refused(cli, store_copy, multi_ids):
    store = FeatureStore.open(store_copy)
    mobilenet, effnet = store.resolve("mobilenet_v2"), store.resolve("efficientnet_lite0")
    query(store, multi_ids["id"][:1].tolist(), "mobilenet_v2")
    src, dst = index_path(store_copy, mobilenet), index_path(store_copy, effnet)
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    code, _, err = cli("query", store_copy, multi_ids["id"][0], "-f", "efficientnet_lite0")
    assert code == 2 and f"built on feature set {mobilenet}, not {effnet}" in err
    code, _, err = cli("query", store_copy, multi_ids["id"][0], "-f", "efficientnet_lite0", "--rebuild-index")
    assert code == 0, err


def test_projected_feature_set_embeds_files_through_the_saved_head(store_copy, multi_ids, ham_root):
    store = FeatureStore.open(store_copy)
    X, table = store.load("mobilenet_v2")
    head = ProjectionHead(epochs=2, hidden_dim=64, out_dim=16).fit(X, table["lesion_id"].to_numpy())
    key = store.put_features("mobilenet_v2+infonce", head.transform(X), table["id"].tolist(),
                             parent="mobilenet_v2", config={"kind": "infonce"})
    file = str(ham_root / "images" / f"{multi_ids['id'][0]}.jpg")
    with pytest.raises(StoreError, match="not saved"):
        query(store, [file], "mobilenet_v2+infonce")
    head.save(head_path(store, key))
    result = query(store, [file], "mobilenet_v2+infonce", top_k=1)
    assert result["image"].iloc[0] == multi_ids["id"][0] and result["similarity"].iloc[0] > 0.99
