"""Extraction on Ray against the single-process engine (issue #13): the overhead of Ray on this machine.

    python benchmarks/bench_ray_extract.py [--limit 2000] [--workers 1,2,4] [--rounds 2]

On the first ``--limit`` real HAM10000 images with the offline MobileNetV2, each round extracts into a new store:
once with the single-process engine (its defaults: the model on every core, decoding in worker processes), then
on a local Ray instance (started once, before the rounds; its start is timed apart) with 1, 2 and 4 workers (each
worker decodes its own blocks and gets an equal share of the cores: 2, 1 and 1/2 CPU, as torch threads 2, 1, 1),
and with 2 workers that each decode in a process of their own (``num_workers=1``), to choose where decoding goes.
Rounds alternate the engines, so drift of this shared machine falls on all of them; the figure of each engine is
its median over the rounds. Wall time counts from the call to the store being final, hashing included.

On this machine's 2 cores more workers cannot go faster than one process using both cores: the figures say what
Ray costs (scheduling, the object store, a model per worker), not what more machines would give. Figures go to
stdout and ``benchmarks/out/ray_extract/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, ROOT  # noqa: E402

from embedstore import extract, open_source  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "ray_extract"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import pandas as pd

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    csv = tmp / "images.csv"
    pd.read_csv(HAM / "HAM10000_metadata.csv").head(args.limit).to_csv(csv, index=False)
    source = open_source(csv, images=HAM / "images", id_col="image_id")
    cpus = os.cpu_count()

    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start_s = time.perf_counter() - t
    print(f"local Ray instance with {cpus} CPUs started in {start_s:.1f} s")

    engines = {"single process": {}} | {f"ray, {w} worker(s)": {"ray": "local", "ray_workers": int(w)}
                                        for w in args.workers.split(",")}
    engines["ray, 2 workers, 1 decoder each"] = {"ray": "local", "ray_workers": 2, "num_workers": 1}
    walls = {name: [] for name in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            store = tmp / "store.zarr"
            t = time.perf_counter()
            result = extract(source, "mobilenet_v2", store, progress=False, **engines[name])
            wall = time.perf_counter() - t
            assert result.n_written == args.limit, result.summary()
            walls[name].append(wall)
            print(f"round {r + 1}: {name}: {wall:.1f} s, {args.limit / wall:.1f} images/s", flush=True)
            shutil.rmtree(store)
    ray.shutdown()
    shutil.rmtree(tmp)

    base = statistics.median(walls["single process"])
    rows = {name: {"wall_s": [round(w, 2) for w in ws], "median_s": round(statistics.median(ws), 2),
                   "images_per_s": round(args.limit / statistics.median(ws), 1),
                   "vs_single_process": round(statistics.median(ws) / base, 3)} for name, ws in walls.items()}
    print(f"\n{'engine':<32} {'median s':>9} {'images/s':>9} {'x single':>9}")
    for name, row in rows.items():
        print(f"{name:<32} {row['median_s']:>9.1f} {row['images_per_s']:>9.1f} {row['vs_single_process']:>9.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"images": args.limit, "cpus": cpus, "rounds": args.rounds,
                                                  "ray_start_s": round(start_s, 2), "engines": rows}, indent=2))


if __name__ == "__main__":
    main()
