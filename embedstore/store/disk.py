"""What the disk under a store can refuse (full, read-only), as one line instead of a traceback."""

from __future__ import annotations

import errno
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from embedstore.errors import StoreError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextmanager
def storage_errors(path: Path, doing: str, kept: Callable[[], str] | None = None):
    """Turn what the disk under ``path`` can refuse while ``doing`` (full, read-only) into one :class:`StoreError`.

    ``kept`` says what survived a full disk (e.g. "412 rows are final and kept"); other OSErrors pass through.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            saved = kept() if kept else "nothing was lost"
            raise StoreError(f"disk full while {doing}: {saved}; free space and rerun the same command "
                             f"to resume") from None
        if exc.errno in _NOT_WRITABLE:
            raise StoreError(f"feature store {path} is not writable ({exc.strerror}: {exc.filename or path}); "
                             f"make it writable or use another store path") from None
        raise
