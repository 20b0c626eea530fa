"""The encoder registry: one obvious way to add, find and build a frozen encoder.

Modelled on timm's ``register_model`` / ``create_model``: a builder function is
registered under a name, and :func:`create_encoder` builds it. Families whose
members are named at run time (``timm:<model>``, ``torchvision:<model>``,
``open_clip:<model>/<tag>``) register a prefix instead.

An :class:`Encoder` carries everything that decides what its features are:
the model (mapping a normalised ``[B, 3, H, W]`` batch to ``[B, D]``), its
:class:`Preprocessing`, its pooling and a hash of its weights. Those go into
the feature set's fingerprint, so a change to any of them is a new feature set,
never a silently stale one. It also knows how to rebuild itself
(:meth:`Encoder.spec`: name, weights file, pooling, input size and crop, as
timm's model config does), so ``extract`` records that from the encoder alone.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from embedstore.errors import EncoderError, first_line


#: How a non-square image becomes a square input (timm's ``crop_mode`` names and meaning):
#: ``center`` resizes the shorter side and crops the centre (the longer side's ends are lost),
#: ``squash`` resizes both sides to the square (the aspect ratio is not kept),
#: ``border`` resizes the longer side and pads the shorter one with the mean colour (the ratio kept);
#: then the centre ``crop`` is taken, so squash and border keep the whole image only at ``crop_pct`` 1.0.
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resize (by ``crop_mode``), crop or pad to ``crop``, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def to_dict(self) -> dict:
        """The fields as JSON values; ``crop_mode`` only when it is not ``center``, so the fingerprints of feature
        sets extracted before crop modes existed (all centre-cropped) stay what they were."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.crop_mode == "center":
            del fields["crop_mode"]
        return fields

    def scaled(self, image_size: int | None = None, crop_pct: float | None = None,
               crop_mode: str | None = None) -> "Preprocessing":
        """The same transform with a ``image_size`` square input, ``crop_pct`` = crop / resize and/or ``crop_mode``.

        timm's names: ``crop_pct`` 0.875 is the ImageNet evaluation crop (256 -> 224), 1.0
        keeps the whole resized image (with ``squash`` or ``border``: the whole image). Unset arguments keep this
        transform's value.
        """
        crop = self.crop if image_size is None else int(image_size)
        pct = self.crop / self.resize if crop_pct is None else float(crop_pct)
        mode = self.crop_mode if crop_mode is None else crop_mode
        if crop < 32:
            raise EncoderError(f"image size {crop} is too small; use 32 pixels or more")
        if not 0.1 <= pct <= 1.0:
            raise EncoderError(f"crop_pct must be in [0.1, 1.0] (the centre crop's share of the resized image), not {pct}")
        if mode not in CROP_MODES:
            raise EncoderError(f"unknown crop mode {mode!r}: choose from {', '.join(CROP_MODES)}")
        return replace(self, crop=crop, resize=round(crop / pct), crop_mode=mode)


@dataclass
class Encoder:
    """A frozen image encoder and everything that determines its output."""

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    dim: int
    pooling: str | None = None
    weights: str | None = None  # where the weights came from: a local path, a package, a hub tag
    channels_last: bool = True  # CNNs run faster in NHWC on CPU and GPU
    input_options: dict = field(default_factory=dict)  # image_size / crop_pct / crop_mode given to create_encoder
    weights_file: str | None = None  # the local weights file given to create_encoder (None: the default source)
    _weights_sha256: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def weights_sha256(self) -> str:
        """sha256 of the model's state dict (names and bytes), whatever file or hub it came from."""
        if self._weights_sha256 is None:
            self._weights_sha256 = state_dict_sha256(self.model.state_dict())
        return self._weights_sha256

    def spec(self) -> dict:
        """The arguments of :func:`create_encoder` that rebuild this encoder (``create_encoder(**enc.spec())``)."""
        return {"name": self.name, "weights": self.weights_file, "pooling": self.pooling, **self.input_options}

    def config(self) -> dict:
        """The parts of the encoder that decide its features (the fingerprint's input; the weights by their hash,
        not by where they came from)."""
        return {
            "encoder": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "pooling": self.pooling,
            "dim": self.dim,
        }


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash tensors by name, dtype, shape and bytes, so equal weights hash equal whatever their file format."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Builders take (weights: str | None, pooling: str | None) and return an Encoder.
Builder = Callable[..., Encoder]


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    description: str
    offline: bool  # weights ship with an installed package: works with no network


_ENCODERS: dict[str, _Entry] = {}
_FAMILIES: dict[str, _Entry] = {}


def register_encoder(name: str, *, description: str, offline: bool = False, family: bool = False):
    """Register ``builder(weights=None, pooling=None, **kw)`` under ``name``.

    With ``family=True``, ``name`` is a prefix (e.g. ``"timm"``) and the builder
    also receives the rest of the requested name (``timm:resnet50`` ->
    ``model_name="resnet50"``).
    """

    def wrap(builder: Builder) -> Builder:
        table = _FAMILIES if family else _ENCODERS
        if name in table:
            raise ValueError(f"encoder {name!r} is registered twice")
        table[name] = _Entry(builder, description, offline)
        return builder

    return wrap


def list_encoders() -> list[dict]:
    """Registered encoders and families, with whether they work offline."""
    rows = [{"name": n, "description": e.description, "offline": e.offline} for n, e in sorted(_ENCODERS.items())]
    rows += [
        {"name": f"{n}:<model>", "description": e.description, "offline": e.offline}
        for n, e in sorted(_FAMILIES.items())
    ]
    return rows


def create_encoder(name: str, weights: str | Path | None = None, pooling: str | None = None,
                   image_size: int | None = None, crop_pct: float | None = None, crop_mode: str | None = None,
                   **kwargs) -> Encoder:
    """Build the encoder registered as ``name``.

    ``weights`` is a local file (safetensors, or a torch checkpoint loadable
    with ``weights_only=True``) that replaces the default download, kept on
    the encoder as ``weights_file`` (see :meth:`Encoder.spec`); ``pooling``
    picks how token/feature maps become one vector where the encoder offers a
    choice (DINOv2: ``cls``, ``mean``, ``cls+mean``; CNNs: ``stages``).
    ``image_size``, ``crop_pct`` and ``crop_mode`` change the input from the encoder's default
    (see :func:`with_input_size`).
    """
    weights = None if weights is None else str(weights)
    if name in _ENCODERS:
        encoder = _ENCODERS[name].builder(weights=weights, pooling=pooling, **kwargs)
    else:
        encoder = _family_member(name, weights, pooling, kwargs)
    encoder.weights_file = weights
    return with_input_size(encoder, image_size, crop_pct, crop_mode)


def with_input_size(encoder: Encoder, image_size: int | None = None, crop_pct: float | None = None,
                    crop_mode: str | None = None) -> Encoder:
    """``encoder`` fed ``image_size`` square inputs cropped at ``crop_pct`` by ``crop_mode`` (None keeps the default).

    A CNN with global pooling takes any size, and another size is another view
    of the image (dermoscopic structures are a few pixels across), which a
    stack can combine with the default one (BENCHMARKS.md, "Probe"). Models
    tied to one input size (a ViT with fixed position embeddings) are refused
    by a forward pass of a blank image, before anything is extracted.
    """
    if image_size is None and crop_pct is None and crop_mode in (None, encoder.preprocessing.crop_mode):
        return encoder
    prep = encoder.preprocessing.scaled(image_size, crop_pct, crop_mode)
    try:
        with torch.inference_mode():
            out = encoder.model(torch.zeros(1, 3, prep.crop, prep.crop))
    except Exception as exc:  # noqa: BLE001 - any failure means the model cannot take this size
        raise EncoderError(f"encoder {encoder.name} cannot take {prep.crop}x{prep.crop} inputs: "
                           f"{first_line(exc, None)}") from None
    if out.shape[-1] != encoder.dim:
        raise EncoderError(f"encoder {encoder.name} gives {out.shape[-1]}-d features at {prep.crop}x{prep.crop}, "
                           f"not its {encoder.dim}; it needs its default input size")
    own_mode = encoder.preprocessing.crop_mode  # timm models may default to squash: a mode is recorded if it differs
    options = {"image_size": image_size, "crop_pct": crop_pct, "crop_mode": None if crop_mode == own_mode else crop_mode}
    return replace(encoder, preprocessing=prep, input_options={k: v for k, v in options.items() if v is not None})


def _family_member(name: str, weights, pooling, kwargs) -> Encoder:
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _FAMILIES and rest:
        return _FAMILIES[prefix].builder(rest, weights=weights, pooling=pooling, **kwargs)
    known = list(_ENCODERS) + [f"{f}:" for f in _FAMILIES]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise EncoderError(
        f"unknown encoder {name!r}{hint}; `embedstore encoders` lists them, "
        f"and timm:<model>, torchvision:<model>, open_clip:<model>/<tag> name any model of those libraries"
    )


def check_pooling(name: str, pooling: str | None, choices: tuple[str, ...], default: str | None) -> str | None:
    """Validate a pooling choice for encoder ``name`` (``None`` gives ``default``)."""
    if pooling is None:
        return default
    if pooling not in choices:
        raise EncoderError(f"encoder {name} has no pooling {pooling!r}; choose one of {', '.join(choices)}")
    return pooling
