"""What the reliability guarantees cost: extraction, rerun and load against the code before them, in one run.

    python benchmarks/bench_reliability.py [--limit 2000] [--baseline 6fc2910] [--rounds 2]

The baseline is embedstore as it was before checksummed chunks, the per-image stat check and the other
guarantees of docs/RELIABILITY.md (commit ``--baseline``, checked out into a temporary git worktree). Each
round extracts the same real HAM10000 images with the offline MobileNetV2 (batch 8, 1 decoding worker, the CPU
defaults) into a fresh store with the baseline and then with this tree, each in a fresh process, then reruns
both over the unchanged images and loads their features. Rounds alternate, so a machine that gets busier or
quieter in between affects both sides alike; the ratios are of the summed times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, ROOT  # noqa: E402

# Run in a child process: import embedstore from CODE (a source tree), never from the editable install.
CHILD = r"""
import json, sys, time
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path.insert(0, CODE)
import embedstore
assert embedstore.__file__.startswith(CODE), embedstore.__file__
from embedstore import FeatureStore, extract, open_source
source = open_source(CSV, images=IMAGES, id_col="image_id")
times = {}
for step in ("first", "rerun"):
    t0 = time.perf_counter()
    result = extract(source, "mobilenet_v2", STORE, batch_size=8, num_workers=1, progress=False)
    times[step] = time.perf_counter() - t0
    times[step + "_written"] = result.n_written
t0 = time.perf_counter()
X, _ = FeatureStore.open(STORE).load("mobilenet_v2")
times["load"] = time.perf_counter() - t0
times["rows"] = len(X)
print(json.dumps(times))
"""


def run_child(code: Path, csv: Path, store: Path) -> dict:
    prelude = f"CODE={str(code)!r}; CSV={str(csv)!r}; IMAGES={str(HAM / 'images')!r}; STORE={str(store)!r}\n"
    out = subprocess.run([sys.executable, "-c", prelude + CHILD], capture_output=True, text=True, cwd=code)
    if out.returncode:
        raise SystemExit(f"extraction with {code} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=2000, help="the first N HAM10000 images (default 2000)")
    ap.add_argument("--baseline", default="6fc2910", help="git revision before the reliability work")
    ap.add_argument("--rounds", type=int, default=2, help="alternating baseline/new rounds")
    args = ap.parse_args()

    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="bench_reliability_"))
    csv = work / "meta.csv"
    pd.read_csv(HAM / "HAM10000_metadata.csv").head(args.limit).to_csv(csv, index=False)
    baseline = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        runs = {"baseline": [], "new": []}
        for r in range(args.rounds):
            for side, code in (("baseline", baseline), ("new", ROOT)):
                times = run_child(code, csv, work / f"{side}-{r}.zarr")
                runs[side].append(times)
                print(f"round {r} {side:8s}: first {times['first']:7.1f} s ({times['first_written']} written), "
                      f"rerun {times['rerun']:6.2f} s, load {times['load']:5.2f} s ({times['rows']} rows)", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)

    total = {side: {k: sum(t[k] for t in ts) for k in ("first", "rerun", "load")} for side, ts in runs.items()}
    b, n = total["baseline"], total["new"]
    print(f"\n{args.limit} images, {args.rounds} rounds, sums of wall seconds:")
    print(f"  first extraction: baseline {b['first']:.1f} s, new {n['first']:.1f} s, "
          f"ratio {n['first'] / b['first']:.3f} (target <= 1.03)")
    print(f"  rerun over unchanged images: new {100 * n['rerun'] / n['first']:.2f}% of its first run "
          f"(target < 3%); baseline {100 * b['rerun'] / b['first']:.2f}%")
    print(f"  load of all features (with the freshness check): baseline {b['load']:.2f} s, new {n['load']:.2f} s")


if __name__ == "__main__":
    main()
