"""A throw-away PostgreSQL server in a folder of its own, for the shared-study tests and benchmark.

It runs Debian's ``postgresql`` binaries (installed by ``tools/install_system_deps.sh``): ``initdb`` into the
folder, ``pg_ctl start`` on a free port of 127.0.0.1 with trust authentication, ``pg_ctl stop -m immediate`` at
the end. PostgreSQL refuses to run as root, so under root every server command runs as Debian's ``postgres``
user (``runuser``), which is why this is not ``pytest-postgresql`` (it calls ``pg_ctl`` as the current user).

    with PostgresServer() as server:
        url = server.database("studies")   # postgresql://embedstore@127.0.0.1:PORT/studies
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "embedstore"


def binaries() -> Path | None:
    """The folder of PostgreSQL's server programs (``initdb``, ``pg_ctl``), or None when none is installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """A PostgreSQL cluster in a new folder of the system's temporary folder (one that the ``postgres`` user can
    reach: a test's own folder may sit under a root-only one), started on entering, stopped immediately and
    removed on leaving."""

    def __init__(self):
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server programs: run tools/install_system_deps.sh")
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="embedstore-postgres-"))

    def __enter__(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        try:
            self._run("initdb", "-D", str(self.folder / "data"), "-U", USER, "-A", "trust", "-E", "UTF8",
                      "--no-locale")
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"), "-w",
                      "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200",
                      "start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.url(name)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        if done.returncode:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
