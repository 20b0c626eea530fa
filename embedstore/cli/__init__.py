"""Command-line interface: one module per command, parsing and printing only.

Each command module registers itself on :data:`embedstore.cli.app.app`; the
work is done by the library API so a notebook can do the same. :func:`main`
turns every mistake on the command line (an unknown option or command, a
missing argument, a value of the wrong type), every :class:`EmbedstoreError`
and every path the system refuses (``OSError``) into one line on stderr and exit code 2; ``--help`` exits 0, and a bare
``embedstore`` prints the help and that line, and exits 2.
"""

import importlib
import sys

from embedstore.cli.app import app
from embedstore.errors import EmbedstoreError

# Command modules (importing them registers their commands).
from embedstore.cli import extract as _extract  # noqa: F401,E402
from embedstore.cli import ls as _ls  # noqa: F401,E402
from embedstore.cli import demo as _demo  # noqa: F401,E402
from embedstore.cli import report as _report  # noqa: F401,E402
from embedstore.cli import probe as _probe  # noqa: F401,E402
from embedstore.cli import match as _match  # noqa: F401,E402
from embedstore.cli import audit as _audit  # noqa: F401,E402

INTERRUPTED = 130


def _from_both_clicks(name: str) -> tuple[type, ...]:
    """The exception class ``name`` of click and of the copy of click that newer typer versions bundle as
    ``typer._click``: commands may raise either, so both are caught."""
    classes = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


_CLICK_ERRORS = _from_both_clicks("ClickException")
_NO_ARGS = _from_both_clicks("NoArgsIsHelpError")
_ABORTS = _from_both_clicks("Abort") + (KeyboardInterrupt,)


def _usage_line(exc: Exception) -> str:
    """One line for a command-line mistake: click's message and where to find the usage."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "embedstore"
    return f"error: {message} (see `{command} --help`)"


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except EmbedstoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a path the system refuses (missing folder, no permission, full disk) is the user's
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    except _ABORTS:
        code = INTERRUPTED
    except _NO_ARGS as exc:
        help_text = exc.format_message()  # empty when typer's rich help has printed itself already
        if help_text.strip():
            print(help_text)
        print("error: no command given; pick one of the commands above (see `embedstore --help`)", file=sys.stderr)
        sys.exit(2)
    except _CLICK_ERRORS as exc:
        print(_usage_line(exc), file=sys.stderr)
        sys.exit(2)
    if code == INTERRUPTED:  # typer turns Ctrl-C into an exit code
        print("interrupted: rerun the same command to resume", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
