"""ARI client for outbound calls: originate (JSON variables), look up, hang up.

Only what the outbound API needs, over treq with one persistent connection pool per Asterisk.
Every request is bounded by ``AriProvider.timeout`` (seconds, connect + headers + body) and every
failure is an ``AriError`` subclass with a message fit for the daemon's own API callers.  The
password goes into the basic-auth header and nowhere else: not into reprs, messages or logs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TxProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss

from rapida_tap import dialstring

log = Logger(namespace="rapida_tap.ari")

#: Seconds an idle pooled connection is kept.  Below Asterisk's default http.conf
#: ``session_inactivity`` (30 s), so we close first rather than POST into a closing socket.
POOL_IDLE_TIMEOUT = 20
#: Concurrent persistent connections per Asterisk (originate bursts).
POOL_MAX_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class AriProvider:
    """One Asterisk reachable over ARI, from the TOML table ``[providers.NAME]``.

    ``ari_url`` is the HTTP base (``http://pbx:8088``), without ``/ari`` and without
    credentials; ``timeout`` bounds each ARI request in seconds.  ``context``/``ws_context`` are
    the dialplan contexts for AudioSocket and WebSocket legs; ``formats`` is the codec list
    passed to originate (``ulaw`` avoids a high-rate slin on ``Local/`` channels).
    """

    name: str
    ari_url: str
    ari_user: str
    ari_password: str = dataclasses.field(repr=False)
    endpoint_technology: str = "PJSIP"
    trunk: str = ""
    context: str = "rapida-outbound"
    ws_context: str = "rapida-outbound-ws"
    caller_id: str = ""
    formats: str = "ulaw"
    timeout: float = 10.0
    endpoint: str = ""  # dial string template, e.g. "Local/{to}@from-rapida"; see dialstring.py

    def __post_init__(self) -> None:
        where = f"provider {self.name!r}"
        url = urlsplit(self.ari_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{where}: ari_url must be an http(s) URL like http://pbx:8088")
        if url.username is not None or url.password is not None:
            raise ValueError(f"{where}: put credentials in ari_user/ari_password, not in ari_url")
        if not self.endpoint_technology or "/" in self.endpoint_technology:
            raise ValueError(f"{where}: endpoint_technology must be a name like PJSIP")
        if "/" in self.trunk or self.trunk != self.trunk.strip():
            raise ValueError(f"{where}: trunk must be one endpoint name, without '/' or spaces")
        if not self.timeout > 0:
            raise ValueError(f"{where}: timeout must be a positive number of seconds")
        try:
            dialstring.check_template(self.endpoint_template, self.trunk)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def endpoint_template(self) -> str:
        """``endpoint`` if set, else ``{technology}/{trunk}/{to}`` (``{technology}/{to}``)."""
        return self.endpoint or dialstring.default_template(self.trunk)


class AriError(Exception):
    """ARI did not do what was asked.

    ``status`` is the HTTP status (``None`` when there was no response), ``message`` the whole
    human-readable explanation, ``ari_message`` ARI's own ``message`` (or ``error``) field.
    """

    def __init__(self, message: str, status: int | None = None, ari_message: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.ari_message = ari_message


class AriBadRequest(AriError):
    """400 (or 422): ARI rejected the parameters."""


class AriUnauthorized(AriError):
    """401 (or 403): wrong ARI credentials, or the user may not do this."""


class AriNotFound(AriError):
    """404: unknown channel, endpoint or resource."""


class AriConflict(AriError):
    """409: a channel with this id already exists."""


class AriServerError(AriError):
    """5xx from Asterisk (or a proxy in front of it)."""


class AriUnreachable(AriError):
    """No response: connection refused, DNS failure, or the connection dropped mid-request."""


class AriTimeout(AriError):
    """No complete response within ``AriProvider.timeout``."""


_ERRORS_BY_STATUS: dict[int, type[AriError]] = {
    400: AriBadRequest,
    401: AriUnauthorized,
    403: AriUnauthorized,
    404: AriNotFound,
    409: AriConflict,
    422: AriBadRequest,
}


def error_for_status(status: int) -> type[AriError]:
    """The ``AriError`` subclass for an HTTP status (``AriError`` itself for the unmapped)."""
    if status >= 500:
        return AriServerError
    return _ERRORS_BY_STATUS.get(status, AriError)


@dataclasses.dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes


class _BodyReader(TxProtocol):
    """Collect a response body into ``done``; cancelling ``done`` stops the connection."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _ari_message(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict):
        for key in ("message", "error"):
            if isinstance(data.get(key), str):
                return str(data[key])
    return None


class AriClient:
    """ARI channel operations against one provider.

    ``reactor`` supplies time (and TCP for the default client).  ``http_client`` is anything
    with ``treq.HTTPClient.request`` (``treq.testing.StubTreq`` in tests); by default a
    ``treq.HTTPClient`` over a persistent pool that this client owns and ``close()`` shuts.
    Channel ids are ours (a UUID per call): they correlate and hang up.
    """

    def __init__(
        self,
        provider: AriProvider,
        reactor: IReactorTime,
        http_client: Any = None,
    ) -> None:
        self._provider = provider
        self._reactor = reactor
        self._base = provider.ari_url.rstrip("/")
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = POOL_MAX_PER_HOST
            self._pool.cachedConnectionTimeout = POOL_IDLE_TIMEOUT
            http_client = HTTPClient(Agent(reactor, pool=self._pool))  # type: ignore[arg-type]
        self._http = http_client

    def __repr__(self) -> str:
        return f"<AriClient {self._provider.name!r} {self._provider.ari_url}>"

    def originate(
        self,
        channel_id: str,
        endpoint: str,
        *,
        context: str,
        extension: str = "s",
        priority: int = 1,
        caller_id: str = "",
        ring_timeout: int = 30,
        variables: Mapping[str, str] | None = None,
        formats: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Dial ``endpoint`` as channel ``channel_id``; on answer it enters the dialplan.

        ``ring_timeout`` is in seconds.  ``caller_id``/``formats`` default to the provider's;
        empty values are left out of the body.  ``variables`` travel in the JSON body (the only
        place ARI does not silently drop them).  Fires with ARI's channel JSON once Asterisk has
        created the channel (not when it is answered); fails with ``AriError``.
        """
        variables = dict(variables or {})
        for key, value in variables.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"channel variable {key!r} must be a str name with a str value")
        body: dict[str, Any] = {
            "endpoint": endpoint,
            "context": context,
            "extension": extension,
            "priority": priority,
            "timeout": ring_timeout,
            "variables": variables,
        }
        caller_id = caller_id or self._provider.caller_id
        if caller_id:
            body["callerId"] = caller_id
        formats = self._provider.formats if formats is None else formats
        if formats:
            body["formats"] = formats
        d = self._request("POST", self._channel_path(channel_id), json_body=body)
        return d.addCallback(lambda reply: self._channel_json(reply, "POST"))

    def get_channel(self, channel_id: str) -> Deferred[dict[str, Any] | None]:
        """Fire with the channel JSON, or ``None`` once the channel is gone (404)."""

        def parsed(reply: _Reply) -> dict[str, Any] | None:
            return None if reply.status == 404 else self._channel_json(reply, "GET")

        d = self._request("GET", self._channel_path(channel_id), expected=(404,))
        return d.addCallback(parsed)

    def hangup(self, channel_id: str, reason: str = "normal") -> Deferred[bool]:
        """Hang the channel up with an ARI ``reason`` (``normal``, ``busy``, ``no_answer``...).

        Fires ``True`` when ARI hung it up, ``False`` when it was already gone (404).
        """
        path = self._channel_path(channel_id)
        d = self._request("DELETE", path, query={"reason": reason}, expected=(404,))
        return d.addCallback(lambda reply: reply.status != 404)

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (the owned pool only); in-flight requests finish."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    def _channel_path(self, channel_id: str) -> str:
        if not channel_id:
            raise ValueError("channel_id must not be empty")
        return "/ari/channels/" + quote(channel_id, safe="")

    def _channel_json(self, reply: _Reply, method: str) -> dict[str, Any]:
        try:
            data = json.loads(reply.body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise AriError(
                f"ARI {method} on provider {self._provider.name!r} answered {reply.status} "
                "without a channel JSON object",
                reply.status,
            )
        return data

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        expected: tuple[int, ...] = (),
    ) -> Deferred[_Reply]:
        """One ARI exchange, bounded by the provider's timeout, logged once.

        Fires with 2xx and ``expected`` replies; fails with an ``AriError`` for the rest.
        """
        started = self._reactor.seconds()
        timed_out = False

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        d = Deferred.fromCoroutine(self._exchange(method, path, query, json_body))
        timer = self._reactor.callLater(self._provider.timeout, on_timeout)

        def finished(result: _Reply | Failure) -> _Reply:
            if timer.active():
                timer.cancel()
            fields = dict(
                provider=self._provider.name,
                method=method,
                path=path,
                ms=round((self._reactor.seconds() - started) * 1000),
            )
            if isinstance(result, _Reply):
                ok = 200 <= result.status < 300 or result.status in expected
                emit = log.info if ok else log.warn
                emit("ARI {method} {path} -> {status} in {ms} ms", status=result.status, **fields)
                if ok:
                    return result
                raise self._status_error(method, result)
            if timed_out:
                log.warn("ARI {method} {path} timed out after {ms} ms", **fields)
                raise AriTimeout(
                    f"ARI {method} on provider {self._provider.name!r} got no answer within "
                    f"{self._provider.timeout:g} s"
                )
            log.warn(
                "ARI {method} {path} failed after {ms} ms: {error}", error=result.value, **fields
            )
            result.raiseException()

        return d.addBoth(finished)

    async def _exchange(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None,
        json_body: dict[str, Any] | None,
    ) -> _Reply:
        headers = {"Accept": "application/json"}
        data = None
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(json_body, separators=(",", ":")).encode("utf-8")
        where = f"ARI {method} on provider {self._provider.name!r}"
        try:
            response: Any = await self._http.request(
                method,
                self._base + path,
                params=query,
                headers=headers,
                data=data,
                auth=(self._provider.ari_user, self._provider.ari_password),
                allow_redirects=False,
                unbuffered=True,
            )
            reader = _BodyReader()
            response.deliverBody(reader)
            body = await reader.done
        except (ierror.ConnectError, ierror.DNSLookupError) as e:
            raise AriUnreachable(
                f"{where}: cannot connect to {self._host()}: {_reason(e)}"
            ) from None
        except (ResponseFailed, RequestTransmissionFailed) as e:
            # A cancelled request (timeout or caller) surfaces wrapped; keep it a cancel.
            if any(r.check(CancelledError) for r in getattr(e, "reasons", [])):
                raise CancelledError() from None
            raise AriUnreachable(
                f"{where}: connection to {self._host()} lost before a complete response"
            ) from None
        return _Reply(response.code, body)

    def _host(self) -> str:
        return urlsplit(self._provider.ari_url).netloc

    def _status_error(self, method: str, reply: _Reply) -> AriError:
        ari_message = _ari_message(reply.body)
        text = f"ARI {method} on provider {self._provider.name!r} answered {reply.status}"
        if ari_message:
            text += f": {ari_message}"
        return error_for_status(reply.status)(text, reply.status, ari_message)


def _reason(e: Exception) -> str:
    return e.__class__.__name__ if not str(e) else str(e)
