"""Webhook endpoints and recording choices from the settings: validated once, at start-up.

Endpoints are configured globally (``[webhooks.NAME]``) and per assistant
(``[assistants.ID.webhooks.NAME]``); a call's events go to both.  Each endpoint's secret comes
from an environment variable (``secret_env``) or a systemd credential (``secret_credential``),
never from the file.  ``record = true`` in an assistant's table records its calls.  Every
problem is a ``ConfigError`` naming the setting, so start-up fails with one line.
"""

from __future__ import annotations

import base64
import binascii
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rapida_tap import secrets
from rapida_tap.config import ConfigError
from rapida_tap.events.webhooks import EVENT_TYPES, Endpoint

ENDPOINT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENDPOINT_KEYS = ("url", "secret_env", "secret_credential", "events", "timeout")
#: what an [assistants.ID] table may hold besides its bot's options
ASSISTANT_EVENT_KEYS = frozenset({"record", "webhooks"})
#: fields of ``recording_name``; values are made safe for a file name before use
NAME_FIELDS = frozenset(
    {"context_id", "assistant_id", "caller", "direction", "transport", "date", "time"}
)
SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class AssistantEvents:
    record: bool = False
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class EventsSpec:
    """Global endpoints, and what each assistant id adds (``default``: unlisted ids)."""

    endpoints: tuple[Endpoint, ...] = ()
    by_assistant: Mapping[str, AssistantEvents] = field(default_factory=dict)
    default: AssistantEvents = AssistantEvents()

    def of(self, assistant_id: str) -> AssistantEvents:
        return self.by_assistant.get(assistant_id, self.default)

    def endpoints_for(self, assistant_id: str) -> tuple[Endpoint, ...]:
        return self.endpoints + self.of(assistant_id).endpoints

    @property
    def records_any(self) -> bool:
        return self.default.record or any(a.record for a in self.by_assistant.values())


def parse_events(
    webhooks: Mapping[str, Any], assistants: Mapping[str, Any], environ: Mapping[str, str]
) -> EventsSpec:
    """Validate ``[webhooks]`` and the event options of ``[assistants]`` tables."""
    endpoints = _endpoints(webhooks, "webhooks", environ)
    by_assistant: dict[str, AssistantEvents] = {}
    default = AssistantEvents()
    for assistant_id, options in assistants.items():
        if not isinstance(options, Mapping):
            continue  # parse_assistants names this error
        where = f"assistants.{assistant_id}"
        record = options.get("record", False)
        if not isinstance(record, bool):
            raise ConfigError(f"{where}.record: must be true or false")
        table = options.get("webhooks", {})
        events = AssistantEvents(record, _endpoints(table, f"{where}.webhooks", environ))
        if assistant_id == "default":
            default = events
        else:
            by_assistant[assistant_id] = events
    return EventsSpec(endpoints, by_assistant, default)


def _endpoints(tables: Any, where: str, environ: Mapping[str, str]) -> tuple[Endpoint, ...]:
    if not isinstance(tables, Mapping) or not all(isinstance(t, Mapping) for t in tables.values()):
        raise ConfigError(f"{where}: must be a table of tables, e.g. [{where}.NAME]")
    result = []
    for name, table in tables.items():
        if not ENDPOINT_NAME.fullmatch(name):
            raise ConfigError(f"{where}.{name}: an endpoint name is 1-64 of [A-Za-z0-9._-]")
        result.append(parse_endpoint(name, table, f"{where}.{name}", environ))
    return tuple(result)


def parse_endpoint(
    name: str, table: Mapping[str, Any], where: str, environ: Mapping[str, str]
) -> Endpoint:
    for key in table:
        if key == "secret":
            raise ConfigError(
                f"{where}.secret: keep the secret out of the config file: set "
                'secret_env = "WEBHOOK_SECRET" (environment) or '
                'secret_credential = "webhook-secret" (systemd credential)'
            )
        if key not in ENDPOINT_KEYS:
            raise ConfigError(f"{where}.{key}: unknown setting; known: {', '.join(ENDPOINT_KEYS)}")
    url = table.get("url")
    if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url.strip()):
        raise ConfigError(f"{where}.url: required: an http:// or https:// URL")
    events = table.get("events", sorted(EVENT_TYPES))
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise ConfigError(f"{where}.events: a non-empty list of event types")
    unknown = sorted(set(events) - EVENT_TYPES)
    if unknown:
        raise ConfigError(
            f"{where}.events: unknown event type {unknown[0]!r}; known: "
            + ", ".join(sorted(EVENT_TYPES))
        )
    timeout = table.get("timeout", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ConfigError(f"{where}.timeout: seconds, more than 0 and at most 60")
    secret = read_secret(
        where, str(table.get("secret_env", "")), str(table.get("secret_credential", "")), environ
    )
    return Endpoint(name, url.strip(), secret, frozenset(events), float(timeout))


def read_secret(where: str, env_name: str, credential: str, environ: Mapping[str, str]) -> str:
    """The signing secret, ``whsec_`` + base64 of 24 to 64 bytes (the Standard Webhooks form).

    Read from the environment variable ``env_name`` or the systemd credential
    ``$CREDENTIALS_DIRECTORY/<credential>``; exactly one must be set.  The secret itself never
    appears in a message.
    """
    secret = secrets.read_secret(where, "secret", env_name, credential, environ).strip()
    source = f"{where}.secret_env" if env_name else f"{where}.secret_credential"
    body = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not 24 <= len(key) <= 64:
        raise ConfigError(
            f"{source}: the secret must be whsec_ followed by the base64 of 24 to 64 random "
            "bytes (e.g. printf 'whsec_%s\\n' \"$(openssl rand -base64 32)\")"
        )
    return SECRET_PREFIX + body


def check_recording_name(template: str) -> None:
    """``recording_name`` must name a ``.wav`` file inside the recordings directory."""
    where = "recording_name"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    unknown = sorted(fields - NAME_FIELDS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {{{unknown[0]}}}; known: "
            + ", ".join("{" + f + "}" for f in sorted(NAME_FIELDS))
        )
    if "context_id" not in fields:
        raise ConfigError(f"{where}: must contain {{context_id}}, so no two calls share a file")
    if not template.endswith(".wav"):
        raise ConfigError(f"{where}: must end with .wav")
    parts = template.split("/")
    if template.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"{where}: a relative path without '.', '..' or empty parts")
