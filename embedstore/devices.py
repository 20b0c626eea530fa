"""The one place a device name (``--device``) becomes a torch device (extraction and projection heads alike).

torch is imported when a device is resolved, not when this module is: ``embedstore --help``, and a
match run without a projection head, never load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedstore.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:N]``; ConfigError (one line) for a device
    that is unknown or, for CUDA, not available."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is available; use cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
