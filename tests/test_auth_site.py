"""API keys, the site's access-log redaction, ``/healthz`` and ``/``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from rapida_tap.config import Settings, validate
from rapida_tap.web.auth import ApiKeys, generate_api_key
from rapida_tap.web.registration import parse_query
from rapida_tap.web.site import SECRET_PARAMS, make_site, redact_uri, redacted_log_formatter
from tests.support import API_KEY, capture_logs, curl_get, raw_http, register, start_daemon

BASE = "/v1/talk/asterisk/call"

# --- ApiKeys -----------------------------------------------------------------------------------


def test_api_keys_check() -> None:
    keys = ApiKeys(["first-key-123", "second-key-456"])
    assert keys.check("first-key-123")
    assert keys.check("second-key-456")
    assert keys.check(b"second-key-456")
    for presented in [
        None,
        "",
        b"",
        "first-key-12",
        "first-key-1234",
        "FIRST-KEY-123",
        " first-key-123",
        "first-key-123second-key-456",
        "\u00e9\u00e9\u00e9",  # non-ASCII text must not raise
        b"\xff\xfe",
    ]:
        assert not keys.check(presented), presented


def test_api_keys_needs_a_key() -> None:
    with pytest.raises(ValueError):
        ApiKeys([])


def test_api_keys_repr_hides_the_keys() -> None:
    keys = ApiKeys(["first-key-123", "second-key-456"])
    for text in (repr(keys), str(keys), f"{keys!r}"):
        assert "first-key" not in text and "second-key" not in text
        assert "2 key(s)" in text


def test_generated_keys_are_valid_fresh_and_url_safe() -> None:
    generated = {generate_api_key() for _ in range(50)}
    assert len(generated) == 50
    for key in generated:
        assert key.startswith("rpd-")
        assert len(key) >= 32
        assert all(c.isalnum() or c in "-_" for c in key)  # fits a header, a URL, a dialplan
        validate(Settings(api_keys=[key]))
        assert ApiKeys([key]).check(key)


# --- redaction ---------------------------------------------------------------------------------

REDACTIONS = [
    (b"/call/1?x-api-key=s3cret", b"/call/1?x-api-key=REDACTED"),
    (b"/call/1?from=%2B49&x-api-key=s3cret", b"/call/1?from=%2B49&x-api-key=REDACTED"),
    (b"/call/1?X-Api-Key=s3cret&from=1", b"/call/1?X-Api-Key=REDACTED&from=1"),
    (b"/call/1?x%2Dapi%2Dkey=s3cret", b"/call/1?x%2Dapi%2Dkey=REDACTED"),
    (b"/call/1?%78-api-key=s3cret", b"/call/1?%78-api-key=REDACTED"),
    (
        b"/c?api_key=a&apikey=b&key=c&token=d",
        b"/c?api_key=REDACTED&apikey=REDACTED&key=REDACTED&token=REDACTED",
    ),
    (b"/c?x-api-key=a&x-api-key=b", b"/c?x-api-key=REDACTED&x-api-key=REDACTED"),
    (b"/c?x-api-key=", b"/c?x-api-key=REDACTED"),
    (b"/c?x-api-key=a=b", b"/c?x-api-key=REDACTED"),
    (b"/c?x-api-key=s3cret&&from=1", b"/c?x-api-key=REDACTED&&from=1"),
    # left alone: no query, other names, a name that only contains "key", a name alone
    (b"/call/1", b"/call/1"),
    (b"/call/1?", b"/call/1?"),
    (b"/c?from=key&monkey=1&keys=2&key_id=3", b"/c?from=key&monkey=1&keys=2&key_id=3"),
    (b"/c?x-api-key", b"/c?x-api-key"),
]


@pytest.mark.parametrize(("uri", "expected"), REDACTIONS)
def test_redact_uri(uri: bytes, expected: bytes) -> None:
    assert redact_uri(uri) == expected


def test_redact_uri_uses_the_same_name_folding_as_registration() -> None:
    """The KELVIN SIGN lower-cases to ``k``: registration reads this as ``x-api-key``."""
    uri = b"/c?x-api-%E2%84%AAey=s3cret"
    assert parse_query(uri)["x-api-key"] == "s3cret"
    assert b"s3cret" not in redact_uri(uri)


NAMES = st.sampled_from(
    [
        "x-api-key",
        "X-API-KEY",
        "x%2Dapi-key",
        "%78%2D%61%70%69%2D%6B%65%79",
        "x-api-%E2%84%AAey",
        "from",
        "key",
        "token",
        "api_key",
        "monkey",
        "",
    ]
)
VALUES = st.text(alphabet="abc019%+=-_.~ ", max_size=12)


@given(st.lists(st.tuples(NAMES, st.booleans(), VALUES), max_size=6), st.text("ab/", max_size=5))
def test_no_secret_survives_redaction(pairs: list[tuple[str, bool, str]], path: str) -> None:
    """Whatever registration would read as a key, the access log shows as ``REDACTED``."""
    query = "&".join(name + ("=" + value if eq else "") for name, eq, value in pairs)
    uri = f"/{path}?{query}".encode("latin-1")
    seen = parse_query(redact_uri(uri))
    for name in SECRET_PARAMS:
        if parse_query(uri).get(name):
            assert seen[name] == "REDACTED"
        else:
            assert seen.get(name, "") in ("", "REDACTED")


def logged_request(uri: bytes) -> DummyRequest:
    request = DummyRequest([b""])
    request.uri = uri
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.client = IPv4Address("TCP", "192.0.2.7", 40000)
    request.code = 200
    request.sentLength = 36
    request.requestHeaders.setRawHeaders(b"user-agent", [b"asterisk-libcurl-agent/1.0"])
    return request


def test_access_log_line_is_combined_format_without_the_key() -> None:
    request = logged_request(b"/v1/talk/asterisk/call/1?from=%2B49&x-api-key=" + API_KEY.encode())
    line = redacted_log_formatter("[01/Jan/2026:00:00:00 +0000]", request)
    assert line == (
        '"192.0.2.7" - - [01/Jan/2026:00:00:00 +0000] '
        '"GET /v1/talk/asterisk/call/1?from=%2B49&x-api-key=REDACTED HTTP/1.1" 200 36 '
        '"-" "asterisk-libcurl-agent/1.0"'
    )


def test_access_log_line_escapes_quotes_and_shows_no_length_as_dash() -> None:
    request = logged_request(b'/x?from="1"')
    request.sentLength = 0
    request.code = 404
    request.requestHeaders.setRawHeaders(b"referer", [b'he said "hi"'])
    line = redacted_log_formatter("[ts]", request)
    assert '"GET /x?from=\\"1\\" HTTP/1.1" 404 - "he said \\"hi\\""' in line


def test_site_uses_the_redacting_formatter() -> None:
    site = make_site(Resource())
    assert site._logFormatter is redacted_log_formatter
    assert site.displayTracebacks is False


class AccessLogTests(unittest.TestCase):
    """The twisted.web access log of a real request never shows the key, whatever its form."""

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.daemon = start_daemon(self)

    def access_lines(self) -> list[str]:
        return [line for line in self.logs.text().splitlines() if '"GET ' in line]

    @defer.inlineCallbacks
    def test_key_in_query(self) -> Any:
        port = self.daemon.http_port
        for name in ["x-api-key", "X-Api-Key", "x%2Dapi-key"]:
            reply = yield raw_http(port, curl_get(f"{BASE}/1?from=%2B49&{name}={API_KEY}"))
            self.assertEqual(reply.status, 200)
        reply = yield raw_http(port, curl_get(f"{BASE}/1?x-api-key=wrong-{API_KEY}"))
        self.assertEqual(reply.status, 401)
        lines = self.access_lines()
        self.assertEqual(len(lines), 4)
        for line in lines:
            self.assertIn("=REDACTED HTTP/1.1", line)
        self.assertIn('"GET /v1/talk/asterisk/call/1?from=%2B49&x-api-key=REDACTED', lines[0])
        self.assertIn('HTTP/1.1" 200 36 "-" "asterisk-libcurl-agent/1.0"', lines[0])
        self.assertIn('HTTP/1.1" 401 - ', lines[3])
        self.assertNotIn(API_KEY, self.logs.text())

    @defer.inlineCallbacks
    def test_key_in_header(self) -> Any:
        yield register(self.daemon.http_port)
        self.assertEqual(len(self.access_lines()), 1)
        self.assertNotIn(API_KEY, self.logs.text())


# --- /healthz and / ----------------------------------------------------------------------------


class HealthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.daemon = start_daemon(self)

    @defer.inlineCallbacks
    def health(self, status: int) -> Any:
        reply = yield raw_http(
            self.daemon.http_port, curl_get("/healthz", headers={"Connection": "close"})
        )
        self.assertEqual(reply.status, status)
        self.assertEqual(reply.headers["content-type"], "application/json")
        self.assertEqual(reply.headers["cache-control"], "no-store")
        return json.loads(reply.body)

    @defer.inlineCallbacks
    def test_healthy(self) -> Any:
        body = yield self.health(200)
        self.assertEqual(body, {"status": "ok", "accepting": True, "calls": 0, "problems": {}})

    @defer.inlineCallbacks
    def test_not_accepting(self) -> Any:
        self.daemon.bridge.accepting = False
        body = yield self.health(503)
        self.assertEqual(body["status"], "unavailable")
        self.assertIs(body["accepting"], False)
        self.daemon.bridge.accepting = True
        yield self.health(200)

    @defer.inlineCallbacks
    def test_a_failing_check(self) -> Any:
        self.daemon.health.checks["cache"] = lambda: (True, "fine")
        yield self.health(200)
        self.daemon.health.checks["redis"] = lambda: (False, "connection refused")
        body = yield self.health(503)
        self.assertEqual(body["status"], "unavailable")
        self.assertIs(body["accepting"], True)
        self.assertEqual(body["problems"], {"redis": "connection refused"})

    @defer.inlineCallbacks
    def test_head_answers_like_get_without_a_body_or_a_warning(self) -> Any:
        logs = capture_logs(self)
        head = curl_get("/healthz", headers={"Connection": "close"}).replace(b"GET", b"HEAD", 1)
        get = yield raw_http(
            self.daemon.http_port, curl_get("/healthz", headers={"Connection": "close"})
        )
        for accepting, status in ((True, 200), (False, 503)):
            self.daemon.bridge.accepting = accepting
            reply = yield raw_http(self.daemon.http_port, head)
            self.assertEqual((reply.status, reply.body), (status, b""))
            self.assertEqual(reply.headers["content-type"], "application/json")
            if accepting:
                self.assertEqual(reply.headers["content-length"], str(len(get.body)))
        text = logs.text()
        self.assertIn('"HEAD /healthz HTTP/1.1" 503', text)  # the access log still has it
        self.assertNotIn("message body", text)
        self.assertNotIn("Warning", text)

    @defer.inlineCallbacks
    def test_banner(self) -> Any:
        reply = yield raw_http(
            self.daemon.http_port, curl_get("/", headers={"Connection": "close"})
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["content-type"], "text/plain")
        self.assertEqual(reply.body, b"rapida-asterisk\n")
        head = curl_get("/", headers={"Connection": "close"}).replace(b"GET", b"HEAD", 1)
        reply = yield raw_http(self.daemon.http_port, head)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, b"")
