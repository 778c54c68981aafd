"""The outbound call service on a Clock with a fake ARI client; request and provider parsing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap import outbound as ob
from rapida_tap import outbound_call as oc
from rapida_tap import providers as providers_mod
from rapida_tap.ari import AriNotFound, AriProvider, AriServerError, AriTimeout, AriUnreachable
from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.config import ConfigError
from rapida_tap.contexts import OUTBOUND, ContextExpired, ContextReused, MemoryContextStore
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.reasons import EndReason
from rapida_tap.web import call_request as cr

API_HANGUP, CALLER_HANGUP = EndReason.API_HANGUP, EndReason.CALLER_HANGUP

ETC = Path(__file__).resolve().parents[1] / "etc"
PROVIDER = AriProvider(
    name="pbx1", ari_url="http://pbx:8088", ari_user="rapida", ari_password="pw", trunk="trunk"
)


class FakeLeg:
    transport_name = "audiosocket"
    lead_frames = 0

    def __init__(self) -> None:
        self.hung_up: list[str] = []

    def send_audio(self, frame: bytes) -> bool:
        pass
        return True

    def send_silence(self) -> None:
        pass

    def send_clear(self) -> None:
        pass

    def send_mark(self, name: str) -> None:
        pass

    def hangup(self, reason: str) -> None:
        self.hung_up.append(reason)


class FakeAriClient:
    """Records calls; originate answers with ``originate_result`` (or stays pending if None)."""

    def __init__(self, provider: AriProvider) -> None:
        self.provider = provider
        self.originates: list[tuple[str, str, dict[str, Any]]] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.originate_result: Any = "ok"
        self.channel: Any = {"state": "Ringing"}
        self.gets: list[str] = []
        self.hangups: list[tuple[str, str]] = []
        self.hangup_error: Exception | None = None
        self.closed = False

    def originate(self, channel_id: str, endpoint: str, **kw: Any) -> defer.Deferred[Any]:
        self.originates.append((channel_id, endpoint, kw))
        if self.originate_result is None:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d
        if isinstance(self.originate_result, Exception):
            return defer.fail(self.originate_result)
        return defer.succeed({"id": channel_id})

    def get_channel(self, channel_id: str) -> defer.Deferred[Any]:
        self.gets.append(channel_id)
        if isinstance(self.channel, Exception):
            return defer.fail(self.channel)
        return defer.succeed(self.channel)

    def hangup(self, channel_id: str, reason: str = "normal") -> defer.Deferred[bool]:
        self.hangups.append((channel_id, reason))
        if self.hangup_error is not None:
            return defer.fail(self.hangup_error)
        return defer.succeed(True)

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def request(**kw: Any) -> cr.CallRequest:
    fields: dict[str, Any] = dict(assistant_id="bot-1", to="+4930123456")
    fields.update(kw)
    return cr.CallRequest(**fields)


class OutboundServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock)
        self.addCleanup(self.store.close)
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=EchoAssistant()),
            idle_timeout=0,
        )
        self.addCleanup(self.bridge.pacer.stop)
        self.clients: dict[str, FakeAriClient] = {}
        self.service = self.make_service()

    def make_service(self, providers: dict[str, AriProvider] | None = None, **kw: Any):
        def factory(provider: AriProvider) -> FakeAriClient:
            client = FakeAriClient(provider)
            self.clients[provider.name] = client
            return client

        kw.setdefault("ring_timeout", 120.0)
        kw.setdefault("check_interval", 5.0)
        return ob.OutboundCalls(
            self.bridge,
            providers if providers is not None else {"pbx1": PROVIDER},
            clock=self.clock,
            client_factory=factory,
            **kw,
        )

    @property
    def ari(self) -> FakeAriClient:
        return self.clients["pbx1"]

    def wait(self, seconds: float, step: float = 0.5) -> None:
        """Let ``seconds`` pass in steps, as a running reactor would."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def place(self, **kw: Any) -> oc.OutboundCall:
        return self.successResultOf(self.service.place(request(**kw)))

    def connect(self, record: oc.OutboundCall) -> Any:
        return self.successResultOf(self.bridge.open_call(record.context_id, FakeLeg()))

    def test_originate_carries_the_context_id_and_the_callers_variables(self) -> None:
        record = self.place(**{"caller_id": "+4930999", "variables": {"LANG": "de"}})
        self.assertEqual(record.status, oc.Status.RINGING)
        channel_id, endpoint, kw = self.ari.originates[0]
        self.assertEqual(channel_id, record.channel_id)
        self.assertNotEqual(record.channel_id, record.context_id)
        self.assertEqual(endpoint, "PJSIP/trunk/+4930123456")
        self.assertEqual(kw["context"], "rapida-outbound")
        self.assertEqual(kw["caller_id"], "+4930999")
        self.assertEqual(kw["ring_timeout"], 120)
        self.assertEqual(kw["variables"], {"LANG": "de", "RAPIDA_CONTEXT_ID": record.context_id})
        context = self.successResultOf(self.store.get(record.context_id))
        assert context is not None
        self.assertEqual(context.direction, OUTBOUND)
        self.assertEqual(context.assistant_id, "bot-1")
        self.assertEqual(context.caller, "+4930123456")
        self.assertEqual(context.variables, {"LANG": "de"})

    def test_websocket_transport_lands_in_the_ws_context(self) -> None:
        self.place(transport=cr.WEBSOCKET)
        self.assertEqual(self.ari.originates[0][2]["context"], "rapida-outbound-ws")

    def test_provider_caller_id_is_the_default_from(self) -> None:
        provider = AriProvider(
            name="p", ari_url="http://pbx:8088", ari_user="u", ari_password="x", caller_id="+491"
        )
        self.service = self.make_service({"p": provider})
        self.assertEqual(self.place().caller_id, "+491")

    def test_status_is_originating_until_ari_answers(self) -> None:
        self.ari.originate_result = None
        d = self.service.place(request())
        (record,) = self.service.calls()
        self.assertEqual(record.status, oc.Status.ORIGINATING)
        self.ari.pending[0].callback({"id": record.channel_id})
        self.assertIs(self.successResultOf(d), record)
        self.assertEqual(record.status, oc.Status.RINGING)

    def test_connect_then_the_far_end_hangs_up(self) -> None:
        record = self.place()
        self.clock.advance(3)
        call = self.connect(record)
        self.assertEqual(record.status, oc.Status.CONNECTED)
        self.assertEqual(record.connected_at, 3)
        call.end(CALLER_HANGUP)
        self.assertEqual((record.status, record.reason), (oc.Status.ENDED, CALLER_HANGUP))
        self.wait(200)  # no ring timer, no checks left behind
        self.assertEqual(self.ari.hangups, [])
        self.assertEqual(self.ari.gets, [])

    def test_nobody_answers_the_context_is_taken_back_and_the_channel_hung_up(self) -> None:
        record = self.place()
        self.ari.channel = {"state": "Ringing"}
        self.wait(119.5)
        self.assertEqual(record.status, oc.Status.RINGING)
        self.assertEqual(len(self.ari.gets), 23)  # checked every 5 s
        self.wait(0.5)
        self.assertEqual((record.status, record.reason), (oc.Status.ENDED, oc.NO_ANSWER))
        self.assertEqual(self.ari.hangups, [(record.channel_id, "no_answer")])
        # the dialplan connecting now is refused
        failure = self.failureResultOf(self.bridge.open_call(record.context_id, FakeLeg()))
        failure.trap(ContextReused)
        self.assertEqual(self.bridge.calls, {})

    def test_ring_timeout_is_configurable(self) -> None:
        self.service = self.make_service(ring_timeout=2.0)
        record = self.place()
        self.assertEqual(self.ari.originates[0][2]["ring_timeout"], 2)
        self.clock.advance(2)
        self.assertEqual(record.reason, oc.NO_ANSWER)
        self.assertEqual(record.detail, "not answered within 2s")

    def test_a_failed_no_answer_hangup_is_logged_and_the_context_stays_unusable(self) -> None:
        self.service = self.make_service(ring_timeout=2.0, check_interval=0)
        self.ari.hangup_error = AriUnreachable("down")
        record = self.place()
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.clock.advance(2)
        self.assertEqual(record.reason, oc.NO_ANSWER)
        (warning,) = [e for e in logged if "could not hang up" in formatEvent(e)]
        self.assertIn("down", formatEvent(warning))
        self.clock.advance(ob.CONNECT_GRACE + 1)
        self.failureResultOf(self.bridge.open_call(record.context_id, FakeLeg()))

    def test_rejected_while_ringing_is_noticed_by_the_channel_check(self) -> None:
        record = self.place()
        self.clock.advance(5)
        self.assertEqual(record.status, oc.Status.RINGING)
        self.ari.channel = None  # gone
        self.clock.advance(5)
        self.assertEqual((record.status, record.reason), (oc.Status.ENDED, oc.NOT_ANSWERED))
        self.assertEqual(self.ari.hangups, [])  # nothing left to hang up
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds(), 600)

    def test_answered_but_never_connected_says_so(self) -> None:
        record = self.place()
        self.ari.channel = {"state": "Up"}
        self.clock.advance(5)
        self.ari.channel = None
        self.clock.advance(5)
        self.assertEqual(record.reason, oc.NOT_CONNECTED)
        self.assertIn("dialplan never connected", record.detail)

    def test_answered_but_never_connected_at_the_ring_timeout(self) -> None:
        record = self.place()
        self.ari.channel = {"state": "Up"}
        self.wait(120)
        self.assertEqual(record.reason, oc.NOT_CONNECTED)
        self.assertEqual(self.ari.hangups, [(record.channel_id, "no_answer")])

    def test_failed_channel_checks_keep_the_call_ringing(self) -> None:
        record = self.place()
        self.ari.channel = AriUnreachable("down")
        self.wait(30)
        self.assertEqual(record.status, oc.Status.RINGING)
        self.assertEqual(len(self.ari.gets), 6)

    def test_checks_can_be_turned_off(self) -> None:
        self.service = self.make_service(check_interval=0)
        self.place()
        self.wait(60)
        self.assertEqual(self.ari.gets, [])

    def test_hangup_while_ringing_goes_through_ari(self) -> None:
        record = self.place()
        result = self.successResultOf(self.service.hangup(record.context_id))
        self.assertIs(result, record)
        self.assertEqual((record.status, record.reason), (oc.Status.ENDED, oc.CANCELLED))
        self.assertEqual(self.ari.hangups, [(record.channel_id, "normal")])
        self.failureResultOf(self.bridge.open_call(record.context_id, FakeLeg()))
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 600)  # only the tombstone

    def test_hangup_while_originating_hangs_up_once_the_channel_exists(self) -> None:
        self.ari.originate_result = None
        d = self.service.place(request())
        (record,) = self.service.calls()
        self.successResultOf(self.service.hangup(record.context_id))
        self.assertEqual(record.reason, oc.CANCELLED)
        self.assertEqual(self.ari.hangups, [])
        self.ari.pending[0].callback({"id": record.channel_id})
        self.successResultOf(d)
        self.assertEqual(record.status, oc.Status.ENDED)
        self.assertEqual(self.ari.hangups, [(record.channel_id, "normal")])

    def test_hangup_when_ari_fails_still_ends_the_call_and_reports_the_error(self) -> None:
        record = self.place()
        self.ari.hangup_error = AriUnreachable("cannot connect to pbx:8088")
        self.failureResultOf(self.service.hangup(record.context_id), AriUnreachable)
        self.assertEqual(record.reason, oc.CANCELLED)
        self.failureResultOf(self.bridge.open_call(record.context_id, FakeLeg()))

    def test_hangup_when_connected_ends_the_call_through_the_bridge(self) -> None:
        record = self.place()
        self.connect(record)
        (leg_call,) = self.bridge.calls.values()
        self.successResultOf(self.service.hangup(record.context_id))
        self.assertEqual((record.status, record.reason), (oc.Status.ENDED, API_HANGUP))
        self.assertEqual(leg_call.leg.hung_up, [API_HANGUP])
        self.assertEqual(self.ari.hangups, [])

    def test_hangup_of_an_ended_call_returns_it_unchanged(self) -> None:
        record = self.place()
        self.successResultOf(self.service.hangup(record.context_id))
        self.successResultOf(self.service.hangup(record.context_id))
        self.assertEqual(len(self.ari.hangups), 1)

    def test_unknown_call(self) -> None:
        self.assertRaises(oc.UnknownCall, self.service.get, "nope")
        self.failureResultOf(self.service.hangup("nope"), oc.UnknownCall)

    def test_originate_failure_ends_the_call_and_frees_the_context(self) -> None:
        for error in (AriNotFound("busy", 404), AriServerError("boom", 500)):
            self.ari.originate_result = error
            failure = self.failureResultOf(self.service.place(request()))
            self.assertIs(failure.value, error)
            record = self.service.calls()[-1]
            self.assertEqual((record.status, record.reason), (oc.Status.ENDED, oc.ORIGINATE_FAILED))
            self.assertEqual(record.detail, error.message)
            self.failureResultOf(self.bridge.open_call(record.context_id, FakeLeg()))
        self.assertEqual(self.ari.hangups, [])
        self.assertEqual(len(self.store), 0)

    def test_originate_timeout_hangs_up_the_channel_asterisk_may_have_made(self) -> None:
        self.ari.originate_result = AriTimeout("slow")
        self.failureResultOf(self.service.place(request()), AriTimeout)
        (record,) = self.service.calls()
        self.assertEqual(self.ari.hangups, [(record.channel_id, "normal")])

    def test_connected_before_ari_replied(self) -> None:
        self.ari.originate_result = None
        d = self.service.place(request())
        (record,) = self.service.calls()
        self.connect(record)
        self.ari.pending[0].callback({"id": record.channel_id})
        self.successResultOf(d)
        self.assertEqual(record.status, oc.Status.CONNECTED)
        self.assertEqual(self.ari.hangups, [])

    def test_connected_on_another_node(self) -> None:
        record = self.place()
        self.successResultOf(self.store.claim(record.context_id))  # as another node would
        self.failureResultOf(self.service.hangup(record.context_id), oc.CallElsewhere)
        self.assertEqual(record.status, oc.Status.CONNECTED)
        self.assertEqual(record.detail, "the media connected to another node")
        self.wait(200)
        self.assertEqual(self.ari.hangups, [])  # the ring timer did not hang it up

    def test_provider_choice(self) -> None:
        other = AriProvider(name="pbx2", ari_url="http://pbx2:8088", ari_user="u", ari_password="x")
        self.service = self.make_service({"pbx1": PROVIDER, "pbx2": other})
        self.failureResultOf(self.service.place(request()), cr.InvalidCallRequest)
        record = self.successResultOf(self.service.place(request(provider="pbx2")))
        self.assertEqual(record.provider, "pbx2")
        self.assertEqual(self.clients["pbx2"].originates[0][1], "PJSIP/+4930123456")
        failure = self.failureResultOf(self.service.place(request(provider="pbx9")))
        self.assertEqual(str(failure.value), "unknown provider 'pbx9' (known: pbx1, pbx2)")

    def test_no_provider_configured(self) -> None:
        self.service = self.make_service({})
        failure = self.failureResultOf(self.service.place(request()), providers_mod.UnknownProvider)
        self.assertIn("[providers.NAME]", str(failure.value))

    def test_unknown_assistant(self) -> None:
        self.bridge.assistants = AssistantRegistry({"bot-1": EchoAssistant()})
        self.failureResultOf(
            self.service.place(request(assistant_id="bot-2")), oc.UnknownAssistantId
        )
        self.assertEqual(self.ari.originates, [])

    def test_draining_refuses_new_calls(self) -> None:
        self.bridge.accepting = False
        self.failureResultOf(self.service.place(request()), oc.Unavailable)
        self.assertEqual(self.ari.originates, [])

    def test_ended_calls_are_kept_bounded_in_number_and_age(self) -> None:
        self.service = self.make_service(max_ended=3, ended_retention=60.0)
        records = [self.place() for _ in range(5)]
        for record in records:
            self.successResultOf(self.service.hangup(record.context_id))
        self.assertEqual(self.service.calls(), records[2:])
        self.assertRaises(oc.UnknownCall, self.service.get, records[0].context_id)
        self.clock.advance(61)
        self.assertEqual(self.service.calls(), [])

    def test_stop_hangs_up_ringing_calls_and_closes_clients(self) -> None:
        ringing = self.place()
        connected = self.place()
        self.connect(connected)
        self.successResultOf(self.service.stop())
        self.assertEqual((ringing.status, ringing.reason), (oc.Status.ENDED, "shutdown"))
        self.assertEqual(self.ari.hangups, [(ringing.channel_id, "normal")])
        self.assertEqual(connected.status, oc.Status.CONNECTED)  # the bridge ends it
        self.assertTrue(self.ari.closed)
        self.failureResultOf(self.service.place(request()), oc.Unavailable)
        self.failureResultOf(self.store.claim(ringing.context_id), ContextExpired)
        self.bridge.end_all()
        self.assertEqual(connected.reason, "shutdown")


# -- the request ---------------------------------------------------------------------------

GOOD = {"assistant_id": "bot-1", "to": "+4930123456"}


def test_minimal_request_defaults() -> None:
    parsed = cr.parse_call_request(dict(GOOD))
    assert parsed == cr.CallRequest("bot-1", "+4930123456", "", cr.AUDIOSOCKET, None, {})


def test_full_request() -> None:
    parsed = cr.parse_call_request(
        {
            **GOOD,
            "from": " 0301234 ",
            "transport": "websocket",
            "provider": "pbx1",
            "variables": {"__LANG": "de", "CUSTOMER": "42"},
        }
    )
    assert parsed.caller_id == "0301234"
    assert parsed.transport == cr.WEBSOCKET
    assert parsed.provider == "pbx1"
    assert parsed.variables == {"__LANG": "de", "CUSTOMER": "42"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "the body must be a JSON object"),
        ({"to": "+4930123456"}, "assistant_id: is required"),
        ({**GOOD, "assistant_id": "  "}, "assistant_id: must not be empty"),
        ({**GOOD, "assistant_id": 12}, "assistant_id: must be a string"),
        ({**GOOD, "assistant_id": "a/b"}, "assistant_id: must be 1-64 of [A-Za-z0-9._-]"),
        ({"assistant_id": "bot"}, "to: is required"),
        ({**GOOD, "to": "+49 30 123"}, "to: number has ' ' at position 3"),
        ({**GOOD, "to": "100@evil.example"}, "to: number has '@' at position 3"),
        ({**GOOD, "to": "12"}, "to: number has 2 digits: 3 to 20 are allowed"),
        ({**GOOD, "to": 4930123456}, "to: must be a string"),
        ({**GOOD, "from": "PJSIP/x"}, "from: number has 'P'"),
        ({**GOOD, "transport": "sip"}, "transport: unknown transport 'sip'"),
        ({**GOOD, "provider": 1}, "provider: must be a string"),
        ({**GOOD, "variables": []}, "variables: must be an object"),
        ({**GOOD, "variables": {"A": 1}}, "variables: the value of A must be a string"),
        ({**GOOD, "variables": {"CALLERID(num)": "1"}}, "not a channel variable name"),
        ({**GOOD, "variables": {"1A": "1"}}, "not a channel variable name"),
        ({**GOOD, "variables": {"RAPIDA_CONTEXT_ID": "x"}}, "is set by the daemon"),
        ({**GOOD, "variables": {"__rapida_context_id": "x"}}, "is set by the daemon"),
        ({**GOOD, "variables": {"A": "x\ny"}}, "printable characters"),
        ({**GOOD, "variables": {"A": "x" * 1025}}, "up to 1024"),
        ({**GOOD, "variables": {f"V{i}": "" for i in range(33)}}, "at most 32"),
        ({**GOOD, "assistantId": "x"}, "unknown field 'assistantId'"),
    ],
)
def test_bad_requests(body: Any, message: str) -> None:
    with pytest.raises(cr.InvalidCallRequest) as info:
        cr.parse_call_request(body)
    assert message in str(info.value)


# -- provider configuration ------------------------------------------------------------------

BASE = {"ari_url": "http://pbx:8088", "ari_user": "rapida", "password_env": "ARI_PW"}
ENV = {"ARI_PW": "s3cret"}


def test_provider_from_the_environment() -> None:
    table = {**BASE, "trunk": "trunk", "timeout": 3, "caller_id": "+4930"}
    (provider,) = providers_mod.parse_providers({"pbx1": table}, ENV).values()
    assert provider == AriProvider(
        name="pbx1",
        ari_url="http://pbx:8088",
        ari_user="rapida",
        ari_password="s3cret",
        trunk="trunk",
        timeout=3.0,
        caller_id="+4930",
    )
    assert "s3cret" not in repr(provider)


def test_provider_from_a_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "ari-password").write_text("from-file\n")
    table = {"ari_url": "https://pbx", "ari_user": "u", "password_credential": "ari-password"}
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    (provider,) = providers_mod.parse_providers({"p": table}, env).values()
    assert provider.ari_password == "from-file"


def test_several_providers_keep_their_order() -> None:
    providers = providers_mod.parse_providers({"b": BASE, "a": {**BASE, "context": "other"}}, ENV)
    assert list(providers) == ["b", "a"]
    assert providers["a"].context == "other"


@pytest.mark.parametrize(
    ("table", "env", "message"),
    [
        ({**BASE, "ari_password": "x"}, ENV, "providers.pbx1.ari_password: keep the password out"),
        ({**BASE, "secret": "x"}, ENV, "providers.pbx1.secret: unknown provider setting"),
        ({**BASE, "ari_url": ""}, ENV, "providers.pbx1.ari_url: is required"),
        ({k: v for k, v in BASE.items() if k != "ari_user"}, ENV, "providers.pbx1.ari_user: is"),
        ({**BASE, "ari_url": "pbx:8088"}, ENV, "providers.pbx1.ari_url: must be an http(s) URL"),
        ({**BASE, "ari_url": "http://u:p@pbx"}, ENV, "providers.pbx1: put credentials in"),
        ({**BASE, "ari_url": 8088}, ENV, "providers.pbx1.ari_url: must be a string"),
        ({**BASE, "ari_user": "a:b"}, ENV, "providers.pbx1.ari_user: must not contain ':'"),
        ({**BASE, "trunk": "a/b"}, ENV, "providers.pbx1.trunk: must be one endpoint name"),
        ({**BASE, "endpoint_technology": "a/b"}, ENV, "providers.pbx1.endpoint_technology:"),
        ({**BASE, "timeout": 0}, ENV, "providers.pbx1.timeout: must be a positive number"),
        ({**BASE, "timeout": True}, ENV, "providers.pbx1.timeout: must be a positive number"),
        ({**BASE, "context": "a b"}, ENV, "providers.pbx1.context: must be a dialplan context"),
        ({**BASE, "ws_context": ""}, ENV, "providers.pbx1.ws_context: must be a dialplan"),
        ({**BASE, "formats": "ulaw;x"}, ENV, "providers.pbx1.formats: must be codec names"),
        ({**BASE, "caller_id": "abc"}, ENV, "providers.pbx1.caller_id: number has 'a'"),
        (BASE, {}, "providers.pbx1.password_env: the environment variable ARI_PW is not set"),
        ({**BASE, "password_env": "A-B"}, ENV, "providers.pbx1.password_env: 'A-B' is not"),
        (
            {k: v for k, v in BASE.items() if k != "password_env"},
            ENV,
            "providers.pbx1: set exactly one of password_env",
        ),
        (
            {**BASE, "password_credential": "x"},
            ENV,
            "providers.pbx1: set exactly one of password_env",
        ),
        (
            {"ari_url": "http://pbx", "ari_user": "u", "password_credential": "ari"},
            {},
            "providers.pbx1.password_credential: $CREDENTIALS_DIRECTORY is not set",
        ),
        (
            {"ari_url": "http://pbx", "ari_user": "u", "password_credential": "../x"},
            {"CREDENTIALS_DIRECTORY": "/nonexistent"},
            "providers.pbx1.password_credential: '../x' is not a credential name",
        ),
        (
            {"ari_url": "http://pbx", "ari_user": "u", "password_credential": "ari"},
            {"CREDENTIALS_DIRECTORY": "/nonexistent"},
            "providers.pbx1.password_credential: cannot read /nonexistent/ari",
        ),
    ],
)
def test_bad_provider_config(table: dict[str, Any], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        providers_mod.parse_providers({"pbx1": table}, env)
    assert str(info.value).startswith(message), str(info.value)
    assert "s3cret" not in str(info.value)


def test_bad_provider_name_and_shape() -> None:
    with pytest.raises(ConfigError, match=r"providers\.a b: a provider name"):
        providers_mod.parse_providers({"a b": BASE}, ENV)
    with pytest.raises(ConfigError, match=r"providers\.p: must be a table"):
        providers_mod.parse_providers({"p": "x"}, ENV)


def test_empty_credential_file(tmp_path: Path) -> None:
    (tmp_path / "ari").write_text("\n")
    table = {"ari_url": "http://pbx", "ari_user": "u", "password_credential": "ari"}
    with pytest.raises(ConfigError, match="is empty"):
        providers_mod.parse_providers({"p": table}, {"CREDENTIALS_DIRECTORY": str(tmp_path)})


# -- the shipped dialplan ---------------------------------------------------------------------


def dialplan_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].rstrip()
        if not line.strip():
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            assert current is not None, raw
            current.append(line)
    return sections


def test_outbound_dialplan_is_what_real_asterisk_needs() -> None:
    sections = dialplan_sections((ETC / "extensions-outbound.conf").read_text())
    assert list(sections) == [PROVIDER.context]  # the WebSocket one lives in its own file
    all_lines = sections[PROVIDER.context]
    h = next(i for i, line in enumerate(all_lines) if line.startswith("exten => h,1,"))
    lines, after = all_lines[:h], all_lines[h:]  # the h extension reports a transfer's outcome
    first = re.fullmatch(r"exten => s,1,(\w+)\((.*)\)", lines[0])
    assert first is not None, lines[0]  # ARI originates to extension s, priority 1
    apps = [first.group(1)]
    labels = set()
    for line in lines[1:] + after[1:]:
        m = re.fullmatch(r" same => n(?:\((\w+)\))?,(\w+)\((.*)\)", line)
        assert m is not None, line
        assert m.group(3).count("(") == m.group(3).count(")"), line
        assert m.group(3).count("{") == m.group(3).count("}"), line
        if m.group(1):
            labels.add(m.group(1))
        apps.append(m.group(2))
    text = "\n".join(lines)
    check = "GotoIf($[${LEN(${CTX})} != 36]?error)"
    audiosocket = "(talk),AudioSocket(${CTX},${RAPIDA_AS_HOST}:${RAPIDA_PORT})"
    assert "Set(CTX=${RAPIDA_CONTEXT_ID})" in text
    assert check in text and audiosocket in text
    assert text.index("Answer()") < text.index(check) < text.index(audiosocket)
    assert labels == {"error", "talk", "done", "end"}
    assert apps[-1] == "NoOp" and "Hangup" in apps
    assert "CHANNEL(audio" not in text


def test_every_status_change_goes_through_the_transition_table() -> None:
    record = oc.OutboundCall("ctx", "chan", "p", "a", "+49", "", cr.AUDIOSOCKET, 0.0)
    record.move(oc.Status.RINGING)
    record.move(oc.Status.CONNECTED)
    with pytest.raises(oc.IllegalTransition, match="connected -> ringing"):
        record.move(oc.Status.RINGING)
    record.move(oc.Status.ENDED)
    for status in oc.Status:
        with pytest.raises(oc.IllegalTransition):
            record.move(status)  # nothing leaves ended
    assert set(oc.TRANSITIONS) == set(oc.Status)
