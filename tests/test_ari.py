"""Unit tests for the ARI client: exact requests over StubTreq, error mapping, timeouts (Clock)."""

from __future__ import annotations

import base64
import json
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, fail
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from rapida_tap.ari import (
    AriBadRequest,
    AriClient,
    AriConflict,
    AriError,
    AriNotFound,
    AriProvider,
    AriServerError,
    AriTimeout,
    AriUnauthorized,
    AriUnreachable,
)
from rapida_tap.dialstring import InvalidNumber, build_endpoint, validate_number

PASSWORD = "s3cret-Pa55"
BASIC = "Basic " + base64.b64encode(f"rapida:{PASSWORD}".encode()).decode()
CHANNEL = {"id": "chan-1", "name": "PJSIP/trunk-00000001", "state": "Down"}


def provider(**overrides: Any) -> AriProvider:
    fields: dict[str, Any] = dict(
        name="pbx1",
        ari_url="http://pbx.example:8088",
        ari_user="rapida",
        ari_password=PASSWORD,
        trunk="trunk",
    )
    fields.update(overrides)
    return AriProvider(**fields)


class Canned(Resource):
    """Answers every request with one status and body; records what it saw.

    ``hang`` leaves requests unanswered; ``stall`` sends headers and half a body, then nothing.
    """

    isLeaf = True

    def __init__(self, status: int = 200, body: Any = CHANNEL, raw: bytes | None = None) -> None:
        super().__init__()
        self.status, self.body, self.raw = status, body, raw
        self.hang = self.stall = False
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Request) -> bytes | int:
        content = request.content.read() if request.content is not None else b""
        self.seen.append(
            {
                "method": request.method.decode(),
                "url": "http://" + request.getHeader(b"host").decode() + request.uri.decode(),
                "authorization": request.getHeader(b"authorization").decode(),
                "content-type": (request.getHeader(b"content-type") or b"").decode(),
                "body": json.loads(content) if content else None,
            }
        )
        if self.hang:
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        if self.stall:
            request.setHeader(b"content-length", b"100")
            request.write(b'{"id": ')
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        if self.raw is not None:
            return self.raw
        if self.body is None:
            return b""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.body).encode()


class FailingHTTP:
    """A treq-like client whose every request fails with ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return fail(self.exc)


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Canned()
        self.stub = StubTreq(self.resource)
        self.client = AriClient(provider(), self.clock, http_client=self.stub)

    def originate(self, **kwargs: Any) -> Any:
        return self.client.originate(
            "chan-1",
            "PJSIP/trunk/+4930123456",
            context="rapida-outbound",
            variables={"RAPIDA_CONTEXT_ID": "0b6f3c55-6c4e-4a57-9a39-7c1e0a0d9f11"},
            **kwargs,
        )

    def test_originate_request_is_exact(self) -> None:
        result = self.successResultOf(self.originate(caller_id="+4930999", ring_timeout=25))
        self.assertEqual(result, CHANNEL)
        [seen] = self.resource.seen
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["url"], "http://pbx.example:8088/ari/channels/chan-1")
        self.assertEqual(seen["authorization"], BASIC)
        self.assertEqual(seen["content-type"], "application/json")
        self.assertEqual(
            seen["body"],
            {
                "endpoint": "PJSIP/trunk/+4930123456",
                "context": "rapida-outbound",
                "extension": "s",
                "priority": 1,
                "callerId": "+4930999",
                "timeout": 25,
                "variables": {"RAPIDA_CONTEXT_ID": "0b6f3c55-6c4e-4a57-9a39-7c1e0a0d9f11"},
                "formats": "ulaw",
            },
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_originate_defaults_come_from_provider(self) -> None:
        self.client = AriClient(
            provider(caller_id="+4930111", formats="alaw"), self.clock, self.stub
        )
        self.successResultOf(self.originate())
        body = self.resource.seen[0]["body"]
        self.assertEqual((body["callerId"], body["formats"]), ("+4930111", "alaw"))

    def test_originate_leaves_out_empty_caller_id_and_formats(self) -> None:
        self.successResultOf(self.originate(formats=""))
        body = self.resource.seen[0]["body"]
        self.assertNotIn("callerId", body)
        self.assertNotIn("formats", body)

    def test_originate_without_variables_sends_an_empty_object(self) -> None:
        d = self.client.originate("chan-1", "PJSIP/100", context="c", extension="100", priority=2)
        self.successResultOf(d)
        body = self.resource.seen[0]["body"]
        self.assertEqual((body["variables"], body["extension"], body["priority"]), ({}, "100", 2))

    def test_originate_rejects_non_string_variables(self) -> None:
        with self.assertRaises(TypeError) as caught:
            self.client.originate("chan-1", "PJSIP/100", context="c", variables={"N": 1})  # type: ignore[dict-item]
        self.assertIn("'N'", str(caught.exception))
        self.assertEqual(self.resource.seen, [])

    def test_channel_id_is_one_path_segment(self) -> None:
        self.successResultOf(self.client.get_channel("a/b c"))
        self.assertEqual(
            self.resource.seen[0]["url"], "http://pbx.example:8088/ari/channels/a%2Fb%20c"
        )

    def test_empty_channel_id_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            self.client.get_channel("")

    def test_base_url_path_and_trailing_slash(self) -> None:
        client = AriClient(provider(ari_url="https://gw.example/pbx1/"), self.clock, self.stub)
        self.successResultOf(client.get_channel("chan-1"))
        self.assertEqual(self.resource.seen[0]["url"], "http://gw.example/pbx1/ari/channels/chan-1")

    def test_get_channel(self) -> None:
        self.assertEqual(self.successResultOf(self.client.get_channel("chan-1")), CHANNEL)
        [seen] = self.resource.seen
        self.assertEqual((seen["method"], seen["body"]), ("GET", None))
        self.assertEqual(seen["url"], "http://pbx.example:8088/ari/channels/chan-1")
        self.assertEqual(seen["authorization"], BASIC)

    def test_get_channel_gone_is_none(self) -> None:
        self.resource.status, self.resource.body = 404, {"message": "Channel not found"}
        self.assertIsNone(self.successResultOf(self.client.get_channel("chan-1")))

    def test_hangup(self) -> None:
        self.resource.status, self.resource.body = 204, None
        self.assertIs(self.successResultOf(self.client.hangup("chan-1", reason="busy")), True)
        [seen] = self.resource.seen
        self.assertEqual(seen["method"], "DELETE")
        self.assertEqual(seen["url"], "http://pbx.example:8088/ari/channels/chan-1?reason=busy")
        self.assertEqual(seen["authorization"], BASIC)

    def test_hangup_already_gone_is_false(self) -> None:
        self.resource.status, self.resource.body = 404, {"message": "Channel not found"}
        self.assertIs(self.successResultOf(self.client.hangup("chan-1")), False)
        self.assertTrue(self.resource.seen[0]["url"].endswith("?reason=normal"))

    def test_hangup_bad_reason_is_bad_request(self) -> None:
        self.resource.status = 400
        self.resource.body = {"message": "Invalid reason for hangup reason provided"}
        failure = self.failureResultOf(self.client.hangup("chan-1", "nope"), AriBadRequest)
        self.assertIn("Invalid reason for hangup", str(failure.value))

    def test_success_without_channel_json_is_an_error(self) -> None:
        self.resource.raw = b"<html>proxy</html>"
        failure = self.failureResultOf(self.originate(), AriError)
        self.assertEqual(failure.value.status, 200)
        self.assertIn("without a channel JSON", failure.value.message)

    def test_redirects_are_not_followed(self) -> None:
        self.resource.status, self.resource.body = 302, None
        failure = self.failureResultOf(self.client.get_channel("chan-1"), AriError)
        self.assertEqual((type(failure.value), failure.value.status), (AriError, 302))
        self.assertEqual(len(self.resource.seen), 1)


@pytest.mark.parametrize(
    ("status", "body", "error", "text"),
    [
        (400, {"message": "Endpoint must be specified"}, AriBadRequest, "Endpoint must be"),
        (422, {"message": "Endpoint parameter 'x' ..."}, AriBadRequest, "Endpoint parameter"),
        (401, {"message": "Authentication required"}, AriUnauthorized, "Authentication required"),
        (403, {"message": "Write access denied"}, AriUnauthorized, "Write access denied"),
        (404, {"message": "Endpoint not found"}, AriNotFound, "Endpoint not found"),
        (409, {"message": "Channel with given unique ID already exists"}, AriConflict, "exists"),
        (500, {"error": "Allocation failed"}, AriServerError, "Allocation failed"),
        (502, None, AriServerError, "answered 502"),
        (503, {"message": "Asterisk not booted"}, AriServerError, "Asterisk not booted"),
        (418, {"message": "teapot"}, AriError, "teapot"),
    ],
)
def test_status_maps_to_error(status: int, body: Any, error: type, text: str) -> None:
    resource = Canned(status, body)
    client = AriClient(provider(), Clock(), http_client=StubTreq(resource))
    result: list[Failure] = []
    client.originate("chan-1", "PJSIP/trunk/123", context="c").addErrback(result.append)
    [failure] = result
    assert type(failure.value) is error
    assert failure.value.status == status
    assert text in failure.value.message
    assert "pbx1" in failure.value.message and "POST" in failure.value.message
    assert PASSWORD not in failure.value.message


def test_non_json_error_body_is_not_quoted() -> None:
    resource = Canned(502, raw=b"<html>Bad Gateway</html>")
    client = AriClient(provider(), Clock(), http_client=StubTreq(resource))
    result: list[Failure] = []
    client.get_channel("chan-1").addErrback(result.append)
    [failure] = result
    assert isinstance(failure.value, AriServerError)
    assert failure.value.ari_message is None
    assert failure.value.message == "ARI GET on provider 'pbx1' answered 502"


@pytest.mark.parametrize(
    "exc",
    [
        ierror.ConnectionRefusedError(),
        ierror.DNSLookupError("pbx.example"),
        ierror.NoRouteError(),
        ResponseNeverReceived([Failure(ierror.ConnectionLost())]),
    ],
)
def test_connection_failures_are_unreachable(exc: Exception) -> None:
    client = AriClient(provider(), Clock(), http_client=FailingHTTP(exc))
    result: list[Failure] = []
    client.hangup("chan-1").addErrback(result.append)
    [failure] = result
    assert isinstance(failure.value, AriUnreachable)
    assert failure.value.status is None
    assert "pbx.example:8088" in failure.value.message
    assert PASSWORD not in failure.value.message


class TimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Canned()
        self.stub = StubTreq(self.resource)
        self.client = AriClient(provider(timeout=2.5), self.clock, http_client=self.stub)

    def test_no_response_times_out(self) -> None:
        self.resource.hang = True
        d = self.client.originate("chan-1", "PJSIP/trunk/123", context="c")
        self.clock.advance(2.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, AriTimeout)
        self.assertIsNone(failure.value.status)
        self.assertIn("no answer within 2.5 s", failure.value.message)

    def test_stalled_body_times_out(self) -> None:
        self.resource.stall = True
        d = self.client.get_channel("chan-1")
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(2.5)
        self.failureResultOf(d, AriTimeout)

    def test_cancel_while_reading_body_is_a_cancel(self) -> None:
        self.resource.stall = True
        d = self.client.get_channel("chan-1")
        self.stub.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_by_caller_is_not_a_timeout(self) -> None:
        self.resource.hang = True
        d = self.client.get_channel("chan-1")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LoggingTests(SynchronousTestCase):
    def test_one_line_per_request_without_secrets(self) -> None:
        clock = Clock()
        resource = Canned()
        client = AriClient(provider(), clock, http_client=StubTreq(resource))
        with capturedLogs() as events:
            self.successResultOf(
                client.originate("chan-1", "PJSIP/trunk/123", context="c", variables={"A": "b"})
            )
            resource.status, resource.body = 404, {"message": "Channel not found"}
            self.successResultOf(client.hangup("chan-1"))
            resource.status = 500
            self.failureResultOf(client.get_channel("chan-1"), AriServerError)
        ari = [e for e in events if e.get("log_namespace") == "rapida_tap.ari"]
        lines = [formatEvent(e) for e in ari]
        self.assertEqual(
            lines,
            [
                "ARI POST /ari/channels/chan-1 -> 200 in 0 ms",
                "ARI DELETE /ari/channels/chan-1 -> 404 in 0 ms",
                "ARI GET /ari/channels/chan-1 -> 500 in 0 ms",
            ],
        )
        self.assertEqual([e["log_level"].name for e in ari], ["info", "info", "warn"])
        self.assertEqual({e["provider"] for e in ari}, {"pbx1"})
        for event in ari:
            self.assertNotIn(PASSWORD, repr(event))
            self.assertNotIn("RAPIDA", repr(event))

    def test_timeout_is_logged(self) -> None:
        clock = Clock()
        resource = Canned()
        resource.hang = True
        client = AriClient(provider(timeout=1), clock, http_client=StubTreq(resource))
        with capturedLogs() as events:
            d = client.get_channel("chan-1")
            clock.advance(1)
            self.failureResultOf(d, AriTimeout)
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "rapida_tap.ari"]
        self.assertEqual(lines, ["ARI GET /ari/channels/chan-1 timed out after 1000 ms"])


def test_password_is_hidden_from_reprs() -> None:
    p = provider()
    assert PASSWORD not in repr(p)
    assert PASSWORD not in str(p)
    assert PASSWORD not in repr(AriClient(p, Clock(), http_client=object()))


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"ari_url": "pbx:8088"}, "http(s) URL"),
        ({"ari_url": "ftp://pbx"}, "http(s) URL"),
        ({"ari_url": "http://"}, "http(s) URL"),
        ({"ari_url": f"http://rapida:{PASSWORD}@pbx:8088"}, "not in ari_url"),
        ({"endpoint_technology": ""}, "endpoint_technology"),
        ({"endpoint_technology": "PJSIP/x"}, "endpoint_technology"),
        ({"trunk": "a/b"}, "trunk"),
        ({"trunk": " trunk"}, "trunk"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_bad_provider_is_refused(overrides: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError, match=r"provider 'pbx1'") as caught:
        provider(**overrides)
    assert text in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("tech", "trunk", "number", "endpoint"),
    [
        ("PJSIP", "trunk", "+4930123456", "PJSIP/trunk/+4930123456"),
        ("PJSIP", "", "+4930123456", "PJSIP/+4930123456"),
        ("SIP", "carrier", " 0301234 ", "SIP/carrier/0301234"),
        ("IAX2", "", "112", "IAX2/112"),
    ],
)
def test_build_endpoint(tech: str, trunk: str, number: str, endpoint: str) -> None:
    assert build_endpoint(provider(endpoint_technology=tech, trunk=trunk), number) == endpoint


@pytest.mark.parametrize(
    ("template", "trunk", "endpoint"),
    [
        ("Local/{to}@from-rapida", "", "Local/+4930123456@from-rapida"),
        ("PJSIP/{to}@{trunk}", "carrier", "PJSIP/+4930123456@carrier"),
        ("{technology}/{trunk}/{to}", "carrier", "PJSIP/carrier/+4930123456"),
        ("PJSIP/00{to}@{trunk}", "carrier", "PJSIP/00+4930123456@carrier"),
        ("Local/{to}@ctx{{x}}", "", "Local/+4930123456@ctx{x}"),
    ],
)
def test_build_endpoint_from_a_template(template: str, trunk: str, endpoint: str) -> None:
    p = provider(endpoint=template, trunk=trunk)
    assert build_endpoint(p, "+4930123456") == endpoint


@pytest.mark.parametrize(
    ("template", "trunk", "text"),
    [
        ("PJSIP/{number}@{trunk}", "t", "endpoint unknown placeholder {number}"),
        ("PJSIP/{0}", "", "endpoint unknown placeholder {0}"),
        ("PJSIP/{to.real}", "", "endpoint unknown placeholder {to.real}"),
        ("PJSIP/{to!r}", "", "endpoint {to} takes no format"),
        ("PJSIP/{to:>20}", "", "endpoint {to} takes no format"),
        ("PJSIP/{trunk}", "t", "must contain {to}"),
        ("PJSIP/{to}@{trunk}", "", "uses {trunk}, but trunk is not set"),
        ("PJSIP/{to", "", "is not a valid template"),
        ("{to}", "", "must be a dial string"),
        ("Local/{to} @x", "", "must be a dial string"),
    ],
)
def test_bad_endpoint_template_is_refused(template: str, trunk: str, text: str) -> None:
    with pytest.raises(ValueError, match=r"provider 'pbx1': endpoint") as caught:
        provider(endpoint=template, trunk=trunk)
    assert text in str(caught.value)


def test_build_endpoint_validates_the_number() -> None:
    with pytest.raises(InvalidNumber):
        build_endpoint(provider(), "100@evil.example")


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("+4930123456", "+4930123456"),
        ("4930123456", "4930123456"),
        ("  112\n", "112"),
        ("+123", "+123"),
        ("1" * 20, "1" * 20),
        ("+" + "9" * 20, "+" + "9" * 20),
    ],
)
def test_valid_numbers(number: str, expected: str) -> None:
    assert validate_number(number) == expected


@pytest.mark.parametrize(
    ("number", "text"),
    [
        ("", "number is empty"),
        ("   ", "number is empty"),
        ("+", "number is empty"),
        ("12", "has 2 digits: 3 to 20"),
        ("+12", "has 2 digits"),
        ("1" * 21, "has 21 digits"),
        ("++4930", "'+' at position 1"),
        ("49 30 123", "' ' at position 2"),
        ("030-1234", "'-' at position 3"),
        ("100@evil.example", "'@' at position 3"),
        ("trunk/100", "'t' at position 0"),
        ("123&PJSIP/999", "'&' at position 3"),
        ("sip:100@pbx", "'s' at position 0"),
        ("*97", "'*' at position 0"),
        ("١٢٣", "at position 0"),
    ],
)
def test_invalid_numbers(number: str, text: str) -> None:
    with pytest.raises(InvalidNumber) as caught:
        validate_number(number)
    assert text in str(caught.value)
    assert isinstance(caught.value, ValueError)


@given(st.text())
def test_any_text_is_valid_or_invalid_number(text: str) -> None:
    try:
        number = validate_number(text)
    except InvalidNumber:
        return
    digits = number.removeprefix("+")
    assert 3 <= len(digits) <= 20
    assert set(digits) <= set(string.digits)


@given(st.from_regex(r"\A\+?[0-9]{3,20}\Z"))
def test_well_formed_numbers_pass_unchanged(number: str) -> None:
    assert validate_number(number) == number
