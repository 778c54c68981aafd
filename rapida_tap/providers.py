"""Outbound providers: ``[providers.NAME]`` TOML tables become ``AriProvider`` objects.

The ARI password never comes from the file or the command line: it is read from an environment
variable or a systemd credential, and it appears in no message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from rapida_tap.ari import AriProvider
from rapida_tap.config import ConfigError
from rapida_tap.dialstring import InvalidNumber, validate_number
from rapida_tap.secrets import read_secret
from rapida_tap.web.call_request import InvalidCallRequest

PROVIDER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
DIALPLAN_CONTEXT = re.compile(r"[A-Za-z0-9._-]{1,79}")
FORMATS = re.compile(r"[a-z0-9_]+(?:,[a-z0-9_]+)*")
_TEXT_KEYS = (
    "ari_url",
    "ari_user",
    "password_env",
    "password_credential",
    "endpoint_technology",
    "trunk",
    "context",
    "ws_context",
    "caller_id",
    "formats",
    "endpoint",
)
PROVIDER_KEYS = (*_TEXT_KEYS, "timeout")


def parse_providers(
    tables: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, AriProvider]:
    """``[providers.NAME]`` TOML tables as ``AriProvider`` objects, in file order.

    The password is read from the environment variable named by ``password_env`` or from the
    systemd credential ``$CREDENTIALS_DIRECTORY/<password_credential>``, never from the file.
    Every problem is a ``ConfigError`` naming the setting, e.g. ``providers.pbx1.ari_url``.
    """
    env = os.environ if environ is None else environ
    providers: dict[str, AriProvider] = {}
    for name, table in tables.items():
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigError(f"providers.{name}: a provider name is 1-64 of [A-Za-z0-9._-]")
        if not isinstance(table, Mapping):
            raise ConfigError(f"providers.{name}: must be a table")
        providers[name] = _parse_provider(name, table, env)
    return providers


def _parse_provider(name: str, table: Mapping[str, Any], env: Mapping[str, str]) -> AriProvider:
    where = f"providers.{name}"
    fields: dict[str, Any] = {}
    for key, value in table.items():
        if key == "ari_password":
            raise ConfigError(
                f"{where}.ari_password: keep the password out of the config file: set "
                'password_env = "ARI_PASSWORD" (environment) or '
                'password_credential = "ari-password" (systemd credential)'
            )
        if key not in PROVIDER_KEYS:
            raise ConfigError(
                f"{where}.{key}: unknown provider setting; known: {', '.join(PROVIDER_KEYS)}"
            )
        if key == "timeout":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}.timeout: must be a positive number of seconds")
            fields[key] = float(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: must be a string")
        else:
            fields[key] = value.strip()
    for key in ("ari_url", "ari_user"):
        if not fields.get(key):
            raise ConfigError(f"{where}.{key}: is required")
    if ":" in fields["ari_user"]:
        raise ConfigError(f"{where}.ari_user: must not contain ':'")
    password = _password(
        where, fields.pop("password_env", ""), fields.pop("password_credential", ""), env
    )
    for key in ("context", "ws_context"):
        if key in fields and not DIALPLAN_CONTEXT.fullmatch(fields[key]):
            raise ConfigError(
                f"{where}.{key}: must be a dialplan context name, 1-79 of [A-Za-z0-9._-]"
            )
    if fields.get("formats") and not FORMATS.fullmatch(fields["formats"]):
        raise ConfigError(f"{where}.formats: must be codec names separated by commas, e.g. ulaw")
    if fields.get("caller_id"):
        try:
            fields["caller_id"] = validate_number(fields["caller_id"])
        except InvalidNumber as e:
            raise ConfigError(f"{where}.caller_id: {e}") from None
    try:
        return AriProvider(name=name, ari_password=password, **fields)
    except ValueError as e:
        # AriProvider says "provider 'x': <field> must ..."; name the setting instead.
        text = str(e).split(": ", 1)[-1]
        field, _, rest = text.partition(" ")
        if field in PROVIDER_KEYS:
            raise ConfigError(f"{where}.{field}: {rest}") from None
        raise ConfigError(f"{where}: {text}") from None


def _password(where: str, env_name: str, credential: str, env: Mapping[str, str]) -> str:
    return read_secret(where, "password", env_name, credential, env)


class UnknownProvider(Exception):
    """An outbound request names a provider that is not configured."""


def choose_provider(providers: Mapping[str, AriProvider], name: str | None) -> AriProvider:
    """The provider an outbound request asks for; the only one when it names none."""
    if name is None:
        if not providers:
            raise UnknownProvider(
                "no ARI provider is configured: add a [providers.NAME] table to the config"
            )
        if len(providers) > 1:
            raise InvalidCallRequest(
                f"provider: is required when several are configured ({', '.join(providers)})"
            )
        return next(iter(providers.values()))
    provider = providers.get(name)
    if provider is None:
        known = ", ".join(providers) or "none configured"
        raise UnknownProvider(f"unknown provider {name!r} (known: {known})")
    return provider
