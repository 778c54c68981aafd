"""Sans-IO codec for chan_websocket control messages (TEXT frames), both wire formats.

Asterisk's chan_websocket speaks either plain text (``f(plain-text)``, its default) or JSON
(``f(json)``) on the TEXT frames of the media WebSocket; binary frames carry the audio and are
not handled here.  This module turns event texts from Asterisk into small frozen dataclasses
(``parse_event``); ``rapida_tap.websocket.commands`` builds what the daemon sends.

Wire facts this relies on (``docs/protocols.md`` section 3 and Asterisk's
``channels/chan_websocket.c``):

- Asterisk ignores TEXT messages over 128 bytes, silently; builders refuse to produce them.
- Plain-text events are ``NAME key:value key:value ...``; ``MEDIA_MARK_PROCESSED`` and
  ``MEDIA_BUFFERING_COMPLETED`` carry their correlation id as the bare rest of the line, and
  ``ERROR``'s ``error_text:`` runs to the end of the line (it may contain spaces).  Plain-text
  ``MEDIA_XOFF``/``MEDIA_XON``/``QUEUE_DRAINED`` and mark events carry no channel id.
- JSON events are compact objects with ``event`` and (always, from Asterisk) ``channel_id``.
- Commands are matched case-sensitively; a plain-text command's parameter is everything after
  the first space.

Nothing here touches a transport, a reactor or a clock; errors are ``ControlError``.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "MAX_EVENT_LENGTH",
    "ControlError",
    "ControlFormat",
    "DtmfEnd",
    "ErrorEvent",
    "Event",
    "MediaBufferingCompleted",
    "MediaMarkProcessed",
    "MediaStart",
    "MediaXoff",
    "MediaXon",
    "QueueDrained",
    "Status",
    "UnknownEvent",
    "detect_format",
    "parse_event",
]

"""Asterisk's ``MAX_TEXT_MESSAGE_LEN``: longer TEXT messages are dropped without a reply."""


MAX_EVENT_LENGTH = 4096
"""Default bound on an incoming event text, in characters.  ``MEDIA_START`` in JSON carries
every channel variable of the call (about 430 characters in the lab); raise it with
``parse_event(..., max_length=...)`` for dialplans that set many inheritable variables."""

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_UINT_RE = re.compile(r"[0-9]{1,9}")
_DTMF_DIGITS = frozenset("0123456789*#ABCD")


class ControlError(Exception):
    """A control message that is malformed, or a command that cannot be sent as asked.

    The message is one line, safe to log (offending values are shown shortened, via ``repr``).
    """


class ControlFormat(enum.StrEnum):
    """chan_websocket's control message format, named as in the dial option ``f(...)``."""

    JSON = "json"
    PLAIN_TEXT = "plain-text"


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event from Asterisk.

    ``name`` is the wire name (``MEDIA_START``...).  ``channel_id`` is the Asterisk channel's
    uniqueid, or ``""`` where the format does not carry it (plain-text XON/XOFF/QUEUE_DRAINED
    and mark events).
    """

    name: str
    channel_id: str = ""


@dataclass(frozen=True, kw_only=True)
class MediaStart(Event):
    """First message of every connection.

    ``optimal_frame_size`` is in bytes of the wire format (160 for ulaw at 20 ms), ``ptime`` in
    milliseconds.  ``channel_variables`` is the new channel's variables (JSON only; ``{}`` in
    plain text), where an inherited ``__RAPIDA_CONTEXT_ID`` appears as set by the dialplan.
    """

    name: str = field(default="MEDIA_START", init=False)
    connection_id: str
    channel: str
    format: str
    optimal_frame_size: int
    ptime: int
    channel_variables: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True)
class DtmfEnd(Event):
    """The caller finished a DTMF digit: one of ``0-9 * # A-D`` (a-d are upper-cased)."""

    name: str = field(default="DTMF_END", init=False)
    digit: str


@dataclass(frozen=True, kw_only=True)
class MediaXoff(Event):
    """Asterisk's outbound queue reached 900 frames: stop sending audio until ``MEDIA_XON``."""

    name: str = field(default="MEDIA_XOFF", init=False)


@dataclass(frozen=True, kw_only=True)
class MediaXon(Event):
    """The outbound queue fell below 800 frames: sending may resume."""

    name: str = field(default="MEDIA_XON", init=False)


@dataclass(frozen=True, kw_only=True)
class QueueDrained(Event):
    """The outbound queue ran empty after a ``REPORT_QUEUE_DRAINED`` (reported once)."""

    name: str = field(default="QUEUE_DRAINED", init=False)


@dataclass(frozen=True, kw_only=True)
class MediaBufferingCompleted(Event):
    """Answer to ``STOP_MEDIA_BUFFERING``, in queue order; ``correlation_id`` may be ``""``."""

    name: str = field(default="MEDIA_BUFFERING_COMPLETED", init=False)
    correlation_id: str = ""


@dataclass(frozen=True, kw_only=True)
class MediaMarkProcessed(Event):
    """The audio queued before ``MARK_MEDIA correlation_id`` has been played."""

    name: str = field(default="MEDIA_MARK_PROCESSED", init=False)
    correlation_id: str


@dataclass(frozen=True, kw_only=True)
class Status(Event):
    """Answer to ``GET_STATUS``; lengths and levels are counts of queued frames."""

    name: str = field(default="STATUS", init=False)
    queue_length: int
    xon_level: int
    xoff_level: int
    queue_full: bool
    bulk_media: bool
    media_paused: bool


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(Event):
    """Asterisk refused a command (e.g. ``MARK_MEDIA`` in passthrough mode); text stripped."""

    name: str = field(default="ERROR", init=False)
    error_text: str


@dataclass(frozen=True, kw_only=True)
class UnknownEvent(Event):
    """An event this module does not know (a newer Asterisk): log it and carry on.

    ``fields`` holds the JSON members other than ``event``/``channel_id``, or the plain-text
    ``key:value`` tokens (strings); ``text`` is the whole message as received.
    """

    fields: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    text: str = ""


def detect_format(text: str) -> ControlFormat:
    """Which format an event text is in: JSON iff it starts with ``{`` (after whitespace)."""
    stripped = text.strip()
    if not stripped:
        raise ControlError("empty control message")
    return ControlFormat.JSON if stripped.startswith("{") else ControlFormat.PLAIN_TEXT


def parse_event(text: str, max_length: int = MAX_EVENT_LENGTH) -> Event:
    """Parse one TEXT message from Asterisk, in either format, into its ``Event``.

    ``max_length`` bounds ``text`` in characters.  Unknown event names give ``UnknownEvent``;
    unknown extra fields of known events are ignored.  Anything malformed (empty, bad JSON,
    no ``event``, missing fields, wrong types) raises ``ControlError``, and nothing else.
    """
    if len(text) > max_length:
        raise ControlError(f"control message too long ({len(text)} > {max_length} characters)")
    if detect_format(text) is ControlFormat.JSON:
        return _parse_json_event(text)
    return _parse_plain_event(text)


def shorten(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


_REQUIRED: Any = object()


class _Fields:
    """Typed access to one event's fields, raising ``ControlError`` naming event and field.

    Plain-text values are strings and are converted; JSON values must have the JSON type.
    """

    def __init__(self, event: str, values: Mapping[str, object], fmt: ControlFormat) -> None:
        self.event = event
        self.values = values
        self.fmt = fmt

    def bad(self, key: str, wanted: str, value: object) -> ControlError:
        return ControlError(f"{self.event}: field {key!r} must be {wanted}, got {shorten(value)}")

    def _get(self, key: str, default: object) -> object:
        value = self.values.get(key, default)
        if value is _REQUIRED:
            raise ControlError(f"{self.event}: missing field {key!r}")
        return value

    def text(self, key: str, default: str = _REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.bad(key, "a string", value)
        return value

    def uint(self, key: str) -> int:
        value = self._get(key, _REQUIRED)
        if self.fmt is ControlFormat.JSON:
            if type(value) is int and 0 <= value < 10**9:  # same bound as plain text
                return value
        elif isinstance(value, str) and _UINT_RE.fullmatch(value):
            return int(value)
        raise self.bad(key, "a non-negative integer", value)

    def flag(self, key: str) -> bool:
        value = self._get(key, _REQUIRED)
        if self.fmt is ControlFormat.JSON:
            if isinstance(value, bool):
                return value
        elif value in ("true", "false"):
            return value == "true"
        raise self.bad(key, "a boolean (true or false)", value)

    def str_map(self, key: str) -> Mapping[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.bad(key, "an object of strings", value)
        return MappingProxyType(dict(value))


def _media_start(f: _Fields, channel_id: str) -> Event:
    return MediaStart(
        channel_id=channel_id,
        connection_id=f.text("connection_id"),
        channel=f.text("channel"),
        format=f.text("format"),
        optimal_frame_size=f.uint("optimal_frame_size"),
        ptime=f.uint("ptime"),
        channel_variables=f.str_map("channel_variables"),
    )


def _dtmf_end(f: _Fields, channel_id: str) -> Event:
    digit = f.text("digit")
    if len(digit) != 1 or digit.upper() not in _DTMF_DIGITS:
        raise f.bad("digit", "one of 0-9 * # A-D", digit)
    return DtmfEnd(channel_id=channel_id, digit=digit.upper())


def _status(f: _Fields, channel_id: str) -> Event:
    return Status(
        channel_id=channel_id,
        queue_length=f.uint("queue_length"),
        xon_level=f.uint("xon_level"),
        xoff_level=f.uint("xoff_level"),
        queue_full=f.flag("queue_full"),
        bulk_media=f.flag("bulk_media"),
        media_paused=f.flag("media_paused"),
    )


_EventBuilder = Callable[[_Fields, str], Event]

_KNOWN_EVENTS: dict[str, _EventBuilder] = {
    "MEDIA_START": _media_start,
    "DTMF_END": _dtmf_end,
    "MEDIA_XOFF": lambda f, cid: MediaXoff(channel_id=cid),
    "MEDIA_XON": lambda f, cid: MediaXon(channel_id=cid),
    "QUEUE_DRAINED": lambda f, cid: QueueDrained(channel_id=cid),
    "MEDIA_BUFFERING_COMPLETED": lambda f, cid: MediaBufferingCompleted(
        channel_id=cid, correlation_id=f.text("correlation_id", "")
    ),
    "MEDIA_MARK_PROCESSED": lambda f, cid: MediaMarkProcessed(
        channel_id=cid, correlation_id=f.text("correlation_id")
    ),
    "STATUS": _status,
    "ERROR": lambda f, cid: ErrorEvent(channel_id=cid, error_text=f.text("error_text").strip()),
}

_PLAIN_REST_IS_ID = frozenset({"MEDIA_MARK_PROCESSED", "MEDIA_BUFFERING_COMPLETED"})
_PLAIN_TAIL_FIELD = {"ERROR": "error_text"}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ControlError(f"not a valid event name: {shorten(name)}")
    return name


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ControlError(f"duplicate JSON key {shorten(key)}")
        result[key] = value
    return result


def _parse_json_event(text: str) -> Event:
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ControlError(f"invalid JSON at column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # e.g. int digit limit, nesting depth
        raise ControlError(f"invalid JSON: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise ControlError(f"JSON control message is not an object: {shorten(obj)}")
    if "event" not in obj:
        raise ControlError("JSON control message has no 'event' member")
    name = _check_name(obj["event"])
    f = _Fields(name, obj, ControlFormat.JSON)
    channel_id = f.text("channel_id", "")
    builder = _KNOWN_EVENTS.get(name)
    if builder is None:
        rest = {k: v for k, v in obj.items() if k not in ("event", "channel_id")}
        return UnknownEvent(
            name=name, channel_id=channel_id, fields=MappingProxyType(rest), text=text
        )
    return builder(f, channel_id)


def _parse_plain_event(text: str) -> Event:
    name, _, rest = text.strip().partition(" ")
    _check_name(name)
    rest = rest.strip()
    if name in _PLAIN_REST_IS_ID:
        values: dict[str, object] = {"correlation_id": rest}
    else:
        values = _plain_fields(name, rest, _PLAIN_TAIL_FIELD.get(name))
    builder = _KNOWN_EVENTS.get(name)
    f = _Fields(name, values, ControlFormat.PLAIN_TEXT)
    channel_id = f.text("channel_id", "")
    if builder is None:
        rest_fields = {k: v for k, v in values.items() if k != "channel_id"}
        return UnknownEvent(
            name=name, channel_id=channel_id, fields=MappingProxyType(rest_fields), text=text
        )
    return builder(f, channel_id)


def _plain_fields(event: str, rest: str, tail_key: str | None) -> dict[str, object]:
    """Split ``key:value key:value`` at whitespace; ``tail_key``'s value runs to the end.

    A known event must consist of such tokens only; an unknown event keeps its well-formed
    tokens and drops the others (its ``text`` keeps everything).
    """
    values: dict[str, object] = {}
    for match in re.finditer(r"\S+", rest):
        key, colon, value = match.group().partition(":")
        if not colon or not key:
            if event in _KNOWN_EVENTS:
                raise ControlError(f"{event}: expected key:value, got {shorten(match.group())}")
            continue
        if key in values:
            raise ControlError(f"{event}: duplicate field {key!r}")
        if key == tail_key:
            values[key] = rest[match.start() + len(key) + 1 :]
            break
        values[key] = value
    return values
