"""Thumbnails re-read from the run's feature store, and the contact sheets drawn from them
(sample-prediction grids, false/missed match sheets).

Reports never need the images: when the store (or the images behind it) is gone,
:func:`load_thumbnails` says why and the report shows a note instead of a sheet.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from embedstore.errors import EmbedstoreError

THUMB_SIZE = (180, 180)  # bounding box; a tile is 180 x 135, the 4:3 of dermoscopy


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


@dataclass(frozen=True)
class Tile:
    """One thumbnail of a sheet: the image, caption lines under it and the colour of its border and text."""

    image: Optional[Image.Image]
    caption: tuple[str, ...]
    color: str = "#333333"
    border: int = 0


@dataclass(frozen=True)
class Header:
    """A title over ``span`` columns of a sheet, starting at column ``start``."""

    text: str
    start: int
    span: int
    color: str = "#1f2328"


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"))
    return ImageFont.truetype(path, size)


def fitted(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text``, cut short with an ellipsis where it would be wider than ``width`` pixels (a long id or group)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def draw_sheet(grid: list[list[Optional[Tile]]], title: str, headers: Sequence[Header] = (),
               gaps: Sequence[int] = ()) -> bytes:
    """A contact sheet of thumbnails as PNG bytes, drawn with PIL (a grid of image axes in matplotlib
    costs seconds). ``gaps`` are columns left empty as separators (a third of a tile wide)."""
    tile_w, tile_h = THUMB_SIZE[0], THUMB_SIZE[1] * 3 // 4
    lines = max((len(t.caption) for row in grid for t in row if t is not None), default=0)
    pad, line_h = 10, 17
    cell_h = tile_h + 8 + lines * line_h + pad
    columns = max(len(row) for row in grid)
    widths = [tile_w // 3 if c in gaps else tile_w for c in range(columns)]
    lefts = [pad + sum(widths[:c]) + pad * c for c in range(columns)]
    top = 44 + (30 if headers else 0)
    sheet = Image.new("RGB", (lefts[-1] + widths[-1] + pad, top + cell_h * len(grid)), "white")
    draw = ImageDraw.Draw(sheet)
    title_font, header_font, caption_font = _font(19, bold=True), _font(16, bold=True), _font(12, bold=True)
    draw.text((sheet.width // 2, 12), title, fill="#000000", font=title_font, anchor="ma")
    for header in headers:
        x0 = lefts[header.start]
        x1 = lefts[header.start + header.span - 1] + widths[header.start + header.span - 1]
        draw.text(((x0 + x1) // 2, 46), header.text, fill=header.color, font=header_font, anchor="ma")
    for r, row in enumerate(grid):
        for c, tile in enumerate(row):
            if tile is None:
                continue
            x, y = lefts[c], top + r * cell_h
            if tile.image is not None:
                image = tile.image.copy()
                image.thumbnail((tile_w - 2 * tile.border, tile_h - 2 * tile.border))
                ox = x + (tile_w - image.width) // 2
                oy = y + (tile_h - image.height) // 2
                if tile.border:
                    b = tile.border
                    draw.rectangle((ox - b, oy - b, ox + image.width + b - 1, oy + image.height + b - 1), fill=tile.color)
                sheet.paste(image, (ox, oy))
            else:
                draw.rectangle((x, y, x + tile_w - 1, y + tile_h - 1), outline="#c0c0c0")
                draw.text((x + tile_w // 2, y + tile_h // 2), "image unavailable", fill="#7f7f7f",
                          font=caption_font, anchor="mm")
            for i, text in enumerate(tile.caption):
                draw.text((x + tile_w // 2, y + tile_h + 6 + i * line_h), fitted(str(text), caption_font, tile_w),
                          fill=tile.color, font=caption_font, anchor="ma")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
