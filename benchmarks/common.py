"""Shared by the benchmarks: where the real data is, and the full HAM10000 store (built once, reused)."""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAM = Path(os.environ.get("EMBEDSTORE_HAM", ROOT.parent / "shared" / "data" / "ham10000"))
HAM_STORE = ROOT / "stores" / "ham10000.zarr"
ENCODERS = ("mobilenet_v2", "efficientnet_lite0")


def ham_store(path: Path = HAM_STORE, encoders=ENCODERS) -> Path:
    """The store of all 10,015 HAM10000 images with the offline encoders; extracts only what is missing.

    ``encoders`` are feature-set names as extract names them: ``mobilenet_v2``, ``mobilenet_v2-stages``
    (``pooling="stages"``), ``mobilenet_v2-stages-320px-crop100`` (and ``image_size=320, crop_pct=1.0``).
    """
    from embedstore import create_encoder, extract, open_source

    source = open_source(HAM / "HAM10000_metadata.csv", images=HAM / "images", id_col="image_id")
    for name in encoders:
        print(extract(source, create_encoder(**encoder_options(name)), path).summary())
    return path


def encoder_options(name: str) -> dict:
    """``create_encoder`` arguments from a default feature-set name: encoder, then pooling / ``<N>px`` / ``crop<P>``
    / crop mode."""
    from embedstore.encoders import CROP_MODES

    encoder, *parts = name.split("-")
    options = {"name": encoder}
    for part in parts:
        if part in CROP_MODES:
            options["crop_mode"] = part
        elif part.endswith("px"):
            options["image_size"] = int(part[:-2])
        elif part.startswith("crop"):
            options["crop_pct"] = float(part[4:]) / 100  # crop100, crop87.5
        else:
            options["pooling"] = part
    return options


def timed(run):
    """``run()``'s result, wall seconds and CPU seconds of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Read from /proc (VmHWM), which starts afresh with each program; getrusage's
    ru_maxrss survives exec, so a child would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


if __name__ == "__main__":
    ham_store()
