"""Listeners named by their setting: a bad endpoint or a port that cannot be had is one line.

Endpoint strings are parsed while the settings are read (``check_listener``), so a typo or a
port out of range stops start-up before anything else happens.  A port already in use (or one
that needs a privilege) can only be found by binding it: ``check_ports_free`` binds each port
for a moment in ``makeService``, before twistd logs or forks, so the error is one line like any
other.  The real bind follows when twistd starts the services; should a port be taken in
between, ``Listener`` raises a ``ListenFailed`` naming the setting and ``one_line_exit`` turns it
into twistd's exit with that one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
from collections.abc import Iterator
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError

from rapida_tap.config import ConfigError, Settings

# Endpoint kinds whose first positional argument (or port=) is a TCP port.
_PORT_KINDS = frozenset({"tcp", "tcp6", "ssl"})
_UNESCAPED_COLON = re.compile(r"(?<!\\):")
_TLS_FILE_OPTIONS = frozenset({"privateKey", "certKey", "extraCertChain", "dhParameters"})


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
    """What went wrong binding ``description`` (the ``--name`` listener), in one line.

    TLS file options are left out of the endpoint shown: the address is what matters here.
    """
    args = _UNESCAPED_COLON.split(description)
    description = ":".join(a for a in args if a.partition("=")[0] not in _TLS_FILE_OPTIONS)
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


def check_port_free(name: str, description: str) -> None:
    """Bind the address of a ``tcp:``/``tcp6:``/``ssl:`` listener and let go at once.

    Raises ``ListenFailed`` when the port is in use, needs a privilege or the address is not
    this machine's.  Port 0 (any free port), ``unix:`` and ``systemd:`` endpoints need no check.
    """
    try:
        port = endpoint_port(description)
    except ValueError:
        return  # check_listener has refused it already
    if not port:
        return
    interface = endpoint_interface(description)
    ipv6 = ":" in interface or description.startswith("tcp6:")
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's own bind
        probe.bind((interface or ("::" if ipv6 else ""), port))
    except OSError as e:
        raise listen_error(name, description, e) from None
    finally:
        probe.close()


def check_ports_free(settings: Settings) -> None:
    """``check_port_free`` for every listener the settings turn on."""
    for name in ("audiosocket", "http", "https", "metrics"):
        description = getattr(settings, name)
        if description:
            check_port_free(name, description)


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
def one_line_exit(enabled: bool = True) -> Iterator[None]:
    """Turn a ``ConfigError`` raised while starting services into twistd's one-line exit.

    twistd binds listeners after ``makeService``, outside the options' error handling; an
    exception there would print a traceback.  ``SystemExit`` with a message prints the message
    alone and exits with status 1, as a bad option does.  Not when twistd has daemonized
    (``enabled`` false): its parent process waits for an ``Exception`` to report, and would
    wait for ever after a ``SystemExit``.
    """
    try:
        yield
    except ConfigError as e:
        if not enabled:
            raise
        raise SystemExit(f"rapida-asterisk: {e}") from None
