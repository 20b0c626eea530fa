"""Rebuild the bundled demo sample (embedstore/data/sample) from the HAM10000 copy in ../shared.

    python tools/make_sample.py [--ham ../shared/data/ham10000]

200 images, seed 0: every image of 30 lesions photographed two or more times
(so the demo can match lesions), then single-image lesions drawn per class so
all seven diagnoses appear at least 12 times.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "embedstore" / "data" / "sample"
LICENSE = """# Demo sample: 200 HAM10000 images

A fixed sample of the HAM10000 data set (200x150 JPEG copies), chosen by `tools/make_sample.py` (seed 0):
all images of 30 lesions with two or more images, and single-image lesions so that every diagnosis occurs.
`sample.csv` is the official metadata of those images (lesion_id, image_id, dx, dx_type, age, sex, localization).

License: CC BY-NC 4.0 (non-commercial use, with attribution), as the original data set.
Cite: Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of multi-source
dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018).
"""


def select(meta: pd.DataFrame, n_lesions: int = 30, n_total: int = 200, min_per_class: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = meta.groupby("lesion_id").size()
    multi = sorted(counts[counts >= 2].index)
    chosen = set(rng.choice(multi, size=n_lesions, replace=False))
    picked = meta[meta.lesion_id.isin(chosen)]
    singles = meta[meta.lesion_id.map(counts) == 1]
    extra = []
    for dx, grp in singles.groupby("dx"):
        need = max(0, min_per_class - int((picked.dx == dx).sum()))
        extra.append(grp.sample(n=min(need, len(grp)), random_state=seed))
    picked = pd.concat([picked, *extra])
    rest = singles[~singles.image_id.isin(picked.image_id)]
    picked = pd.concat([picked, rest.sample(n=n_total - len(picked), random_state=seed)])
    return picked.sort_values(["lesion_id", "image_id"]).reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ham", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"))
    args = ap.parse_args()
    ham = Path(args.ham)
    sample = select(pd.read_csv(ham / "HAM10000_metadata.csv"))
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "images").mkdir(parents=True)
    for image_id in sample.image_id:
        shutil.copy(ham / "images" / f"{image_id}.jpg", OUT / "images" / f"{image_id}.jpg")
    sample.to_csv(OUT / "sample.csv", index=False)
    (OUT / "README.md").write_text(LICENSE)
    print(f"{len(sample)} images, {sample.lesion_id.nunique()} lesions; classes: {sample.dx.value_counts().to_dict()}")


if __name__ == "__main__":
    main()
