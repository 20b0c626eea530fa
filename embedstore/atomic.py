"""The one way embedstore replaces a file or a folder: never half-written, never losing the old version,
never touching what embedstore did not write.

* :func:`write_file` writes a file aside (``.<name>.embedstore-tmp-<pid>-<rand>``), flushes it to disk and
  renames it over the target: readers see the old file or the new one, never a torn one.
* :func:`replacing_folder` hands out a staging folder beside the target and, when the block succeeds,
  swaps it with the target in one ``renameat2(RENAME_EXCHANGE)`` system call (Linux), then deletes the old
  version. A kill at any moment leaves either the old folder or the new one in place, plus at most a hidden
  staging folder. Where the exchange is not supported the swap takes two renames, and a kill between them
  leaves the old folder under a hidden name that :func:`clean_stale` puts back on the next run.
* A folder is replaced only if embedstore wrote it: it carries the marker file ``.embedstore`` (older run
  folders: a ``run.json`` with ``format`` and ``kind``), or is empty. Anything else (the user's notes, a
  feature store, the working directory) is refused in one line, whatever ``overwrite`` says.
* :func:`staging_path` and :func:`rename_into_place` build something new under a hidden name and give it its
  name in one rename (a new feature set of the store).
* :func:`remove_folder` makes a folder vanish in one rename before deleting it.
* :func:`clean_stale` removes the hidden leftovers of killed processes (their pid is gone) next to a path.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from embedstore import faults
from embedstore.errors import ConfigError

MARKER = ".embedstore"
_TMP = ".embedstore-tmp-"
_OLD = ".embedstore-old-"


def _hidden(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}{kind}{os.getpid()}-{secrets.token_hex(3)}"


def staging_path(path: str | Path) -> Path:
    """A hidden name beside ``path`` to build it under before renaming it into place; :func:`clean_stale`
    removes it if this process dies first."""
    return _hidden(Path(path), _TMP)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rename_into_place(staging: str | Path, path: str | Path) -> None:
    """Give a finished ``staging`` file or folder (see :func:`staging_path`) its final name ``path`` in one rename,
    made durable by syncing the folder that holds it."""
    os.rename(staging, path)
    _fsync_dir(Path(path).parent)


def write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` with what ``write(tmp_path)`` writes, atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden(path, _TMP)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """:func:`write_file` for text (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def written_by_embedstore(folder: str | Path) -> bool:
    """True when ``folder`` carries embedstore's marker, or is a run folder of an older embedstore."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    try:
        run = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and "format" in run and run.get("kind") in ("probe", "match")


def check_replaceable(out: str | Path, overwrite: bool, what: str = "run folder") -> None:
    """Raise :class:`ConfigError` unless ``out`` may become a new ``what``: absent, empty, or (with
    ``overwrite``) one that embedstore wrote."""
    out = Path(out)
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ConfigError(f"--out {out} is the folder you are working in (or holds it); name a {what} inside it")
    blocking = next((d for d in out.parents if d.exists() and not d.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"cannot make {what} {out}: {blocking} is a file, not a folder")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"{out} exists and is not a {what} embedstore wrote; choose another --out")
    if not any(out.iterdir()):
        return
    if not written_by_embedstore(out):
        raise ConfigError(f"{out} holds files embedstore did not write; refusing to replace it: choose another --out")
    if not overwrite:
        raise ConfigError(f"{what} {out} already exists; pass --overwrite to replace it, or another --out")


@contextmanager
def replacing_folder(out: str | Path, *, overwrite: bool, kind: str, what: str = "run folder") -> Iterator[Path]:
    """Yield an empty staging folder; when the block returns, it replaces ``out`` in one step.

    ``out`` is checked first (:func:`check_replaceable`) and again just before the swap. The staging
    folder gets the marker (``kind`` in it), so the next run may replace it. If the block raises, the
    staging folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_replaceable(out, overwrite, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    staging = _hidden(out, _TMP)
    staging.mkdir()
    try:
        (staging / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        yield staging
        check_replaceable(out, overwrite, what)
        faults.point("folder-replace")
        _swap_in(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, out: Path) -> None:
    """Put ``staging`` at ``out``; the previous ``out`` (if any) ends up at ``staging`` and is deleted."""
    if not out.exists():
        rename_into_place(staging, out)
        return
    if not _exchange(staging, out):
        old = _hidden(out, _OLD)
        os.rename(out, old)
        os.rename(staging, out)
        os.rename(old, staging)
    _fsync_dir(out.parent)
    shutil.rmtree(staging, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def remove_folder(folder: str | Path, beside: str | Path | None = None) -> None:
    """Delete ``folder`` so that it vanishes in one step: it is renamed to a hidden name beside ``beside``
    (default: ``folder`` itself), then deleted. A kill during the deletion leaves only that hidden folder,
    which :func:`clean_stale` of ``beside`` removes."""
    folder = Path(folder)
    if not folder.exists():
        return
    aside = _hidden(Path(beside or folder), _TMP)
    os.rename(folder, aside)
    _fsync_dir(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs on this machine (whoever owns it); a zombie (dead, not yet reaped by its
    parent) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): existing is all that can be told
    return state != "Z"


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the hidden leftovers of killed embedstore processes beside ``path``; returns what was removed.

    A staging copy (``.<name>.embedstore-tmp-<pid>-…``) whose process is gone is deleted. An old version
    parked by a two-rename swap (``.<name>.embedstore-old-<pid>-…``) is put back when ``path`` is missing
    (the kill fell between the renames), and deleted otherwise.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        for kind in (_TMP, _OLD):
            prefix = f".{path.name}{kind}"
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):].split("-")[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            if kind == _OLD and not path.exists():
                os.rename(entry, path)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
