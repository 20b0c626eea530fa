"""The one place a device name (``--device``) becomes a torch device (extraction and projection heads alike).

torch is imported when a device is resolved, not when this module is: ``embedstore --help``, and a
match run without a projection head, never load it.
"""

from __future__ import annotations

import sys
from pathlib import Path
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
    return parse_device(device)


def parse_device(device: str) -> torch.device:
    """A device name (``cpu``, ``cuda[:N]``) as a torch device, whether or not it is present here (a Ray
    worker's device is its node's); ConfigError (one line) for a name that is none."""
    import torch

    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None


def device_name(device: str) -> str:
    """:func:`resolve_device` as a name (``cpu``, ``cuda:0``), without importing torch (2 s) where ``auto``
    can only mean the CPU: on Linux with no GPU driver loaded (NVIDIA's, ROCm's or WSL's device file)."""
    if device == "cpu" or (device == "auto" and not _gpu_driver_possible()):
        return "cpu"
    return str(resolve_device(device))


def _gpu_driver_possible() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg"))
