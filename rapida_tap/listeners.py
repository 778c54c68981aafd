"""Listeners named by their setting: a bad endpoint or a port that cannot be had is one line.

Endpoint strings are parsed while the settings are read (``check_listener``), so a typo or a
port out of range stops start-up before anything else happens.  A port already in use (or one
that needs a privilege) can only be found by binding it, which twistd does after
``makeService``; ``Listener`` turns that failure into a ``ListenFailed`` naming the setting, and
``one_line_exit`` turns it into twistd's exit with that one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError

from rapida_tap.config import ConfigError

# Endpoint kinds whose first positional argument (or port=) is a TCP port.
_PORT_KINDS = frozenset({"tcp", "tcp6", "ssl"})
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


class ListenFailed(ConfigError):
    """A listener could not be bound; ``str()`` names the setting, the endpoint and why."""


def endpoint_port(description: str) -> int | None:
    """The port of a ``tcp:``/``tcp6:``/``ssl:`` endpoint string; ``None`` for other kinds.

    Raises ``ValueError`` when the port is not a number.
    """
    kind, *args = _UNESCAPED_COLON.split(description.strip())
    if kind not in _PORT_KINDS:
        return None
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    text = named.get("port", positional[0] if positional else "")
    return int(text)


def endpoint_interface(description: str) -> str:
    """The ``interface=`` of an endpoint string (unescaped), or ``""`` when it has none."""
    for arg in _UNESCAPED_COLON.split(description.strip())[1:]:
        key, eq, value = arg.partition("=")
        if eq and key == "interface":
            return value.replace("\\:", ":")
    return ""


def check_listener(reactor: Any, name: str, value: str) -> None:
    """Parse a listener's endpoint string now, so a typo fails start-up with one line.

    ``systemd:`` endpoints are looked up in the sockets systemd passed (``LISTEN_FDS``), so a
    missing or misnamed socket unit is reported here rather than as a bare ``KeyError``.
    """
    try:
        port = endpoint_port(value)
    except ValueError:
        raise ConfigError(f"--{name}: {value!r}: the port must be a number") from None
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--{name}: {value!r}: port {port} is out of range (0-65535)")
    try:
        endpoints.serverFromString(reactor, value)
    except (IndexError, KeyError) as e:
        if value.startswith("systemd:"):
            raise ConfigError(
                f"--{name}: {value!r}: systemd passed no such socket ({e}); is the .socket unit "
                "running, and do its FileDescriptorName= values match?"
            ) from None
        raise ConfigError(f"--{name}: {value!r}: {e}") from None
    except Exception as e:
        raise ConfigError(f"--{name}: {value!r}: {e}") from None


def listen_error(name: str, description: str, error: BaseException) -> ListenFailed:
    """What went wrong binding ``description`` (the ``--name`` listener), in one line."""
    cause = getattr(error, "socketError", None) or error
    code = getattr(cause, "errno", None)
    if code == errno.EADDRINUSE:
        why = "the port is already in use (another process listens on it)"
    elif code == errno.EACCES:
        why = "permission denied (ports below 1024 need a privilege: see socket activation)"
    elif code == errno.EADDRNOTAVAIL:
        why = "this machine has no such address (interface=)"
    else:
        why = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return ListenFailed(f"--{name}: {description!r}: cannot listen: {why}")


class Listener(StreamServerEndpointService):
    """``strports.service`` that knows which setting it serves, so a bind failure names it.

    It binds in ``privilegedStartService`` (before twistd drops privileges), like strports.
    """

    _raiseSynchronously = True

    def __init__(self, reactor: Any, name: str, description: str, factory: Any) -> None:
        super().__init__(endpoints.serverFromString(reactor, description), factory)
        self.setting = name
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError, OverflowError) as e:
            raise listen_error(self.setting, self.description, e) from None


@contextlib.contextmanager
def one_line_exit() -> Iterator[None]:
    """Turn a ``ConfigError`` raised while starting services into twistd's one-line exit.

    twistd binds listeners after ``makeService``, outside the options' error handling; an
    exception there would print a traceback.  ``SystemExit`` with a message prints the message
    alone and exits with status 1, as a bad option does.
    """
    try:
        yield
    except ConfigError as e:
        raise SystemExit(f"rapida-asterisk: {e}") from None
