"""The ``[assistants]`` table and ``--assistant``: validated specs, then the registry.

Parsing is pure (settings and an environment in, specs or a ``ConfigError`` out), so start-up
fails with one line naming the setting; building the registry only adds the reactor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from rapida_tap.assistants.dialects import DIALECTS, AudioFormat
from rapida_tap.assistants.dialects.base import MULAW
from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.config import ConfigError
from rapida_tap.dialstring import check_template
from rapida_tap.interfaces import IAssistant

ECHO = "echo"
DEFAULT_KEY = "default"
ON_FAILURE = ("hangup", "continue")
# What registration accepts as an assistant id: an id outside it could never be called.
ASSISTANT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
ACCOUNT_SID = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# Headers the WebSocket client itself owns; a configured one would break the handshake.
RESERVED_HEADERS = frozenset(
    {"host", "upgrade", "connection", "content-length", "transfer-encoding", "origin"}
)
# customParameters the daemon fills in for every call; configured parameters may not shadow them.
BUILTIN_PARAMETERS = frozenset(
    {"context_id", "assistant_id", "caller", "from_number", "direction", "transport"}
)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\$|\$")
BOT_OPTIONS = frozenset(
    {
        "url",
        "headers",
        "parameters",
        "connect_timeout",
        "on_failure",
        "ca_file",
        "account_sid",
        "transfer_endpoint",
        "transfer_sip_endpoint",
        "transfer_fallback",
        "protocol",
        "encoding",
        "sample_rate",
    }
)
DEFAULT_PROTOCOL = "twilio"
TWILIO_AUDIO = AudioFormat(MULAW, 8000)
# Options any assistant takes (echo too), about its calls rather than its bot; validated by
# rapida_tap.events.config: record its calls, its own webhook endpoints.
CALL_OPTIONS = frozenset({"record", "webhooks"})


@dataclass(frozen=True)
class BotSpec:
    """One upstream bot: where it is and how to talk to it.

    ``headers`` and ``url`` are already expanded (they may hold secrets: never log them; log
    ``name``).  ``connect_timeout`` is in seconds and covers TCP, TLS and the WebSocket
    handshake.  ``ca_file`` replaces the system trust store for this bot (a private CA).
    ``protocol`` names the media-stream dialect (``rapida_tap.assistants.dialects``) and
    ``audio`` the format it carries, one the dialect allows.
    """

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    connect_timeout: float = 5.0
    on_failure: str = "hangup"
    ca_file: str | None = None
    account_sid: str = "rapida-asterisk"
    transfer_endpoint: str = ""  # "" = the top-level setting (docs/call-control.md)
    transfer_sip_endpoint: str = ""
    transfer_fallback: bool = True
    protocol: str = DEFAULT_PROTOCOL
    audio: AudioFormat = TWILIO_AUDIO

    @property
    def name(self) -> str:
        """The URL without credentials or query: safe for logs."""
        return redacted_url(self.url)


Spec = BotSpec | str  # a bot, or ECHO


@dataclass(frozen=True)
class AssistantsSpec:
    """Which spec serves which assistant id; ``default`` (or ``None``: 404) for the rest."""

    by_id: dict[str, Spec]
    default: Spec | None

    def describe(self) -> str:
        """One short line for the start-up log."""
        default = "none (unlisted ids: 404)" if self.default is None else _label(self.default)
        return f"{len(self.by_id)} mapped, default {default}" if self.by_id else default


def _label(spec: Spec) -> str:
    return spec.name if isinstance(spec, BotSpec) else spec


def redacted_url(url: str) -> str:
    """``url`` without user info, query or fragment (where tokens hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def expand(text: str, environ: Mapping[str, str], where: str) -> str:
    """Replace ``${NAME}`` with the environment variable ``NAME`` and ``$$`` with ``$``.

    A lone ``$`` or an unset variable is a ``ConfigError`` naming ``where`` (never the value).
    """

    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$$":
            return "$"
        name = match.group(1)
        if name is None:
            raise ConfigError(f"{where}: a lone '$' (write '$$' for a literal '$')")
        if name not in environ:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return environ[name]

    return _ENV_REF.sub(one, text)


def parse_assistants(
    table: Mapping[str, Any], default_url: str, environ: Mapping[str, str]
) -> AssistantsSpec:
    """Validate ``[assistants.ID]`` tables and the ``assistant`` setting.

    The default for unlisted ids is ``[assistants.default]`` if given, with its ``url``
    replaced by ``default_url`` (``--assistant``) when that is set too; else ``default_url``;
    else echo when no id is listed; else none, so unlisted ids are refused (404).
    """
    by_id: dict[str, Spec] = {}
    default: Spec | None = None
    for assistant_id, options in table.items():
        where = f"assistants.{assistant_id}"
        if not isinstance(options, Mapping):
            raise ConfigError(f'{where}: must be a table, e.g. [assistants."{assistant_id}"]')
        if assistant_id == DEFAULT_KEY:
            if default_url:
                options = {**options, "url": default_url}
            default = parse_spec(options, environ, where)
        elif not ASSISTANT_ID.fullmatch(assistant_id):
            raise ConfigError(f"{where}: an assistant id is 1-64 of [A-Za-z0-9._-]")
        else:
            by_id[assistant_id] = parse_spec(options, environ, where)
    if default is None:
        if default_url:
            default = parse_spec({"url": default_url}, environ, "--assistant")
        elif not by_id:
            default = ECHO
    return AssistantsSpec(by_id, default)


def parse_spec(options: Mapping[str, Any], environ: Mapping[str, str], where: str) -> Spec:
    options = {k: v for k, v in options.items() if k not in CALL_OPTIONS}
    unknown = sorted(set(options) - BOT_OPTIONS)
    if unknown:
        known = ", ".join(sorted(BOT_OPTIONS | CALL_OPTIONS))
        raise ConfigError(f"{where}: unknown option {unknown[0]!r} (known: {known})")
    raw_url = options.get("url")
    url_where = where if where.startswith("--") else f"{where}.url"
    if not isinstance(raw_url, str) or not raw_url.strip():
        raise ConfigError(f"{url_where}: required: 'echo' or a ws:// or wss:// URL")
    if raw_url.strip() == ECHO:
        extra = sorted(set(options) - {"url"})
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: the echo assistant takes no options")
        return ECHO
    url = expand(raw_url.strip(), environ, url_where)
    _check_url(url, url_where)
    headers = _string_table(options.get("headers", {}), f"{where}.headers")
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{where}.headers: {name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS or name.lower().startswith("sec-websocket-"):
            raise ConfigError(f"{where}.headers.{name}: set by the WebSocket client itself")
        headers[name] = expand(value, environ, f"{where}.headers.{name}")
        if any(c in headers[name] for c in "\r\n\0"):
            raise ConfigError(f"{where}.headers.{name}: the value has a line break or NUL")
    parameters = _string_table(options.get("parameters", {}), f"{where}.parameters")
    for name in parameters:
        if name in BUILTIN_PARAMETERS:
            raise ConfigError(f"{where}.parameters.{name}: filled in by the daemon for each call")
    timeout = options.get("connect_timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ConfigError(f"{where}.connect_timeout: seconds, more than 0 and at most 60")
    on_failure = options.get("on_failure", "hangup")
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"{where}.on_failure: {on_failure!r} is not 'hangup' or 'continue'")
    ca_file = options.get("ca_file")
    if ca_file is not None:
        if not isinstance(ca_file, str) or not ca_file:
            raise ConfigError(f"{where}.ca_file: must be the path of a PEM file")
        if not url.startswith("wss://"):
            raise ConfigError(f"{where}.ca_file: only for a wss:// URL")
        try:
            with open(ca_file, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{where}.ca_file: cannot read {ca_file}: {e.strerror}") from None
    account_sid = options.get("account_sid", "rapida-asterisk")
    if not isinstance(account_sid, str) or not ACCOUNT_SID.fullmatch(account_sid):
        raise ConfigError(f"{where}.account_sid: 1-64 of [A-Za-z0-9._-] (it is part of a URL)")
    transfer_endpoint = options.get("transfer_endpoint", "")
    check_transfer_template(transfer_endpoint, f"{where}.transfer_endpoint")
    transfer_sip_endpoint = options.get("transfer_sip_endpoint", "")
    check_transfer_template(transfer_sip_endpoint, f"{where}.transfer_sip_endpoint", sip=True)
    fallback = options.get("transfer_fallback", True)
    if not isinstance(fallback, bool):
        raise ConfigError(f"{where}.transfer_fallback: must be true or false")
    protocol = options.get("protocol", DEFAULT_PROTOCOL)
    if protocol not in DIALECTS:
        known = ", ".join(f"{name!r}" for name in DIALECTS)
        raise ConfigError(f"{where}.protocol: {str(protocol)[:20]!r} is not one of {known}")
    return BotSpec(
        url=url,
        headers=headers,
        parameters=parameters,
        connect_timeout=float(timeout),
        on_failure=on_failure,
        ca_file=ca_file,
        account_sid=account_sid,
        transfer_endpoint=transfer_endpoint,
        transfer_sip_endpoint=transfer_sip_endpoint,
        transfer_fallback=fallback,
        protocol=protocol,
        audio=_audio_format(options, protocol, where),
    )


def check_transfer_template(template: object, where: str, sip: bool = False) -> None:
    """A transfer target template: ``{to}`` (a number) or, with ``sip``, ``{uri}``; "" = none."""
    if not isinstance(template, str):
        raise ConfigError(f"{where}: must be a dial string template")
    if not template:
        return
    try:
        if sip:
            check_template(template, "", ("uri",), "uri", "sip:alice@pbx.example.com")
        else:
            check_template(template, "", ("to",), "to")
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _audio_format(options: Mapping[str, Any], protocol: str, where: str) -> AudioFormat:
    """The dialect's format named by ``encoding`` and ``sample_rate`` (its default if neither)."""
    dialect = DIALECTS[protocol]
    encoding = options.get("encoding")
    rate = options.get("sample_rate")
    allowed = ", ".join(f.label for f in dialect.formats)
    if encoding is not None and not isinstance(encoding, str):
        raise ConfigError(f"{where}.encoding: 'mulaw', 'alaw' or 'l16'")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int)):
        raise ConfigError(f"{where}.sample_rate: a whole number of Hz, e.g. 16000")
    fmt = dialect.audio_format(encoding.lower() if encoding else None, rate)
    if fmt is None:
        asked = "/".join(str(x) for x in (encoding, rate) if x is not None)
        raise ConfigError(
            f"{where}: protocol {protocol!r} carries {allowed}, not {asked} "
            "(set encoding and sample_rate to one of those)"
        )
    return fmt


def _check_url(url: str, where: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{where}: {redacted_url(url)!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(f"{where}: {redacted_url(url)!r} is neither 'echo' nor a ws(s):// URL")
    if port == 0:
        raise ConfigError(f"{where}: port 0")
    if parts.fragment:
        raise ConfigError(f"{where}: a WebSocket URL has no #fragment")


def _string_table(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a table of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"{where}.{key}: must be a string")
    return dict(value)


def build_registry(spec: AssistantsSpec, reactor: Any) -> AssistantRegistry:
    """One assistant object per spec (calls share it); the reactor is the bots' clock."""
    from rapida_tap.assistants.bot_client import UpstreamAssistant

    echo = EchoAssistant()

    def make(s: Spec) -> IAssistant:
        return echo if s == ECHO else UpstreamAssistant(s, reactor)  # type: ignore[arg-type]

    return AssistantRegistry(
        {aid: make(s) for aid, s in spec.by_id.items()},
        default=None if spec.default is None else make(spec.default),
    )
