"""The twistd entry point: Options, one-line start-up errors, the start-up log, makeService."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, protocol, reactor
from twisted.logger import formatEvent
from twisted.trial import unittest

from rapida_tap import dialplan, listeners, node, services, tap
from rapida_tap.admission import AdmissionFactory
from rapida_tap.audiosocket.protocol import AudioSocketFactory
from rapida_tap.config import Settings
from rapida_tap.listeners import ListenFailed
from rapida_tap.tls import TlsListener
from rapida_tap.web.guard import GuardedSite
from tests.certs import make_cert
from tests.support import API_KEY, capture_logs, curl_get, raw_http, register

LOCAL = "tcp:0:interface=127.0.0.1"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RAPIDA_"):
            monkeypatch.delenv(name)


def parse(args: list[str]) -> tap.Options:
    options = tap.Options()
    options.parseOptions(args)
    return options


def exit_message(args: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        parse(args)
    message = caught.value.code
    assert isinstance(message, str)
    assert "\n" not in message
    return message


# --- Options -----------------------------------------------------------------------------------


def test_options_defaults_generate_a_key() -> None:
    settings = parse([]).settings
    assert settings is not None
    assert settings.audiosocket == "tcp:4573"
    assert settings.http == "tcp:8080"
    assert settings.api_key_generated is True
    assert len(settings.api_keys) == 1 and settings.api_keys[0].startswith("rpd-")
    assert parse([]).settings.api_keys != settings.api_keys  # type: ignore[union-attr]


def test_options_every_setting() -> None:
    settings = parse(
        [
            "--audiosocket=tcp:14573",
            "--http",
            "tcp:18080:interface=127.0.0.1",
            "--https=",
            "--assistant=wss://bot.example.com/a",
            "--contexts=redis://127.0.0.1:6379/0",
            "--public-url=https://rapida.example.com",
            "--api-key=first-key-0001",
            "--api-key",
            "second-key-0002",
        ]
    ).settings
    assert settings is not None
    assert settings.audiosocket == "tcp:14573"
    assert settings.http == "tcp:18080:interface=127.0.0.1"
    assert settings.https == ""
    assert settings.assistant == "wss://bot.example.com/a"
    assert settings.contexts == "redis://127.0.0.1:6379/0"
    assert settings.public_url == "https://rapida.example.com"
    assert settings.api_keys == ["first-key-0001", "second-key-0002"]
    assert settings.api_key_generated is False


def test_options_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "r.toml"
    key, cert = make_cert(tmp_path)
    tls = f"privateKey={key}:certKey={cert}"
    config.write_text(f'http = "tcp:1"\naudiosocket = "tcp:2"\nhttps = "ssl:3:{tls}"\n')
    monkeypatch.setenv("RAPIDA_AUDIOSOCKET", "tcp:20")
    monkeypatch.setenv("RAPIDA_HTTPS", f"ssl:30:{tls}")
    monkeypatch.setenv("RAPIDA_API_KEYS", "env-key-0001,env-key-0002")
    settings = parse(["-c", str(config), "--https", f"ssl:300:{tls}"]).settings
    assert settings is not None
    assert (settings.http, settings.audiosocket) == ("tcp:1", "tcp:20")
    assert settings.https == f"ssl:300:{tls}"
    assert settings.api_keys == ["env-key-0001", "env-key-0002"]
    assert settings.api_key_generated is False


@pytest.mark.parametrize(
    ("args", "env", "starts"),
    [
        (["--contexts", "bad"], {}, "rapida-asterisk: --contexts: 'bad' is neither"),
        (["--assistant", "http://x"], {}, "rapida-asterisk: --assistant:"),
        (["--public-url", "nope"], {}, "rapida-asterisk: --public-url:"),
        (["--audiosocket", "nonsense:1"], {}, "rapida-asterisk: --audiosocket: 'nonsense:1':"),
        (["--http", "tcp:abc"], {}, "rapida-asterisk: --http: 'tcp:abc':"),
        (["--https", "ssl:8443:privateKey=/nonexistent.pem"], {}, "rapida-asterisk: --https:"),
        (["--api-key", "short"], {}, "rapida-asterisk: api_keys:"),
        (["--config", "/nonexistent/r.toml"], {}, "rapida-asterisk: --config: cannot read"),
        ([], {"RAPIDA_CONTEXT_TTL": "-1"}, "rapida-asterisk: context_ttl: must be greater"),
        ([], {"RAPIDA_RATE_LIMIT": "fast"}, "rapida-asterisk: RAPIDA_RATE_LIMIT: 'fast'"),
        ([], {"RAPIDA_AUDIOSOCKET": "bogus:9"}, "rapida-asterisk: --audiosocket: 'bogus:9'"),
    ],
)
def test_bad_values_exit_with_one_line(
    args: list[str], env: dict[str, str], starts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    message = exit_message(args)
    assert message.startswith(starts), message


def test_bad_file_value_exits_naming_the_setting(tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    config.write_text("rate_burst = 0\n")
    assert exit_message(["--config", str(config)]) == (
        "rapida-asterisk: rate_burst: must be at least 1"
    )
    config.write_text("[broken\n")
    assert exit_message(["--config", str(config)]).startswith(
        f"rapida-asterisk: --config: {config} is not valid TOML"
    )


# --- start-up log ------------------------------------------------------------------------------


def test_endpoint_port() -> None:
    table = [
        ("tcp:4573", 4573),
        ("tcp:0:interface=127.0.0.1", 0),
        ("tcp:port=8080:interface=127.0.0.1", 8080),
        ("tcp:interface=127.0.0.1:port=8081", 8081),
        ("ssl:8443:privateKey=key.pem:certKey=cert.pem", 8443),
        ("tcp6:4573:interface=\\:\\:1", 4573),
        ("unix:/run/rapida.sock", None),
        ("systemd:domain=INET:index=0", None),
    ]
    for endpoint, port in table:
        assert listeners.endpoint_port(endpoint) == port, endpoint


def test_listener_host_is_the_bound_address_or_this_machine() -> None:
    table = [
        ("tcp:4573:interface=127.0.0.1", "127.0.0.1"),
        ("tcp:port=4573:interface=10.0.0.5", "10.0.0.5"),
        ("tcp6:4573:interface=\\:\\:1", "[::1]"),
        ("tcp:4573", dialplan.this_host()),
        ("tcp:4573:interface=0.0.0.0", dialplan.this_host()),
        ("tcp6:4573:interface=\\:\\:", dialplan.this_host()),
        ("systemd:domain=INET:index=0", dialplan.this_host()),
    ]
    for endpoint, host in table:
        assert dialplan.listener_host(endpoint) == host, endpoint


def key_events(texts: list[str], key: str) -> list[str]:
    return [t for t in texts if key in t]


class StartLogTests(unittest.TestCase):
    def logs_of(self, settings: Settings) -> list[str]:
        capture = capture_logs(self)
        node.log_start(settings)
        return [formatEvent(e) for e in capture.events]

    def test_generated_key_is_logged_once_with_a_dialplan(self) -> None:
        key = "rpd-generated-key-abc"
        texts = self.logs_of(
            Settings(
                audiosocket="tcp:14573",
                http="tcp:18080",
                public_url="https://rapida.example.com:8443/",
                api_keys=[key],
                api_key_generated=True,
            )
        )
        with_key = key_events(texts, key)
        self.assertEqual(len(with_key), 1)
        text = with_key[0]
        self.assertIn("No API key configured", text)
        self.assertIn(f"RAPIDA_API_KEY = {key}", text)
        self.assertIn("RAPIDA_URL = https://rapida.example.com:8443\n", text)
        self.assertIn("RAPIDA_AS_HOST = rapida.example.com\n", text)
        self.assertIn("RAPIDA_PORT = 14573\n", text)
        self.assertIn("AudioSocket(${CTX},", text)
        self.assertIn("LEN(${CTX})} != 36", text)
        self.assertIn("X-Api-Key: ${RAPIDA_API_KEY}", text)  # the key goes in a header
        self.assertIn("URIENCODE(${CALLERID(num)})", text)

    def test_generated_key_without_public_url_names_this_host(self) -> None:
        key = "rpd-generated-key-def"
        texts = self.logs_of(
            Settings(
                audiosocket="tcp:14573", http="tcp:18080", api_keys=[key], api_key_generated=True
            )
        )
        [text] = key_events(texts, key)
        host = dialplan.this_host()
        self.assertIn(f"RAPIDA_URL = http://{host}:18080\n", text)
        self.assertIn(f"RAPIDA_AS_HOST = {host}\n", text)

    def test_listeners_bound_to_one_address_name_that_address(self) -> None:
        key = "rpd-generated-key-ghi"
        texts = self.logs_of(
            Settings(
                audiosocket="tcp:14573:interface=127.0.0.1",
                http="tcp:port=18080:interface=127.0.0.1",
                api_keys=[key],
                api_key_generated=True,
            )
        )
        [text] = key_events(texts, key)
        self.assertIn("RAPIDA_URL = http://127.0.0.1:18080\n", text)
        self.assertIn("RAPIDA_AS_HOST = 127.0.0.1\n", text)
        self.assertIn("RAPIDA_PORT = 14573\n", text)

    def test_each_address_follows_its_own_listener(self) -> None:
        key = "rpd-generated-key-jkl"
        texts = self.logs_of(
            Settings(
                audiosocket="tcp:14573:interface=10.0.0.5",
                http="tcp:18080",
                api_keys=[key],
                api_key_generated=True,
            )
        )
        [text] = key_events(texts, key)
        self.assertIn(f"RAPIDA_URL = http://{dialplan.this_host()}:18080\n", text)
        self.assertIn("RAPIDA_AS_HOST = 10.0.0.5\n", text)

    def test_configured_key_is_never_logged(self) -> None:
        key = "configured-key-0001"
        texts = self.logs_of(Settings(api_keys=[key]))
        self.assertEqual(key_events(texts, key), [])
        self.assertEqual(len(texts), 1)
        self.assertIn("audiosocket=tcp:4573 http=tcp:8080 https=off", texts[0])
        self.assertNotIn("AudioSocket(", texts[0])

    def test_redis_password_is_not_logged(self) -> None:
        texts = self.logs_of(
            Settings(api_keys=[API_KEY], contexts="redis://:hunter2-secret@redis.example:6380/1")
        )
        self.assertNotIn("hunter2", "\n".join(texts))
        self.assertIn("contexts=redis.example:6380/1", texts[0])


# --- makeService -------------------------------------------------------------------------------


class MakeServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {})

    def make(self, *args: str) -> service.MultiService:
        options = tap.Options()
        options.parseOptions(["--audiosocket", LOCAL, "--http", LOCAL, *args])
        self.options = options
        return tap.makeService(options)

    def start(self, top: service.MultiService) -> dict[str, Any]:
        """Start ``top``; the listening ports by factory kind ("audiosocket", "http")."""
        ports: dict[str, Any] = {}
        for child in top:
            if isinstance(child, StreamServerEndpointService):
                served = child.factory.wrapped  # behind the admission caps
                kind = "audiosocket" if isinstance(served, AudioSocketFactory) else "http"
                listen = child.endpoint.listen

                def spy(factory: Any, listen: Any = listen, kind: str = kind) -> Any:
                    d = listen(factory)
                    d.addCallback(lambda port: ports.setdefault(kind, port))
                    return d

                child.endpoint.listen = spy  # type: ignore[method-assign]
        top.startService()
        self.addCleanup(lambda: top.stopService() if top.running else None)
        return ports

    def test_children(self) -> None:
        top = self.make("--api-key", API_KEY)
        self.assertIsInstance(top, service.MultiService)
        children = list(top)
        self.assertEqual(len(children), 6)
        # Children stop in reverse order: the events (webhook flush) after the calls ended.
        self.assertIsInstance(children[0], services.CollectorService)
        self.assertIsInstance(children[1], services.EventsService)
        self.assertIsInstance(children[2], services.BridgeService)
        self.assertIsInstance(children[3], services.OutboundService)
        listeners = [c for c in children if isinstance(c, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 2)
        # Each listener's factory sits behind the node's connection caps (rapida_tap.admission).
        self.assertIsInstance(listeners[0].factory, AdmissionFactory)
        self.assertIsInstance(listeners[0].factory.wrapped, AudioSocketFactory)
        self.assertIsInstance(listeners[1].factory.wrapped, GuardedSite)
        self.assertFalse(top.running)

    def test_https_adds_a_listener_and_off_removes_one(self) -> None:
        key, cert = make_cert(Path(self.mktemp()).resolve().parent)
        https = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        top = self.make("--api-key", API_KEY, "--audiosocket=", "--https", https)
        listeners = [c for c in top if isinstance(c, StreamServerEndpointService | TlsListener)]
        self.assertEqual(len(listeners), 2)
        self.assertEqual(sum(isinstance(c, TlsListener) for c in listeners), 1)
        self.assertFalse(
            any(
                isinstance(getattr(c.factory, "wrapped", c.factory), AudioSocketFactory)
                for c in listeners
            )
        )

    @defer.inlineCallbacks
    def test_start_serve_and_stop(self) -> Any:
        logs = capture_logs(self)
        top = self.make()  # no key: one is generated and logged once
        settings = self.options.settings
        assert settings is not None
        key = settings.api_keys[0]
        self.assertEqual(len([e for e in logs.events if key in formatEvent(e)]), 1)
        ports = self.start(top)
        self.assertTrue(top.running)
        self.assertEqual(set(ports), {"audiosocket", "http"})
        http_port = ports["http"].getHost().port
        ctx = yield register(http_port, key=key)
        self.assertEqual(len(ctx), 36)
        reply = yield raw_http(http_port, curl_get("/healthz", headers={"Connection": "close"}))
        self.assertEqual(reply.status, 200)
        bridge = next(c for c in top if isinstance(c, services.BridgeService)).bridge
        self.assertTrue(bridge.accepting)
        yield top.stopService()
        self.assertFalse(top.running)
        self.assertFalse(bridge.accepting)
        self.assertEqual(len(bridge.contexts.store), 0)  # type: ignore[attr-defined]
        self.assertEqual(len(key_events([formatEvent(e) for e in logs.events], key)), 1)

    def taken_http(self) -> tuple[str, str]:
        """A port something else listens on, as an --http endpoint, and the one-line error."""
        taken = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        http = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        return http, (
            f"rapida-asterisk: --http: '{http}': cannot listen: the port is already in use "
            "(another process listens on it)"
        )

    def test_a_port_in_use_stops_makeService_with_one_line(self) -> None:
        """Found before twistd logs or forks, like any bad setting."""
        http, expected = self.taken_http()
        logs = capture_logs(self)
        caught = self.assertRaises(SystemExit, self.make, "--api-key", API_KEY, "--http", http)
        self.assertEqual(caught.code, expected)
        self.assertEqual(logs.events, [])

    @defer.inlineCallbacks
    def test_a_port_taken_after_makeService_is_one_line_too(self) -> Any:
        http, expected = self.taken_http()
        settings = Settings(api_keys=[API_KEY], audiosocket=LOCAL, http=http)
        # twistd binds in privilegedStartService; a service started without it binds in
        # startService. Either way: the one-line exit of a bad option, not CannotListenError.
        for start in ("privilegedStartService", "startService"):
            top = node.Daemon(settings, reactor).service()
            caught = self.assertRaises(SystemExit, getattr(top, start))
            self.assertEqual(caught.code, expected)
            yield top.stopService()

    @defer.inlineCallbacks
    def test_daemonized_twistd_gets_an_exception_it_can_report(self) -> Any:
        """twistd's parent process waits for an Exception from a daemonized child."""
        self.assertTrue(self.make("--api-key", API_KEY).one_line_errors)  # type: ignore[attr-defined]
        options = tap.Options()
        options.parent = {"nodaemon": False}  # type: ignore[assignment]
        options.parseOptions(["--audiosocket", LOCAL, "--http", LOCAL, "--api-key", API_KEY])
        self.assertFalse(tap.makeService(options).one_line_errors)  # type: ignore[attr-defined]
        http, expected = self.taken_http()
        settings = Settings(api_keys=[API_KEY], audiosocket=LOCAL, http=http)
        top = node.Daemon(settings, reactor).service()
        top.one_line_errors = False
        caught = self.assertRaises(ListenFailed, top.privilegedStartService)
        self.assertEqual(f"rapida-asterisk: {caught}", expected)
        yield top.stopService()
