"""timm models as encoders (``timm:<model>``) and DINOv2 ViT-S/B/L/g 14, with and without registers.

DINOv2 is built from timm's architecture and loads either the pretrained
weights from the Hugging Face hub or a local file in Meta's own key format
(``mask_token``, ``register_tokens``, ``blocks.N.mlp.w12`` ...) or timm's;
timm's ``checkpoint_filter_fn`` maps Meta's keys and resamples the position
embedding from the 518-px training grid to the 224-px evaluation input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from embedstore.encoders.registry import Encoder, Preprocessing, check_pooling, register_encoder
from embedstore.encoders.weights import hub_download, load_into, load_state_dict
from embedstore.errors import EncoderError, first_line

DINOV2_POOLING = ("cls", "mean", "cls+mean")
# The DINOv2 linear evaluation: resize 256, centre-crop 224, bicubic, ImageNet statistics.
DINOV2_PREPROCESSING = Preprocessing(resize=256, crop=224, interpolation="bicubic")
_DINOV2 = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}


class TokenPooling(nn.Module):
    """A ViT whose token sequence is pooled to one vector: CLS token, mean of patch tokens, or both concatenated."""

    def __init__(self, vit: nn.Module, pooling: str) -> None:
        super().__init__()
        self.vit, self.pooling = vit, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # [B, prefix + patches, D], final norm applied
        cls = tokens[:, 0]
        patches = tokens[:, self.vit.num_prefix_tokens:].mean(dim=1)
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return patches
        return torch.cat([cls, patches], dim=1)


# Built at 224 px; dynamic_img_size lets the same model take other multiples of 14 (--image-size 448, 518).
_DINOV2_ARGS = {"img_size": 224, "num_classes": 0, "dynamic_img_size": True}


def build_dinov2(name: str, weights: str | None = None, pooling: str | None = None, pretrained: bool = True) -> Encoder:
    """DINOv2 ``name`` (e.g. ``dinov2_vits14``); ``pretrained=False`` gives random weights (for timing only)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    pooling = check_pooling(name, pooling, DINOV2_POOLING, default="cls")
    arch = _DINOV2[name]
    if weights is not None:
        vit = timm.create_model(arch, pretrained=False, **_DINOV2_ARGS)
        load_into(vit, checkpoint_filter_fn(load_state_dict(weights), vit), str(weights))
        label = str(Path(weights).resolve())
    elif pretrained:
        with hub_download(name):
            vit = timm.create_model(f"{arch}.lvd142m", pretrained=True, **_DINOV2_ARGS)
        label = f"timm:{arch}.lvd142m"
    else:
        vit = timm.create_model(arch, pretrained=False, **_DINOV2_ARGS)
        label = "random"
    dim = vit.num_features * (2 if pooling == "cls+mean" else 1)
    return Encoder(name=name, model=TokenPooling(vit, pooling), preprocessing=DINOV2_PREPROCESSING, dim=dim,
                   pooling=pooling, weights=label, channels_last=False)


def _register_dinov2(name: str) -> None:
    size = {"s": "ViT-S/14", "b": "ViT-B/14", "l": "ViT-L/14", "g": "ViT-g/14"}[name.split("vit")[1][0]]
    regs = " with registers" if name.endswith("_reg") else ""

    @register_encoder(name, description=f"DINOv2 {size}{regs} (cls | mean | cls+mean pooling)")
    def builder(weights: str | None = None, pooling: str | None = None, pretrained: bool = True) -> Encoder:
        return build_dinov2(name, weights, pooling, pretrained)


for _name in _DINOV2:
    _register_dinov2(_name)


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    crop = int(cfg["input_size"][-1])
    return Preprocessing(
        resize=int(round(crop / cfg.get("crop_pct", 0.875))), crop=crop,
        mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
    )  # crop_mode stays center (timm's squash defaults would change existing fingerprints): --crop-mode picks another


#: timm's ``global_pool`` names: CNNs take avg, max, avgmax and catavgmax (avg and max side by side, twice the width);
#: ViTs avg, max, avgmax (over the patch tokens) and token (the class token); map only for models built with it.
TIMM_POOLING = ("avg", "max", "avgmax", "catavgmax", "token", "map")


def timm_pooled(name: str, model: nn.Module, pooling: str, crop: int) -> int:
    """Re-pool ``model`` in place with timm's ``global_pool`` = ``pooling``; returns its feature width.

    timm's ``reset_classifier`` swaps the pooling without touching the weights. What a model does not
    offer (token pooling without a class token, a new attention pool) is refused in one line, as is a
    pooling that leaves feature maps unpooled (checked by one pass of a blank ``crop`` x ``crop`` image).
    """
    try:
        model.reset_classifier(0, global_pool=pooling)
        with torch.inference_mode():
            out = model.eval()(torch.zeros(1, 3, crop, crop))  # eval: leave batch-norm statistics alone
    except Exception as exc:  # noqa: BLE001 - timm refuses with asserts, type and value errors alike
        raise EncoderError(f"encoder {name} does not offer pooling {pooling!r}: {first_line(exc, None)}") from None
    if out.ndim != 2:
        raise EncoderError(f"encoder {name} with pooling {pooling!r} gives unpooled {tuple(out.shape[1:])} maps; "
                           f"choose another of {', '.join(TIMM_POOLING)}")
    return int(out.shape[-1])


@register_encoder("timm", description="any timm model, pooled by timm (timm:resnet50.a1_in1k, timm:vit_small_patch16_224, ...)", family=True)
def timm_family(model_name: str, weights: str | None = None, pooling: str | None = None) -> Encoder:
    """``timm:<model>``; ``pooling`` is timm's ``global_pool`` (:data:`TIMM_POOLING`), None keeps the model's own."""
    import timm

    name = f"timm:{model_name}"
    pooling = check_pooling(name, pooling, TIMM_POOLING, default=None)  # before any download
    if not timm.list_models(model_name.split(".")[0]):
        raise EncoderError(f"timm has no model {model_name!r}")
    if weights is None:
        with hub_download(name):
            model = timm.create_model(model_name, pretrained=True, num_classes=0)
        label = name
    else:
        model = timm.create_model(model_name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(Path(weights).resolve())})
        label = str(Path(weights).resolve())
    preprocessing = _timm_preprocessing(model)
    dim = int(model.num_features) if pooling is None else timm_pooled(name, model, pooling, preprocessing.crop)
    return Encoder(name=name, model=model, preprocessing=preprocessing, dim=dim, pooling=pooling, weights=label,
                   channels_last="vit" not in model_name)
