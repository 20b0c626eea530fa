"""Short, stable identities: a feature set's key from its configuration, and a digest of a sequence of values."""

from __future__ import annotations

import hashlib
import json

import numpy as np


def fingerprint(config: dict) -> str:
    """A short, stable key for a feature-set configuration (canonical JSON, sha256, 16 hex digits)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digest(values) -> str:
    """A short sha256 (16 hex digits) of a sequence's values in order: row ids, labels, row indices, features."""
    a = np.asarray(values)
    if a.dtype == object:
        a = a.astype(str)
    elif a.dtype.kind in "iub":
        a = a.astype(np.int64)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
