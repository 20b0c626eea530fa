"""The leakage audit (issue #14) on the full HAM10000 store, through the CLI as a user runs it.

    python benchmarks/bench_audit.py                    # audits, then the reruns with --merge-near-duplicates
    python benchmarks/bench_audit.py --parts audit      # the audits alone (under a minute each)

- ``audit``: ``embedstore audit stores/ham10000.zarr -f SET -g lesion_id -t dx`` (the 5 lesion-grouped folds a probe
  of dx makes with seed 0; the threshold calibrated at 99% precision) for each feature set of ``--sets``, timed
  end to end (process start, store read, kNN graph, report); its counts. The first set's audit is written to
  its default folder beside the store, where probe finds it, and once more at ``--loose`` precision into
  ``benchmarks/out/audit/``.
- ``merge``: the HAM10000 7-class four-view stack (benchmarks/bench_heads.py) and the melanoma recipe
  (configs/ham10000_melanoma_pauc.yaml) each run three times in one go: as they are, with
  ``--merge-near-duplicates`` of the calibrated audit, and of the loose one; their figures side by side.

Figures go to stdout and ``benchmarks/out/audit/results.json``; BENCHMARKS.md holds the commands and figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM_STORE, ROOT, ham_store  # noqa: E402

from bench_heads import STACK, STACK_FEATURES  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "audit"
EMBEDSTORE = str(Path(sys.executable).with_name("embedstore"))


def run(*args: str) -> tuple[float, str]:
    """``embedstore ARGS``: seconds and the summary it printed; exits on a failure."""
    t0 = time.perf_counter()
    done = subprocess.run([EMBEDSTORE, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"embedstore {' '.join(args)} failed:\n{done.stderr}")
    return seconds, done.stdout.strip()


def part_audit(sets: list[str], loose: float) -> dict:
    results = {}
    for k, name in enumerate(sets):
        args = [str(HAM_STORE), "-f", name, "-g", "lesion_id", "-t", "dx", "-q", "--overwrite"]
        seconds, summary = run("audit", *args)
        folder = HAM_STORE.parent / f"{HAM_STORE.name}.audit" / name
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        threshold = json.loads((folder / "run.json").read_text())["threshold"]
        results[name] = {"seconds": round(seconds, 1), "threshold": threshold, "folder": str(folder),
                         **{k: v["value"] for k, v in metrics.items()}}
        print(f"audit {name}: {seconds:.1f} s; {summary}", flush=True)
        if k == 0:
            loose_folder = OUT / f"{name}-precision{loose}"
            seconds, summary = run("audit", *args, "--precision", str(loose), "-o", str(loose_folder))
            metrics = json.loads((loose_folder / "metrics.json").read_text())["metrics"]
            results[f"{name}@{loose}"] = {"seconds": round(seconds, 1), "folder": str(loose_folder),
                                          "threshold": json.loads((loose_folder / "run.json").read_text())["threshold"],
                                          **{k: v["value"] for k, v in metrics.items()}}
            print(f"audit {name} at precision {loose}: {seconds:.1f} s; {summary}", flush=True)
    return results


def probe_args(kind: str) -> list[str]:
    if kind == "melanoma":
        return ["-c", str(ROOT / "configs" / "ham10000_melanoma_pauc.yaml"), str(HAM_STORE)]
    recipe = OUT / "stack_7class.json"  # the four-view 7-class stack of bench_heads.py, as a recipe file
    recipe.write_text(json.dumps({"store": str(HAM_STORE), "features": ["+".join(STACK_FEATURES)], "target": "dx",
                                  "groups": "lesion_id", "folds": 5, "seed": 0, "n_boot": 1000, **STACK}))
    return ["-c", str(recipe)]


def part_merge(audits: dict) -> dict:
    results = {}
    for kind in ("stack_7class", "melanoma"):
        for label, audit in (("as is", None), *audits.items()):
            out = OUT / "runs" / f"{kind}-{label.replace(' ', '_')}"
            extra = ["--merge-near-duplicates", audit] if audit else []
            seconds, summary = run("probe", *probe_args(kind.split("_")[0]), *extra, "-o", str(out), "--overwrite",
                                   "--no-report", "-q")
            metrics = json.loads((out / "metrics.json").read_text())
            record = json.loads((out / "run.json").read_text())
            results[f"{kind} {label}"] = {"seconds": round(seconds, 1), "metrics": metrics["metrics"],
                                          "merged": record.get("merged_groups"), "leakage": record.get("leakage")}
            print(f"{kind} ({label}): {seconds:.0f} s; {summary}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="audit,merge")
    parser.add_argument("--sets", default="efficientnet_lite0-stages,mobilenet_v2,efficientnet_lite0,mobilenet_v2-stages")
    parser.add_argument("--loose", type=float, default=0.9, help="the looser precision of the second audit")
    args = parser.parse_args()
    parts, sets = args.parts.split(","), args.sets.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    ham_store(encoders=[*dict.fromkeys(["mobilenet_v2", *sets, *STACK_FEATURES])])
    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if "audit" in parts:
        results["audit"] = part_audit(sets, args.loose)
    if "merge" in parts:
        audit = results["audit"]
        first = sets[0]
        results["merge"] = part_merge({f"merged ({first}, 99%)": audit[first]["folder"],
                                       f"merged ({first}, {args.loose:.0%})": audit[f"{first}@{args.loose}"]["folder"]})
    results_file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
