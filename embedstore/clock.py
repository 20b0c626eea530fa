"""The one timestamp format of embedstore: UTC, ISO 8601, to the second (store metadata, run records, cards)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    """Now in UTC as ``2026-12-05T23:43:20+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
