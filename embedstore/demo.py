"""The bundled demo sample: 200 HAM10000 images (CC BY-NC 4.0, Tschandl et al. 2018) with their metadata."""

from __future__ import annotations

from pathlib import Path

from embedstore.sources import CsvFolderSource

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"


def sample_source() -> CsvFolderSource:
    """The sample as a source: ``sample.csv`` (HAM10000 metadata columns) plus ``images/``."""
    return CsvFolderSource(SAMPLE_DIR / "sample.csv", images=SAMPLE_DIR / "images", id_col="image_id")
