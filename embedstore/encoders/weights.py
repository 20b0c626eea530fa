"""Loading weights from local files, and turning failed hub downloads into one clear line.

Before a pretrained download, one short TCP connect tells whether the Hugging Face hub is reachable;
when it is not, the download runs in huggingface_hub's offline mode (the local cache only), so an
offline machine gets its one line in a moment instead of minutes of retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch

from embedstore.errors import EncoderError, first_line

# Wrappers that training checkpoints put around the state dict, outermost first.
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch checkpoint (``weights_only=True``, never arbitrary pickles).

    Common wrappers are removed: a ``state_dict``/``model``/``teacher`` entry
    (DINOv2 training checkpoints keep the teacher) and ``module.``/``backbone.``
    key prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file is the user's input
        raise EncoderError(f"cannot read weights from {path}: {first_line(exc, None)}") from None
    for key in _CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"{path} holds no state dict of tensors")
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``, allowing only the keys in ``ignore`` (e.g. a dropped classifier) to differ."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(ignore)] if ignore else result.missing_keys
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignore)] if ignore else result.unexpected_keys
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise EncoderError(f"weights in {source} do not fit this model: {'; '.join(parts)} keys")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_host() -> tuple[str, int]:
    """Host and port of the Hugging Face hub that pretrained weights come from (``HF_ENDPOINT`` respected)."""
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except ImportError:
        endpoint = urlparse("https://huggingface.co")
    return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the hub cannot be reached (one TCP connect, at most ``timeout`` seconds), or None when it can.

    Behind a proxy, or when the hub is already switched offline (``HF_HUB_OFFLINE``), nothing is tried.
    """
    if any(os.environ.get(v) for v in _PROXY_VARIABLES) or _hf_offline_flag():
        return None
    host, port = _hub_host()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


def _hf_offline_flag() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _hf_offline():
    """Switch huggingface_hub to its offline mode (cached files only, no retries) for the block."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def hub_download(name: str):
    """Turn any failure while fetching pretrained weights into one line that names the offline option.

    When the hub cannot be reached, downloads switch to the local cache at once (weights fetched
    before still load), instead of minutes of retries ending in a traceback.
    """
    unreachable = hub_unreachable()
    try:
        with _hf_offline() if unreachable else contextlib.nullcontext():
            yield
    except EncoderError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, hub and cache errors all mean the same to the user
        if unreachable:
            reason = f"no network: {unreachable}, and they are not in the local cache"
        else:
            reason = first_line(exc)
        raise EncoderError(
            f"could not download the pretrained weights of {name} ({reason}); "
            f"pass --weights FILE to load a local file (safetensors or a torch checkpoint), "
            f"or use an offline encoder (mobilenet_v2, efficientnet_lite0)"
        ) from None
