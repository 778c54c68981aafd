"""Native TLS for ``--https``: modern settings, clear start-up errors, reload without drops.

The listener is given in Twisted's public endpoint syntax,
``ssl:8443:privateKey=key.pem:certKey=cert.pem`` (also ``ssl:port=8443:interface=0.0.0.0:
privateKey=...:certKey=...:extraCertChain=chain.pem``; ``certKey`` defaults to ``privateKey``
when both are in one file; ``\\:`` escapes a colon in a path).  Unlike Twisted's own ``ssl:``
endpoint this one only offers TLS 1.2 and 1.3 with forward-secret AEAD ciphers, checks that
the key matches the certificate before the daemon starts, and re-reads both files on
``reload()`` (the daemon calls it on SIGHUP): new connections get the new certificate, calls
in progress keep their TLS session and are not touched.  A reload that fails (half-written
files, key not matching) keeps the old certificate and logs why.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL
from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from rapida_tap.config import ConfigError
from rapida_tap.listeners import listen_error
from rapida_tap.tls_transport import MediaTLSFactory

__all__ = [
    "CIPHERS",
    "TlsError",
    "TlsListener",
    "TlsServerContext",
    "TlsSpec",
    "install_reload_signal",
    "parse_tls_endpoint",
]

CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""TLS 1.2 suites (Mozilla "intermediate" without DHE); TLS 1.3 suites are OpenSSL's defaults,
all AEAD with forward secrecy."""

log = Logger(namespace="rapida_tap.tls")


class TlsError(ConfigError):
    """The certificate or key cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class TlsSpec:
    """What an ``ssl:`` endpoint string asks for (paths as given, not yet read)."""

    port: int
    private_key: str
    cert_key: str
    interface: str = ""
    backlog: int = 50
    extra_cert_chain: str = ""


_KEYS = {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"}


def _split(description: str) -> list[str]:
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_tls_endpoint(description: str, name: str = "--https") -> TlsSpec:
    """Parse ``ssl:PORT:privateKey=...:certKey=...``; ``TlsError`` names what is wrong."""
    parts = _split(description.strip())
    if parts[0] != "ssl":
        raise TlsError(f"{name}: {description!r} must start with 'ssl:' (e.g. {_EXAMPLE})")
    positional: list[str] = []
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            positional.append(part)
        elif key not in _KEYS:
            raise TlsError(f"{name}: unknown option {key!r} (known: {', '.join(sorted(_KEYS))})")
        else:
            options[key] = value
    if positional:
        if len(positional) > 1 or "port" in options:
            raise TlsError(f"{name}: {description!r}: only the port may be given without a name")
        options["port"] = positional[0]
    try:
        port = int(options.get("port", ""))
        backlog = int(options.get("backlog", "50"))
    except ValueError:
        raise TlsError(f"{name}: port and backlog must be numbers in {description!r}") from None
    if not 0 <= port <= 65535:
        raise TlsError(f"{name}: port {port} out of range")
    key = options.get("privateKey", "")
    if not key:
        raise TlsError(f"{name}: privateKey= is required (e.g. {_EXAMPLE})")
    return TlsSpec(
        port=port,
        private_key=key,
        cert_key=options.get("certKey") or key,
        interface=options.get("interface", ""),
        backlog=backlog,
        extra_cert_chain=options.get("extraCertChain", ""),
    )


_EXAMPLE = "ssl:8443:privateKey=key.pem:certKey=cert.pem"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TlsError(f"--https: {what} file {path} does not exist") from None
    except PermissionError:
        raise TlsError(
            f"--https: {what} file {path} is not readable by this user (uid {os.getuid()})"
        ) from None
    except OSError as e:
        raise TlsError(f"--https: cannot read {what} file {path}: {e.strerror}") from None


def build_context(spec: TlsSpec) -> tuple[SSL.Context, str]:
    """A server context for ``spec`` and the certificate's SHA-256 fingerprint (hex)."""
    key_pem = _read(spec.private_key, "private key")
    cert_pem = _read(spec.cert_key, "certificate")
    chain_pem = _read(spec.extra_cert_chain, "certificate chain") if spec.extra_cert_chain else b""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(
            f"--https: the private key {spec.private_key} is encrypted; "
            "the daemon needs an unencrypted key (readable by its user only)"
        ) from None
    except ValueError:
        raise TlsError(f"--https: {spec.private_key} holds no usable PEM private key") from None
    if not isinstance(
        key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise TlsError(f"--https: {spec.private_key}: use an RSA, EC or Ed25519 key")
    blocks = _pem_blocks(cert_pem)
    if not blocks:
        raise TlsError(f"--https: {spec.cert_key} holds no PEM certificate")
    try:
        cert, *chain = [x509.load_pem_x509_certificate(b) for b in blocks + _pem_blocks(chain_pem)]
    except ValueError:
        raise TlsError(f"--https: a certificate in {spec.cert_key} cannot be read") from None
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
    )
    ctx.set_cipher_list(CIPHERS.encode("ascii"))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    ctx.set_session_id(b"rapida-asterisk")
    ctx.use_certificate(cert)
    for extra in chain:
        ctx.add_extra_chain_cert(extra)
    try:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error:
        raise TlsError(
            f"--https: the private key {spec.private_key} does not match the certificate "
            f"{spec.cert_key}"
        ) from None
    return ctx, cert.fingerprint(hashes.SHA256()).hex()


def _pem_blocks(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for piece in pem.split(end)[:-1]:
        start = piece.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(piece[start:] + end + b"\n")
    return blocks


@implementer(IOpenSSLServerConnectionCreator)
class TlsServerContext:
    """The current server context; ``reload()`` swaps in a new one for new connections."""

    def __init__(self, spec: TlsSpec) -> None:
        self.spec = spec
        self._context, self.fingerprint = build_context(spec)
        self.reloads = 0

    def reload(self) -> bool:
        """Re-read the files; on any problem keep the current certificate. True if swapped."""
        try:
            context, fingerprint = build_context(self.spec)
        except TlsError as e:
            log.error("TLS reload failed, keeping the current certificate: {error}", error=str(e))
            return False
        self._context = context
        changed = fingerprint != self.fingerprint
        self.fingerprint = fingerprint
        self.reloads += 1
        log.info(
            "TLS certificate reloaded from {cert} (sha256 {fp}{same})",
            cert=self.spec.cert_key,
            fp=fingerprint[:16],
            same="" if changed else ", unchanged",
        )
        return True

    def getContext(self) -> SSL.Context:
        """Old-style context-factory API (what ``SSL4ServerEndpoint`` documents)."""
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def install_reload_signal(reload: Callable[[], object], reactor: Any) -> Callable[[], None]:
    """Call ``reload`` (in the reactor thread) on SIGHUP; returns the undo function."""
    previous = signal.getsignal(signal.SIGHUP)

    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, handler)

    def undo() -> None:
        signal.signal(signal.SIGHUP, previous)

    return undo


class TlsListener(service.Service):
    """The ``--https`` listener of a Twisted ``factory``, reloading its certificate on SIGHUP."""

    def __init__(
        self,
        reactor: Any,
        spec: TlsSpec,
        context: TlsServerContext,
        factory: Any,
        admission: Callable[[Any], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.spec = spec
        self.context = context
        self.factory = factory
        self.admission = admission
        self.port: Any = None
        self._undo: Callable[[], None] | None = None

    def privilegedStartService(self) -> None:
        """Bind before twistd drops privileges; a failure is one line naming ``--https``."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()
        self._undo = install_reload_signal(self.context.reload, self.reactor)

    def _listen(self) -> None:
        factory: Any = MediaTLSFactory(self.context, False, self.factory)
        if self.admission is not None:
            # Admission wraps TLS, not the other way round: a refused connection is closed at
            # accept time, before a TLS object or a handshake is spent on it.
            factory = self.admission(factory)
        d = endpoints.TCP4ServerEndpoint(
            self.reactor, self.spec.port, backlog=self.spec.backlog, interface=self.spec.interface
        ).listen(factory)
        failed: list[Any] = []

        def listening(port: Any) -> None:
            self.port = port

        d.addCallbacks(listening, failed.append)
        if failed:  # a TCP/TLS endpoint binds at once: this is start-up, not a later error
            where = f"ssl:{self.spec.port}" + (
                f":interface={self.spec.interface}" if self.spec.interface else ""
            )
            raise listen_error("https", where, failed[0].value)

    def stopService(self) -> Any:
        super().stopService()
        if self._undo is not None:
            self._undo()
            self._undo = None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
