"""Loading weights from local files, and turning failed hub downloads into one clear line."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from embedstore.errors import EncoderError

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
        raise EncoderError(f"cannot read weights from {path}: {str(exc).splitlines()[0]}") from None
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


@contextlib.contextmanager
def hub_download(name: str):
    """Turn any failure while fetching pretrained weights into one line that names the offline option."""
    try:
        yield
    except EncoderError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, hub and cache errors all mean the same to the user
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise EncoderError(
            f"could not download the pretrained weights of {name} ({reason}); "
            f"pass --weights PATH to load a local file (safetensors or a torch checkpoint), "
            f"or use an offline encoder (mobilenet_v2, efficientnet_lite0)"
        ) from None
