"""How a report names files: relative to the folder the report sits in, never a reader-specific absolute path.

A report is mailed and moved; ``/home/alice/...`` in its header tells the next reader nothing
and leaks the author's folders. A path close to the report's folder is shown relative to it
(``../stores/ham.zarr``); one further away by its name alone (``ham.zarr``).
"""

from __future__ import annotations

import os
from pathlib import Path

from embedstore.studies import shown_url

MAX_CLIMB = 2  # at most this many ``..`` in a path shown relative to the report


def shown_path(path: str | Path, base: str | Path) -> str:
    """``path`` as the report shows it: relative to ``base`` when close to it, else its name."""
    path, base = Path(path).expanduser().absolute(), Path(base).expanduser().absolute()
    relative = Path(os.path.relpath(path, base))
    if relative.parts.count(os.pardir) <= MAX_CLIMB:
        return relative.as_posix()
    return path.name


def shown_storage(storage: str, base: str | Path) -> str:
    """An Optuna storage as the report shows it: a sqlite file by :func:`shown_path`, any other URL
    without its user and password (it names a server, not a file of the reader's)."""
    if storage.startswith("sqlite:///"):
        return shown_path(storage[len("sqlite:///"):], base)
    if "://" in storage:
        return shown_url(storage)
    return shown_path(storage, base)
