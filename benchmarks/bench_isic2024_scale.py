"""ISIC 2024 scale on one machine (issue #12): the CLI, as a user runs it, on the ISIC-2024-like data set.

    python benchmarks/make_isic2024_like.py                       # once: 401,059 rows (about 11 min, 1.6 GB)
    python benchmarks/bench_isic2024_scale.py --steps extract     # HAM 128 px, 40,000 rows, 401,059 rows, rerun, ls
    python benchmarks/bench_isic2024_scale.py --steps recipe,report,query,knn

Every step is one ``embedstore`` command run in a child process; the benchmark records its wall time and the peak
memory of its whole process tree (the command and its decoding workers: PSS summed, which counts a shared page
once, and RSS summed beside it; sampled every 0.2 s from ``/proc``), and prints one line per step. Steps:

- ``extract``: MobileNetV2 at ``--image-size 128`` (fair at ISIC 2024's ~133 px crops): first the 10,015 HAM10000
  JPEGs at the same input size (the rate to compare with), then the first 40,000 rows of the ISIC-2024-like set
  into their own store, then all 401,059 rows, then a rerun over the unchanged 401,059 (nothing to extract), then
  ``ls`` of the large store;
- ``memory``: the peak memory of extracting 40,000 and 401,059 rows, each run stopped 60 s into its encoding loop;
- ``recipe``: ``embedstore probe --config configs/isic2024_pauc.yaml`` (5 patient-grouped folds; logistic and
  LightGBM-with-metadata bases tuned in nested studies, stacked; pAUC above 80% TPR with CIs) on the
  MobileNetV2 feature set, with a fresh study; its peak memory is compared with the float32 feature matrix;
- ``report``: ``embedstore report`` of that run;
- ``query``: ``embedstore query`` of one new image file (a JPEG of the set, written out) and one stored id,
  first building and saving the index of all rows (``auto``: HNSW above 200,000 rows), then with the saved one;
- ``knn``: the kNN graph (k=10) of all rows as ``match`` computes it (centred, L2-normalised features, its default
  index, HNSW above 200,000 rows, ``embedstore.match.pairs.knn_graph``), in a child process.

The data set is a simulation for cost and memory (see make_isic2024_like.py): no figure of accuracy measured on
it means anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, ROOT  # noqa: E402

DATA = ROOT / "benchmarks" / "out" / "isic2024_like"
OUT = ROOT / "benchmarks" / "out" / "isic2024_scale"
EXTRACTED = ROOT / "stores" / "isic2024_like.zarr"  # what the extract step writes
STORE = EXTRACTED  # what the other steps read (--store)
EXTRACT = ["--image-size", "128", "--encoder", "mobilenet_v2"]


def _tree_memory(root: int) -> tuple[int, int]:
    """Resident and proportional-set bytes (RSS, PSS) of process ``root`` and all its descendants, from /proc.

    The PSS sum is the tree's real footprint: a page that a forked worker shares with its parent counts once,
    split between them, where the RSS sum counts it in both."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    rss = pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        except OSError:
            continue
        rss += int(fields["Rss"].split()[0]) * 1024
        pss += int(fields["Pss"].split()[0]) * 1024
    return rss, pss


def run(title: str, args: list[str], rows: int | None = None, argv: list[str] | None = None,
        stop_after: float | None = None) -> tuple[float, int]:
    """Run ``embedstore ARGS`` (or ``argv``); print its wall time, rate and peak tree memory (PSS, and RSS
    beside it); return the seconds and the peak PSS bytes.

    ``stop_after``: stop the command that many seconds after its log first shows the encoding loop (for the
    peak memory of an extraction, reached once the manifest is prepared and the workers run)."""
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"{title.replace(' ', '_')}.log"
    peak = [0, 0]
    with open(log, "w") as stream:
        t0 = time.perf_counter()
        argv = argv or [sys.executable, "-m", "embedstore", *args]
        child = subprocess.Popen(argv, stdout=stream, stderr=stream, cwd=ROOT, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                rss, pss = _tree_memory(child.pid)
                peak[:] = max(peak[0], pss), max(peak[1], rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if stop_after is not None:
            while child.poll() is None and "extracting" not in log.read_text():
                time.sleep(1)
            time.sleep(stop_after)
            os.killpg(child.pid, signal.SIGTERM)
        code = child.wait()
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    shown = " ".join(args) if args else " ".join(argv[1:])[:120]
    if code != 0 and stop_after is None:
        sys.exit(f"{title}: {shown} exited {code}; see {log}")
    rate = f", {rows / seconds:.1f} rows/s" if rows else ""
    print(f"{title}: {seconds:.1f} s{rate}, peak memory {peak[0] / 2**20:.0f} MiB PSS ({peak[1] / 2**20:.0f} MiB RSS)"
          f"  ({shown})", flush=True)
    return seconds, peak[0]


def _inputs() -> tuple[Path, Path, Path]:
    """The data set's HDF5 file, its metadata CSV and a CSV of its first 40,000 rows (written here)."""
    hdf5, metadata = DATA / "train-image.hdf5", DATA / "train-metadata.csv"
    if not hdf5.exists():
        sys.exit(f"no {hdf5}: run python benchmarks/make_isic2024_like.py first")
    first = OUT / "train-metadata-40000.csv"
    OUT.mkdir(parents=True, exist_ok=True)
    pd.read_csv(metadata, nrows=40_000, low_memory=False).to_csv(first, index=False)
    return hdf5, metadata, first


def step_memory() -> None:
    """Peak memory of extracting the first 40,000 rows and all 401,059 into new stores, each stopped 60 s into
    its encoding loop (a full 401,059-row extraction takes 45 minutes here)."""
    hdf5, metadata, first = _inputs()
    scratch = OUT / "stores"
    for title, csv in (("memory, 40,000 rows", first), ("memory, 401,059 rows", metadata)):
        shutil.rmtree(scratch, ignore_errors=True)
        run(title, ["extract", str(hdf5), "--metadata", str(csv), "--store", str(scratch / "memory.zarr"), *EXTRACT],
            stop_after=60)
    shutil.rmtree(scratch, ignore_errors=True)


def step_extract() -> None:
    """Extraction into this benchmark's own store (``EXTRACTED``, replaced; never ``--store``)."""
    hdf5, metadata, first = _inputs()
    table = pd.read_csv(metadata, usecols=["isic_id"])
    scratch = OUT / "stores"
    shutil.rmtree(scratch, ignore_errors=True)
    run("HAM10000 at 128 px", ["extract", str(HAM / "HAM10000_metadata.csv"), "--images", str(HAM / "images"),
                               "--store", str(scratch / "ham128.zarr"), *EXTRACT], 10_015)
    run("ISIC-2024-like 40,000 rows", ["extract", str(hdf5), "--metadata", str(first),
                                       "--store", str(scratch / "isic40k.zarr"), *EXTRACT], 40_000)
    shutil.rmtree(EXTRACTED, ignore_errors=True)
    first_run, _ = run("ISIC-2024-like 401,059 rows", ["extract", str(hdf5), "--metadata", str(metadata),
                                                    "--store", str(EXTRACTED), *EXTRACT], len(table))
    rerun, _ = run("rerun over unchanged images", ["extract", str(hdf5), "--metadata", str(metadata),
                                                "--store", str(EXTRACTED), *EXTRACT])
    print(f"  rerun / first run: {rerun / first_run:.2%}")
    run("ls", ["ls", str(EXTRACTED)])
    shutil.rmtree(scratch, ignore_errors=True)


FEATURES = "mobilenet_v2-128px"
RUN = OUT / "runs" / "isic2024_pauc"


def step_recipe() -> None:
    from embedstore.store import FeatureStore

    store = FeatureStore.open(STORE)
    info = next(i for i in store.feature_sets() if i.name == FEATURES)
    matrix = store.manifest.shape[0] * info.dim * 4
    storage = OUT / "pauc.optuna.db"
    storage.unlink(missing_ok=True)  # a fresh study: the tuning is timed, not reused
    _, peak = run("pAUC recipe", ["probe", str(STORE), "--config", "configs/isic2024_pauc.yaml", "--features", FEATURES,
                                  "--storage", f"sqlite:///{storage}", "--out", str(RUN), "--overwrite"])
    print(f"  peak / float32 feature matrix ({matrix / 2**20:.0f} MiB): {peak / matrix:.2f}x")


def step_report() -> None:
    run("report", ["report", str(RUN)])


def step_query() -> None:
    import h5py

    table = pd.read_csv(DATA / "train-metadata.csv", usecols=["isic_id"], nrows=2)
    image = OUT / "query.jpg"
    with h5py.File(DATA / "train-image.hdf5", "r") as f:
        image.write_bytes(f[table["isic_id"][0]][()])
    query = ["query", str(STORE), str(image), table["isic_id"][1], "--features", FEATURES]
    run("query, building and saving the index", [*query, "--rebuild-index"])
    run("query, with the saved index", query)


KNN = """
import sys, time
from embedstore.match.index import FeatureIndex, normalise
from embedstore.match.pairs import knn_graph
from embedstore.store import FeatureStore
X, table = FeatureStore.open(sys.argv[1]).load(sys.argv[2])
t0 = time.perf_counter()
Z = normalise(X, X.mean(axis=0))
del X
index = FeatureIndex.build(Z, table["id"].to_numpy(), key="transient", kind="auto")
t1 = time.perf_counter()
sims, rows = knn_graph(index, Z, 10)
t2 = time.perf_counter()
print(f"{len(Z)} rows: index built in {t1 - t0:.1f} s ({index.meta.params}), graph {rows.shape} in {t2 - t1:.1f} s")
"""


def step_knn() -> None:
    run("kNN graph (k=10) of all rows", [], argv=[sys.executable, "-c", KNN, str(STORE), FEATURES])
    print("  " + (OUT / "kNN_graph_(k=10)_of_all_rows.log").read_text().strip().splitlines()[-1])


STEPS = {"extract": step_extract, "memory": step_memory, "recipe": step_recipe, "report": step_report, "query": step_query, "knn": step_knn}


def main() -> None:
    global STORE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--store", type=Path, default=EXTRACTED,
                        help="the store the recipe, report, query and knn steps read (extract writes the default)")
    args = parser.parse_args()
    STORE = args.store
    for name in args.steps.split(","):
        STEPS[name]()


if __name__ == "__main__":
    main()
