"""scikit-learn-compatible heads on cached embeddings, and the stacker that combines them.

``make_head("logreg", C=0.5)`` builds a head by name; :data:`HEADS` lists them;
:func:`coerce_params` checks the parameters a user fixes; :func:`save_head` and
:func:`load_head` write and read a fitted head without pickle.
"""

from __future__ import annotations

from embedstore.errors import ConfigError
from embedstore.heads.base import EmbeddingHead, Preprocessor, undersample_indices
from embedstore.heads.columns import ColumnsHead
from embedstore.heads.decision import DECISIONS, BalancedDecision, decide
from embedstore.heads.knn import KNNHead
from embedstore.heads.lgbm import LGBMHead
from embedstore.heads.linear import LogRegHead, SVMHead
from embedstore.heads.mlp import MLPHead
from embedstore.heads.params import coerce_params, head_parameters
from embedstore.heads.saved import load_head, save_head
from embedstore.heads.stack import StackHead, select_columns

#: Base heads by name (the stack is built from these by :mod:`embedstore.probe`).
HEADS = {"logreg": LogRegHead, "knn": KNNHead, "svm": SVMHead, "lgbm": LGBMHead, "mlp": MLPHead}


def make_head(name: str, **params):
    """A head by name with the given parameters (unknown names raise ConfigError)."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}: choose one of {', '.join([*HEADS, 'stack'])}")
    return HEADS[name](**params)


__all__ = [
    "DECISIONS", "HEADS", "BalancedDecision", "ColumnsHead", "EmbeddingHead", "KNNHead", "LGBMHead", "LogRegHead", "MLPHead", "Preprocessor", "SVMHead",
    "StackHead", "coerce_params", "decide", "head_parameters", "load_head", "make_head", "save_head", "select_columns",
    "undersample_indices",
]
