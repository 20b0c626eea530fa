"""Heads that travel (issue #15): a simulated second clinic made from HAM10000, through the CLI as a user runs it.

    python benchmarks/bench_transfer.py                      # make the two clinics, extract, probe across them
    python benchmarks/bench_transfer.py --parts probe        # the probes alone (the stores already extracted)

This is a simulation, not a cross-clinic result: both "clinics" are HAM10000 images; the second one's images are
degraded as another camera might render them. Real cross-clinic figures have to be measured on other clinics' sets.

- ``make``: HAM10000 split by lesion into two halves (a seeded permutation of the lesion ids; every image of a
  lesion on one side). Clinic A is the first half's original files. Clinic B is the second half, each image
  (200 x 150 RGB) changed in this order:
  1. a warm colour cast: red x 1.08, green x 0.97, blue x 0.85 (clipped to 0..255);
  2. a vignette: each pixel x (1 - 0.4 r^2), r its distance from the centre over the centre-to-corner distance;
  3. a lower resolution: resized to 100 x 75 (PIL bicubic) and saved as JPEG quality 70.
  Clinic B's table has a ``split`` column: 30% of its lesions ``valid``, the rest ``test`` (seeded, by lesion).
- ``extract``: ``embedstore extract`` of both clinics with MobileNetV2 (offline ImageNet weights) in four
  preprocessings: ``center`` at crop_pct 0.875 (the default), and ``center``, ``squash``, ``border`` at crop_pct 1.0
  (the whole shorter side / the whole image).
- ``probe``: for each preprocessing and each normalisation (``train``: standardised by clinic A's training rows;
  ``per-store``: each clinic re-centred and re-scaled on its own feature statistics), a melanoma-vs-rest logistic probe
  fitted on clinic A (5 lesion-grouped folds, the head's defaults: C = 1, standardised) and scored on clinic B's test rows with
  ``--test-store``: ROC AUC with a 95% CI (1,000 lesion-grouped bootstrap resamples), beside clinic A's own
  out-of-fold AUC. Then, for the default and the squash preprocessing, the same with C tuned (20 trials, nested),
  the final C chosen either on clinic A's folds or on clinic B's ``valid`` rows (``--select-on-store``), never on B's test rows.

Figures go to stdout and ``benchmarks/out/transfer/results.json``; BENCHMARKS.md holds the command and figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, ROOT  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "transfer"
EMBEDSTORE = str(Path(sys.executable).with_name("embedstore"))
STORE_A, STORE_B = OUT / "clinic_a.zarr", OUT / "clinic_b.zarr"
#: name of the feature set -> the extract options that make it
PREPROCESSINGS = {
    "mobilenet_v2": [],
    "mobilenet_v2-crop100": ["--crop-pct", "1.0"],
    "mobilenet_v2-crop100-squash": ["--crop-pct", "1.0", "--crop-mode", "squash"],
    "mobilenet_v2-crop100-border": ["--crop-pct", "1.0", "--crop-mode", "border"],
}
NORMALISATIONS = ("train", "per-store")
CAST = np.array([1.08, 0.97, 0.85])


def run(*args: str) -> tuple[float, str]:
    """``embedstore ARGS``: seconds and what it printed; exits on a failure."""
    t0 = time.perf_counter()
    done = subprocess.run([EMBEDSTORE, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"embedstore {' '.join(args)} failed:\n{done.stderr}")
    return time.perf_counter() - t0, done.stdout.strip()


def degrade(image: Image.Image) -> Image.Image:
    """Clinic B's camera: the colour cast, the vignette, then half the resolution (saved as JPEG by the caller)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float64) * CAST
    h, w = x.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2)
    x *= (1 - 0.4 * r2)[..., None]
    out = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return out.resize((w // 2, h // 2), Image.Resampling.BICUBIC)


def part_make(seed: int = 0) -> None:
    meta = pd.read_csv(HAM / "HAM10000_metadata.csv")
    lesions = np.random.default_rng(seed).permutation(sorted(meta["lesion_id"].unique()))
    half = set(lesions[: len(lesions) // 2])
    a, b = meta[meta["lesion_id"].isin(half)].copy(), meta[~meta["lesion_id"].isin(half)].copy()
    b_lesions = sorted(b["lesion_id"].unique())
    valid = set(np.random.default_rng(seed + 1).permutation(b_lesions)[: int(0.3 * len(b_lesions))])
    b["split"] = np.where(b["lesion_id"].isin(valid), "valid", "test")
    (OUT / "clinic_b" / "images").mkdir(parents=True, exist_ok=True)
    a.to_csv(OUT / "clinic_a.csv", index=False)
    b.to_csv(OUT / "clinic_b" / "clinic_b.csv", index=False)
    for k, image_id in enumerate(b["image_id"]):
        target = OUT / "clinic_b" / "images" / f"{image_id}.jpg"
        if not target.exists():  # written aside and renamed, so a killed run leaves no half-written image
            with Image.open(HAM / "images" / f"{image_id}.jpg") as image:
                degrade(image).save(target.with_suffix(".part"), format="JPEG", quality=70)
            target.with_suffix(".part").rename(target)
        if k % 1000 == 0:
            print(f"clinic B: {k}/{len(b)} images written", flush=True)
    print(f"clinic A: {len(a)} images of {a['lesion_id'].nunique()} lesions ({int((a['dx'] == 'mel').sum())} mel); "
          f"clinic B: {len(b)} of {b['lesion_id'].nunique()} ({int((b['dx'] == 'mel').sum())} mel), "
          f"{int((b['split'] == 'valid').sum())} valid / {int((b['split'] == 'test').sum())} test rows", flush=True)


def part_extract() -> dict:
    results = {}
    for name, options in PREPROCESSINGS.items():
        for store, source in ((STORE_A, [str(OUT / "clinic_a.csv"), "--images", str(HAM / "images")]),
                              (STORE_B, [str(OUT / "clinic_b" / "clinic_b.csv"), "--images", str(OUT / "clinic_b" / "images")])):
            seconds, summary = run("extract", *source, "--id-col", "image_id", "-s", str(store), "-q", *options)
            results[f"{store.stem}:{name}"] = round(seconds, 1)
            print(f"extract {store.stem} {name}: {seconds:.1f} s; {summary.splitlines()[0]}", flush=True)
    return results


def probe(name: str, normalisation: str, *extra: str) -> dict:
    out = OUT / "runs" / "-".join([name, normalisation, *[e.strip("-") for e in extra if e.startswith("--")]])
    args = [str(STORE_A), "-f", name, "-t", "dx", "--positive", "mel", "-g", "lesion_id", "--normalize",
            normalisation, "--test-store", str(STORE_B), "--test-split-column", "split", "--test-split", "test",
            "-o", str(out), "--overwrite", "-q", "--no-report", *extra]
    seconds, summary = run("probe", *args)
    metrics = json.loads((out / "metrics.json").read_text())
    folds = pd.read_csv(out / "folds.csv")
    auc = metrics["metrics"]["roc_auc"]
    row = {"features": name, "normalize": normalisation, "options": " ".join(extra), "seconds": round(seconds, 1),
           "test_auc": auc["value"], "ci": [auc["ci_low"], auc["ci_high"]], "n_test": metrics["n"],
           "clinic_a_fold_auc_mean": round(float(folds["roc_auc"].mean()), 4)}
    print(f"{name:30s} {normalisation:9s} {' '.join(extra):45s} B test AUC {auc['value']:.3f} "
          f"[{auc['ci_low']:.3f}, {auc['ci_high']:.3f}] (A folds {row['clinic_a_fold_auc_mean']:.3f}) {seconds:.0f} s",
          flush=True)
    return row


def part_probe() -> list[dict]:
    rows = [probe(name, norm) for name in PREPROCESSINGS for norm in NORMALISATIONS]
    for name in ("mobilenet_v2", "mobilenet_v2-crop100-squash"):
        for norm in NORMALISATIONS:
            rows.append(probe(name, norm, "--trials", "20"))
            rows.append(probe(name, norm, "--trials", "20", "--select-on-store", str(STORE_B)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="make,extract,probe")
    parts = parser.parse_args().parts.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if "make" in parts:
        part_make()
    if "extract" in parts:
        results["extract_seconds"] = part_extract()
    if "probe" in parts:
        results["probes"] = part_probe()
    results_file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
