"""Encoders: the registry and its families (one file each).

``create_encoder(name, weights=None, pooling=None)`` builds any registered
encoder; ``list_encoders()`` shows them. Importing this package registers
every family; adding an encoder is one decorated builder function.
"""

from embedstore.encoders.registry import (
    CROP_MODES,
    Encoder,
    Preprocessing,
    create_encoder,
    list_encoders,
    register_encoder,
    state_dict_sha256,
)
from embedstore.encoders import efficientnet_lite, open_clip_models, timm_models, torchvision_models  # noqa: F401

__all__ = ["CROP_MODES", "Encoder", "Preprocessing", "create_encoder", "list_encoders", "register_encoder", "state_dict_sha256"]
