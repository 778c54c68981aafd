"""Secrets in the configuration: never in the file, read from the environment or systemd.

A setting ``NAME`` is given as ``NAME_env`` (an environment variable holding it) or
``NAME_credential`` (a systemd credential, ``$CREDENTIALS_DIRECTORY/<name>``, as
``LoadCredential=`` provides); exactly one of the two.  Every error is one ``ConfigError``
naming the setting; the secret itself never appears in a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from rapida_tap.config import ConfigError

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


def read_secret(
    where: str, name: str, env_name: str, credential: str, environ: Mapping[str, str]
) -> str:
    """The secret ``name`` of the table ``where``, without a credential file's final newline;
    errors name ``where.name_env`` or ``where.name_credential``."""
    if bool(env_name) == bool(credential):
        raise ConfigError(
            f"{where}: set exactly one of {name}_env (an environment variable holding the "
            f"{name}) or {name}_credential (a systemd credential name)"
        )
    if env_name:
        if not ENV_NAME.fullmatch(env_name):
            raise ConfigError(f"{where}.{name}_env: {env_name!r} is not a variable name")
        value = environ.get(env_name, "")
        if not value:
            raise ConfigError(
                f"{where}.{name}_env: the environment variable {env_name} is not set or empty"
            )
        return value
    setting = f"{where}.{name}_credential"
    if not CREDENTIAL_NAME.fullmatch(credential) or credential in (".", ".."):
        raise ConfigError(f"{setting}: {credential!r} is not a credential name")
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        raise ConfigError(
            f"{setting}: $CREDENTIALS_DIRECTORY is not set: run under systemd with "
            f"LoadCredential={credential}:/path/to/file, or use {name}_env"
        )
    path = os.path.join(directory, credential)
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{setting}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{setting}: {path} is empty")
    return value
