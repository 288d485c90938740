"""Time windows as every command takes them: ISO-8601 instants (no zone means UTC), an end after the start.

One definition for `query` (its ``start``/``end`` parameters, or ``--from``/``--to``), `reconcile` and whatever else
takes a window, so a window one command refuses no other command accepts.
"""

from __future__ import annotations

from datetime import UTC, datetime


class WindowError(ValueError):
    """A time window's bound is not an ISO-8601 instant, or its end is not after its start."""


#: The word that stands for the current time where an instant is expected.
NOW = "now"


def parse_instant(text: str, *, name: str, now: datetime | None = None) -> datetime:
    """An aware UTC datetime from ISO-8601 text (``Z`` or an offset; none means UTC) or ``now``.

    Raises:
        WindowError: naming ``name`` (the option or parameter) and the value.
    """
    value = text.strip()
    if value.lower() == NOW:
        moment = now or datetime.now(UTC)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise WindowError(f"{name} {text!r} is not an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def require_ordered(start: datetime, end: datetime, *, start_name: str, end_name: str) -> None:
    """Refuse a window whose end is not after its start (it would select nothing, silently).

    Raises:
        WindowError: naming both bounds.
    """
    if end <= start:
        raise WindowError(f"{end_name} {_iso(end)} is not after {start_name} {_iso(start)}: the window is empty")


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
