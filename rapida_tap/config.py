"""Settings: embedded defaults < TOML file < environment < command line, validated once.

Every problem is a ``ConfigError`` whose message starts with the setting's name, so start-up
fails with one line a user can act on.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.python import usage


class ConfigError(usage.UsageError):
    """A setting has a bad value; ``str()`` names the setting."""


@dataclasses.dataclass
class Settings:
    """Everything the daemon can be told; ``etc/rapida-asterisk.toml`` explains each one."""

    audiosocket: str = "tcp:4573"
    http: str = "tcp:8080"
    https: str = ""
    api_keys: list[str] = dataclasses.field(default_factory=list)
    assistant: str = ""  # the default assistant; "" = echo unless [assistants] lists ids
    contexts: str = "memory"
    public_url: str = ""
    context_ttl: float = 30.0
    idle_timeout: float = 60.0
    id_timeout: float = 5.0
    stall_timeout: float = 5.0
    rate_limit: float = 200.0
    rate_burst: int = 400
    max_connections: int = 5000
    max_audio_payload: int = 8192
    # chan_websocket (docs/websocket.md): seconds, bytes, frames of 20 ms.
    ws_handshake_timeout: float = 10.0
    ws_start_timeout: float = 5.0
    ws_ping_interval: float = 10.0
    ws_max_message: int = 65536
    ws_max_text: int = 4096
    ws_max_connections: int = 5000
    ws_lead_frames: int = 3
    ring_timeout: float = 120.0
    ring_check_interval: float = 5.0
    # call control (docs/call-control.md): dial string templates of transfer targets
    transfer_endpoint: str = ""  # e.g. "PJSIP/{to}@my-trunk"; "" = number transfers refused
    transfer_sip_endpoint: str = ""  # e.g. "PJSIP/my-trunk/{uri}"; "" = <Sip> refused
    # hostile peers (docs/operations.md, "Limits"): counts, seconds, bytes, per second
    max_pending_per_address: int = 256  # connections not yet identified, per client address
    accept_rate: float = 200.0  # new connections a second per client address, per listener...
    accept_burst: int = 400  # ...in bursts of up to this many
    http_max_connections: int = 10000  # per HTTP/HTTPS listener (ws:// calls included)
    http_head_timeout: float = 10.0  # seconds for a request's whole head
    http_max_body: int = 65536  # bytes, JSON APIs (outbound calls, admin); others take none
    # operations (docs/operations.md)
    drain_timeout: float = 0.0  # seconds live calls may run on after a drain starts; 0: no limit
    metrics: str = ""  # endpoint of its own for /metrics; "" = /metrics on the HTTP site
    api_keys_file: str = ""  # one key a line, e.g. a systemd credential: %d/api-keys
    # call events (docs/events.md)
    webhook_max_pending: int = 1000  # deliveries queued, in flight or awaiting a retry
    webhook_flush_timeout: float = 10.0  # seconds pending deliveries may take at stop
    recordings_dir: str = "/var/lib/rapida-asterisk/recordings"
    recording_name: str = "{date}/{context_id}.wav"
    webhooks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    assistants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    providers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    api_key_generated: bool = False


# Settings a user may give as a string (file, environment, command line), with their types.
SCALARS: dict[str, type] = {
    "audiosocket": str,
    "http": str,
    "https": str,
    "assistant": str,
    "contexts": str,
    "public_url": str,
    "context_ttl": float,
    "idle_timeout": float,
    "id_timeout": float,
    "stall_timeout": float,
    "rate_limit": float,
    "rate_burst": int,
    "max_connections": int,
    "max_audio_payload": int,
    "ws_handshake_timeout": float,
    "ws_start_timeout": float,
    "ws_ping_interval": float,
    "ws_max_message": int,
    "ws_max_text": int,
    "ws_max_connections": int,
    "ws_lead_frames": int,
    "ring_timeout": float,
    "ring_check_interval": float,
    "transfer_endpoint": str,
    "transfer_sip_endpoint": str,
    "max_pending_per_address": int,
    "accept_rate": float,
    "accept_burst": int,
    "http_max_connections": int,
    "http_head_timeout": float,
    "http_max_body": int,
    "drain_timeout": float,
    "metrics": str,
    "api_keys_file": str,
    "webhook_max_pending": int,
    "webhook_flush_timeout": float,
    "recordings_dir": str,
    "recording_name": str,
}
TABLES = ("assistants", "providers", "webhooks")
ENV_PREFIX = "RAPIDA_"


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None


def build_settings(
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    cli_values: Mapping[str, Any],
    cli_api_keys: list[str],
) -> Settings:
    """Merge the layers and validate the result."""
    settings = Settings()
    for name, value in file_values.items():
        key = name.replace("-", "_")
        if key in SCALARS:
            setattr(settings, key, _coerce(key, value))
        elif key in TABLES:
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"{key}: must be a table of tables, e.g. [{key}.NAME]")
            setattr(settings, key, value)
        elif key == "api_keys":
            if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
                raise ConfigError("api_keys: must be a list of strings")
            settings.api_keys = list(value)
        else:
            raise ConfigError(f"{name}: unknown setting in the config file")
    for key in SCALARS:
        env_value = environ.get(ENV_PREFIX + key.upper())
        if env_value:
            setattr(settings, key, _coerce(key, env_value, source=ENV_PREFIX + key.upper()))
    if environ.get("RAPIDA_API_KEYS"):
        settings.api_keys = [k.strip() for k in environ["RAPIDA_API_KEYS"].split(",") if k.strip()]
    for key, value in cli_values.items():
        if value is not None:
            setattr(settings, key, _coerce(key, value, source="--" + key.replace("_", "-")))
    if cli_api_keys:
        settings.api_keys = list(cli_api_keys)
    if settings.api_keys_file:
        settings.api_keys = settings.api_keys + read_api_keys_file(settings.api_keys_file)
    validate(settings)
    from rapida_tap.assistants.config import parse_assistants  # it imports ConfigError

    parse_assistants(settings.assistants, settings.assistant, environ)
    from rapida_tap.assistants.config import check_transfer_template

    check_transfer_template(settings.transfer_endpoint, "transfer_endpoint")
    check_transfer_template(settings.transfer_sip_endpoint, "transfer_sip_endpoint", sip=True)

    from rapida_tap.events.config import parse_events

    parse_events(settings.webhooks, settings.assistants, environ)
    return settings


def read_api_keys_file(path: str) -> list[str]:
    """The keys in ``path``: one a line; blank lines and ``#`` comments are ignored.

    Meant for a systemd credential (``LoadCredential=api-keys:/etc/rapida-asterisk/api-keys``
    and ``--api-keys-file=%d/api-keys``), so keys are in neither the unit nor the environment.
    The keys add to any given otherwise.  A file without a key is an error, not an open door.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"api_keys_file: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"api_keys_file: {path} is not UTF-8 text") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"api_keys_file: {path} holds no key")
    return keys


def _coerce(key: str, value: Any, source: str | None = None) -> Any:
    kind = SCALARS[key]
    name = source or key
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string")
        return value.strip()
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        result = kind(value)
        if kind is float and not math.isfinite(result):  # "nan", "inf" from text
            raise ValueError
        return result
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a finite number"
        raise ConfigError(f"{name}: {value!r} is not {what}") from None


def validate(s: Settings) -> None:
    for key in ("context_ttl", "id_timeout", "stall_timeout", "rate_limit", "ring_timeout"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    for key in ("ws_handshake_timeout", "ws_start_timeout"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    if s.ws_ping_interval < 0:
        raise ConfigError("ws_ping_interval: must be 0 (off) or more seconds")
    if not 1024 <= s.ws_max_message <= 16 * 1024 * 1024:
        raise ConfigError("ws_max_message: must be between 1024 and 16777216 bytes")
    if not 512 <= s.ws_max_text <= s.ws_max_message:
        raise ConfigError("ws_max_text: must be between 512 bytes and ws_max_message")
    if s.ws_max_connections < 1:
        raise ConfigError("ws_max_connections: must be at least 1")
    if not 0 <= s.ws_lead_frames <= 50:
        raise ConfigError("ws_lead_frames: must be between 0 and 50 frames")
    if s.idle_timeout < 0:
        raise ConfigError("idle_timeout: must be 0 (off) or more seconds")
    if s.drain_timeout < 0:
        raise ConfigError(
            "drain_timeout: must be 0 (no limit: wait for every call) or more seconds"
        )
    for key in ("max_pending_per_address", "accept_burst", "http_max_connections"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{key}: must be at least 1")
    for key in ("accept_rate", "http_head_timeout"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    if not 0 <= s.http_max_body <= 1024 * 1024:
        raise ConfigError("http_max_body: must be between 0 and 1048576 bytes")
    if s.ring_check_interval < 0:
        raise ConfigError("ring_check_interval: must be 0 (off) or more seconds")
    for key in ("rate_burst", "max_connections"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{key}: must be at least 1")
    if not 320 <= s.max_audio_payload <= 65535:
        raise ConfigError("max_audio_payload: must be between 320 and 65535 bytes")
    for key in s.api_keys:
        if len(key) < 8 or len(key) > 256 or not key.isprintable() or " " in key:
            raise ConfigError(
                "api_keys: each key must be 8 to 256 printable characters without spaces"
            )
    if s.contexts != "memory":
        from rapida_tap.redis_url import RedisURLError, parse_redis_url

        if not s.contexts.startswith(("redis://", "rediss://")):
            raise ConfigError(f"--contexts: {s.contexts!r} is neither 'memory' nor a redis:// URL")
        try:
            parse_redis_url(s.contexts)
        except RedisURLError as e:
            raise ConfigError(f"--contexts: {e}") from None
    if s.assistant not in ("", "echo") and not s.assistant.startswith(("ws://", "wss://")):
        raise ConfigError(
            f"--assistant: {s.assistant!r} is neither 'echo' nor a ws:// or wss:// URL"
        )
    if s.public_url:
        parts = urlsplit(s.public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--public-url: {s.public_url!r} is not an http(s):// URL")
    if s.webhook_max_pending < 1:
        raise ConfigError("webhook_max_pending: must be at least 1")
    if s.webhook_flush_timeout < 0:
        raise ConfigError("webhook_flush_timeout: must be 0 (no wait) or more seconds")
    if not s.recordings_dir:
        raise ConfigError("recordings_dir: must be a directory")
    from rapida_tap.events.config import check_recording_name

    check_recording_name(s.recording_name)
    if not s.audiosocket and not s.http and not s.https:
        raise ConfigError("--audiosocket/--http/--https: at least one listener is needed")
