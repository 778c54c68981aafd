"""twistd entry point: ``twistd -n rapida-asterisk [options]``.

``Options`` reads the command line, ``load_settings`` layers it over the TOML file and the
environment once, and ``makeService`` builds the node (``rapida_tap.node``) on the reactor.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import txaio
from twisted.application import service
from twisted.python import usage

from rapida_tap import __version__, internals, tls
from rapida_tap.config import ConfigError, Settings, build_settings, load_toml
from rapida_tap.listeners import check_listener, check_ports_free
from rapida_tap.node import Daemon, log_start
from rapida_tap.web.auth import generate_api_key


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve Asterisk calls (AudioSocket, chan_websocket) to voice-AI assistants. With no"
        " options: AudioSocket on tcp:4573, HTTP on tcp:8080, the echo assistant, in-memory"
        " contexts and a generated API key (logged once). Endpoints are Twisted endpoint strings."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/rapida-asterisk.toml)."],
        ["audiosocket", None, None, "AudioSocket listener endpoint [default: tcp:4573]."],
        ["http", None, None, "HTTP (registration, ws://, /healthz) endpoint [default: tcp:8080]."],
        [
            "https",
            None,
            None,
            "HTTPS/wss:// endpoint, e.g. ssl:8443:privateKey=key.pem:certKey=cert.pem.",
        ],
        [
            "assistant",
            None,
            None,
            "Default assistant: 'echo' or a ws(s):// bot URL [default: echo].",
        ],
        [
            "contexts",
            None,
            None,
            "Context store: 'memory' or redis://host:6379/0 [default: memory].",
        ],
        [
            "public-url",
            None,
            None,
            "The URL Asterisk reaches this node at (for printed dialplans).",
        ],
        [
            "drain-timeout",
            None,
            None,
            "Seconds live calls may go on after SIGTERM or POST /admin/drain; 0 waits for"
            " every call [default: 0]. A second SIGTERM ends them at once.",
        ],
        [
            "metrics",
            None,
            None,
            "Serve /metrics on this endpoint only (e.g. tcp:9464:interface=127.0.0.1)"
            " [default: /metrics on the HTTP listener].",
        ],
        [
            "api-keys-file",
            None,
            None,
            "File of API keys, one a line (e.g. the systemd credential %d/api-keys).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["api_keys"] = []
        self.settings: Settings | None = None

    def opt_api_key(self, key: str) -> None:
        """An accepted API key; repeatable (also RAPIDA_API_KEYS, comma separated)."""
        self["api_keys"].append(key)

    def opt_version(self) -> None:
        print(f"rapida-asterisk {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self, os.environ)
        except ConfigError as e:
            # One line naming the setting, rather than twistd's whole usage text.
            raise SystemExit(f"rapida-asterisk: {e}") from None


def load_settings(options: usage.Options, environ: Any) -> Settings:
    file_values = load_toml(options["config"]) if options["config"] else {}
    cli = {
        key.replace("-", "_"): options[key]
        for key in (
            "audiosocket",
            "http",
            "https",
            "assistant",
            "contexts",
            "public-url",
            "drain-timeout",
            "metrics",
            "api-keys-file",
        )
    }
    settings = build_settings(file_values, environ, cli, options["api_keys"])
    from twisted.internet import reactor

    if settings.https:
        tls.TlsServerContext(tls.parse_tls_endpoint(settings.https))  # fails early and clearly
    for name in ("audiosocket", "http", "metrics"):
        value = getattr(settings, name)
        if value:
            check_listener(reactor, name, value)
    if not settings.api_keys:
        settings.api_keys = [generate_api_key()]
        settings.api_key_generated = True
    return settings


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    settings = options.settings
    assert settings is not None
    # Autobahn logs two more lines (info and warn) for every refused handshake, after ours;
    # keep its errors only, so each refusal is one line saying why.
    txaio.set_global_log_level("error")  # type: ignore[attr-defined]  # bound by use_twisted()
    try:
        internals.check()
        internals.dispatch_events_directly(reactor)
        internals.defer_autobahn_settings_dump()
        daemon = Daemon(settings, reactor, on_drained=reactor.stop)
        check_ports_free(settings)  # a port in use: one line now, before twistd logs or forks
    except (ConfigError, internals.LibraryChanged) as e:
        raise SystemExit(f"rapida-asterisk: {e}") from None
    log_start(settings)
    top = daemon.service()
    twistd = options.parent
    top.one_line_errors = twistd is None or bool(twistd.get("nodaemon", True))
    return top
