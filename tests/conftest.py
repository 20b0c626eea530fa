"""Shared fixtures: real HAM10000 images (from ../shared) and stores extracted with the real offline weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

HAM_ROOT = Path(os.environ.get("EMBEDSTORE_HAM", Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"))
ISIC2024_ROOT = HAM_ROOT.parent / "isic2024-format"


def select_subset(meta: pd.DataFrame, n_lesions: int = 100, n_total: int = 400, min_per_class: int = 20, seed: int = 0) -> pd.DataFrame:
    """A fixed subset: every image of ``n_lesions`` multi-image lesions, then singles so each class has ``min_per_class``."""
    rng = np.random.default_rng(seed)
    counts = meta.groupby("lesion_id").size()
    multi = sorted(counts[counts >= 2].index)
    picked = meta[meta.lesion_id.isin(set(rng.choice(multi, size=n_lesions, replace=False)))]
    singles = meta[meta.lesion_id.map(counts) == 1]
    extra = [grp.sample(n=min(max(0, min_per_class - int((picked.dx == dx).sum())), len(grp)), random_state=seed)
             for dx, grp in singles.groupby("dx")]
    picked = pd.concat([picked, *extra])
    rest = singles[~singles.image_id.isin(picked.image_id)]
    picked = pd.concat([picked, rest.sample(n=max(0, n_total - len(picked)), random_state=seed)])
    return picked.sort_values(["lesion_id", "image_id"]).reset_index(drop=True)


@pytest.fixture(scope="session")
def ham_root() -> Path:
    """The HAM10000 folder: HAM10000_metadata.csv and images/ (tests that need it skip, with the reason, without it)."""
    if not (HAM_ROOT / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 data not found at {HAM_ROOT} (set EMBEDSTORE_HAM to its folder)")
    return HAM_ROOT


@pytest.fixture(scope="session")
def ham_meta(ham_root) -> pd.DataFrame:
    return pd.read_csv(ham_root / "HAM10000_metadata.csv")


@pytest.fixture(scope="session")
def ham_subset(ham_meta) -> pd.DataFrame:
    """~400 HAM10000 rows: 100 lesions with 2+ images (all their images) and at least 20 images of each class."""
    return select_subset(ham_meta)


@pytest.fixture(scope="session")
def ham_subset_csv(ham_subset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ham") / "subset.csv"
    ham_subset.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def ham_store(ham_root, ham_subset_csv, tmp_path_factory) -> Path:
    """A store of the subset extracted with the offline mobilenet_v2 and efficientnet_lite0 (read-only: copy to modify)."""
    from embedstore import extract, open_source

    path = tmp_path_factory.mktemp("stores") / "ham_subset.zarr"
    source = open_source(ham_subset_csv, images=ham_root / "images", id_col="image_id")
    for encoder in ("mobilenet_v2", "efficientnet_lite0"):
        result = extract(source, encoder, path, progress=False)
        assert result.n_failed == 0
    return path


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``embedstore ARGS...`` in-process (as the console script does); returns (exit code, stdout, stderr)."""
    from embedstore.cli import main

    def run(*args, cwd: Path | None = None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr("sys.argv", ["embedstore", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run
