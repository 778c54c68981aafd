"""Sans-IO chan_websocket commands (what the daemon sends) and the marks they leave in flight.

Asterisk ignores TEXT messages over 128 bytes, silently, so the builders refuse to produce
them; commands are matched case-sensitively, and a plain-text command's parameter is
everything after the first space.  Errors are ``ControlError``.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from rapida_tap.websocket.control import ControlError, ControlFormat, shorten

__all__ = [
    "COMMANDS",
    "MAX_COMMAND_BYTES",
    "MAX_CORRELATION_ID_LENGTH",
    "CommandSpec",
    "MarkTracker",
    "answer",
    "build_command",
    "continue_media",
    "flush_media",
    "get_status",
    "hangup",
    "mark_media",
    "pause_media",
    "report_queue_drained",
    "set_media_direction",
    "start_media_buffering",
    "stop_media_buffering",
]

MAX_COMMAND_BYTES = 128
"""Asterisk ignores TEXT messages longer than this (bytes), without a word."""

MAX_CORRELATION_ID_LENGTH = 64
"""Our own bound on mark ids (characters), well inside ``MAX_COMMAND_BYTES`` in either format."""
_CORRELATION_ID_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_MEDIA_DIRECTIONS = ("both", "in", "out")


@dataclass(frozen=True)
class CommandSpec:
    """A command's one parameter (if any), whether it is required, and format limits."""

    param: str | None = None
    required: bool = False
    json_only: bool = False


COMMANDS: Mapping[str, CommandSpec] = MappingProxyType(
    {
        "ANSWER": CommandSpec(),
        "HANGUP": CommandSpec(),
        "START_MEDIA_BUFFERING": CommandSpec(),
        "STOP_MEDIA_BUFFERING": CommandSpec("correlation_id"),
        "MARK_MEDIA": CommandSpec("correlation_id", required=True),
        "FLUSH_MEDIA": CommandSpec(),
        "REPORT_QUEUE_DRAINED": CommandSpec(),
        "GET_STATUS": CommandSpec(),
        "PAUSE_MEDIA": CommandSpec(),
        "CONTINUE_MEDIA": CommandSpec(),
        "SET_MEDIA_DIRECTION": CommandSpec("direction", required=True, json_only=True),
    }
)
"""Every command chan_websocket understands, with its one optional or required parameter."""


def _check_correlation_id(correlation_id: object) -> str:
    if not isinstance(correlation_id, str):
        raise ControlError(f"correlation id must be a string, got {shorten(correlation_id)}")
    if len(correlation_id) > MAX_CORRELATION_ID_LENGTH:
        raise ControlError(
            f"correlation id too long ({len(correlation_id)} > "
            f"{MAX_CORRELATION_ID_LENGTH} characters)"
        )
    if not _CORRELATION_ID_RE.fullmatch(correlation_id):
        raise ControlError(
            f"correlation id must be printable ASCII without spaces, got {shorten(correlation_id)}"
        )
    return correlation_id


def build_command(fmt: ControlFormat, name: str, **params: str) -> str:
    """The exact text to send to Asterisk for command ``name`` (see ``COMMANDS``).

    JSON is ``json.dumps`` of ``{"command": name, param: value}``; plain text is ``NAME`` or
    ``NAME value``.  Raises ``ControlError`` for an unknown command or parameter, a missing or
    invalid parameter, ``SET_MEDIA_DIRECTION`` in plain text, or a result over 128 bytes
    (Asterisk would drop it silently).
    """
    if fmt not in (ControlFormat.JSON, ControlFormat.PLAIN_TEXT):
        raise ControlError(f"unknown control format {shorten(fmt)}")
    fmt = ControlFormat(fmt)
    spec = COMMANDS.get(name)
    if spec is None:
        raise ControlError(f"unknown command {shorten(name)}")
    unexpected = sorted(set(params) - {spec.param})
    if unexpected:
        raise ControlError(f"{name}: unexpected parameter {unexpected[0]!r}")
    if spec.json_only and fmt is not ControlFormat.JSON:
        raise ControlError(f"{name} is only supported in JSON format")
    value = params.get(spec.param) if spec.param else None
    if value is None and spec.required:
        raise ControlError(f"{name}: missing parameter {spec.param!r}")
    if value is not None:
        if spec.param == "direction":
            if value not in _MEDIA_DIRECTIONS:
                raise ControlError(f"{name}: direction must be both, in or out: {shorten(value)}")
        else:
            _check_correlation_id(value)
    if fmt is ControlFormat.JSON:
        obj = {"command": name}
        if value is not None and spec.param:
            obj[spec.param] = value
        text = json.dumps(obj)
    else:
        text = name if value is None else f"{name} {value}"
    size = len(text.encode("utf-8"))
    if size > MAX_COMMAND_BYTES:
        raise ControlError(
            f"{name}: command is {size} bytes, Asterisk ignores more than {MAX_COMMAND_BYTES}"
        )
    return text


def answer(fmt: ControlFormat) -> str:
    """Answer the channel (only needed with the dial option ``n``)."""
    return build_command(fmt, "ANSWER")


def hangup(fmt: ControlFormat) -> str:
    """Ask Asterisk to hang the channel up; it then closes the WebSocket with 1000."""
    return build_command(fmt, "HANGUP")


def start_media_buffering(fmt: ControlFormat) -> str:
    """Audio that follows may be split across messages at any byte; Asterisk re-frames it."""
    return build_command(fmt, "START_MEDIA_BUFFERING")


def stop_media_buffering(fmt: ControlFormat, correlation_id: str | None = None) -> str:
    """End buffering; Asterisk answers ``MEDIA_BUFFERING_COMPLETED`` with ``correlation_id``."""
    if correlation_id is None:
        return build_command(fmt, "STOP_MEDIA_BUFFERING")
    return build_command(fmt, "STOP_MEDIA_BUFFERING", correlation_id=correlation_id)


def mark_media(fmt: ControlFormat, correlation_id: str) -> str:
    """Queue a mark behind the audio sent so far; reported once that audio has played."""
    return build_command(fmt, "MARK_MEDIA", correlation_id=correlation_id)


def flush_media(fmt: ControlFormat) -> str:
    """Barge-in: drop every queued frame and every queued mark (those are never reported)."""
    return build_command(fmt, "FLUSH_MEDIA")


def report_queue_drained(fmt: ControlFormat) -> str:
    """Ask for one ``QUEUE_DRAINED`` when the outbound queue next runs empty."""
    return build_command(fmt, "REPORT_QUEUE_DRAINED")


def get_status(fmt: ControlFormat) -> str:
    """Ask for a ``STATUS`` event (answered at once, not in queue order)."""
    return build_command(fmt, "GET_STATUS")


def pause_media(fmt: ControlFormat) -> str:
    """Stop playing the queue (it keeps filling); ``CONTINUE_MEDIA`` resumes."""
    return build_command(fmt, "PAUSE_MEDIA")


def continue_media(fmt: ControlFormat) -> str:
    """Resume playing after ``PAUSE_MEDIA``."""
    return build_command(fmt, "CONTINUE_MEDIA")


def set_media_direction(fmt: ControlFormat, direction: str) -> str:
    """Change media direction to ``both``, ``in`` or ``out`` (JSON format only)."""
    return build_command(fmt, "SET_MEDIA_DIRECTION", direction=direction)


# --- marks --------------------------------------------------------------------------------


class MarkTracker:
    """The daemon's record of ``MARK_MEDIA`` marks sent and not yet settled, in send order.

    Asterisk queues each mark in the same FIFO as the audio and reports it when it reaches the
    head, so marks are reported strictly in send order.  An ack for ``X`` therefore settles
    ``X`` *and every mark sent before it*: an earlier mark still pending can only have been
    lost (never reported, e.g. dropped by a flush the tracker was not told about), and its
    audio, being ahead of ``X``'s, has played.  Duplicate ids are allowed; an ack settles the
    oldest pending one.  ``FLUSH_MEDIA`` drops queued marks silently, so ``flushed()`` settles
    all of them.
    """

    def __init__(self) -> None:
        self._pending: deque[str] = deque()

    @property
    def pending(self) -> tuple[str, ...]:
        """Marks sent and not yet settled, oldest first."""
        return tuple(self._pending)

    def sent(self, correlation_id: str) -> None:
        """Record a mark just sent to Asterisk."""
        self._pending.append(correlation_id)

    def processed(self, correlation_id: str) -> tuple[str, ...]:
        """Handle ``MEDIA_MARK_PROCESSED``: return the ids settled now, oldest first.

        An empty tuple means the id is not pending (never sent, already settled or flushed):
        the caller should log it and otherwise ignore it.
        """
        try:
            index = self._pending.index(correlation_id)
        except ValueError:
            return ()
        return tuple(self._pending.popleft() for _ in range(index + 1))

    def flushed(self) -> tuple[str, ...]:
        """Handle our own ``FLUSH_MEDIA``: return every pending id (oldest first), now settled."""
        settled = tuple(self._pending)
        self._pending.clear()
        return settled
