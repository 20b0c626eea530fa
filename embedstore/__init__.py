"""embedstore: extract frozen embeddings once, reuse them for every experiment.

Data flows one way: source -> encoder -> store -> heads/index -> report.
The notebook API mirrors the CLI::

    from embedstore import FeatureStore, extract, open_source, create_encoder

    source = open_source("HAM10000_metadata.csv", images="images/", id_col="image_id")
    extract(source, create_encoder("mobilenet_v2"), "stores/ham10000.zarr")
    X, table = FeatureStore.open("stores/ham10000.zarr").load("mobilenet_v2")

Names are imported on first use, so ``import embedstore`` (and the CLI's
start-up) does not pay for torch until a command needs it.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "EmbedstoreError": "embedstore.errors",
    "FeatureStore": "embedstore.store",
    "create_encoder": "embedstore.encoders",
    "list_encoders": "embedstore.encoders",
    "register_encoder": "embedstore.encoders",
    "open_source": "embedstore.sources",
    "extract": "embedstore.extract",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'embedstore' has no attribute {name!r}")
