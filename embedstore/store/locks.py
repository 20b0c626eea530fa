"""The store's writer locks: flock files under ``<store>/.locks/``, released by the kernel when a process dies.

* ``prepare`` serialises the short steps that change shared metadata (manifest merge, feature-set creation
  and growth, run records);
* ``<key>.set``, ``<key>.shard-i-of-n`` and ``<key>.n<n>`` keep two extractions from writing the same feature
  set, while letting the ``n`` shards of one extraction write it together;
* ``<key>.writers`` keeps the Ray workers of a killed driver from writing beside a new driver's
  (:func:`block_writers_lock`).

Each holder writes who it is into the lock file, so a refusal names the process in the way.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

from embedstore.errors import StoreError
from embedstore.store.disk import storage_errors

_HOLDER_BYTES = 200  # what a lock file says about its holder


@contextmanager
def metadata_lock(store: Path):
    """Hold ``.locks/prepare`` exclusively (blocking: the steps it guards take a moment); a full or read-only
    disk there is one line."""
    with storage_errors(store, f"updating {store}"):
        (store / ".locks").mkdir(exist_ok=True)
        with open(store / ".locks" / "prepare", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


@contextmanager
def writer_lock(store: Path, key: str, shard: tuple[int, int] = (0, 1)):
    """Hold the locks of writing shard ``(i, n)`` of feature set ``key`` (released when the process dies).

    An unsharded extraction (n = 1) holds ``<key>.set`` exclusively. A shard holds it shared, its own
    ``<key>.shard-i-of-n`` exclusively and ``<key>.n<n>`` shared, then refuses if any ``<key>.n<m>``
    (m != n) is held: of two extractions with different n starting together both may refuse, never both run.
    """
    index, count = shard
    me = f"{f'shard {index}/{count} of ' if count > 1 else ''}an extraction (pid {os.getpid()})"
    with ExitStack() as held:
        with storage_errors(store, f"locking feature set {key}"):
            (store / ".locks").mkdir(exist_ok=True)
            held.enter_context(_flock(store, key, "set", fcntl.LOCK_EX if count == 1 else fcntl.LOCK_SH, me))
            if count > 1:
                held.enter_context(_flock(store, key, f"shard-{index}-of-{count}", fcntl.LOCK_EX, me))
                held.enter_context(_flock(store, key, f"n{count}", fcntl.LOCK_SH, me, wait=True))
                _refuse_other_shard_counts(store, key, count)
        yield


@contextmanager
def _flock(store: Path, key: str, part: str, mode: int, me: str, wait: bool = False):
    """flock ``.locks/<key>.<part>`` (``wait``: block, for locks only ever held exclusively for an instant)
    and note ``me`` in it; StoreError naming the holder when it is taken."""
    fd = os.open(store / ".locks" / f"{key}.{part}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise StoreError(f"feature set {key} of {store} is being written by {_holder(fd)}; "
                             f"wait for it to finish") from None
        os.pwrite(fd, me.encode().ljust(_HOLDER_BYTES), 0)  # one write: concurrent holders never interleave
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    return os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace").strip() or "another process"


def _refuse_other_shard_counts(store: Path, key: str, count: int) -> None:
    """StoreError if shards of ``key`` with another shard count hold their ``<key>.n<m>`` lock."""
    for file in (store / ".locks").glob(f"{key}.n*"):
        other = file.name.rsplit(".n", 1)[1]
        if not other.isdigit() or int(other) == count:
            continue
        fd = os.open(file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: released at close
        except BlockingIOError:
            raise StoreError(f"feature set {key} of {store} is being written by {_holder(fd)}; the shards of one "
                             f"extraction must all be split {other} ways: wait for it to finish, or split this "
                             f"one {other} ways too") from None
        finally:
            os.close(fd)


@contextmanager
def block_writers_lock(store: Path, key: str, exclusive: bool):
    """Hold ``.locks/<key>.writers``: shared by each Ray worker while it checks its driver's token and writes a
    block, exclusively (waiting) by a driver while it puts its own token in place.

    A killed driver releases the feature set's lock at once, but its workers may still be writing a block for a
    few seconds. A new driver therefore waits for the blocks being written, and after it has placed its token the
    old workers refuse to write (:mod:`embedstore.ray_extraction`).
    """
    with storage_errors(store, f"locking feature set {key}"):
        fd = os.open(store / ".locks" / f"{key}.writers", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
