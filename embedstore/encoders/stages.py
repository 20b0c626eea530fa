"""``pooling="stages"`` for CNN encoders: the pooled output of every stage, not only the last one.

A CNN's penultimate features are the global average of its last block, tuned
to ImageNet's object categories. Earlier stages carry colour and texture at
finer scales, which transfer better to dermoscopy, where the diagnosis lies in
pigment networks and dots rather than object shape. ``stages`` pools the output
of the last block of each stage (each run of blocks with one output width),
from stride 4 on, and concatenates them: for MobileNetV2 the 24-, 32-, 64-,
96-, 160- and 320-channel stages and the 1280-channel head, 1,976 values whose
last 1,280 are the default features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embedstore.errors import EncoderError

#: Pooling choices of the CNN encoders: ``None`` (the classifier's own average pool) or ``"stages"``.
CNN_POOLING = ("stages",)


class StagePooling(nn.Module):
    """Runs ``blocks`` in order and returns the spatial mean of the blocks at ``taps``, concatenated."""

    def __init__(self, blocks: Sequence[nn.Module], taps: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.taps = sorted(taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


def stage_taps(blocks: Sequence[nn.Module], size: int = 224) -> tuple[list[int], int]:
    """Indices of the last block of every stage at stride 4 or more, and the width of their concatenation.

    Found by passing one ``size`` x ``size`` image through the blocks, so any
    network described as a sequence of blocks works without a table of its stages.
    """
    shapes = []
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        for block in blocks:
            x = block.eval()(x)  # eval: a training-mode pass would move batch-norm statistics towards this blank image
            shapes.append(tuple(x.shape))
    taps = [i for i, s in enumerate(shapes)
            if size // s[-1] >= 4 and (i + 1 == len(shapes) or shapes[i + 1][1] != s[1])]
    return taps, sum(shapes[i][1] for i in taps)


def cnn_blocks(name: str, model: nn.Module) -> list[nn.Module]:
    """The blocks of a CNN's convolutional trunk in forward order (its classifier left out)."""
    if hasattr(model, "blocks_in_order"):  # EfficientNetLite0
        return model.blocks_in_order()
    if isinstance(getattr(model, "features", None), nn.Sequential):  # MobileNets, EfficientNets, DenseNets, ConvNeXt
        return list(model.features)
    if all(hasattr(model, f"layer{k}") for k in range(1, 5)):  # ResNet family
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    raise EncoderError(f"encoder {name} has no stages pooling; it is offered for CNNs with a `features` trunk "
                       f"(MobileNets, EfficientNets, DenseNets, ConvNeXt) and ResNets")


def pooled_model(name: str, model: nn.Module, pooling: str | None) -> tuple[nn.Module, str | None, int | None]:
    """``model`` itself (``pooling=None``), or its :class:`StagePooling` and feature width (``"stages"``)."""
    if pooling is None:
        return model, None, None
    if pooling not in CNN_POOLING:
        raise EncoderError(f"encoder {name} has no pooling {pooling!r}; choose {', '.join(CNN_POOLING)} "
                           f"(or none for its own average pool)")
    blocks = cnn_blocks(name, model)
    taps, dim = stage_taps(blocks)
    return StagePooling(blocks, taps), pooling, dim
