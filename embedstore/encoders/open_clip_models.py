"""OpenCLIP image towers as encoders: ``open_clip:<model>/<pretrained tag>`` (e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from embedstore.encoders.registry import Encoder, Preprocessing, register_encoder
from embedstore.encoders.weights import hub_download
from embedstore.errors import EncoderError


class ImageTower(nn.Module):
    """The image half of a CLIP model: ``encode_image`` without normalisation (heads normalise as they need)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual

    def forward(self, x):
        return self.visual(x)


@register_encoder("open_clip", description="OpenCLIP image tower (open_clip:<model>/<pretrained tag>)", family=True)
def open_clip_family(model_name: str, weights: str | None = None, pooling: str | None = None) -> Encoder:
    """``open_clip:<model>/<tag>``; the tower pools as the model was trained to (no ``pooling`` choice)."""
    if pooling is not None:
        raise EncoderError(f"encoder open_clip:{model_name} has no pooling choice: its image tower pools as the model "
                           f"was trained to (class token or attention pool); leave --pooling out")
    import open_clip

    arch, _, tag = model_name.partition("/")
    if arch not in open_clip.list_models():
        raise EncoderError(f"open_clip has no model {arch!r}; `open_clip.list_models()` lists them")
    if weights is None and not tag:
        raise EncoderError(f"name the pretrained weights: open_clip:{arch}/<tag> (see open_clip.list_pretrained())")
    pretrained = str(Path(weights).resolve()) if weights is not None else tag
    with hub_download(f"open_clip:{model_name}"):
        clip = open_clip.create_model(arch, pretrained=pretrained)
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][-1]
    prep = Preprocessing(resize=size, crop=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                         interpolation=cfg.get("interpolation", "bicubic"))
    return Encoder(name=f"open_clip:{model_name}", model=ImageTower(clip), preprocessing=prep,
                   dim=int(clip.visual.output_dim), weights=pretrained, channels_last=False)
