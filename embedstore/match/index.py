"""FAISS indices over one feature set, saved beside the store and tied to its fingerprint.

Vectors are compared by cosine similarity: they are L2-normalised (optionally centred first on
the mean of the collection, ``centre=True``, which removes the shared component of post-ReLU CNN
features) and searched by inner product. The default index
is exact (``IndexFlatIP``); IVF, IVF-PQ or HNSW are used when asked for or when the collection is
large, and the index moves to the GPU when faiss was built with GPU support and one is present.

An index is built from :class:`Rows`: raw features read a block at a time, from an array in memory or
from a feature set on disk (:meth:`Rows.of_feature_set`), so building from the store never holds all
vectors in float32 at once: IVF kinds are trained on a seeded sample of rows (read alone), the mean
(``centre``) is summed block by block, and rows are added one block at a time. ``ivfpq`` keeps only
PQ codes (``dim / 4`` bytes per vector) and re-ranks a shortlist of :data:`REFINE` x k candidates
by their exact vectors, read back from the rows it was built from (:meth:`FeatureIndex.search`).

An index file lives in ``<store>.index/<feature-set key>.faiss`` (:mod:`embedstore.layout`) with a JSON
sidecar that holds the feature-set fingerprint, the sha256 of the ordered ids it was built on, the
centring vector and the sha256 of the index file, so an index is never used with features of another
feature set (or with a store whose rows changed), nor beside a sidecar of another build. An index is a
cache: whatever is wrong with it (damaged, truncated, mismatched), :func:`embedstore.match.query.load_index`
rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import faiss
import numpy as np

from embedstore import faults
from embedstore.atomic import write_file, write_text
from embedstore.errors import ConfigError, StoreError, first_line
from embedstore.layout import index_sidecar

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
LARGE_COLLECTION = 200_000  # "auto" switches from exact to approximate search above this
HNSW_MAX_BYTES = 2 << 30  # "auto" takes ivfpq where HNSW's float32 copy of the vectors would exceed this
TRAIN_MAX = 131_072  # IVF kinds train on at most this many sampled rows (200 MB of 384-d float32)
IVFPQ_NLIST_MAX = 1024  # on 2 cores, k-means of 4,096 lists would take longer than adding 10M rows
PQ_DIMS_PER_CODE = 4  # each byte of a PQ code stands for this many dimensions (96 bytes per 384-d vector)
REFINE = 20  # ivfpq re-ranks REFINE x k PQ candidates by their exact vectors (recall@10 0.926 with 10, 0.949 with 20
# on 1M synthetic 384-d vectors; BENCHMARKS.md)
REFINE_ROWS = 262_144  # distinct candidate vectors held at once while re-ranking (400 MB per copy of 384-d float32)


def normalise(X: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Centre (when ``mean`` is given) and L2-normalise rows; returns contiguous float32."""
    X = np.asarray(X, dtype=np.float32)
    if mean is not None:
        X = X - mean.astype(np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(norms, 1e-12), dtype=np.float32)


def ids_digest(ids) -> str:
    """A short sha256 of the ordered ids, to tell whether an index still matches the store rows. Items may be
    ``(id, image sha256)`` pairs (:func:`embedstore.match.query.load_index`), so that a row re-extracted from a
    changed image, same id, same feature set, also tells the index is stale."""
    h = hashlib.sha256()
    for i in ids:
        h.update("\0".join(map(str, i)).encode() if isinstance(i, tuple) else str(i).encode())
        h.update(b"\0\0")
    return h.hexdigest()[:16]


def gpu_available() -> bool:
    """True when faiss has GPU support compiled in and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class IndexMeta:
    """What an index was built on; written as the JSON sidecar of the index file."""

    key: str
    kind: str
    n: int
    dim: int
    ids_sha256: str
    centred: bool
    params: dict = field(default_factory=dict)
    format: int = 2  # 2: the sidecar holds the sha256 of the ids, no longer the ids themselves


@dataclass(frozen=True)
class Rows:
    """Raw feature rows to index or search, read a block at a time.

    ``read(rows)`` returns the float32 features of sorted, unique row numbers ``0 <= r < n``; :meth:`blocks`
    walks all rows in order, ``block`` at a time. An array in memory (:meth:`of_array`) and a feature set on
    disk (:meth:`of_feature_set`) are read through the same two calls, so an index built either way is the same.
    """

    n: int
    dim: int
    read: Callable[[np.ndarray], np.ndarray]
    block: int = 65536

    @classmethod
    def of_array(cls, X: np.ndarray, block: int = 65536) -> "Rows":
        """The rows of a 2-D array in memory."""
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError("features must be a 2-D array")

        def read(rows: np.ndarray) -> np.ndarray:
            if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
                return np.asarray(X[rows[0]:rows[-1] + 1], dtype=np.float32)  # a block: a view, converted
            return np.asarray(X[rows], dtype=np.float32)

        return cls(len(X), X.shape[1], read, block)

    @classmethod
    def of_feature_set(cls, fs, store_rows: np.ndarray, chunks_per_block: int | None = None) -> "Rows":
        """The rows ``store_rows`` (sorted, e.g. :meth:`FeatureStore.usable_rows`) of feature set ``fs``, read
        from disk when asked: a block is the rows of whole store chunks (about 65,536 rows), float16 on disk becomes
        float32 one block at a time, and a damaged chunk raises :class:`StoreError` as every read does."""
        store_rows = np.asarray(store_rows, dtype=np.int64)
        per_chunk = fs.rows_per_chunk
        chunks_per_block = chunks_per_block or max(1, 65536 // per_chunk)

        def read(rows: np.ndarray) -> np.ndarray:
            return np.asarray(fs.read_rows(store_rows[rows]), dtype=np.float32)

        return cls(len(store_rows), int(fs.emb.shape[1]), read, per_chunk * chunks_per_block)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, features)`` of each block of rows, in order."""
        for start in range(0, self.n, self.block):
            yield start, self.read(np.arange(start, min(self.n, start + self.block)))

    def mean(self) -> np.ndarray:
        """The mean row, summed in float64 one block at a time (the same for an array and a store)."""
        total = np.zeros(self.dim, dtype=np.float64)
        for _, X in self.blocks():
            total += X.sum(axis=0, dtype=np.float64)
        return (total / max(self.n, 1)).astype(np.float32)


class FeatureIndex:
    """A cosine-similarity FAISS index over the rows of one feature set.

    Build with :meth:`build` (an array) or :meth:`build_from` (:class:`Rows`, e.g. a feature set read from disk
    block by block), query with :meth:`search` (raw features in, similarities out), persist with :meth:`save` /
    :meth:`load`. ``exact`` reads the raw features of index rows (``Rows.read``); an ``ivfpq`` index re-ranks its
    shortlist with it (an index loaded without it searches by PQ codes alone).
    """

    def __init__(self, index, meta: IndexMeta, mean: np.ndarray | None, exact: Callable | None = None):
        self.index = index
        self.meta = meta
        self.mean = mean
        self.exact = exact

    # -- building -----------------------------------------------------------------------
    @classmethod
    def build(cls, X: np.ndarray, ids, key: str, **options) -> "FeatureIndex":
        """Index ``X`` (raw features in memory, one row per id) under the feature-set fingerprint ``key``;
        ``options`` are those of :meth:`build_from`."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or len(X) == 0:
            raise StoreError(f"feature set {key} has no rows to index")
        if len(ids) != len(X):
            raise ValueError("ids and features differ in length")
        return cls.build_from(Rows.of_array(X), ids, key, **options)

    @classmethod
    def build_from(
        cls,
        rows: Rows,
        ids,
        key: str,
        kind: str = "auto",
        centre: bool = False,
        nlist: int | None = None,
        nprobe: int = 32,
        hnsw_m: int = 32,
        ef_search: int = 128,
        use_gpu: str | bool = "auto",
        seed: int = 0,
        advance=None,
    ) -> "FeatureIndex":
        """Index ``rows`` (one per id, in order) under the feature-set fingerprint ``key``, a block at a time.

        Memory is the index itself (for ``ivfpq``: its PQ codes), one block of rows and the training sample, never
        all rows in float32 (unless the index kind keeps them: ``flat``, ``ivf``, ``hnsw``). ``advance(n)``, when
        given, counts the rows added.
        """
        if kind not in INDEX_KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        if rows.n == 0:
            raise StoreError(f"feature set {key} has no rows to index")
        if len(ids) != rows.n:
            raise ValueError("ids and features differ in length")
        kind = resolve_kind(kind, rows.n, rows.dim)
        if kind == "ivfpq" and rows.n < 2 * 39:
            raise ConfigError(f"feature set {key} has {rows.n} rows, too few to train an ivfpq index "
                              f"(78 at least); use --index flat")
        mean = rows.mean() if centre else None
        params = {}
        index = make_index(kind, rows.dim, rows.n, nlist=nlist, hnsw_m=hnsw_m, params=params)
        train(index, rows, mean, seed)
        for _, X in rows.blocks():
            index.add(normalise(X, mean))
            if advance is not None:
                advance(len(X))
        set_search_params(index, kind, nprobe=nprobe, ef_search=ef_search, params=params)
        meta = IndexMeta(key=key, kind=kind, n=rows.n, dim=rows.dim, ids_sha256=ids_digest(ids),
                         centred=centre, params=params)
        out = cls(index, meta, mean, exact=rows.read if kind == "ivfpq" else None)
        if use_gpu is True or (use_gpu == "auto" and gpu_available() and kind not in ("hnsw", "ivfpq")):
            out.to_gpu()  # ivfpq stays on the CPU: its cost is the re-ranking, and faiss's GPU IVF-PQ limits m and k
        return out

    def to_gpu(self) -> None:
        """Move the index to GPU 0 (HNSW has no GPU version and stays on the CPU)."""
        if not gpu_available():
            raise ConfigError("this faiss build has no GPU support or no GPU is visible; install faiss-gpu")
        self.index = gpu_copy(self.index)

    # -- searching ----------------------------------------------------------------------
    def prepare(self, X: np.ndarray) -> np.ndarray:
        """Bring raw features into the index's space (same centring, L2-normalised)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.meta.dim:
            raise StoreError(
                f"features of width {X.shape[-1]} cannot be searched in index {self.meta.key} "
                f"of width {self.meta.dim}; use the feature set the index was built on"
            )
        return normalise(X, self.mean)

    def search(self, X: np.ndarray, k: int, batch: int = 8192, advance=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` cosine similarities and row numbers for each row of raw features ``X``.

        Queries are prepared and searched in batches, so one batch and the [n, k] result is all that is held;
        missing neighbours (k larger than the collection) come back as row -1 with similarity -inf. An
        ``ivfpq`` index with ``exact`` takes the :data:`REFINE` x k nearest by PQ codes and ranks them by their
        exact similarity (batches then hold at most :data:`REFINE_ROWS` candidates).
        ``advance(n)``, when given, is called with the number of queries of each batch done.
        """
        k = int(min(k, self.meta.n))
        refine = self.meta.kind == "ivfpq" and self.exact is not None
        depth = int(min(self.meta.n, self.meta.params.get("refine", REFINE) * k)) if refine else k
        batch = max(1, min(batch, REFINE_ROWS // depth)) if refine else batch
        sims = np.empty((len(X), k), dtype=np.float32)
        rows = np.empty((len(X), k), dtype=np.int64)
        for start in range(0, len(X), batch):
            Q = self.prepare(X[start:start + batch])
            s, r = search_index(self.index, Q, depth)
            if refine:
                s, r = self.rerank(Q, r, k)
            sims[start:start + len(Q)], rows[start:start + len(Q)] = s, r
            if advance is not None:
                advance(len(Q))
        return sims, rows

    def rerank(self, Q: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` of each query's ``candidates`` (rows, -1 for none) most similar by their exact vectors."""
        found = candidates >= 0
        unique, at = np.unique(candidates[found], return_inverse=True)
        V = self.prepare(self.exact(unique))  # each candidate read once, however many queries share it
        exact = np.full(candidates.shape, -np.inf, dtype=np.float32)
        slot = np.zeros(candidates.shape, dtype=np.int64)
        slot[found] = at
        for q in range(len(Q)):  # one query's candidates at a time: no [queries, candidates, dim] copy
            exact[q, found[q]] = V[slot[q, found[q]]] @ Q[q]
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        sims = np.take_along_axis(exact, order, axis=1)
        rows = np.where(np.isneginf(sims), -1, np.take_along_axis(candidates, order, axis=1))
        return sims, rows

    # -- persistence --------------------------------------------------------------------
    def check(self, key: str, ids=None) -> None:
        """Refuse to serve another feature set (or a changed one) with this index."""
        if key != self.meta.key:
            raise StoreError(
                f"index was built on feature set {self.meta.key}, not {key}; "
                f"rebuild it for {key} (embedstore query ... --rebuild-index)"
            )
        if ids is not None and ids_digest(ids) != self.meta.ids_sha256:
            raise StoreError(
                f"index for {key} was built on other rows than the store now holds; "
                "rebuild it (embedstore query ... --rebuild-index)"
            )

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (the .faiss file), then its ``.json`` sidecar, each atomically.

        The sidecar records the sha256 and size of the index file it belongs to and is written
        second, so an index file without its sidecar, or beside the sidecar of another build,
        is refused by :meth:`load` (and :func:`embedstore.match.query.load_index` rebuilds it).
        It holds the sha256 of the ordered ids, not the ids: at 10 million rows a list of them
        would be a JSON file of 140 MB that takes over a gigabyte to parse.
        """
        path = Path(path)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and gpu_available() and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        write_file(path, lambda tmp: faiss.write_index(index, str(tmp)))
        faults.point("index-save")
        sidecar = asdict(self.meta) | {
            "index_file": {"sha256": file_sha256(path), "size": path.stat().st_size},
            "mean": None if self.mean is None else self.mean.astype(float).tolist(),
        }
        write_text(index_sidecar(path), json.dumps(sidecar))
        return path

    @classmethod
    def load(cls, path: str | Path, key: str | None = None, exact: Callable | None = None) -> "FeatureIndex":
        """Read an index saved by :meth:`save`; with ``key``, refuse one of another feature set. ``exact`` reads
        the raw features of index rows (``Rows.read`` of the rows it was built on), for an ``ivfpq`` re-ranking.

        Anything that is not an intact pair of index file and sidecar (missing, truncated, garbage,
        from different builds, or of an older sidecar format) raises :class:`StoreError`, never another exception.
        """
        path = Path(path)
        if not path.exists() or not index_sidecar(path).exists():
            raise StoreError(f"no index at {path}; build one with embedstore query or embedstore match")
        side = _read_sidecar(path)
        mean, recorded = side.pop("mean"), side.pop("index_file")
        if recorded != {"sha256": file_sha256(path), "size": path.stat().st_size}:
            raise StoreError(f"index file {path} is not the one its sidecar was written for (damaged, or "
                             "another build); rebuild it (embedstore query ... --rebuild-index)")
        meta = IndexMeta(**side)
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError for any unreadable file
            raise StoreError(f"index file {path} cannot be read ({first_line(exc, 120)}); "
                             "rebuild it (embedstore query ... --rebuild-index)") from None
        if index.ntotal != meta.n or index.d != meta.dim:
            raise StoreError(f"index file {path} does not hold the {meta.n} rows of width {meta.dim} its "
                             "sidecar describes; rebuild it (embedstore query ... --rebuild-index)")
        set_search_params(index, meta.kind, nprobe=meta.params.get("nprobe", 32),
                          ef_search=meta.params.get("ef_search", 128), params={})
        out = cls(index, meta, None if mean is None else np.asarray(mean, dtype=np.float32), exact=exact)
        if key is not None:
            out.check(key)
        return out


def _read_sidecar(path: Path) -> dict:
    """The sidecar of index ``path`` as a dict with every field :meth:`FeatureIndex.save` writes; StoreError otherwise."""
    try:
        side = json.loads(index_sidecar(path).read_text())
        names = {f.name for f in fields(IndexMeta)} | {"mean", "index_file"}
        if not isinstance(side, dict) or set(side) != names or not isinstance(side["params"], dict):
            raise ValueError("fields differ from those embedstore writes")
        return side
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"index sidecar {index_sidecar(path)} is damaged or from another version ({exc}); "
                         "rebuild the index (embedstore query ... --rebuild-index)") from None


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def search_index(index, Q: np.ndarray, k: int, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products and row numbers of the prepared (unit, float32) queries ``Q`` in a FAISS
    ``index``, in batches; missing neighbours come back as row -1 with similarity -inf.

    The one FAISS search of embedstore: :meth:`FeatureIndex.search` and the kNN head both go through it.
    """
    sims = np.empty((len(Q), k), dtype=np.float32)
    rows = np.empty((len(Q), k), dtype=np.int64)
    for start in range(0, len(Q), batch):
        s, r = index.search(Q[start:start + batch], k)
        sims[start:start + batch], rows[start:start + batch] = s, r
    sims[rows < 0] = -np.inf
    return sims, rows


def gpu_copy(index, device: str = "cuda"):
    """FAISS's GPU copy of ``index`` on the GPU that ``device`` (``cuda``, ``cuda:N`` or ``auto``) names;
    call only when :func:`gpu_available`."""
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), int(device.partition(":")[2] or 0), index)


def exact_index(Z: np.ndarray):
    """An exact inner-product index over prepared (unit, float32, contiguous) rows ``Z``, kept in memory."""
    index = make_index("flat", Z.shape[1], len(Z), nlist=None, hnsw_m=0, params={})
    index.add(Z)
    return index


def resolve_kind(kind: str, n: int, dim: int) -> str:
    """The index kind ``auto`` stands for: exact up to :data:`LARGE_COLLECTION` rows, HNSW while its float32 copy
    of the vectors stays under :data:`HNSW_MAX_BYTES`, IVF-PQ above (codes of ``dim / 4`` bytes per vector)."""
    if kind != "auto":
        return kind
    if n <= LARGE_COLLECTION:
        return "flat"
    return "hnsw" if n * dim * 4 <= HNSW_MAX_BYTES else "ivfpq"


def default_nlist(kind: str, n: int) -> int:
    """Inverted lists of an IVF index of ``n`` rows: 4 sqrt(n), capped (for IVF-PQ at :data:`IVFPQ_NLIST_MAX`) so
    that each list has the 39 training rows k-means needs, of ``n`` and of the :data:`TRAIN_MAX` sampled."""
    nlist = max(1, min(65536, round(4 * np.sqrt(n))))
    if kind == "ivfpq":
        nlist = min(nlist, IVFPQ_NLIST_MAX, max(1, n // 39))
    return min(nlist, TRAIN_MAX // 39)  # the training sample (at most TRAIN_MAX rows) gives each list 39 rows


def pq_shape(dim: int, n_train: int) -> tuple[int, int]:
    """Sub-quantizers and bits per code of an IVF-PQ index: one sub-quantizer per :data:`PQ_DIMS_PER_CODE`
    dimensions (the largest divisor of ``dim`` not above ``dim / 4``), 8 bits each, fewer bits when the training
    sample is too small for 39 rows per centroid (tiny collections)."""
    m = max(d for d in range(1, max(1, dim // PQ_DIMS_PER_CODE) + 1) if dim % d == 0)
    nbits = int(np.clip(np.floor(np.log2(max(n_train, 2) / 39)), 1, 8))
    return m, nbits


def training_size(index, n: int) -> int:
    """Rows an IVF index is trained on: 256 per list (what faiss's k-means samples), at most :data:`TRAIN_MAX`."""
    return min(n, 256 * index.nlist, TRAIN_MAX)


def make_index(kind: str, dim: int, n: int, nlist: int | None, hnsw_m: int, params: dict):
    """An empty inner-product index of the given kind; its shape goes into ``params`` (the sidecar's)."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind in ("ivf", "ivfpq"):
        nlist = min(int(nlist or default_nlist(kind, n)), n)
        params["nlist"] = nlist
        if kind == "ivf":
            return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        m, nbits = pq_shape(dim, min(n, 256 * nlist, TRAIN_MAX))
        params.update(m=m, nbits=nbits, refine=REFINE)
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    params["hnsw_m"] = hnsw_m
    index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    return index


def train(index, rows: Rows, mean, seed: int) -> None:
    """Train an IVF index on a seeded sample of :func:`training_size` rows, read alone (sorted, so a store reads
    each chunk once); the same seed and rows give the same sample, so the same centroids from memory or disk."""
    if index.is_trained:
        return
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rows.n, size=training_size(index, rows.n), replace=False))
    index.cp.seed = seed
    if isinstance(index, faiss.IndexIVFPQ):
        index.pq.cp.seed = seed
    X = normalise(rows.read(sample), mean)  # the sample's raw rows are freed before training
    index.train(X)


def set_search_params(index, kind: str, nprobe: int, ef_search: int, params: dict) -> None:
    """Set the search depth (IVF lists probed, HNSW's ef) on ``index`` and record it in ``params``."""
    if kind in ("ivf", "ivfpq"):
        index.nprobe = min(nprobe, index.nlist)
        params["nprobe"] = index.nprobe
    elif kind == "hnsw":
        index.hnsw.efSearch = ef_search
        params["ef_search"] = ef_search
