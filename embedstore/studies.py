"""Where tuning studies live, and how several workers share one.

A storage is named by one string, as ``--storage`` takes it:

- an SQLAlchemy URL that Optuna's :class:`optuna.storages.RDBStorage` opens: ``sqlite:///path.db`` (the default,
  :func:`embedstore.layout.study_storage`), ``postgresql://user:pass@host/db``, ``mysql://...``;
- a file path ending in ``.journal``: Optuna's :class:`~optuna.storages.journal.JournalFileBackend`, an
  append-only log that many processes on one machine (or on a filesystem with working locks) write at once
  without a server.

Workers that share a study (``--tune-workers``, or the same probe started on several machines) open the storage
with :func:`open_storage` ``(shared=True)``: on an RDB storage each running trial then beats a heartbeat, and a
trial whose worker stopped beating (killed, or its machine lost) is failed and queued again with the same
parameters (:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`). The journal has no heartbeat; there,
only a dead worker of this machine is noticed (by its pid, :func:`embedstore.tune`).

Before a worker asks for a new trial it holds the study's claim lock (:func:`claim_lock`), counts the trials
claimed so far and stops at the requested number, so a study shared by any number of workers ends with exactly
that many. The lock is PostgreSQL's advisory lock on a PostgreSQL storage (every machine sees it), a file lock
beside a sqlite or journal file, and a lock file of this machine for any other URL (exact on one machine only).
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna

from embedstore.errors import ConfigError, first_line

#: Seconds between heartbeats of a shared study's running trial, and the silence after which it is stale.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
#: How many times a stale trial is queued again before it is left failed.
MAX_RETRY = 2

JOURNAL_SUFFIX = ".journal"


def is_journal(storage: str) -> bool:
    """Whether ``storage`` names a journal file (a path ending in ``.journal``) rather than a database URL."""
    return "://" not in storage and storage.endswith(JOURNAL_SUFFIX)


def open_storage(storage: str, shared: bool = False) -> optuna.storages.BaseStorage:
    """The Optuna storage ``storage`` names; with ``shared``, an RDB storage beats a heartbeat every
    :data:`HEARTBEAT_SECONDS` for its running trials and retries those silent for :data:`GRACE_SECONDS`.
    One clear line when it cannot open."""
    check_storage(storage)
    try:
        if is_journal(storage):
            path = Path(storage).expanduser()
            if not path.parent.is_dir():
                raise ConfigError(f"cannot open journal storage {storage}: folder {path.parent} does not exist")
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        if not shared:
            return optuna.storages.RDBStorage(storage)
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9; they are what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=requeue)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed URL, unknown dialect, missing driver or refused login
        raise ConfigError(f"cannot open Optuna storage {shown_url(storage)}: {first_line(exc, None)}") from None


def check_storage(storage: str) -> None:
    """Refuse, in one line, a ``--storage`` that is neither a database URL nor a journal file."""
    if not is_journal(storage) and "://" not in storage:
        raise ConfigError(f"--storage {storage!r} is neither a database URL (sqlite:///..., postgresql://...) nor "
                          f"a journal file (a path ending in {JOURNAL_SUFFIX})")


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a stale trial again, WAITING with its parameters, at most :data:`MAX_RETRY` times in its line of
    retries; the retry records ``failed_trial`` (the first of the line) and ``retry_history`` as Optuna's
    :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` does, but not the dead worker's owner and fold
    scores (the worker that takes it names itself)."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history}))


def fail_silent_trials(study: optuna.Study) -> None:
    """Fail (and queue again, by the storage's callback :func:`requeue`) the RUNNING trials whose heartbeat has been
    silent for the grace period; nothing on a storage without heartbeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def lock_is_global(storage: str) -> bool:
    """Whether every worker of a study, on any machine, takes the same claim lock: PostgreSQL's advisory lock, or
    the lock file beside a sqlite or journal file; not for another server, whose lock is per machine."""
    return _is_postgres(storage) or storage_file(storage) is not None


def _is_postgres(storage: str) -> bool:
    """Whether ``storage`` is a PostgreSQL URL (``postgresql://``, ``postgresql+psycopg://``, ...)."""
    return storage.split(":", 1)[0].startswith("postgresql")


def is_server(storage: str) -> bool:
    """Whether ``storage`` is a database server (PostgreSQL, MySQL, ...), which other machines may share."""
    return "://" in storage and not storage.startswith("sqlite")


def storage_file(storage: str) -> Path | None:
    """The file a sqlite URL or journal path keeps its studies in; None for a server."""
    if is_journal(storage):
        return Path(storage).expanduser()
    if storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///"):])
    return None


@contextmanager
def claim_lock(storage: str, study_name: str) -> Iterator:
    """A lock that every worker of ``study_name`` holds while it counts the study's trials and asks for one.

    Yields a callable that releases the lock early (a worker releases it as soon as its trial is asked, before
    computing it); leaving the block releases it if still held.
    """
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)  # the URL may be
    # spelled otherwise on another machine; an advisory lock is one database's already
    try:
        release = _postgres_lock(storage, key) if _is_postgres(storage) else _file_lock(storage, key)
    except Exception as exc:  # noqa: BLE001 - a lost server or an unwritable folder: one line
        raise ConfigError(f"cannot take the claim lock of study {study_name!r} in {shown_url(storage)}: "
                          f"{first_line(exc, None)}") from None
    held = [True]

    def release_once() -> None:
        if held[0]:
            held[0] = False
            release()

    try:
        yield release_once
    finally:
        release_once()


def _postgres_lock(storage: str, key: int):
    """Take PostgreSQL's session advisory lock ``key`` on a connection of its own; return its release."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
    connection = engine.connect()
    connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})

    def release() -> None:
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            connection.close()
            engine.dispose()

    return release


def _file_lock(storage: str, key: int):
    """Take an exclusive POSIX record lock on the study's byte of a file beside the storage's file (or, for a server
    other than PostgreSQL, of a file in this machine's temporary folder: exact on one machine only); return its
    release. Record locks belong to the process, and one process holds one claim lock at a time."""
    beside = storage_file(storage)  # one file for all the file's studies, a byte-range lock per study
    path = (beside.with_name(beside.name + ".claim.lock") if beside is not None
            else Path(tempfile.gettempdir()) / f"embedstore-claim-{key & 0xFFFFFFFFFFFF:012x}.lock")
    handle = open(path, "a")
    offset = key & 0x7FFFFFFF  # one byte of the file per study: a long claim (a C path) holds its study's only
    fcntl.lockf(handle, fcntl.LOCK_EX, 1, offset)

    def release() -> None:
        fcntl.lockf(handle, fcntl.LOCK_UN, 1, offset)
        handle.close()

    return release


def shown_url(storage: str) -> str:
    """``storage`` without its user and password, as messages and reports show it."""
    return re.sub(r"://[^/@]*@", "://", storage)
