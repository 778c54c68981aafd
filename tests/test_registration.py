"""``GET /v1/talk/asterisk/call/{assistantId}`` over real HTTP, byte for byte as func_curl sends it.

Every reply must close the connection (``raw_http`` times out otherwise), every error is an empty
body with a status and a log line, and after any error the next registration still works.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.logger import formatEvent
from twisted.trial import unittest

from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.contexts import INBOUND, CallContext, ContextStoreUnavailable
from tests.captures import FIXTURES
from tests.support import (
    API_KEY,
    HttpReply,
    _RawHttp,
    capture_logs,
    curl_get,
    raw_http,
    register,
    start_daemon,
    wait_until,
)

BASE = "/v1/talk/asterisk/call"
LAB_KEY = b"lab-key"  # the key of the captures; too short for our validation, so swapped


def captured_requests() -> list[bytes]:
    """The exact requests of ``curl-registration.txt``, in order (cases 1 to 4)."""
    text = (FIXTURES / "curl-registration.txt").read_text()
    return [json.loads(m).encode("latin-1") for m in re.findall(r'^exact: (".*")$', text, re.M)]


def with_test_key(request: bytes) -> bytes:
    assert LAB_KEY in request
    return request.replace(LAB_KEY, API_KEY.encode())


def assert_context_reply(reply: HttpReply) -> str:
    """A 200 func_curl can use as is: text/plain, exactly a canonical uuid4, connection closed."""
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "text/plain"
    assert reply.headers["connection"] == "close"
    assert reply.headers["content-length"] == "36"
    assert reply.closed_by_server
    text = reply.body.decode("ascii")
    assert len(text) == 36
    parsed = uuid.UUID(text)
    assert str(parsed) == text  # canonical 8-4-4-4-12, lower case, no braces, no newline
    assert parsed.version == 4
    return text


def assert_empty_refusal(reply: HttpReply, status: int) -> None:
    assert reply.status == status, reply
    assert reply.body == b""
    assert reply.headers["content-length"] == "0"
    assert reply.headers["connection"] == "close"
    assert reply.closed_by_server


def raw_http_from(
    source: str, port: int, request: bytes, timeout: float = 5.0
) -> defer.Deferred[HttpReply]:
    """``raw_http`` from another loopback address (another client, for the rate limit)."""
    client = _RawHttp(request)
    d = protocol.ClientCreator(reactor, lambda: client).connectTCP(
        "127.0.0.1", port, bindAddress=(source, 0)
    )
    d.addCallback(lambda _: client.done)
    return d.addTimeout(timeout, reactor)


class FailingStore:
    """A context store whose ``mint`` fails (e.g. Redis down)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.minted = 0

    def mint(self, context: CallContext, ttl: float) -> defer.Deferred[str]:
        self.minted += 1
        return defer.fail(self.error)


class PendingStore:
    """A context store whose ``mint`` answers only when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[CallContext, defer.Deferred[str]]] = []

    def mint(self, context: CallContext, ttl: float) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self.pending.append((context, d))
        return d


class FuncCurlCaptureTests(unittest.TestCase):
    """The requests real func_curl sent (curl-registration.txt) each get a usable context id."""

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.daemon = start_daemon(self)
        self.requests = captured_requests()
        self.assertEqual(len(self.requests), 4)

    @defer.inlineCallbacks
    def check(self, case: int, caller: str) -> Any:
        reply = yield raw_http(self.daemon.http_port, with_test_key(self.requests[case - 1]))
        ctx = assert_context_reply(reply)
        context = yield self.daemon.contexts.get(ctx)
        self.assertIsNotNone(context)
        self.assertEqual(context.context_id, ctx)
        self.assertEqual(context.assistant_id, "123456789")
        self.assertEqual(context.caller, caller)
        self.assertEqual(context.direction, INBOUND)
        self.assertNotIn(API_KEY, self.logs.text())
        self.assertEqual(self.daemon.registration.replies, {200: 1})

    def test_key_in_query_caller_uriencoded(self) -> Any:
        return self.check(1, "+4930123456")

    def test_key_in_header(self) -> Any:
        self.assertIn(b"X-Api-Key: lab-key\r\n", self.requests[1])
        return self.check(2, "+4930123456")

    def test_raw_plus_is_taken_literally(self) -> Any:
        """``from=+4930123456`` (no URIENCODE) is the caller ``+4930123456``, not a space."""
        self.assertIn(b"?from=+4930123456&", self.requests[2])
        return self.check(3, "+4930123456")

    def test_keep_alive_capture_is_answered_with_close(self) -> Any:
        """Case 4: the server closes, so no idle connection stays open for the whole call."""
        return self.check(4, "+4930123456")

    @defer.inlineCallbacks
    def test_each_registration_mints_a_fresh_id(self) -> Any:
        ids = set()
        for _ in range(5):
            ids.add((yield register(self.daemon.http_port)))
        self.assertEqual(len(ids), 5)
        self.assertEqual(len(self.daemon.contexts), 5)


class AcceptedInputTests(unittest.TestCase):
    def setUp(self) -> None:
        self.daemon = start_daemon(self)

    @defer.inlineCallbacks
    def caller_of(self, query: str, headers: dict[str, str] | None = None) -> Any:
        reply = yield raw_http(
            self.daemon.http_port,
            curl_get(f"{BASE}/a1?{query}", headers={"X-Api-Key": API_KEY, **(headers or {})}),
        )
        context = yield self.daemon.contexts.get(assert_context_reply(reply))
        return context.caller

    @defer.inlineCallbacks
    def test_callers(self) -> Any:
        table = [
            ("from=%2B4930123456", "+4930123456"),
            ("from=+4930123456", "+4930123456"),
            ("from=", ""),
            ("", ""),  # anonymous: no from at all
            ("from=%20%2049%20", "49"),  # stripped
            ("from=*%23-_.%20Ab9", "*#-_. Ab9"),
            ("from=1&from=2", "1"),  # the first value wins
            ("FROM=7", "7"),  # parameter names are case-insensitive
            ("from=" + "9" * 64, "9" * 64),  # the longest allowed
        ]
        for query, caller in table:
            self.assertEqual((yield self.caller_of(query)), caller, query)

    @defer.inlineCallbacks
    def test_longest_assistant_id(self) -> Any:
        name = "a.b-c_" + "9" * 58
        self.assertEqual(len(name), 64)
        reply = yield raw_http(
            self.daemon.http_port, curl_get(f"{BASE}/{name}", headers={"X-Api-Key": API_KEY})
        )
        context = yield self.daemon.contexts.get(assert_context_reply(reply))
        self.assertEqual(context.assistant_id, name)

    @defer.inlineCallbacks
    def test_header_key_is_preferred_over_query_key(self) -> Any:
        port = self.daemon.http_port
        right_header = curl_get(f"{BASE}/a?x-api-key=wrong-key-123", headers={"X-Api-Key": API_KEY})
        assert_context_reply((yield raw_http(port, right_header)))
        wrong_header = curl_get(
            f"{BASE}/a?x-api-key={API_KEY}", headers={"X-Api-Key": "wrong-key-123"}
        )
        assert_empty_refusal((yield raw_http(port, wrong_header)), 401)

    @defer.inlineCallbacks
    def test_query_key_name_is_case_insensitive(self) -> Any:
        reply = yield raw_http(self.daemon.http_port, curl_get(f"{BASE}/a?X-API-KEY={API_KEY}"))
        assert_context_reply(reply)


class RefusalTests(unittest.TestCase):
    """Each refusal: the right status, an empty body, a closed connection, a log line with the
    reason, no key in any log; and a valid registration right after still works."""

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.daemon = start_daemon(self)

    @defer.inlineCallbacks
    def refused(
        self, request: bytes, status: int, reason: str | None, *, then_works: bool = True
    ) -> Any:
        before = len(self.logs.events)
        reply = yield raw_http(self.daemon.http_port, request)
        assert_empty_refusal(reply, status)
        logged = "\n".join(
            line for line in self.text_since(before) if line.startswith("registration refused")
        )
        if reason is None:
            self.assertEqual(logged, "", request)
        else:
            self.assertIn(f"registration refused: {status} {reason}", logged, request)
            self.assertIn("(client 127.0.0.1)", logged)
        self.assertNotIn(API_KEY, self.logs.text())
        if then_works:
            ctx = yield register(self.daemon.http_port)
            self.assertIsNotNone((yield self.daemon.contexts.get(ctx)))
        return reply

    def text_since(self, before: int) -> list[str]:
        return [formatEvent(e) for e in self.logs.events[before:]]

    def get(self, path: str, key: str | None = API_KEY) -> bytes:
        return curl_get(path, headers={"X-Api-Key": key} if key is not None else {})

    @defer.inlineCallbacks
    def test_missing_key(self) -> Any:
        yield self.refused(self.get(f"{BASE}/a?from=1", key=None), 401, "missing API key")
        yield self.refused(self.get(f"{BASE}/a?x-api-key=", key=None), 401, "missing API key")
        yield self.refused(self.get(f"{BASE}/a", key=""), 401, "missing API key")

    @defer.inlineCallbacks
    def test_wrong_key(self) -> Any:
        wrong = [
            self.get(f"{BASE}/a", key="not-the-key-0000"),
            self.get(f"{BASE}/a", key=API_KEY[:-1]),  # a prefix
            self.get(f"{BASE}/a", key=API_KEY + "x"),  # longer
            self.get(f"{BASE}/a?x-api-key=not-the-key-0000", key=None),
            self.get(f"{BASE}/a?x-api-key={API_KEY.upper()}", key=None),
        ]
        for request in wrong:
            yield self.refused(request, 401, "wrong API key")
        self.assertEqual(self.daemon.registration.replies[401], len(wrong))

    @defer.inlineCallbacks
    def test_bad_assistant_id(self) -> Any:
        for name in ["a" * 65, "a%20b", "a;b", "a%00", "%C3%A9", "a%2Fb", "a'b", "a%22b", "a@b"]:
            yield self.refused(self.get(f"{BASE}/{name}"), 400, "assistant id must be 1-64")

    @defer.inlineCallbacks
    def test_bad_caller(self) -> Any:
        bad = [
            "9" * 65,
            "1;2",
            "%3B",
            "'1'",
            "%221%22",
            "%00",
            "1%002",
            "a%0Ab",  # a newline inside: no log injection
            "%FF",  # not UTF-8
            "%E2%80%8B1",  # non-ASCII (zero-width space)
            "sip:1@host",
            "<1>",
        ]
        for caller in bad:
            yield self.refused(
                self.get(f"{BASE}/a?from={caller}"), 400, "'from' must be up to 64 of"
            )

    @defer.inlineCallbacks
    def test_uri_too_long(self) -> Any:
        yield self.refused(
            self.get(f"{BASE}/a?from=1&pad={'x' * 2100}"), 400, "request URI too long"
        )

    @defer.inlineCallbacks
    def test_no_assistant_id(self) -> Any:
        for path in [BASE, f"{BASE}/", f"{BASE}//a"]:
            yield self.refused(self.get(path), 404, "no assistant id in the path")

    @defer.inlineCallbacks
    def test_extra_segments_after_the_assistant_id(self) -> Any:
        """``/call/123/extra`` has an assistant id: the log says what is really wrong."""
        for path in [f"{BASE}/123/extra", f"{BASE}/a/b", f"{BASE}/a/"]:
            yield self.refused(
                self.get(path), 404, "unknown path: nothing follows the assistant id"
            )
        self.assertNotIn("no assistant id", self.logs.text())

    @defer.inlineCallbacks
    def test_unknown_paths_elsewhere(self) -> Any:
        """Outside the registration resource: 404, empty body, closed, no registration log."""
        for path in [
            "/nope",
            "/v1",
            "/v1/",
            "/v1/talk/asterisk",
            "/v1/talk/asterisk/call_/1",
            "/healthz_",
        ]:
            yield self.refused(self.get(path), 404, None)

    @defer.inlineCallbacks
    def test_unknown_assistant_without_default(self) -> Any:
        self.daemon.bridge.assistants = AssistantRegistry({"a": EchoAssistant()})
        yield self.refused(self.get(f"{BASE}/b"), 404, "unknown assistant 'b'", then_works=False)
        reply = yield raw_http(self.daemon.http_port, self.get(f"{BASE}/a"))
        context = yield self.daemon.contexts.get(assert_context_reply(reply))
        self.assertEqual(context.assistant_id, "a")
        self.assertEqual(len(self.daemon.contexts), 1)  # nothing minted for "b"

    @defer.inlineCallbacks
    def test_not_accepting(self) -> Any:
        self.daemon.bridge.accepting = False
        yield self.refused(
            self.get(f"{BASE}/a"), 503, "not accepting calls (draining)", then_works=False
        )
        self.assertEqual(len(self.daemon.contexts), 0)
        self.daemon.bridge.accepting = True
        yield register(self.daemon.http_port)

    @defer.inlineCallbacks
    def test_context_store_unavailable(self) -> Any:
        store = self.daemon.bridge.contexts
        failing = FailingStore(ContextStoreUnavailable("redis: connection refused"))
        self.daemon.bridge.contexts = failing  # type: ignore[assignment]
        yield self.refused(
            self.get(f"{BASE}/a"),
            503,
            "context store unavailable: redis: connection refused",
            then_works=False,
        )
        self.assertEqual(failing.minted, 1)
        self.daemon.bridge.contexts = store
        yield register(self.daemon.http_port)

    @defer.inlineCallbacks
    def test_context_store_bug_is_503_and_logged_as_failure(self) -> Any:
        store = self.daemon.bridge.contexts
        self.daemon.bridge.contexts = FailingStore(RuntimeError("bug"))  # type: ignore[assignment]
        yield self.refused(self.get(f"{BASE}/a"), 503, "internal error", then_works=False)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.daemon.bridge.contexts = store
        yield register(self.daemon.http_port)

    @defer.inlineCallbacks
    def test_other_methods(self) -> Any:
        for method in ["POST", "PUT", "DELETE"]:
            request = self.get(f"{BASE}/a").replace(b"GET ", method.encode() + b" ", 1)
            request = request.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")
            reply = yield self.refused(request, 405, "method not allowed")
            self.assertEqual(reply.headers["allow"], "GET")
        self.assertEqual(len(self.daemon.contexts), 3)  # only the follow-up registrations

    @defer.inlineCallbacks
    def test_rate_limit(self) -> Any:
        """Past the burst a client gets 429 (counted, and logged once per interval: a flood must
        not flood the log); other clients and the rest of the site are unaffected."""
        daemon = start_daemon(self, rate_limit=0.001, rate_burst=2)
        port = daemon.http_port
        yield register(port)
        yield register(port)
        before = len(self.logs.events)
        for _ in range(3):
            assert_empty_refusal((yield raw_http(port, self.get(f"{BASE}/a"))), 429)
        self.assertEqual(daemon.registration.replies, {200: 2, 429: 3})
        refused = [t for t in self.text_since(before) if "registration refused" in t]
        self.assertEqual(len(refused), 1)
        self.assertIn("429 rate limit (client 127.0.0.1; 1 refused", refused[0])
        health = yield raw_http(port, curl_get("/healthz", headers={"Connection": "close"}))
        self.assertEqual(health.status, 200)
        other = yield raw_http_from("127.0.0.2", port, self.get(f"{BASE}/a"))
        assert_context_reply(other)

    @defer.inlineCallbacks
    def test_client_gone_before_the_context_is_minted(self) -> Any:
        """A slow store answering after func_curl gave up: no crash, no reply written, and the
        next registration works."""
        store = PendingStore()
        original = self.daemon.bridge.contexts
        self.daemon.bridge.contexts = store  # type: ignore[assignment]
        requests: list[Any] = []
        render = self.daemon.registration.render_GET

        def spy(request: Any) -> Any:
            requests.append(request)
            return render(request)

        self.daemon.registration.render_GET = spy  # type: ignore[method-assign]
        client = _RawHttp(self.get(f"{BASE}/a"))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.daemon.http_port
        )
        yield wait_until(lambda: bool(store.pending))
        gone = requests[0].notifyFinish()
        client.transport.loseConnection()
        yield client.done
        yield gone.addErrback(lambda _: None)
        context, minted = store.pending[0]
        minted.callback(context.context_id)
        self.assertFalse(requests[0].finished)
        self.daemon.bridge.contexts = original
        yield register(self.daemon.http_port)
