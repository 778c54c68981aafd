"""The media-stream codec: exact wire shapes, numbering, and every bad bot message."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapida_tap.assistants.mediastreams import (
    BotClear,
    BotMark,
    BotMedia,
    BotOther,
    StreamEncoder,
    StreamProtocolError,
    parse_bot_message,
)

SID = "MZ0123456789abcdef0123456789abcdef"
CALL = "CA0123456789abcdef0123456789abcdef"


def encoder() -> StreamEncoder:
    return StreamEncoder(SID, CALL)


def started() -> StreamEncoder:
    enc = encoder()
    enc.connected()
    enc.start(custom_parameters={})
    return enc


# --- daemon -> bot: exact JSON ------------------------------------------------------------


def test_connected() -> None:
    assert json.loads(encoder().connected()) == {
        "event": "connected",
        "protocol": "Call",
        "version": "1.0.0",
    }


def test_start() -> None:
    enc = encoder()
    enc.connected()
    params = {"assistant": "a1", "from": "+15551234567"}
    assert json.loads(enc.start(custom_parameters=params)) == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "rapida-asterisk",
            "streamSid": SID,
            "callSid": CALL,
            "tracks": ["inbound"],
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": SID,
    }


def test_start_with_account_and_tracks() -> None:
    enc = StreamEncoder(SID, CALL, account_sid="AC1")
    start = json.loads(enc.start(custom_parameters={}, tracks=["inbound", "outbound"]))
    assert start["start"]["accountSid"] == "AC1"
    assert start["start"]["tracks"] == ["inbound", "outbound"]
    assert start["start"]["customParameters"] == {}


def test_media() -> None:
    enc = started()
    ulaw = bytes(range(160))
    assert json.loads(enc.media(ulaw, 0)) == {
        "event": "media",
        "sequenceNumber": "2",
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(ulaw).decode("ascii"),
        },
        "streamSid": SID,
    }


def test_dtmf() -> None:
    assert json.loads(started().dtmf("#")) == {
        "event": "dtmf",
        "sequenceNumber": "2",
        "streamSid": SID,
        "dtmf": {"track": "inbound_track", "digit": "#"},
    }


def test_mark() -> None:
    assert json.loads(started().mark("reply-1")) == {
        "event": "mark",
        "sequenceNumber": "2",
        "streamSid": SID,
        "mark": {"name": "reply-1"},
    }


def test_stop() -> None:
    assert json.loads(started().stop()) == {
        "event": "stop",
        "sequenceNumber": "2",
        "stop": {"accountSid": "rapida-asterisk", "callSid": CALL},
        "streamSid": SID,
    }


# --- numbering ------------------------------------------------------------------------------


def test_sequence_numbers_count_every_message_after_connected() -> None:
    enc = encoder()
    assert "sequenceNumber" not in json.loads(enc.connected())
    messages = [
        enc.start(custom_parameters={}),
        enc.media(b"\xff" * 160, 0),
        enc.dtmf("1"),
        enc.media(b"\xff" * 160, 20),
        enc.mark("m"),
        enc.media(b"\xff" * 160, 40),
        enc.stop(),
    ]
    assert [json.loads(m)["sequenceNumber"] for m in messages] == [str(n) for n in range(1, 8)]
    assert enc.sequence_number == 7


def test_chunks_count_media_only() -> None:
    enc = started()
    chunks = []
    for n in range(5):
        enc.dtmf("2")
        chunks.append(json.loads(enc.media(b"\x7f" * 160, n * 20))["media"])
    assert [c["chunk"] for c in chunks] == ["1", "2", "3", "4", "5"]
    assert [c["timestamp"] for c in chunks] == ["0", "20", "40", "60", "80"]
    assert enc.chunk == 5


def test_encoders_number_independently() -> None:
    first, second = started(), started()
    first.media(b"", 0)
    assert json.loads(second.media(b"", 0))["sequenceNumber"] == "2"


# --- encoder arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("digit", list("0123456789*#ABCD"))
def test_dtmf_accepts_every_key(digit: str) -> None:
    assert json.loads(started().dtmf(digit))["dtmf"]["digit"] == digit


@pytest.mark.parametrize("digit", ["", "12", "E", "a", " ", 1, None])
def test_dtmf_refuses_non_keys(digit: object) -> None:
    with pytest.raises(ValueError, match="not a DTMF digit"):
        started().dtmf(digit)  # type: ignore[arg-type]


@pytest.mark.parametrize("params", [{"n": 1}, {"n": None}, {1: "x"}])
def test_start_refuses_non_string_parameters(params: dict[object, object]) -> None:
    with pytest.raises(TypeError, match="must map a str to a str"):
        encoder().start(custom_parameters=params)  # type: ignore[arg-type]


# --- media template: valid JSON whatever the stream sid and audio --------------------------


@given(sid=st.text(), ulaw=st.binary(max_size=2000), ts=st.integers(0, 2**40))
def test_media_template_is_the_json_it_claims(sid: str, ulaw: bytes, ts: int) -> None:
    enc = StreamEncoder(sid, CALL)
    message = json.loads(enc.media(ulaw, ts))
    assert message == {
        "event": "media",
        "sequenceNumber": "1",
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": str(ts),
            "payload": base64.b64encode(ulaw).decode("ascii"),
        },
        "streamSid": sid,
    }


@given(ulaw=st.binary(max_size=4000))
def test_media_round_trips_through_the_bot_parser(ulaw: bytes) -> None:
    # Bots read caller media and send their own with the same media.payload field.
    parsed = parse_bot_message(started().media(ulaw, 0))
    assert parsed == BotMedia(ulaw)
    assert parsed.stream_sid == SID  # type: ignore[union-attr]


@given(sid=st.text(), name=st.text(), params=st.dictionaries(st.text(), st.text()))
def test_every_message_is_ascii_json(sid: str, name: str, params: dict[str, str]) -> None:
    enc = StreamEncoder(sid, sid, sid)
    messages = [enc.connected(), enc.start(custom_parameters=params), enc.mark(name), enc.stop()]
    for text in messages:
        text.encode("ascii")  # lone surrogates are escaped, so any WebSocket can send it
        assert json.loads(text)["event"]
    assert json.loads(messages[1])["start"]["customParameters"] == params
    assert json.loads(messages[2])["mark"]["name"] == name


# --- bot -> daemon: what is accepted ----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


ACCEPTED = [
    (
        {"event": "media", "streamSid": SID, "media": {"payload": _b64(b"\x01\x02\x03")}},
        BotMedia(b"\x01\x02\x03"),
    ),
    ({"event": "media", "media": {"payload": ""}}, BotMedia(b"")),
    (
        {"event": "media", "media": {"payload": "AQID", "track": "outbound"}},
        BotMedia(b"\x01\x02\x03"),
    ),
    ({"event": "media", "media": {"payload": "AQ"}}, BotMedia(b"\x01")),  # unpadded
    ({"event": "media", "media": {"payload": "AQI"}}, BotMedia(b"\x01\x02")),  # unpadded
    ({"event": "media", "media": {"payload": "AQ="}}, BotMedia(b"\x01")),  # half padded
    ({"event": "mark", "streamSid": SID, "mark": {"name": "chunk-7"}}, BotMark("chunk-7")),
    ({"event": "mark", "mark": {"name": "é 🎉"}}, BotMark("é 🎉")),
    ({"event": "clear", "streamSid": SID}, BotClear()),
    ({"event": "clear"}, BotClear()),
    ({"event": "clear", "streamSid": "MZ-someone-else"}, BotClear()),
    ({"event": "transcript", "text": "hi"}, BotOther("transcript")),
    ({"event": "start", "start": {}}, BotOther("start")),
    ({"event": ""}, BotOther("")),
]


@pytest.mark.parametrize(("message", "expected"), ACCEPTED)
def test_accepted(message: dict[str, object], expected: object) -> None:
    text = json.dumps(message)
    assert parse_bot_message(text) == expected
    assert parse_bot_message(text.encode("utf-8")) == expected


def test_stream_sid_is_exposed_but_not_compared() -> None:
    media = parse_bot_message('{"event":"media","streamSid":"MZx","media":{"payload":"AA=="}}')
    assert isinstance(media, BotMedia) and media.stream_sid == "MZx"
    assert parse_bot_message('{"event":"mark","mark":{"name":"n"}}').stream_sid is None  # type: ignore[union-attr]
    assert parse_bot_message('{"event":"clear","streamSid":7}') == BotClear(None)
    assert parse_bot_message('{"event":"clear","streamSid":7}').stream_sid is None  # type: ignore[union-attr]


def test_message_of_exactly_max_bytes_is_accepted() -> None:
    text = '{"event":"clear"}'
    assert parse_bot_message(text, max_bytes=len(text)) == BotClear()


# --- bot -> daemon: every refusal ---------------------------------------------------------

REFUSED = [
    ('{"event":"clear"} ', 17, "exceeds 17"),
    (b'{"event":"clear"} ', 17, "exceeds 17"),
    ('{"event":"clear","x":"\u00e9\u00e9\u00e9"}', 29, "of 30 bytes exceeds 29"),  # 27 chars
    (b"\xff\xfe{", None, "not UTF-8"),
    ('{"event":"clear"', None, "not JSON"),
    ("", None, "not JSON"),
    ("media", None, "not JSON"),
    ("[" * 100_000 + "]" * 100_000, None, "not JSON"),
    ("1" * 5000, None, "not JSON"),
    ('["event","media"]', None, "not a JSON object"),
    ('"clear"', None, "not a JSON object"),
    ("null", None, "not a JSON object"),
    ("{}", None, "no string 'event'"),
    ('{"event":null}', None, "no string 'event'"),
    ('{"event":5}', None, "no string 'event'"),
    ('{"event":["media"]}', None, "no string 'event'"),
    ('{"event":"media"}', None, "no string 'media.payload'"),
    ('{"event":"media","media":"AAAA"}', None, "no string 'media.payload'"),
    ('{"event":"media","media":{}}', None, "no string 'media.payload'"),
    ('{"event":"media","media":{"payload":null}}', None, "no string 'media.payload'"),
    ('{"event":"media","media":{"payload":[1,2]}}', None, "no string 'media.payload'"),
    ('{"event":"media","media":{"payload":"A"}}', None, "not base64"),
    ('{"event":"media","media":{"payload":"AAAA!"}}', None, "not base64"),
    ('{"event":"media","media":{"payload":"AA AA"}}', None, "not base64"),
    ('{"event":"media","media":{"payload":"AAAA\\n"}}', None, "not base64"),
    ('{"event":"media","media":{"payload":"AA-_"}}', None, "not base64"),
    ('{"event":"media","media":{"payload":"===="}}', None, "not base64"),
    ('{"event":"media","media":{"payload":"AA==AA=="}}', None, "not base64"),
    ('{"event":"media","media":{"payload":"\u00e9\u00e9\u00e9\u00e9"}}', None, "not base64"),
    ('{"event":"mark"}', None, "no non-empty string 'mark.name'"),
    ('{"event":"mark","mark":"m"}', None, "no non-empty string 'mark.name'"),
    ('{"event":"mark","mark":{}}', None, "no non-empty string 'mark.name'"),
    ('{"event":"mark","mark":{"name":""}}', None, "no non-empty string 'mark.name'"),
    ('{"event":"mark","mark":{"name":7}}', None, "no non-empty string 'mark.name'"),
    ('{"event":"mark","mark":{"name":null}}', None, "no non-empty string 'mark.name'"),
]


@pytest.mark.parametrize(("text", "max_bytes", "error"), REFUSED)
def test_refused(text: str | bytes, max_bytes: int | None, error: str) -> None:
    with pytest.raises(StreamProtocolError, match=error):
        if max_bytes is None:
            parse_bot_message(text)
        else:
            parse_bot_message(text, max_bytes=max_bytes)


def test_default_limit_is_one_mebibyte() -> None:
    payload = "A" * (1_048_576 - len('{"event":"media","media":{"payload":""}}'))
    assert parse_bot_message('{"event":"media","media":{"payload":"' + payload + '"}}')
    with pytest.raises(StreamProtocolError, match="exceeds 1048576"):
        parse_bot_message('{"event":"media","media":{"payload":"' + payload + 'AAAA"}}')


# --- nothing but StreamProtocolError, whatever arrives -------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
bot_shaped = st.fixed_dictionaries(
    {"event": st.sampled_from(["media", "mark", "clear", "stop"]) | json_values},
    optional={
        "streamSid": json_values,
        "media": st.fixed_dictionaries({}, optional={"payload": st.text() | json_values}),
        "mark": st.fixed_dictionaries({}, optional={"name": json_values}),
    },
)


def _parse_or_refuse(data: str | bytes) -> None:
    try:
        result = parse_bot_message(data, max_bytes=4096)
    except StreamProtocolError:
        return
    assert isinstance(result, BotMedia | BotMark | BotClear | BotOther)


@given(st.text())
def test_random_text_only_raises_protocol_errors(text: str) -> None:
    _parse_or_refuse(text)


@given(st.binary())
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    _parse_or_refuse(data)


@given(json_values)
def test_random_json_only_raises_protocol_errors(value: object) -> None:
    _parse_or_refuse(json.dumps(value))


@given(bot_shaped)
def test_bot_shaped_json_only_raises_protocol_errors(value: dict[str, object]) -> None:
    _parse_or_refuse(json.dumps(value))


# --- the shapes bot frameworks read and write (docs/media-streams.md, "Checked against") ---


def _call(params: dict[str, str]) -> list[str]:
    enc = encoder()
    return [
        enc.connected(),
        enc.start(custom_parameters=params),
        enc.media(b"\xff" * 160, 0),
        enc.dtmf("5"),
        enc.mark("m1"),
        enc.stop(),
    ]


def test_pipecat_reads_the_second_frame_as_start() -> None:
    # Pipecat's runner (parse_telephony_websocket) and its Twilio examples skip frame 1,
    # json.loads frame 2, and detect Twilio by start.streamSid and start.callSid.
    frames = _call({"from_number": "+15550001", "to_number": "+15550002"})
    call_data = json.loads(frames[1])
    assert call_data.get("event") == "start"
    assert "streamSid" in call_data.get("start", {}) and "callSid" in call_data.get("start", {})
    assert call_data["start"]["streamSid"] == SID
    assert call_data["start"]["callSid"] == CALL
    assert call_data["start"]["customParameters"].get("from_number") == "+15550001"


def test_pipecat_serializer_reads_media_and_dtmf() -> None:
    # TwilioFrameSerializer.deserialize: message["event"], message["media"]["payload"]
    # (base64), message.get("dtmf", {}).get("digit") as a KeypadEntry ("0"-"9", "*", "#").
    frames = _call({})
    for text in frames:
        assert isinstance(json.loads(text)["event"], str)
    media = json.loads(frames[2])
    assert base64.b64decode(media["media"]["payload"]) == b"\xff" * 160
    assert json.loads(frames[3]).get("dtmf", {}).get("digit") == "5"


def test_vocode_and_openai_demo_reads() -> None:
    # Vocode: data["start"]["streamSid"], data["mark"]["name"], stops on event "stop".
    # OpenAI's Twilio demo: int(data["media"]["timestamp"]), top-level streamSid in start.
    frames = [json.loads(text) for text in _call({})]
    assert frames[1]["start"]["streamSid"] == frames[1]["streamSid"] == SID
    assert int(frames[2]["media"]["timestamp"]) == 0
    assert frames[4]["mark"]["name"] == "m1"
    assert frames[5]["event"] == "stop"


def test_bot_frameworks_outgoing_messages_parse() -> None:
    # Exactly what Pipecat's TwilioFrameSerializer.serialize and Vocode's
    # TwilioOutputDevice send: json.dumps of these dicts, default separators.
    payload = base64.b64encode(b"\x00\x7f\xff").decode("utf-8")
    sent = [
        (
            {"event": "media", "streamSid": SID, "media": {"payload": payload}},
            BotMedia(b"\x00\x7f\xff"),
        ),
        ({"event": "mark", "streamSid": SID, "mark": {"name": "3"}}, BotMark("3")),
        ({"event": "clear", "streamSid": SID}, BotClear()),
    ]
    for message, expected in sent:
        parsed = parse_bot_message(json.dumps(message))
        assert parsed == expected
        assert parsed.stream_sid == SID  # type: ignore[union-attr]
