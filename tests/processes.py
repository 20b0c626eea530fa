"""The embedstore command line in a fresh process, for tests that must see a real kill (no ``finally`` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from embedstore.faults import ENV


def run_embedstore(*args, fault: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``embedstore ARGS...``; ``fault`` names the crash point (``name`` or ``name:N``) to die at."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if fault:
        env[ENV] = fault
    return subprocess.run([sys.executable, "-m", "embedstore.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
