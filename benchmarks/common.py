"""Shared by the benchmarks: where the real data is, and the full HAM10000 store (built once, reused)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAM = Path(os.environ.get("EMBEDSTORE_HAM", ROOT.parent / "shared" / "data" / "ham10000"))
HAM_STORE = ROOT / "stores" / "ham10000.zarr"
ENCODERS = ("mobilenet_v2", "efficientnet_lite0")


def ham_store(path: Path = HAM_STORE, encoders=ENCODERS) -> Path:
    """The store of all 10,015 HAM10000 images with the offline encoders; extracts only what is missing.

    ``encoders`` are feature-set names as extract names them: ``mobilenet_v2``, or ``mobilenet_v2-stages``
    for that encoder with ``pooling="stages"``.
    """
    from embedstore import create_encoder, extract, open_source

    source = open_source(HAM / "HAM10000_metadata.csv", images=HAM / "images", id_col="image_id")
    for name in encoders:
        encoder, _, pooling = name.partition("-")
        print(extract(source, create_encoder(encoder, pooling=pooling or None), path).summary())
    return path


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
