"""Errors a user can cause.

Every mistake in the input (a bad path, an unknown encoder, a missing column)
raises an :class:`EmbedstoreError` whose message says what was wrong and what
to do. The CLI prints it as one line on stderr and exits with code 2;
tracebacks are reserved for bugs.
"""


class EmbedstoreError(Exception):
    """Base class of all errors caused by the user's input or environment."""


class SourceError(EmbedstoreError):
    """The images or their table cannot be read as asked."""


class EncoderError(EmbedstoreError):
    """The encoder does not exist, or its weights cannot be loaded."""


class StoreError(EmbedstoreError):
    """The feature store is missing, of another kind, or does not hold what was asked."""


class ConfigError(EmbedstoreError):
    """An option or config file value is invalid."""


def reject_unknown_options(options, known, what: str) -> None:
    """Raise :class:`ConfigError` naming the options of ``what`` (e.g. "probe") that are not in ``known``."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}; known: {', '.join(sorted(known))}")


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (its type's name when it has none) for a one-line error,
    shortened at a word boundary, never mid-word, to about ``limit`` characters (``None``: not shortened)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if limit is None or len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
