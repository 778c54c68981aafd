"""The body of ``POST /v1/talk/asterisk/calls``, validated before anything is placed."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from rapida_tap.dialstring import InvalidNumber, validate_number

AUDIOSOCKET = "audiosocket"
WEBSOCKET = "websocket"
TRANSPORTS = (AUDIOSOCKET, WEBSOCKET)

#: The channel variable the outbound dialplans hand to ``AudioSocket()`` / ``Dial(WebSocket/…)``.
CONTEXT_VARIABLE = "RAPIDA_CONTEXT_ID"

ASSISTANT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
VARIABLE_NAME = re.compile(r"_{0,2}[A-Za-z][A-Za-z0-9_]{0,63}")
MAX_VARIABLES = 32
MAX_VARIABLE_VALUE = 1024
REQUEST_FIELDS = ("assistant_id", "to", "from", "transport", "provider", "variables")


class InvalidCallRequest(ValueError):
    """The request is malformed; the message names the field and what it must be."""


@dataclasses.dataclass(frozen=True)
class CallRequest:
    """A validated ``POST /v1/talk/asterisk/calls`` body."""

    assistant_id: str
    to: str
    caller_id: str = ""
    transport: str = AUDIOSOCKET
    provider: str | None = None
    variables: Mapping[str, str] = dataclasses.field(default_factory=dict)


def parse_call_request(data: Any) -> CallRequest:
    """Validate a decoded JSON body; raise ``InvalidCallRequest`` naming the field."""
    if not isinstance(data, dict):
        raise InvalidCallRequest("the body must be a JSON object")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidCallRequest(
            f"unknown field {unknown[0]!r}; the fields are {', '.join(REQUEST_FIELDS)}"
        )
    assistant_id = _string(data, "assistant_id", required=True)
    if not ASSISTANT_ID.fullmatch(assistant_id):
        raise InvalidCallRequest("assistant_id: must be 1-64 of [A-Za-z0-9._-]")
    to = _number(data, "to", required=True)
    caller_id = _number(data, "from", required=False)
    transport = _string(data, "transport") or AUDIOSOCKET
    if transport not in TRANSPORTS:
        raise InvalidCallRequest(
            f"transport: unknown transport {transport!r}; use 'audiosocket' or 'websocket'"
        )
    provider = _string(data, "provider") or None
    return CallRequest(
        assistant_id=assistant_id,
        to=to,
        caller_id=caller_id,
        transport=transport,
        provider=provider,
        variables=_variables(data.get("variables")),
    )


def _string(data: dict[str, Any], key: str, required: bool = False) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidCallRequest(f"{key}: is required")
        return ""
    if not isinstance(value, str):
        raise InvalidCallRequest(f"{key}: must be a string")
    value = value.strip()
    if required and not value:
        raise InvalidCallRequest(f"{key}: must not be empty")
    return value


def _number(data: dict[str, Any], key: str, required: bool) -> str:
    value = _string(data, key, required)
    if not value:
        return ""
    try:
        return validate_number(value)
    except InvalidNumber as e:
        raise InvalidCallRequest(f"{key}: {e}") from None


def _variables(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidCallRequest("variables: must be an object of names to string values")
    if len(value) > MAX_VARIABLES:
        raise InvalidCallRequest(f"variables: at most {MAX_VARIABLES} are allowed")
    out: dict[str, str] = {}
    for name, text in value.items():
        if not VARIABLE_NAME.fullmatch(name):
            raise InvalidCallRequest(
                f"variables: {name!r} is not a channel variable name (a letter, then letters, "
                "digits or '_', up to 64; '_' or '__' in front to inherit)"
            )
        if name.lstrip("_").upper() == CONTEXT_VARIABLE:
            raise InvalidCallRequest(f"variables: {name} is set by the daemon")
        if not isinstance(text, str):
            raise InvalidCallRequest(f"variables: the value of {name} must be a string")
        if len(text) > MAX_VARIABLE_VALUE or not text.isprintable():
            raise InvalidCallRequest(
                f"variables: the value of {name} must be up to {MAX_VARIABLE_VALUE} "
                "printable characters"
            )
        out[name] = text
    return out
