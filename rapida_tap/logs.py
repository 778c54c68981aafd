"""JSON lines for log shippers: ``twistd --logger=rapida_tap.logs.json_logger -n rapida-asterisk``.

One JSON object per line on stdout (journald, Docker, Vector, Promtail read it as is)::

    {"time": "2025-01-01T12:00:00.000000Z", "level": "info", "namespace": "rapida_tap...",
     "message": "call 5f0e… ended: caller-hangup after 12.3s; …", "ctx": "5f0e…",
     "reason": "caller-hangup", …}

``message`` is the formatted text line; the event's own fields (``ctx``, ``reason``,
``transport``, ``frames_in``…) follow as they are, so a shipper can filter on them without
parsing text; a field that is a flat dict of such values (the call-end line's ``quality``)
is kept as a JSON object.  Twisted's ``jsonFileLogObserver`` is not used: its records are
meant to be read back by Twisted (``\\x1e`` separators, every internal ``log_*`` key, no
formatted message).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, Logger, LogLevel, formatEvent

_SCALARS = (str, int, float, bool, type(None))


def log_line(log: Logger, level: LogLevel, text: str, **fields: object) -> None:
    """Log ``text``, already formatted, with ``fields`` kept for structured observers.

    twisted.logger formats a message with ``string.Formatter``, in Python, field by field, for
    every line it writes: the dozen fields of a call's end line cost twice what writing the
    line does.  Lines written for every call format their text once, with an f-string, and
    hand it over whole (as Twisted does for its legacy events).
    """
    log.emit(level, "{log_text}", log_text=text, **fields)


def event_as_json(event: dict[str, Any]) -> str:
    """One log event as a JSON object on one line (with its newline)."""
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if isinstance(when, int | float)
            else None
        ),
        "level": _level(event.get("log_level")),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot describe itself must not lose the line
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "time"):
            continue
        if isinstance(value, _SCALARS):
            record[key] = value
        elif isinstance(value, dict) and all(isinstance(v, _SCALARS) for v in value.values()):
            record[key] = value  # a flat record, e.g. the call-end line's quality report
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def _level(level: object) -> str:
    name = getattr(level, "name", None)
    return name if isinstance(name, str) else "info"


def json_logger(out: IO[str] | None = None) -> FileLogObserver:
    """The observer factory for ``twistd --logger``: JSON lines to ``out`` (stdout)."""
    return FileLogObserver(out if out is not None else sys.stdout, event_as_json)
