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
from embedstore.encoders import create_encoder, list_encoders, register_encoder  # noqa: E402
from embedstore.sources import open_source  # noqa: E402
from embedstore.store import FeatureStore  # noqa: E402
from embedstore.extraction import extract  # noqa: E402  (the function; it shadows the module name on purpose)

__all__ = [
    "EmbedstoreError",
    "FeatureStore",
    "create_encoder",
    "extract",
    "list_encoders",
    "open_source",
    "register_encoder",
]
