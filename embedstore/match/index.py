"""FAISS indices over one feature set, saved beside the store and tied to its fingerprint.

Vectors are compared by cosine similarity: they are L2-normalised (optionally centred first on
the mean of the collection, ``centre=True``, which removes the shared component of post-ReLU CNN
features) and searched by inner product. The default index
is exact (``IndexFlatIP``); IVF or HNSW are used when asked for or when the collection is
large, and the index moves to the GPU when faiss was built with GPU support and one is present.

An index file lives in ``<store>.index/<feature-set key>.faiss`` (:mod:`embedstore.layout`) with a JSON sidecar that holds
the feature-set fingerprint, the ids it was built on, the centring vector and the sha256 of the
index file, so an index is never used with features of another feature set (or with a store whose
rows changed), nor beside a sidecar of another build. An index is a cache: whatever is wrong with
it (damaged, truncated, mismatched), :func:`embedstore.match.query.load_index` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import faiss
import numpy as np

from embedstore import faults
from embedstore.atomic import write_file, write_text
from embedstore.errors import ConfigError, StoreError, first_line
from embedstore.layout import index_sidecar

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
LARGE_COLLECTION = 200_000  # "auto" switches from exact to approximate search above this


def normalise(X: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Centre (when ``mean`` is given) and L2-normalise rows; returns contiguous float32."""
    X = np.asarray(X, dtype=np.float32)
    if mean is not None:
        X = X - mean.astype(np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(norms, 1e-12), dtype=np.float32)


def ids_digest(ids) -> str:
    """A short sha256 of the ordered ids, to tell whether an index still matches the store rows."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
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
    format: int = 1


class FeatureIndex:
    """A cosine-similarity FAISS index over the rows of one feature set.

    Build with :meth:`build`, query with :meth:`search` (raw features in, similarities out),
    persist with :meth:`save` / :meth:`load`.
    """

    def __init__(self, index, ids, meta: IndexMeta, mean: np.ndarray | None):
        self.index = index
        self.ids = np.asarray(ids).astype(str)
        self.meta = meta
        self.mean = mean

    # -- building -----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        X: np.ndarray,
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
    ) -> "FeatureIndex":
        """Index ``X`` (raw features, one row per id) under the feature-set fingerprint ``key``."""
        if kind not in INDEX_KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or len(X) == 0:
            raise StoreError(f"feature set {key} has no rows to index")
        if len(ids) != len(X):
            raise ValueError("ids and features differ in length")
        n, dim = X.shape
        if kind == "auto":
            kind = "hnsw" if n > LARGE_COLLECTION else "flat"
        mean = X.mean(axis=0) if centre else None
        params = {}
        index = make_index(kind, dim, n, nlist=nlist, hnsw_m=hnsw_m, params=params)
        add_in_chunks(index, X, mean, seed=seed)
        set_search_params(index, kind, nprobe=nprobe, ef_search=ef_search, params=params)
        meta = IndexMeta(key=key, kind=kind, n=n, dim=dim, ids_sha256=ids_digest(ids),
                         centred=centre, params=params)
        out = cls(index, ids, meta, mean)
        if use_gpu is True or (use_gpu == "auto" and gpu_available() and kind != "hnsw"):
            out.to_gpu()
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

        Queries go in batches so the [batch, k] result is all that is held at once; missing
        neighbours (k larger than the collection) come back as row -1 with similarity -inf.
        ``advance(n)``, when given, is called with the number of queries of each batch done.
        """
        return search_index(self.index, self.prepare(X), int(min(k, self.meta.n)), batch, advance)

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
        """
        path = Path(path)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and gpu_available() and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        write_file(path, lambda tmp: faiss.write_index(index, str(tmp)))
        faults.point("index-save")
        sidecar = asdict(self.meta) | {
            "index_file": {"sha256": file_sha256(path), "size": path.stat().st_size},
            "ids": self.ids.tolist(),
            "mean": None if self.mean is None else self.mean.astype(float).tolist(),
        }
        write_text(index_sidecar(path), json.dumps(sidecar))
        return path

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> "FeatureIndex":
        """Read an index saved by :meth:`save`; with ``key``, refuse one of another feature set.

        Anything that is not an intact pair of index file and sidecar (missing, truncated, garbage,
        or from different builds) raises :class:`StoreError`, never another exception.
        """
        path = Path(path)
        if not path.exists() or not index_sidecar(path).exists():
            raise StoreError(f"no index at {path}; build one with embedstore query or embedstore match")
        side = _read_sidecar(path)
        ids, mean, recorded = side.pop("ids"), side.pop("mean"), side.pop("index_file")
        if recorded != {"sha256": file_sha256(path), "size": path.stat().st_size}:
            raise StoreError(f"index file {path} is not the one its sidecar was written for (damaged, or "
                             "another build); rebuild it (embedstore query ... --rebuild-index)")
        meta = IndexMeta(**side)
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError for any unreadable file
            raise StoreError(f"index file {path} cannot be read ({first_line(exc, 120)}); "
                             "rebuild it (embedstore query ... --rebuild-index)") from None
        if index.ntotal != meta.n or index.d != meta.dim or len(ids) != meta.n:
            raise StoreError(f"index file {path} does not hold the {meta.n} rows of width {meta.dim} its "
                             "sidecar describes; rebuild it (embedstore query ... --rebuild-index)")
        set_search_params(index, meta.kind, nprobe=meta.params.get("nprobe", 32),
                          ef_search=meta.params.get("ef_search", 128), params={})
        out = cls(index, ids, meta, None if mean is None else np.asarray(mean, dtype=np.float32))
        if key is not None:
            out.check(key)
        return out


def _read_sidecar(path: Path) -> dict:
    """The sidecar of index ``path`` as a dict with every field :meth:`FeatureIndex.save` writes; StoreError otherwise."""
    try:
        side = json.loads(index_sidecar(path).read_text())
        names = {f.name for f in fields(IndexMeta)} | {"ids", "mean", "index_file"}
        if (not isinstance(side, dict) or set(side) != names or not isinstance(side["params"], dict)
                or not isinstance(side["ids"], list)):
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


def search_index(index, Q: np.ndarray, k: int, batch: int = 8192, advance=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products and row numbers of the prepared (unit, float32) queries ``Q`` in a FAISS
    ``index``, in batches; missing neighbours come back as row -1 with similarity -inf.

    The one FAISS search of embedstore: :meth:`FeatureIndex.search` and the kNN head both go through it.
    """
    sims = np.empty((len(Q), k), dtype=np.float32)
    rows = np.empty((len(Q), k), dtype=np.int64)
    for start in range(0, len(Q), batch):
        s, r = index.search(Q[start:start + batch], k)
        sims[start:start + batch], rows[start:start + batch] = s, r
        if advance is not None:
            advance(len(s))
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


def make_index(kind: str, dim: int, n: int, nlist: int | None, hnsw_m: int, params: dict):
    """An empty inner-product index of the given kind."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        nlist = int(nlist or max(1, min(65536, round(4 * np.sqrt(n)))))
        nlist = min(nlist, n)
        params["nlist"] = nlist
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    params["hnsw_m"] = hnsw_m
    index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    return index


def add_in_chunks(index, X: np.ndarray, mean, seed: int, chunk: int = 65536) -> None:
    """Train (IVF) on a seeded sample and add normalised rows chunk by chunk (bounded memory)."""
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        n_train = min(len(X), max(256 * index.nlist, 39 * index.nlist))
        sample = np.sort(rng.choice(len(X), size=n_train, replace=False))
        index.cp.seed = seed
        index.train(normalise(X[sample], mean))
    for start in range(0, len(X), chunk):
        index.add(normalise(X[start:start + chunk], mean))


def set_search_params(index, kind: str, nprobe: int, ef_search: int, params: dict) -> None:
    if kind == "ivf":
        index.nprobe = min(nprobe, index.nlist)
        params["nprobe"] = index.nprobe
    elif kind == "hnsw":
        index.hnsw.efSearch = ef_search
        params["ef_search"] = ef_search
