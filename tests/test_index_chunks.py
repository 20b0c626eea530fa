"""FAISS indices built from the store a block of rows at a time (issue 13, part 3), on real HAM10000 features.

The subset's MobileNetV2 features are copied into a feature set of 16-row chunks (one row marked failed), so a
block is 16 rows and the build's reads can be watched: the chunked build must equal the in-memory build, never read
more than a block or the training sample at once, and serve ``embedstore query --index ivfpq``.
"""

import json
import shutil
import tracemalloc

import faiss
import numpy as np
import pytest

from embedstore.errors import ConfigError
from embedstore.layout import index_file, index_sidecar
from embedstore.match import index as index_module
from embedstore.match.index import FeatureIndex, Rows, normalise
from embedstore.match.pairs import knn_graph
from embedstore.match.query import load_index, query
from embedstore.store import FeatureStore
from embedstore.store.feature_set import DONE, FAILED

SMALL = "mobilenet_v2-16rows"


@pytest.fixture(scope="module")
def small_chunks(ham_store, tmp_path_factory):
    """A copy of the subset store with its MobileNetV2 features also in a set of 16-row chunks, row 5 failed."""
    path = tmp_path_factory.mktemp("chunks") / "ham.zarr"
    shutil.copytree(ham_store, path)
    store = FeatureStore.open(path)
    X, table = store.load("mobilenet_v2")
    assert len(table) == len(store.manifest)  # every row of the subset has features
    fs = store.require_feature_set(SMALL, SMALL, {"encoder": "mobilenet_v2"}, X.shape[1], "float16", 16)
    status = np.full(len(X), DONE)
    status[5] = FAILED
    fs.write_rows(np.arange(len(X)), X, table["sha256"].tolist(), [""] * len(X), status)
    return path


def _rows(store):
    """The usable rows of the small-chunk set as Rows (one chunk per block) and the same features in memory."""
    fs, store_rows = store.usable_rows(SMALL)
    X, table = store.load(SMALL)
    assert len(store_rows) == len(X) == len(store.manifest) - 1  # the failed row is left out by both
    return Rows.of_feature_set(fs, store_rows, chunks_per_block=1), X, table["id"].to_numpy()


@pytest.mark.parametrize("centre", [False, True])
def test_chunked_flat_build_is_the_in_memory_build(small_chunks, centre):
    store = FeatureStore.open(small_chunks)
    rows, X, ids = _rows(store)
    assert rows.block == 16
    chunked = FeatureIndex.build_from(rows, ids, key=SMALL, kind="flat", centre=centre, use_gpu=False)
    memory = FeatureIndex.build(X, ids, key=SMALL, kind="flat", centre=centre, use_gpu=False)
    assert chunked.meta == memory.meta
    np.testing.assert_array_equal(chunked.mean, memory.mean)
    for a, b in zip(chunked.search(X[:40], 10), memory.search(X[:40], 10)):
        np.testing.assert_array_equal(a, b)
    # the kNN graph of all rows, one block of queries read from the store at a time, is the in-memory one
    # (similarities to the last bit aside: BLAS sums a block of 16 queries in another order than 399)
    (s_chunked, r_chunked), (s_memory, r_memory) = knn_graph(chunked, rows, 8), knn_graph(memory, X, 8)
    np.testing.assert_array_equal(r_chunked, r_memory)
    np.testing.assert_allclose(s_chunked, s_memory, rtol=0, atol=1e-6)


def test_chunked_ivf_build_trains_the_same_centroids(small_chunks):
    store = FeatureStore.open(small_chunks)
    rows, X, ids = _rows(store)
    chunked = FeatureIndex.build_from(rows, ids, key=SMALL, kind="ivf", nlist=8, seed=3, use_gpu=False)
    memory = FeatureIndex.build(X, ids, key=SMALL, kind="ivf", nlist=8, seed=3, use_gpu=False)
    centroids = [i.index.quantizer.reconstruct_n(0, 8) for i in (chunked, memory)]
    np.testing.assert_array_equal(*centroids)
    for a, b in zip(chunked.search(X, 5), memory.search(X, 5)):
        np.testing.assert_array_equal(a, b)


def test_ivfpq_recall_against_exact_search(small_chunks):
    """Re-ranked by exact vectors, IVF-PQ finds the exact 10 nearest; by PQ codes alone it misses many (measured on
    these 399 rows of 1280-d features: 1.00 re-ranked, 0.60 by codes alone)."""
    store = FeatureStore.open(small_chunks)
    rows, X, ids = _rows(store)
    index = FeatureIndex.build_from(rows, ids, key=SMALL, kind="ivfpq", use_gpu=False)
    assert index.meta.params["m"] == 320 and isinstance(index.index, faiss.IndexIVFPQ)
    exact = FeatureIndex.build(X, ids, key=SMALL, kind="flat", use_gpu=False).search(X, 10)[1]

    def recall(found):
        return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)])

    sims, found = index.search(X, 10)
    assert recall(found) >= 0.98
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", normalise(X), normalise(X)[found]), atol=1e-5)
    index.exact = None
    assert recall(index.search(X, 10)[1]) < 0.9  # the re-ranking is what the recall rests on


def _build_peak(rows, ids, **options) -> int:
    """Peak bytes tracemalloc sees (numpy's buffers and zarr's chunk reads, not faiss's) while building from rows."""
    tracemalloc.start()
    try:
        FeatureIndex.build_from(rows, ids, key=SMALL, kind="ivfpq", centre=True, use_gpu=False, **options)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_chunked_build_reads_a_block_at_a_time(small_chunks, monkeypatch):
    """No read bigger than a block (16 rows) or the training sample (capped at 48 rows here), every row added once,
    and less memory than one float32 copy of all the features; the same build from one block of all rows takes
    more (so the bound can fail)."""
    store = FeatureStore.open(small_chunks)
    rows, X, ids = _rows(store)
    monkeypatch.setattr(index_module, "TRAIN_MAX", 48)
    sizes, added = [], []
    watched = Rows(rows.n, rows.dim, lambda r: sizes.append(len(r)) or rows.read(r), rows.block)
    peak = _build_peak(watched, ids, advance=added.append)
    assert max(sizes) == 48 and sizes.count(48) == 1  # the training sample, read alone
    assert set(sizes) - {48} == {16, rows.n % 16}  # then blocks, twice: the mean's pass and the adding pass
    assert sum(added) == rows.n and max(added) == 16
    assert peak < X.nbytes, f"peak {peak} bytes for {X.nbytes} bytes of float32 features"
    whole = Rows(rows.n, rows.dim, rows.read, rows.n)
    assert _build_peak(whole, ids) > 1.5 * X.nbytes


def test_saved_ivfpq_index_reloads_and_a_changed_store_rebuilds_it(small_chunks, tmp_path):
    path = tmp_path / "ham.zarr"
    shutil.copytree(small_chunks, path)
    store = FeatureStore.open(path)
    built, table, _ = load_index(store, SMALL, kind="ivfpq")
    saved = index_file(path, SMALL)
    side = json.loads(index_sidecar(saved).read_text())
    assert side["kind"] == "ivfpq" and side["n"] == len(table) and "ids" not in side
    first = saved.stat().st_mtime_ns
    X = store.load(SMALL, ids=table["id"][:20])[0]
    loaded, _, _ = load_index(FeatureStore.open(path), SMALL, kind="flat")  # a saved index is served, whatever kind
    assert loaded.meta.kind == "ivfpq" and saved.stat().st_mtime_ns == first and loaded.exact is not None
    for a, b in zip(loaded.search(X, 5), built.search(X, 5)):
        np.testing.assert_array_equal(a, b)
    fs = store.feature_set(SMALL)  # the store changes: one more row fails
    fs.write_rows(np.array([7]), None, [""], ["unreadable"], np.array([FAILED]))
    rebuilt, table, _ = load_index(FeatureStore.open(path), SMALL, kind="ivfpq")
    assert rebuilt.meta.n == len(table) == built.meta.n - 1 and rebuilt.meta.ids_sha256 != built.meta.ids_sha256


def test_query_cli_with_ivfpq(cli, small_chunks, tmp_path):
    path = tmp_path / "ham.zarr"
    shutil.copytree(small_chunks, path)
    store = FeatureStore.open(path)
    table = store.load(SMALL, columns=["lesion_id"])[1]
    item = table["id"].iloc[0]
    code, out, err = cli("query", path, item, "-f", SMALL, "-g", "lesion_id", "--index", "ivfpq", "--json")
    assert code == 0, err
    hits = json.loads(out)
    assert json.loads(index_sidecar(index_file(path, SMALL)).read_text())["kind"] == "ivfpq"
    expected = query(store, [item], SMALL, top_k=5, groups="lesion_id", kind="flat", rebuild=True)
    assert [h["group"] for h in hits] == expected["group"].tolist()  # the lesions exact search ranks
    code, _, err = cli("query", path, item, "-f", SMALL, "--index", "pq", "--rebuild-index")
    assert code == 2 and "unknown index kind 'pq'" in err and len(err.strip().splitlines()) == 1


def test_a_row_re_extracted_from_a_changed_image_makes_the_saved_index_stale(small_chunks):
    """Same ids, same feature set, one image's bytes changed (and its row re-extracted): the index's row identity
    is the (id, image sha256) of each row, so the saved index no longer matches."""
    from embedstore.match.index import ids_digest
    from embedstore.match.query import _RowKeys

    table = FeatureStore.open(small_chunks).manifest
    changed = table.copy()
    changed.loc[3, "sha256"] = "0" * 64
    assert ids_digest(_RowKeys(table)) == ids_digest(_RowKeys(table.copy()))  # iterated afresh, same identity
    assert ids_digest(_RowKeys(changed)) != ids_digest(_RowKeys(table))
    assert list(changed["id"]) == list(table["id"])


def test_ivfpq_on_too_few_rows_is_one_line(small_chunks):
    store = FeatureStore.open(small_chunks)
    X, table = store.load(SMALL)
    with pytest.raises(ConfigError, match="too few to train an ivfpq index"):
        FeatureIndex.build(X[:20], table["id"][:20].tolist(), key="k", kind="ivfpq")
