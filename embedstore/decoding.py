"""Image bytes -> the uint8 tensor an encoder is fed, and the short reason when an image cannot be read.

:func:`decode` is the one place an image is decoded, resized and cropped, for the extraction engine
(:class:`DecodedImages` in DataLoader workers) and for :func:`embedstore.extraction.embed_images`
alike, so a stored row and a new image embedded later see exactly the same pixels.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from embedstore.errors import first_line

if TYPE_CHECKING:  # annotations only: decoding needs neither the encoder registry nor the source readers
    from embedstore.encoders import Preprocessing
    from embedstore.sources import Source

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


def decode(data: bytes, prep: Preprocessing) -> torch.Tensor:
    """Encoded bytes -> uint8 ``[3, crop, crop]``, resized and cropped by ``prep.crop_mode`` (:func:`frame`).

    JPEGs are decoded at the smallest DCT scale that still covers the resize
    target (PIL's draft mode), which makes large images cheap; images over
    PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 megapixels)
    raise rather than exhaust memory. 16-bit grey images are scaled to 8 bits
    (PIL's own conversion would clip them to white; 16-bit RGB PIL reads as 8-bit).
    """
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    img.draft("RGB", (prep.resize, prep.resize))
    return TF.pil_to_tensor(frame(_to_8_bits(img).convert("RGB"), prep))


def frame(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """An RGB image resized and cropped to ``prep.crop`` square, as timm's evaluation transform does per crop mode:

    - ``center``: the shorter side resized to ``prep.resize``, the centre ``crop`` square cut out;
    - ``squash``: both sides resized to ``prep.resize`` (the aspect ratio is not kept), the centre cut out;
    - ``border``: the longer side resized to ``prep.resize`` (ratio kept, each side rounded), then cropped or padded
      about the centre to ``crop`` with the normalisation's mean colour (which the encoder sees as zero).
    """
    mode = _INTERPOLATION.get(prep.interpolation, InterpolationMode.BILINEAR)
    if prep.crop_mode == "squash":
        img = TF.resize(img, [prep.resize, prep.resize], interpolation=mode)
    elif prep.crop_mode == "border":
        scale = prep.resize / max(img.size)
        img = TF.resize(img, [round(img.height * scale), round(img.width * scale)], interpolation=mode)
        fill = [round(255 * m) for m in prep.mean]
        return TF.center_crop(TF.pad(img, _padding(img.size, prep.crop), fill=fill), prep.crop)
    else:
        img = TF.resize(img, prep.resize, interpolation=mode)
    return TF.center_crop(img, prep.crop)


def _padding(size: tuple[int, int], crop: int) -> list[int]:
    """Left, top, right, bottom padding that centres an image of ``size`` (width, height) in a ``crop`` square
    (none on a side already as long), the odd pixel on the right or bottom."""
    pad_w, pad_h = max(crop - size[0], 0), max(crop - size[1], 0)
    return [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]


def _to_8_bits(img: Image.Image) -> Image.Image:
    """A 16-bit grey image (modes ``I;16*``, and ``I``, in which PIL may hold 16-bit PNGs) scaled to 8-bit ``L``:
    0..65535 maps to 0..255 by rounding x / 257. Other images are returned as they are."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    wide = np.asarray(img).astype(np.int64)
    return Image.fromarray(((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8))


def failure_reason(exc: BaseException) -> str:
    """A short, human reason for an image that could not be read."""
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, KeyError):
        return "missing in source"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return f"image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels)"
    text = first_line(exc, None)
    if "truncated" in text:
        return "truncated image"
    return text[:200]


class DecodedImages(Dataset):
    """Decodes the images at ``paths`` of ``source``; item ``i`` is ``(i, tensor, "")``, or ``(i, None, reason)``
    for an unreadable image (recorded as failed, never fatal)."""

    def __init__(self, source: Source, paths: Sequence[str], prep: Preprocessing) -> None:
        self.source, self.paths, self.prep = source, paths, prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, decode(self.source.read_bytes(self.paths[i]), self.prep), ""
        except Exception as exc:  # noqa: BLE001 - any unreadable image is recorded, never fatal
            return i, None, failure_reason(exc)


def collate_decoded(batch) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """A DataLoader batch of :class:`DecodedImages` items -> (positions of the decoded images, their stacked
    uint8 tensors or None when none decoded, ``(position, reason)`` of the unreadable ones)."""
    ok = [(i, t) for i, t, _ in batch if t is not None]
    failed = [(i, reason) for i, t, reason in batch if t is None]
    positions = torch.tensor([i for i, _ in ok], dtype=torch.long)
    images = torch.stack([t for _, t in ok]) if ok else None
    return positions, images, failed
