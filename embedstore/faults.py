"""Named crash points, so the fault-injection tests can kill a command exactly where it hurts most.

Each risky step of embedstore (a resize, a manifest replace, a status write, a
folder replace, ...) calls :func:`point` with its name. Normally that is one
dictionary lookup and nothing else. When the environment variable
``EMBEDSTORE_FAULT`` names the point (``name``, or ``name:N`` for its N-th
passage; ``name:N@K`` only in tuning worker K, :mod:`embedstore.tune`), the process kills itself with SIGKILL there: no cleanup, no
``finally``, exactly as a power cut or the out-of-memory killer would.
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
    if _passed[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
