"""embedstore: extract frozen embeddings once, reuse them for every experiment.

Data flows one way: source -> encoder -> store -> heads/index -> report.
The notebook API mirrors the CLI::

    from embedstore import FeatureStore, extract, open_source, create_encoder

    source = open_source("HAM10000_metadata.csv", images="images/", id_col="image_id")
    extract(source, create_encoder("mobilenet_v2"), "stores/ham10000.zarr")
    X, table = FeatureStore.open("stores/ham10000.zarr").load("mobilenet_v2")
"""

__version__ = "0.1.0"

from embedstore.errors import EmbedstoreError  # noqa: E402
from embedstore.sources import open_source  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402

# The encoders and the extraction engine import torch and torchvision (seconds), so they are
# loaded on first access (PEP 562) rather than here: `import embedstore` and commands that
# never build a model (`embedstore --help`, `report`, `ls`, `probe`, `match`) start without torch.
# `from embedstore import extract, create_encoder` works as before and gives the functions.
_LAZY = {
    "create_encoder": "embedstore.encoders",
    "list_encoders": "embedstore.encoders",
    "register_encoder": "embedstore.encoders",
    "extract": "embedstore.extraction",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "EmbedstoreError",
    "FeatureStore",
    "create_encoder",
    "extract",
    "list_encoders",
    "open_source",
    "register_encoder",
]
