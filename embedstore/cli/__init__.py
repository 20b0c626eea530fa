"""Command-line interface: one module per command, parsing and printing only.

Each command module registers itself on :data:`embedstore.cli.app.app`; the
work is done by the library API so a notebook can do the same.
"""

import sys

import click

from embedstore.cli.app import app
from embedstore.errors import EmbedstoreError

# Command modules (importing them registers their commands).
from embedstore.cli import extract as _extract  # noqa: F401,E402
from embedstore.cli import ls as _ls  # noqa: F401,E402
from embedstore.cli import demo as _demo  # noqa: F401,E402
from embedstore.cli import report as _report  # noqa: F401,E402
from embedstore.cli import probe as _probe  # noqa: F401,E402
from embedstore.cli import match as _match  # noqa: F401,E402


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except EmbedstoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
