"""Thumbnails re-read from the run's feature store, for prediction grids and pair sheets.

Reports never need the images: when the store (or the images behind it) is gone,
:func:`load_thumbnails` says why and the report shows a note instead of a sheet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

from PIL import Image

from embedstore.errors import EmbedstoreError

THUMB_SIZE = (160, 160)


def resolve_store_path(store: object, run_dir: Path) -> Path | None:
    """The store path recorded in run.json, tried as given and relative to the run folder."""
    if not store:
        return None
    candidate = Path(str(store)).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    beside = (run_dir / candidate).resolve()
    return beside if beside.exists() else candidate


def load_thumbnails(store: object, run_dir: Path, ids: Iterable[str]) -> Union[dict[str, Image.Image], str]:
    """Thumbnails of ``ids`` keyed by id, or a sentence saying why they cannot be shown."""
    ids = list(dict.fromkeys(str(i) for i in ids))
    path = resolve_store_path(store, run_dir)
    if path is None:
        return "the run does not record its feature store"
    if not path.exists():
        return f"the feature store {path} is gone"
    try:
        from embedstore.store import FeatureStore
    except ImportError as exc:  # the store module is part of embedstore; this only guards partial installs
        return f"the feature store cannot be read here ({exc})"
    try:
        feature_store = FeatureStore.open(path)
    except EmbedstoreError as exc:
        return f"the feature store {path} cannot be opened ({exc})"
    thumbs: dict[str, Image.Image] = {}
    missing: list[str] = []
    for image_id in ids:
        try:
            image = feature_store.open_image(image_id)
            image = image.convert("RGB")
            image.thumbnail(THUMB_SIZE)
            thumbs[image_id] = image
        except (EmbedstoreError, OSError, KeyError, ValueError):
            missing.append(image_id)
    if not thumbs:
        return f"the images behind {path} are gone ({len(missing)} of {len(ids)} could not be read)"
    return thumbs
