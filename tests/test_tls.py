"""Native TLS: the ``ssl:`` endpoint string, start-up errors, wss:// calls, reload on SIGHUP.

Certificates are generated per test into a temporary directory, never committed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, ssl
from twisted.trial import unittest

from rapida_tap import tls
from rapida_tap.media.codec import pcm_to_ulaw
from rapida_tap.tap import Options
from tests import fake_chan_websocket as fc
from tests.certs import make_cert
from tests.support import register, start_daemon, tone, wait_until

# -- the endpoint string -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "ssl:8443:privateKey=key.pem:certKey=cert.pem",
            tls.TlsSpec(8443, "key.pem", "cert.pem"),
        ),
        ("ssl:port=443:privateKey=both.pem", tls.TlsSpec(443, "both.pem", "both.pem")),
        (
            "ssl:8443:interface=127.0.0.1:backlog=10:privateKey=k:certKey=c:extraCertChain=ch",
            tls.TlsSpec(8443, "k", "c", interface="127.0.0.1", backlog=10, extra_cert_chain="ch"),
        ),
        (r"ssl:8443:privateKey=C\:/k.pem:certKey=c.pem", tls.TlsSpec(8443, "C:/k.pem", "c.pem")),
    ],
)
def test_parse_tls_endpoint(text: str, want: tls.TlsSpec) -> None:
    assert tls.parse_tls_endpoint(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:8443", "must start with 'ssl:'"),
        ("ssl:8443", "privateKey= is required"),
        ("ssl:http:privateKey=k", "port and backlog must be numbers"),
        ("ssl:70000:privateKey=k", "port 70000 out of range"),
        ("ssl:8443:privateKey=k:sslmethod=SSLv3_METHOD", "unknown option 'sslmethod'"),
        ("ssl:8443:9443:privateKey=k", "only the port may be given without a name"),
    ],
)
def test_parse_tls_endpoint_errors(text: str, message: str) -> None:
    with pytest.raises(tls.TlsError, match="^--https: .*" + message.replace("(", r"\(")):
        tls.parse_tls_endpoint(text)


# -- start-up errors ---------------------------------------------------------------------------


def spec(key: Path, cert: Path) -> tls.TlsSpec:
    return tls.TlsSpec(0, str(key), str(cert))


def test_good_files_build_a_tls12_plus_context(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path)
    context = tls.TlsServerContext(spec(key, cert))
    assert len(context.fingerprint) == 64
    assert isinstance(context.getContext(), SSL.Context)


def test_missing_key(tmp_path: Path) -> None:
    _, cert = make_cert(tmp_path)
    with pytest.raises(tls.TlsError, match=r"private key file .*nope\.pem does not exist"):
        tls.TlsServerContext(spec(tmp_path / "nope.pem", cert))


def test_missing_certificate(tmp_path: Path) -> None:
    key, _ = make_cert(tmp_path)
    with pytest.raises(tls.TlsError, match=r"certificate file .*nope\.pem does not exist"):
        tls.TlsServerContext(spec(key, tmp_path / "nope.pem"))


def test_unreadable_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = make_cert(tmp_path)
    real_open = open

    def deny(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == str(key):  # what chmod 0 does for a non-root user
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(tls.TlsError, match="is not readable by this user"):
        tls.TlsServerContext(spec(key, cert))


def test_key_path_is_a_directory(tmp_path: Path) -> None:
    _, cert = make_cert(tmp_path)
    with pytest.raises(tls.TlsError, match="cannot read private key file"):
        tls.TlsServerContext(spec(tmp_path, cert))


def test_encrypted_key(tmp_path: Path) -> None:
    _, cert = make_cert(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "enc.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(tls.TlsError, match="is encrypted"):
        tls.TlsServerContext(spec(path, cert))


def test_mismatched_key(tmp_path: Path) -> None:
    key, _ = make_cert(tmp_path, "a")
    _, cert = make_cert(tmp_path, "b")
    with pytest.raises(tls.TlsError, match="does not match the certificate"):
        tls.TlsServerContext(spec(key, cert))


def test_not_a_key(tmp_path: Path) -> None:
    _, cert = make_cert(tmp_path)
    with pytest.raises(tls.TlsError, match="holds no usable PEM private key"):
        tls.TlsServerContext(spec(cert, cert))


def test_not_a_certificate(tmp_path: Path) -> None:
    key, _ = make_cert(tmp_path)
    with pytest.raises(tls.TlsError, match="holds no PEM certificate"):
        tls.TlsServerContext(spec(key, key))


def test_command_line_fails_with_one_line(tmp_path: Path) -> None:
    options = Options()
    with pytest.raises(SystemExit) as raised:
        options.parseOptions(["--https", f"ssl:8443:privateKey={tmp_path}/missing.pem"])
    assert str(raised.value).startswith("rapida-asterisk: --https: private key file")


def test_reload_keeps_the_old_certificate_when_the_new_files_are_bad(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path)
    context = tls.TlsServerContext(spec(key, cert))
    before, first = context.getContext(), context.fingerprint
    cert.write_text("half-written")
    assert context.reload() is False
    assert context.getContext() is before and context.fingerprint == first
    make_cert(tmp_path)  # a renewed pair under the same names
    assert context.reload() is True
    assert context.fingerprint != first and context.getContext() is not before


# -- over real sockets ------------------------------------------------------------------------


class Tls12Only(ssl.ClientContextFactory):
    """A client that offers at most ``version`` (to see old protocols refused)."""

    def __init__(self, version: int) -> None:
        self.version = version

    def getContext(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_max_proto_version(self.version)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        return ctx


class WssTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.key, self.cert = make_cert(self.dir)
        self.daemon = start_daemon(self)
        self.context = tls.TlsServerContext(spec(self.key, self.cert))
        # As the daemon listens: admission caps outside TLS, the site inside.
        listener = tls.TlsListener(
            reactor,
            spec(self.key, self.cert),
            self.context,
            self.daemon.site,
            admission=lambda factory: self.daemon.admitted("https", factory, 100),
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        self.clients: list[fc.FakeChanWebSocket] = []
        return wait_until(lambda: listener.port is not None).addCallback(
            lambda _: self._listening(listener.port)
        )

    def _listening(self, port: Any) -> None:
        self.port = port.getHost().port

    def tearDown(self) -> defer.Deferred[Any]:
        waits = []
        for c in self.clients:
            if c.connected_:
                c.transport.abortConnection()
            waits.append(c.closed)
        return defer.gatherResults(waits)

    def trust(self, *certs: Path) -> Any:
        roots = [ssl.Certificate.loadPEM(c.read_bytes()) for c in certs]
        return ssl.optionsForClientTLS("localhost", trustRoot=ssl.trustRootFromCertificates(roots))

    @defer.inlineCallbacks
    def wss(self, ctx: str, options: Any) -> Any:
        client = fc.FakeChanWebSocket(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        self.clients.append(client)
        yield protocol.ClientCreator(reactor, lambda: client).connectSSL(
            "127.0.0.1", self.port, options
        )
        yield client.handshake
        return client

    @defer.inlineCallbacks
    def start_call(self, options: Any) -> Any:
        ctx = yield register(self.daemon.http_port)
        client = yield self.wss(ctx, options)
        self.assertTrue(fc.head_is_101(client.response_head), client.response_head)
        client.send_text(fc.media_start_json(ctx))
        yield wait_until(lambda: ctx in self.daemon.bridge.calls)
        return client, self.daemon.bridge.calls[ctx]

    @defer.inlineCallbacks
    def echo_once(self, client: fc.FakeChanWebSocket) -> Any:
        before = len(client.audio())
        client.send_audio(pcm_to_ulaw(tone(1)[0]))
        yield client.wait_for(lambda c: len(c.audio()) > before)

    @defer.inlineCallbacks
    def test_wss_call_echoes_and_uses_tls12_or_later(self) -> Any:
        client, call = yield self.start_call(self.trust(self.cert))
        yield self.echo_once(client)
        version = client.transport.getHandle().get_protocol_version_name()
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        client.close_like_asterisk()
        self.assertEqual((yield call.when_ended()), "caller-hangup")

    @defer.inlineCallbacks
    def test_https_refuses_an_oversized_body_and_counts_the_call_as_identified(self) -> Any:
        """The HTTP limits hold on the TLS listener too, behind its admission caps."""
        client, call = yield self.start_call(self.trust(self.cert))
        https = self.daemon.listeners["https"]
        self.assertEqual((https.connections, https.pending), (1, {}))  # the call, identified
        upload = fc.FakeChanWebSocket(
            b"POST /v1/talk/asterisk/calls HTTP/1.1\r\nHost: a\r\n"
            b"Content-Length: 2000000000\r\n\r\n" + b"x" * 65536
        )
        self.clients.append(upload)
        yield protocol.ClientCreator(reactor, lambda: upload).connectSSL(
            "127.0.0.1", self.port, self.trust(self.cert)
        )
        yield upload.closed
        self.assertTrue(upload.response_head.startswith(b"HTTP/1.1 413 "), upload.response_head)
        self.assertEqual(self.daemon.site.refused, {"body-too-large": 1})
        yield self.echo_once(client)  # the call never noticed
        client.close_like_asterisk()
        self.assertEqual((yield call.when_ended()), "caller-hangup")
        yield wait_until(lambda: https.connections == 0)

    @defer.inlineCallbacks
    def test_tls11_and_plain_clients_are_refused_without_harm(self) -> Any:
        good, call = yield self.start_call(self.trust(self.cert))
        old = fc.FakeChanWebSocket(b"")
        self.clients.append(old)
        yield protocol.ClientCreator(reactor, lambda: old).connectSSL(
            "127.0.0.1", self.port, Tls12Only(SSL.TLS1_1_VERSION)
        )
        yield old.closed
        self.assertEqual(old.response_head, b"")
        ctx = yield register(self.daemon.http_port)
        plain = fc.FakeChanWebSocket(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        self.clients.append(plain)
        yield protocol.ClientCreator(reactor, lambda: plain).connectTCP("127.0.0.1", self.port)
        yield plain.closed
        self.assertFalse(fc.head_is_101(plain.response_head))
        self.assertIn(ctx, self.daemon.contexts._live)  # not claimed by the failed attempt
        self.assertFalse(call.is_ended)
        yield self.echo_once(good)

    @defer.inlineCallbacks
    def test_sighup_reload_serves_the_new_certificate_and_keeps_calls(self) -> Any:
        old_cert = self.dir / "old-cert.pem"
        old_cert.write_bytes(self.cert.read_bytes())
        client, call = yield self.start_call(self.trust(old_cert))
        first = self.context.fingerprint
        make_cert(self.dir)  # renewed files under the same paths
        undo = tls.install_reload_signal(self.context.reload, reactor)
        self.addCleanup(undo)
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_until(lambda: self.context.fingerprint != first)
        yield self.echo_once(client)  # the call in progress is untouched
        self.assertFalse(call.is_ended)
        renewed = self.trust(self.cert)
        second, call2 = yield self.start_call(renewed)  # verifies against the new cert only
        peer = second.transport.getPeerCertificate()
        served = peer.digest("sha256").decode().replace(":", "").lower()
        self.assertEqual(served, self.context.fingerprint)
        self.assertFalse(call2.is_ended)
        yield self.echo_once(second)


class DaemonHttpsTest(unittest.TestCase):
    @defer.inlineCallbacks
    def test_daemon_https_listener_installs_and_removes_the_sighup_reload(self) -> Any:
        from rapida_tap.config import Settings
        from rapida_tap.node import Daemon

        directory = Path(self.mktemp())
        directory.mkdir()
        key, cert = make_cert(directory)
        settings = Settings(
            api_keys=["test-key-0123456789"],
            audiosocket="",
            http="",
            https=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        daemon = Daemon(settings, reactor)
        self.addCleanup(daemon.contexts.close)
        top = daemon.service()
        [listener] = [s for s in top if isinstance(s, tls.TlsListener)]
        before = signal.getsignal(signal.SIGHUP)
        top.startService()
        yield wait_until(lambda: listener.port is not None)
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        first = daemon.tls.fingerprint
        make_cert(directory)
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_until(lambda: daemon.tls.fingerprint != first)
        yield top.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
