"""Write an ISIC-2024-like data set made from the HAM10000 images: a simulation for cost and memory, not for accuracy.

    python benchmarks/make_isic2024_like.py [--out benchmarks/out/isic2024_like] [--n 401059] [--patients 1042]
        [--positive-rate 0.00098] [--seed 0] [--size 133] [--quality 85] [--workers 2] [--block 256] [--overwrite]
    embedstore extract benchmarks/out/isic2024_like/train-image.hdf5 \\
        --metadata benchmarks/out/isic2024_like/train-metadata.csv --image-size 128 --store stores/isic2024_like.zarr

ISIC 2024 (SLICE-3D) has 401,059 crops of about 133 px from 3D total-body photos of 1,042 patients, 393 of them
malignant, JPEG bytes in one HDF5 file and about 45 metadata columns per image; it is not available here. This
script writes a data set of the same shape and layout, so that extraction, the pAUC recipe, the kNN graph, ``ls``
and the report can be measured at that size on one machine. Its images are HAM10000 dermoscopy re-cut ~40 times
each and its metadata is drawn from plausible distributions: figures of accuracy measured on it mean nothing.

Layout written to ``--out`` (that of the challenge's train files; ``../shared/data/isic2024-format`` has a sample):

* ``train-image.hdf5``: one scalar dataset per ``isic_id`` holding the JPEG file's bytes (``|S<n>``, contiguous);
* ``train-metadata.csv``: ``isic_id``, ``target`` (1 = malignant), then the columns of the challenge's metadata;
* ``simulation-sources.csv`` (not in the challenge): ``isic_id, ham_image_id``, the HAM10000 image each row was
  cut from, and ``simulation.json``: the arguments that rebuild the data set.

Rows:

* each image is a random square crop (45-70% of the HAM image's shorter side, near its centre, where HAM's
  lesions are), rotated by any angle, flipped at random, colour-jittered (brightness, contrast, saturation
  +-20%, hue +-18 degrees) and re-encoded as a JPEG of ``--size`` px +-10%;
* ``round(n * positive_rate)`` rows are positive (``target`` 1), cut from melanoma (``dx == mel``) images; the
  others from the other images;
* every HAM10000 lesion belongs to one patient (its images appear under no other patient while there are at
  least as many lesions as patients), so patient-grouped folds do not leak an image across folds; melanoma
  lesions go to the first patients in a random order and only they have positives; patients' sizes are
  lognormal (a few with thousands of rows, as in ISIC 2024);
* age, sex, institution, licence and tile type are constant per patient; the anatomical site, lesion size and
  shape, CIELAB colours inside and outside the lesion and body coordinates are drawn per row, consistent with
  each other (C and H from A and B, deltas from the inside and outside values, coordinates from the site), with
  positives larger, darker and less nevus-like.

The output is the same for a ``--seed`` whatever ``--workers`` and ``--block``: every row draws from its own
random stream (``[seed, stream, row]``). Rows are made in blocks by a process pool and written by this process in
order, so memory stays flat in ``--n``. The data set is built in a hidden folder beside ``--out`` and takes its
name only when complete (a killed run leaves no half-written data set); an existing ``--out`` is replaced only
with ``--overwrite`` and only if this script wrote it. It is not resumable: a killed run starts again.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM  # noqa: E402

from embedstore.atomic import check_replaceable, replacing_folder  # noqa: E402
from embedstore.errors import ConfigError, EmbedstoreError  # noqa: E402
from embedstore.progress import progress_bar  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "isic2024_like"
IMAGES, METADATA = "train-image.hdf5", "train-metadata.csv"  # the challenge's names
SOURCES, SETTINGS = "simulation-sources.csv", "simulation.json"  # this simulation's own
FIRST_ID = 2_000_000  # isic ids ISIC_2000000, ISIC_2000001, ...: apart from HAM10000's own ISIC_00xxxxx names
PLAN_STREAM, IMAGE_STREAM, METADATA_STREAM = 0, 1, 2

# The metadata columns of ISIC 2024, in the challenge's order (isic2024-format/test-metadata.csv), target second
# as in its train-metadata.csv.
COLUMNS = (
    "isic_id", "target", "patient_id", "age_approx", "sex", "anatom_site_general", "clin_size_long_diam_mm",
    "image_type", "tbp_tile_type", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C", "tbp_lv_Cext",
    "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L", "tbp_lv_Lext", "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio",
    "tbp_lv_color_std_mean", "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB",
    "tbp_lv_deltaLBnorm", "tbp_lv_eccentricity", "tbp_lv_location", "tbp_lv_location_simple", "tbp_lv_minorAxisMM",
    "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_perimeterMM",
    "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt", "tbp_lv_symm_2axis", "tbp_lv_symm_2axis_angle",
    "tbp_lv_x", "tbp_lv_y", "tbp_lv_z", "attribution", "copyright_license",
)

# Sites with ISIC 2024's shares (None: a missing site), each with its tbp_lv_location_simple, its finer
# tbp_lv_location values ({side} is Left or Right) and the range of the body's height coordinate tbp_lv_y (mm).
SITES = {
    "posterior torso": (0.304, "Torso Back", ("Torso Back Top Third", "Torso Back Middle Third",
                                              "Torso Back Bottom Third"), (950, 1500)),
    "lower extremity": (0.257, "{side} Leg", ("{side} Leg - Upper", "{side} Leg - Lower"), (60, 950)),
    "anterior torso": (0.219, "Torso Front", ("Torso Front Top Half", "Torso Front Bottom Half"), (950, 1450)),
    "upper extremity": (0.176, "{side} Arm", ("{side} Arm - Upper", "{side} Arm - Lower"), (800, 1450)),
    "head/neck": (0.030, "Head & Neck", ("Head & Neck",), (1450, 1800)),
    None: (0.014, "Unknown", ("Unknown",), (-50, 1800)),
}
ATTRIBUTIONS = (
    "Memorial Sloan Kettering Cancer Center",
    "Frazer Institute, The University of Queensland, Dermatology Research Centre",
    "FNQH Cairns",
    "Department of Dermatology, Hospital Clínic de Barcelona",
    "University Hospital of Basel",
    "ACEMID MIA",
    "Department of Dermatology, University of Athens, Andreas Syggros Hospital of Skin and Venereal Diseases, "
    "Alexandra Tsirigoti",
)
LICENSES = ("CC-BY", "CC-BY-NC", "CC0")


def isic_id(row: int) -> str:
    return f"ISIC_{FIRST_ID + row:07d}"


# ---------------------------------------------------------------- the plan: patients, targets and source images


@dataclass(frozen=True)
class Plan:
    """What every row is made of, decided once from the seed: small (a few ints per row), so it is held whole."""

    patients: pd.DataFrame  # one row per patient: patient_id and the columns constant per patient
    patient: np.ndarray  # [n] index into patients
    target: np.ndarray  # [n] 0/1
    source: np.ndarray  # [n] index into the HAM10000 table


def make_plan(ham: pd.DataFrame, n: int, n_patients: int, positive_rate: float, seed: int) -> Plan:
    """Patients and their sizes, each HAM lesion's patient, the positive rows and every row's source image.

    ``ham`` is HAM10000_metadata.csv as read (its index numbers the images).
    """
    rng = np.random.default_rng([seed, PLAN_STREAM])
    patients = _patients(rng, n_patients)
    weights = rng.lognormal(0.0, 1.3, n_patients)
    sizes = 1 + rng.multinomial(n - n_patients, weights / weights.sum())
    patient = rng.permutation(np.repeat(np.arange(n_patients), sizes))

    mel = (ham["dx"] == "mel").to_numpy()
    mel_pools = _lesion_pools(ham[mel], n_patients, rng, wrap=False)
    other_pools = _lesion_pools(ham[~mel], n_patients, rng, wrap=True)
    eligible = np.flatnonzero(np.isin(patient, [p for p, pool in enumerate(mel_pools) if len(pool)]))
    n_positive = round(n * positive_rate)
    if n_positive > len(eligible):
        raise ConfigError(f"{n_positive} positives asked, but the patients with a melanoma lesion have only "
                          f"{len(eligible)} rows: lower --positive-rate or raise --n")
    target = np.zeros(n, dtype=np.int8)
    target[rng.choice(eligible, size=n_positive, replace=False)] = 1

    source = np.empty(n, dtype=np.int64)
    order = np.lexsort((target, patient))  # rows grouped by patient, then target
    bounds = np.flatnonzero(np.diff(patient[order] * 2 + target[order])) + 1
    for rows in np.split(order, bounds):
        p, t = patient[rows[0]], target[rows[0]]
        source[rows] = rng.choice((mel_pools if t else other_pools)[p], size=len(rows))
    return Plan(patients, patient, target, source)


def _patients(rng: np.random.Generator, n_patients: int) -> pd.DataFrame:
    """Per-patient constants: ids IP_<7 digits>, age in 5-year steps (0.5% unknown), sex (1% unknown),
    institution, licence and tile type."""
    ids = rng.choice(9_000_000, size=n_patients, replace=False) + 1_000_000
    age = 5.0 * np.round(np.clip(rng.normal(58, 13.5, n_patients), 5, 85) / 5)
    age[rng.random(n_patients) < 0.005] = np.nan
    sex = np.where(rng.random(n_patients) < 0.65, "male", "female").astype(object)
    sex[rng.random(n_patients) < 0.01] = None
    return pd.DataFrame({
        "patient_id": [f"IP_{i:07d}" for i in ids],
        "age_approx": age,
        "sex": sex,
        "attribution": rng.choice(np.array(ATTRIBUTIONS, dtype=object), n_patients,
                                  p=[0.3, 0.2, 0.1, 0.15, 0.1, 0.1, 0.05]),
        "copyright_license": rng.choice(np.array(LICENSES, dtype=object), n_patients, p=[0.6, 0.3, 0.1]),
        "tbp_tile_type": np.where(rng.random(n_patients) < 0.71, "3D: white", "3D: XP").astype(object),
    })


def _lesion_pools(ham: pd.DataFrame, n_patients: int, rng: np.random.Generator, wrap: bool) -> list[np.ndarray]:
    """Each patient's HAM images (row indices into the full table): the lesions dealt round a random order.

    With more patients than lesions the extra patients get no lesion, or (``wrap``) share one with another patient.
    """
    lesions = rng.permutation(ham["lesion_id"].unique())
    images = ham.reset_index().groupby("lesion_id")["index"].apply(np.asarray)
    pools = []
    for p in range(n_patients):
        mine = lesions[p % len(lesions)::n_patients] if wrap else lesions[p::n_patients]
        pools.append(np.concatenate([images[lesion] for lesion in mine]) if len(mine) else np.empty(0, np.int64))
    return pools


# ---------------------------------------------------------------- one row: its image and its metadata


def render_image(jpeg: bytes, seed: int, row: int, size: int, quality: int) -> bytes:
    """Row ``row``'s JPEG: a random crop, rotation, flips and colour jitter of ``jpeg``, about ``size`` px square.

    The crop, rotation, flips and scaling are one affine map from the output pixels into the HAM image, decoded
    at the smallest JPEG scale (``draft``) that still has the output's resolution.
    """
    rng = np.random.default_rng([seed, IMAGE_STREAM, row])
    side = round(size * rng.uniform(0.9, 1.1))
    angle = rng.uniform(0, 2 * math.pi)
    flip_x, flip_y = rng.choice([-1, 1], size=2)
    with Image.open(io.BytesIO(jpeg)) as image:
        width, height = image.size
        crop = rng.uniform(0.45, 0.7) * min(width, height)
        # half the rotated crop's bounding box: at most 0.7 * sqrt(2) / 2 < 1/2 of the shorter side, so it fits
        reach = crop * (abs(math.cos(angle)) + abs(math.sin(angle))) / 2
        cx = np.clip(width / 2 + rng.normal(0, 0.05 * width), reach, width - reach)
        cy = np.clip(height / 2 + rng.normal(0, 0.05 * height), reach, height - reach)
        image.draft("RGB", (math.ceil(width * side / crop), math.ceil(height * side / crop)))
        scale = image.size[0] / width
        image = image.convert("RGB")
    step = crop * scale / side  # input pixels per output pixel
    a, b = step * flip_x * math.cos(angle), -step * flip_y * math.sin(angle)
    d, e = step * flip_x * math.sin(angle), step * flip_y * math.cos(angle)
    c, f = cx * scale - (a + b) * side / 2, cy * scale - (d + e) * side / 2
    cut = image.transform((side, side), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    Image.fromarray(_jitter(np.asarray(cut), rng)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


# RGB <-> YIQ: hue turns the I-Q plane, saturation scales it.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = np.linalg.inv(_YIQ)


def _jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation +-20% and hue +-18 degrees: one colour matrix, then a blend with the mean."""
    brightness, contrast, saturation = rng.uniform(0.8, 1.2, size=3)
    hue = rng.uniform(-0.1, 0.1) * math.pi
    turn = np.array([[1, 0, 0], [0, math.cos(hue), -math.sin(hue)], [0, math.sin(hue), math.cos(hue)]])
    matrix = brightness * _RGB @ np.diag([1.0, saturation, saturation]) @ turn @ _YIQ
    x = pixels.astype(np.float32) @ matrix.T.astype(np.float32)
    gray = x.mean()
    return np.clip((x - gray) * contrast + gray, 0, 255).astype(np.uint8)


def row_metadata(seed: int, row: int, target: int, patient: dict) -> dict:
    """Row ``row``'s metadata: the patient's constants, then a site, size, shape and colours drawn for the lesion."""
    rng = np.random.default_rng([seed, METADATA_STREAM, row])
    site = list(SITES)[rng.choice(len(SITES), p=[share for share, *_ in SITES.values()])]
    _, simple, locations, (low_y, high_y) = SITES[site]
    side = str(rng.choice(["Left", "Right"]))
    location = str(rng.choice(locations)).format(side=side)

    malignant = bool(target)
    diameter = float(np.clip(rng.lognormal(math.log(3.4 * (1.6 if malignant else 1.0)), 0.4), 1.0, 28.4))
    minor = diameter * rng.uniform(0.45, 0.95)
    area = math.pi / 4 * diameter * minor
    perimeter = math.pi * (diameter + minor) / 2 * rng.uniform(1.0, 1.3)
    l_ext, a_ext, b_ext = rng.normal(55, 8), rng.normal(15, 3.5), rng.normal(27, 3.5)
    lesion_l = l_ext - abs(rng.normal(10 + 4 * malignant, 4))
    lesion_a, lesion_b = a_ext + rng.normal(5, 3), b_ext + rng.normal(1.5, 3)
    delta_l, delta_b = lesion_l - l_ext, lesion_b - b_ext
    delta_lb = math.hypot(delta_l, delta_b)
    x_sign = {"Left": 1, "Right": -1}[side]  # the body's left is +x
    return {
        "isic_id": isic_id(row), "target": target, "patient_id": patient["patient_id"],
        "age_approx": patient["age_approx"], "sex": patient["sex"], "anatom_site_general": site,
        "clin_size_long_diam_mm": round(diameter, 2), "image_type": "TBP tile: close-up",
        "tbp_tile_type": patient["tbp_tile_type"],
        "tbp_lv_A": lesion_a, "tbp_lv_Aext": a_ext, "tbp_lv_B": lesion_b, "tbp_lv_Bext": b_ext,
        "tbp_lv_C": math.hypot(lesion_a, lesion_b), "tbp_lv_Cext": math.hypot(a_ext, b_ext),
        "tbp_lv_H": math.degrees(math.atan2(lesion_b, lesion_a)), "tbp_lv_Hext": math.degrees(math.atan2(b_ext, a_ext)),
        "tbp_lv_L": lesion_l, "tbp_lv_Lext": l_ext, "tbp_lv_areaMM2": area,
        "tbp_lv_area_perim_ratio": perimeter ** 2 / area,
        "tbp_lv_color_std_mean": rng.gamma(1.2, 0.8 * (1 + malignant)),
        "tbp_lv_deltaA": lesion_a - a_ext, "tbp_lv_deltaB": delta_b, "tbp_lv_deltaL": delta_l,
        "tbp_lv_deltaLB": delta_lb, "tbp_lv_deltaLBnorm": delta_lb * rng.uniform(0.8, 1.2),
        "tbp_lv_eccentricity": math.sqrt(1 - (minor / diameter) ** 2),
        "tbp_lv_location": location, "tbp_lv_location_simple": simple.format(side=side), "tbp_lv_minorAxisMM": minor,
        "tbp_lv_nevi_confidence": 100 * rng.beta(0.3, 1.2 if not malignant else 6.0),
        "tbp_lv_norm_border": 10 * rng.beta(2 + 2 * malignant, 4),
        "tbp_lv_norm_color": 10 * rng.beta(1 + 2 * malignant, 4),
        "tbp_lv_perimeterMM": perimeter, "tbp_lv_radial_color_std_max": rng.gamma(1.0, 0.7 * (1 + malignant)),
        "tbp_lv_stdL": rng.gamma(2.0, 1.1), "tbp_lv_stdLExt": abs(rng.normal(2.5, 0.8)),
        "tbp_lv_symm_2axis": rng.beta(2, 4), "tbp_lv_symm_2axis_angle": int(5 * rng.integers(0, 36)),
        "tbp_lv_x": x_sign * rng.uniform(5, 200), "tbp_lv_y": rng.uniform(low_y, high_y),
        "tbp_lv_z": rng.normal(0, 70),
        "attribution": patient["attribution"], "copyright_license": patient["copyright_license"],
    }


@dataclass(frozen=True)
class Block:
    """The rows ``start`` to ``start + len(targets)`` as a worker makes them: all it needs, nothing shared."""

    seed: int
    start: int
    targets: list[int]
    patients: list[dict]
    images: list[str]  # HAM10000 JPEG paths
    size: int
    quality: int


def make_block(block: Block) -> tuple[list[bytes], pd.DataFrame]:
    """A block's JPEGs and metadata rows (in a worker process)."""
    jpegs, rows = [], []
    for offset, (target, patient, path) in enumerate(zip(block.targets, block.patients, block.images)):
        row = block.start + offset
        jpegs.append(render_image(Path(path).read_bytes(), block.seed, row, block.size, block.quality))
        rows.append(row_metadata(block.seed, row, target, patient))
    return jpegs, pd.DataFrame(rows, columns=list(COLUMNS))


# ---------------------------------------------------------------- the data set


def generate(args: argparse.Namespace) -> dict:
    """Write the data set to ``args.out`` (see the module's docstring); returns what was written and how fast."""
    check_args(args)
    ham = pd.read_csv(args.ham / "HAM10000_metadata.csv")
    t0 = time.perf_counter()
    plan = make_plan(ham, args.n, args.patients, args.positive_rate, args.seed)
    ham_ids = ham["image_id"].to_numpy()
    patients = plan.patients.to_dict("records")

    def block(start: int) -> Block:
        rows = slice(start, min(start + args.block, args.n))
        return Block(args.seed, start, plan.target[rows].tolist(), [patients[p] for p in plan.patient[rows]],
                     [str(args.ham / "images" / f"{i}.jpg") for i in ham_ids[plan.source[rows]]],
                     args.size, args.quality)

    progress = progress_bar("making an ISIC-2024-like data set", args.n, enabled=not args.quiet, unit="rows")
    with replacing_folder(args.out, overwrite=args.overwrite, kind="isic2024-like", what="data set folder") as staging:
        with DataSetFiles(staging) as files, progress as advance, \
                ProcessPoolExecutor(args.workers, multiprocessing.get_context("forkserver")) as pool:
            pending: deque = deque()

            def write_oldest() -> None:
                start, future = pending.popleft()
                jpegs, meta = future.result()
                files.append(jpegs, meta, ham_ids[plan.source[start:start + len(meta)]])
                advance(len(meta))

            for start in range(0, args.n, args.block):
                pending.append((start, pool.submit(make_block, block(start))))
                if len(pending) >= 2 * args.workers:  # a bounded number of blocks in flight: memory flat in --n
                    write_oldest()
            while pending:
                write_oldest()
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    if k not in ("out", "overwrite", "quiet", "workers", "block")}
        (staging / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
    seconds = time.perf_counter() - t0
    image_bytes = (args.out / IMAGES).stat().st_size
    return {"rows": args.n, "positives": int(plan.target.sum()), "patients": args.patients, "seconds": seconds,
            "rows_per_s": args.n / seconds, "hdf5_bytes": image_bytes, "hdf5_bytes_per_row": image_bytes / args.n,
            "csv_bytes_per_row": (args.out / METADATA).stat().st_size / args.n}


class DataSetFiles:
    """The HDF5 file, the metadata CSV and the sources CSV of a data set, appended to block by block in row order."""

    def __init__(self, folder: Path) -> None:
        self.h5 = h5py.File(folder / IMAGES, "w")
        self.metadata = open(folder / METADATA, "w", newline="", encoding="utf-8")
        self.sources = open(folder / SOURCES, "w", newline="", encoding="utf-8")
        self.sources.write("isic_id,ham_image_id\n")

    def append(self, jpegs: list[bytes], meta: pd.DataFrame, ham_image_ids: np.ndarray) -> None:
        for name, jpeg in zip(meta["isic_id"], jpegs):
            self.h5[name] = np.bytes_(jpeg)  # |S<n>, as in the challenge's file (a JPEG ends with FFD9: no NUL lost)
        meta.to_csv(self.metadata, header=self.metadata.tell() == 0, index=False)
        self.sources.writelines(f"{i},{h}\n" for i, h in zip(meta["isic_id"], ham_image_ids))

    def __enter__(self) -> "DataSetFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.h5.close()
        self.metadata.close()
        self.sources.close()


def check_args(args: argparse.Namespace) -> None:
    """One line for every argument that cannot work, before any work."""
    check_replaceable(args.out, args.overwrite, what="data set folder")
    if not (args.ham / "HAM10000_metadata.csv").is_file() or not (args.ham / "images").is_dir():
        raise ConfigError(f"--ham {args.ham} does not hold HAM10000_metadata.csv and images/")
    for name, low in (("n", 1), ("patients", 1), ("workers", 1), ("block", 1), ("size", 16)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} must be at least {low}, not {getattr(args, name)}")
    if args.patients > args.n:
        raise ConfigError(f"--patients {args.patients} is more than --n {args.n}: every patient needs a row")
    if not 0 <= args.positive_rate < 1:
        raise ConfigError(f"--positive-rate must be in [0, 1), not {args.positive_rate}")
    if not 1 <= args.quality <= 95:
        raise ConfigError(f"--quality must be 1 to 95 (PIL's JPEG scale), not {args.quality}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A command-line mistake is one line, as in embedstore's CLI (argparse prints the usage as well)."""
        raise ConfigError(f"{message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"data set folder (default {OUT})")
    parser.add_argument("--n", type=int, default=401_059, help="rows (default 401059, as ISIC 2024)")
    parser.add_argument("--patients", type=int, default=1042, help="patient ids (default 1042)")
    parser.add_argument("--positive-rate", type=float, default=393 / 401_059,
                        help="share of positive rows, from melanoma images (default 393/401059, about 0.1%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=133, help="JPEG side in px, +-10%% (default 133)")
    parser.add_argument("--quality", type=int, default=85,
                        help="JPEG quality (default 85: about 2.9 kB at 133 px, as the sample crops)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes making blocks (default: the cores this process may use)")
    parser.add_argument("--block", type=int, default=256, help="rows per block (default 256)")
    parser.add_argument("--ham", type=Path, default=HAM, help=f"the HAM10000 folder (default {HAM})")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out this script wrote")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Parse, generate, print a summary; a mistake the user can make is one line on stderr and exit code 2."""
    try:
        args = parse_args(argv)
        summary = generate(args)
    except (EmbedstoreError, OSError) as exc:  # OSError: an unreadable HAM image, a full disk
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {summary['rows']:,} rows ({summary['positives']} positive, {summary['patients']} patients) to "
          f"{args.out} in {summary['seconds']:.1f} s: {summary['rows_per_s']:.1f} rows/s, "
          f"{summary['hdf5_bytes_per_row']:.0f} B/row of HDF5, {summary['csv_bytes_per_row']:.0f} B/row of CSV")
    return summary


if __name__ == "__main__":
    main()
