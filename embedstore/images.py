"""Image files as a source holds them: read only regular files, never from outside the image folder.

Hostile files never hang a read or escape the image folder: only regular files are opened (a FIFO, a device
or a socket is refused with its kind, checked before opening), and an image path that leads out of the image
folder, by ``..`` or through a symlink, is found by :func:`escaping_paths` before anything is read.
"""

from __future__ import annotations

import os
import stat as stat_module
from pathlib import Path
from typing import Iterable

from embedstore.errors import SourceError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
_FILE_KINDS = ((stat_module.S_ISFIFO, "fifo"), (stat_module.S_ISCHR, "character device"),
               (stat_module.S_ISBLK, "block device"), (stat_module.S_ISSOCK, "socket"),
               (stat_module.S_ISDIR, "directory"))


def _not_regular(mode: int) -> SourceError | None:
    """The error for a file that is not a regular file (reading a FIFO or a device may block or never end)."""
    if stat_module.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
    return SourceError(f"not a regular file ({kind})")


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of ``path``, refused with :class:`SourceError` unless it is a regular file.

    The kind is checked with ``stat`` before opening, and again on the open descriptor (opened
    non-blocking, so a FIFO swapped in meanwhile cannot block either).
    """
    error = _not_regular(os.stat(path).st_mode)
    if error is not None:
        raise error
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
        error = _not_regular(os.fstat(fh.fileno()).st_mode)
        if error is not None:
            raise error
        return fh.read()


def regular_file_stat(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a regular file; None if it is missing, unreadable or not a regular file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns) if stat_module.S_ISREG(st.st_mode) else None


def _inside(root: str, path: str) -> bool:
    """True if ``path`` (normalised, absolute or relative to ``root``) is ``root`` or lies under it."""
    full = os.path.normpath(os.path.join(root, path))
    return full == root or full.startswith(root.rstrip(os.sep) + os.sep)


def escaping_paths(root: Path, paths: Iterable[str]) -> list[str]:
    """The image paths that lead out of ``root``: lexically (``..``, absolute) or through a symlink.

    The root itself may be a symlink (a data folder kept elsewhere). Only links are resolved: one
    ``lstat`` per image, and each sub-folder once.
    """
    root_s = os.path.normpath(str(root))
    real_root = os.path.realpath(root_s)
    folders: dict[str, bool] = {}
    out = []
    for rel in paths:
        if os.path.isabs(rel) or not _inside(root_s, rel):
            out.append(f"{rel!r}")
            continue
        full = os.path.join(root_s, rel)
        folder = os.path.dirname(os.path.normpath(full))
        if folder not in folders:
            folders[folder] = _inside(real_root, os.path.realpath(folder))
        try:
            is_link = stat_module.S_ISLNK(os.lstat(full).st_mode)
        except OSError:
            is_link = False  # missing: recorded as a failed row later
        if not folders[folder] or (is_link and not _inside(real_root, os.path.realpath(full))):
            out.append(f"{rel!r} -> {os.path.realpath(full)}")
    return out


def image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (any depth), by suffix, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
