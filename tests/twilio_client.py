"""Test clients of the call-control resources: a bot's Twilio REST calls, the dialplan's CURL()."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer, protocol, reactor

from tests.support import API_KEY, HttpReply, curl_get, raw_http

ACCOUNT = "rapida-asterisk"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


class _Exchange(protocol.Protocol):
    """Writes one request, reads one reply (by its Content-Length), then closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred[Reply] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(body) >= int(headers.get("content-length", "0")) and not self.done.called:
            self.done.callback(Reply(int(lines[0].split()[1]), headers, body))
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(AssertionError(f"connection closed before a reply: {self.data!r}"))


def exchange(port: int, request: bytes, timeout: float = 5.0) -> defer.Deferred[Reply]:
    client = _Exchange(request)
    d = protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
    d.addCallback(lambda _: client.done)
    return d.addTimeout(timeout, reactor)


def pipecat_hang_up(port: int, sid: str, account: str = ACCOUNT, key: str = API_KEY) -> bytes:
    """Byte for byte what Pipecat 1.14's ``TwilioFrameSerializer`` (aiohttp 3) sends to hang up,
    captured from ``_hang_up_call`` with ``base_url`` set to the daemon."""
    auth = base64.b64encode(f"{account}:{key}".encode()).decode()
    return (
        f"POST /2010-04-01/Accounts/{account}/Calls/{sid}.json HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Accept: */*\r\n"
        "Accept-Encoding: gzip, deflate\r\n"
        "User-Agent: Python/3.11 aiohttp/3.14.5\r\n"
        f"Authorization: Basic {auth}\r\n"
        "Content-Length: 16\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "\r\n"
        "Status=completed"
    ).encode()


def twilio(
    port: int,
    method: str,
    sid: str,
    form: dict[str, str] | None = None,
    *,
    account: str = ACCOUNT,
    user: str | None = None,
    key: str | None = API_KEY,
    path: str | None = None,
) -> defer.Deferred[Reply]:
    """A Twilio REST client's request to ``/2010-04-01/Accounts/{account}/Calls/{sid}.json``."""
    body = urlencode(form or {}).encode()
    lines = [
        f"{method} {path or f'/2010-04-01/Accounts/{account}/Calls/{sid}.json'} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Length: {len(body)}",
    ]
    if form is not None:
        lines.append("Content-Type: application/x-www-form-urlencoded")
    if key is not None:
        auth = base64.b64encode(f"{user if user is not None else account}:{key}".encode())
        lines.append(f"Authorization: Basic {auth.decode()}")
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def dialplan(port: int, path: str, key: str = API_KEY) -> defer.Deferred[HttpReply]:
    """``CURL()`` from the dialplan, as func_curl sends it (the server must close)."""
    return raw_http(port, curl_get(path, headers={"X-Api-Key": key}))


def next_hop(port: int, ctx: str, key: str = API_KEY) -> defer.Deferred[HttpReply]:
    return dialplan(port, f"/v1/talk/asterisk/call/{ctx}/next", key)


def outcome(port: int, ctx: str, dialstatus: str) -> defer.Deferred[HttpReply]:
    return dialplan(port, f"/v1/talk/asterisk/call/{ctx}/outcome?dialstatus={dialstatus}")
