"""Named crash points, so the fault-injection tests can kill a command exactly where it hurts most.

Each risky step of embedstore (a resize, a manifest replace, a status write, a
folder replace, ...) calls :func:`point` with its name. Normally that is one
dictionary lookup and nothing else. When the environment variable
``EMBEDSTORE_FAULT`` names the point (``name``, or ``name:N`` for its N-th
passage; ``name:N@K`` only in tuning worker K, :mod:`embedstore.tune`), the process kills itself with SIGKILL there: no cleanup, no
``finally``, exactly as a power cut or the out-of-memory killer would. With ``EMBEDSTORE_FAULT_ONCE=FILE``
only the first process to get there dies (it creates FILE), so a worker that is restarted (a Ray worker,
:mod:`embedstore.ray_extraction`) passes the point the second time.
``tests/test_faults.py`` uses it to check that a rerun after each such kill
loses nothing and equals an uninterrupted run (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "EMBEDSTORE_FAULT"
#: Set by a spawned tuning worker to its number (1, 2, ...), so a fault can name one worker of several.
WORKER = "EMBEDSTORE_WORKER"
#: A file: only the process that creates it dies at the point (the first to get there).
ONCE = "EMBEDSTORE_FAULT_ONCE"

#: Every crash point, with the step it interrupts (docs/RELIABILITY.md lists the same).
POINTS = {
    "resize": "between growing one array of a feature set and the next",
    "manifest-replace": "after the new manifest is written aside, before it replaces the old one",
    "status-write": "after a block's features are written, before its status commits the rows",
    "folder-replace": "after a run folder is complete aside, before it replaces the old one",
    "projected-set-replace": "after a new projected feature set is written, before the old one is removed",
    "index-save": "between writing a FAISS index file and its sidecar",
    "trial-commit": "after an Optuna trial is computed, before it is stored as complete",
    "trial-claimed": "after a shared study's trial is asked, before its worker names itself its owner",
    "ray-collect": "after a Ray worker's block is final in the store, before the driver counts it",
}

_passed: Counter = Counter()


def point(name: str) -> None:
    """Kill this process here if ``EMBEDSTORE_FAULT`` names this point (and this is its N-th passage)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    spec, _, worker = spec.partition("@")
    target, _, nth = spec.partition(":")
    if target != name or (worker and os.environ.get(WORKER) != worker):
        return
    _passed[name] += 1
    if _passed[name] >= int(nth or 1) and _first_to_die():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_to_die() -> bool:
    """True without ``EMBEDSTORE_FAULT_ONCE``; with it, True only for the process that creates its file."""
    once = os.environ.get(ONCE)
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
