"""The media-stream dialects, sans-IO: exact shapes per provider, bot messages, bad input."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from rapida_tap.assistants.dialects import DIALECTS, AudioFormat, Dialect, StreamCall
from rapida_tap.assistants.dialects.base import ALAW, L16, MULAW
from rapida_tap.assistants.mediastreams import (
    BotClear,
    BotMark,
    BotMedia,
    BotOther,
    StreamProtocolError,
)
from rapida_tap.media.codec import pcm_to_alaw, pcm_to_ulaw
from tests.support import tone

CTX = "a2862cfa-3b8e-4bd6-9a4c-0d1e2f3a4b5c"
HEX = CTX.replace("-", "")
CALL = StreamCall(
    context_id=CTX, caller="+4930123456", to="", account="acct", parameters={"k": "v"}
)
NOW = 1_795_499_200.5


def dialect(name: str, audio: AudioFormat | None = None) -> Dialect:
    cls = DIALECTS[name]
    return cls(CALL, audio or cls.formats[0], lambda: NOW)


def messages(texts: list[str]) -> list[dict[str, Any]]:
    return [json.loads(t) for t in texts]


PCM = tone(1)[0]  # 20 ms at 8 kHz
PCM_BE = bytes(b for i in range(0, len(PCM), 2) for b in (PCM[i + 1], PCM[i]))


# -- the provider's messages, exactly ------------------------------------------------------


def test_twilio_is_the_mediastreams_codec() -> None:
    d = dialect("twilio")
    connected, start = messages(d.opening())
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["start"]["streamSid"] == "MZ" + HEX
    assert start["start"]["callSid"] == "CA" + HEX
    assert start["start"]["customParameters"] == {"k": "v"}
    media = json.loads(d.media(PCM))
    assert base64.b64decode(media["media"]["payload"]) == pcm_to_ulaw(PCM)
    assert json.loads(d.media(PCM))["media"]["timestamp"] == "20"
    assert d.stop() is not None and d.cleared() is None


def test_telnyx_messages() -> None:
    d = dialect("telnyx")
    assert messages(d.opening()) == [
        {"event": "connected", "version": "1.0.0"},
        {
            "event": "start",
            "sequence_number": "1",
            "start": {
                "user_id": "acct",
                "call_control_id": CTX,
                "client_state": "",
                "from": "+4930123456",
                "to": "",
                "custom_parameters": {"k": "v"},
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
            },
            "stream_id": CTX,
        },
    ]
    d.media(PCM)
    assert json.loads(d.media(PCM)) == {
        "event": "media",
        "sequence_number": "3",
        "media": {
            "track": "inbound",
            "chunk": "2",
            "timestamp": "20",
            "payload": base64.b64encode(pcm_to_ulaw(PCM)).decode(),
        },
        "stream_id": CTX,
    }
    assert json.loads(d.dtmf("5")) == {
        "event": "dtmf",
        "stream_id": CTX,
        "occurred_at": "2026-11-24T05:46:40Z",
        "sequence_number": "4",
        "dtmf": {"digit": "5"},
    }
    assert json.loads(d.mark_played("m1")) == {
        "event": "mark",
        "sequence_number": "5",
        "stream_id": CTX,
        "mark": {"name": "m1"},
    }
    assert d.cleared() is None
    assert json.loads(d.stop() or "") == {
        "event": "stop",
        "sequence_number": "6",
        "stop": {"user_id": "acct", "call_control_id": CTX},
        "stream_id": CTX,
    }


def test_plivo_messages() -> None:
    d = dialect("plivo")
    assert messages(d.opening()) == [
        {
            "event": "start",
            "sequenceNumber": 1,
            "start": {
                "callId": CTX,
                "streamId": CTX,
                "accountId": "acct",
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
            },
            "extra_headers": "k=v",
        }
    ]
    assert json.loads(d.media(PCM)) == {
        "event": "media",
        "sequenceNumber": 2,
        "streamId": CTX,
        "media": {
            "track": "inbound",
            "timestamp": "1795499200500",
            "chunk": 1,
            "payload": base64.b64encode(pcm_to_ulaw(PCM)).decode(),
        },
        "extra_headers": "k=v",
    }
    assert json.loads(d.dtmf("#")) == {
        "event": "dtmf",
        "sequenceNumber": 3,
        "streamId": CTX,
        "dtmf": {"track": "inbound", "digit": "#", "timestamp": "1795499200500"},
        "extra_headers": "k=v",
    }
    assert json.loads(d.mark_played("c1")) == {
        "event": "playedStream",
        "sequenceNumber": 4,
        "streamId": CTX,
        "name": "c1",
    }
    assert json.loads(d.cleared() or "") == {
        "event": "clearedAudio",
        "sequenceNumber": 5,
        "streamId": CTX,
    }
    assert d.stop() is None  # Plivo's stream ends with the WebSocket
    assert not d.echo_cleared_marks


def test_exotel_messages() -> None:
    d = dialect("exotel", AudioFormat(L16, 16000))
    pcm16 = tone(1, rate=16000)[0]
    assert messages(d.opening()) == [
        {"event": "connected"},
        {
            "event": "start",
            "sequence_number": 1,
            "stream_sid": HEX,
            "start": {
                "stream_sid": HEX,
                "call_sid": CTX,
                "account_sid": "acct",
                "from": "+4930123456",
                "to": "",
                "custom_parameters": {"k": "v"},
                "media_format": {
                    "encoding": "base64",
                    "sample_rate": "16000",
                    "bit_rate": "256kbps",
                },
            },
        },
    ]
    assert json.loads(d.media(pcm16)) == {
        "event": "media",
        "sequence_number": 2,
        "stream_sid": HEX,
        "media": {"chunk": 1, "timestamp": "0", "payload": base64.b64encode(pcm16).decode()},
    }
    assert json.loads(d.dtmf("7")) == {
        "event": "dtmf",
        "sequence_number": 3,
        "stream_sid": HEX,
        "dtmf": {"duration": "0", "digit": "7"},
    }
    assert json.loads(d.mark_played("m")) == {
        "event": "mark",
        "sequence_number": 4,
        "stream_sid": HEX,
        "mark": {"name": "m"},
    }
    assert json.loads(d.stop() or "")["stop"] == {
        "call_sid": CTX,
        "account_sid": "acct",
        "reason": "callended",
    }


# Pipecat's parse_telephony_websocket tells the dialects apart by these fields of `start`.
@pytest.mark.parametrize(
    ("name", "top", "in_start"),
    [
        ("twilio", [], ["streamSid", "callSid"]),
        ("telnyx", ["stream_id"], ["call_control_id"]),
        ("plivo", [], ["streamId", "callId"]),
        ("exotel", [], ["stream_sid", "call_sid", "account_sid"]),
    ],
)
def test_each_start_carries_the_fields_that_name_its_dialect(
    name: str, top: list[str], in_start: list[str]
) -> None:
    start = messages(dialect(name).opening())[-1]
    assert start["event"] == "start"
    assert all(field in start for field in top)
    assert all(field in start["start"] for field in in_start)


# -- audio formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "wire"),
    [
        (AudioFormat(MULAW, 8000), pcm_to_ulaw(PCM)),
        (AudioFormat(ALAW, 8000), pcm_to_alaw(PCM)),
        (AudioFormat(L16, 8000), PCM),
        (
            AudioFormat(L16, 8000, big_endian=True),
            bytes(b for i in range(0, 320, 2) for b in (PCM[i + 1], PCM[i])),
        ),
    ],
)
def test_audio_formats_encode_and_decode(fmt: AudioFormat, wire: bytes) -> None:
    assert fmt.encode(PCM) == wire
    if fmt.encoding == L16:
        assert fmt.decode(wire) == PCM
        assert fmt.decode(wire + b"\x01") == PCM  # half a sample is left out


def test_audio_time_counts_at_the_dialects_rate() -> None:
    d = dialect("exotel", AudioFormat(L16, 24000))
    pcm24 = tone(2, rate=24000)[0]
    d.media(pcm24)
    assert json.loads(d.media(pcm24))["media"]["timestamp"] == "20"


# -- what bots send ----------------------------------------------------------------------------

PAYLOAD = base64.b64encode(b"\x01\x02").decode()

BOT_MESSAGES = [
    ("telnyx", {"event": "media", "media": {"payload": PAYLOAD}}, BotMedia(b"\x01\x02")),
    ("telnyx", {"event": "mark", "mark": {"name": "m"}}, BotMark("m")),
    ("telnyx", {"event": "clear"}, BotClear()),
    ("telnyx", {"event": "error"}, BotOther("error")),
    (
        "plivo",
        {
            "event": "playAudio",
            "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": PAYLOAD},
            "streamId": CTX,
        },
        BotMedia(b"\x01\x02"),
    ),
    ("plivo", {"event": "playAudio", "media": {"payload": PAYLOAD}}, BotMedia(b"\x01\x02")),
    ("plivo", {"event": "checkpoint", "streamId": CTX, "name": "c"}, BotMark("c")),
    ("plivo", {"event": "clearAudio", "streamId": CTX}, BotClear()),
    ("plivo", {"event": "sendDTMF", "dtmf": "1"}, BotOther("sendDTMF")),
    (
        "exotel",
        {"event": "media", "stream_sid": HEX, "media": {"payload": PAYLOAD}},
        BotMedia(b"\x01\x02"),
    ),
    ("exotel", {"event": "mark", "stream_sid": HEX, "mark": {"name": "m"}}, BotMark("m")),
    ("exotel", {"event": "clear", "stream_sid": HEX}, BotClear()),
    ("twilio", {"event": "clear", "streamSid": "MZ"}, BotClear()),
]


@pytest.mark.parametrize(("name", "message", "meaning"), BOT_MESSAGES)
def test_bot_messages(name: str, message: dict[str, Any], meaning: object) -> None:
    assert dialect(name).parse(json.dumps(message), 10_000) == meaning


BAD_BOT_MESSAGES = [
    ("telnyx", "not json", "not JSON"),
    ("telnyx", '{"event":"media","media":{}}', "no string 'media.payload'"),
    ("telnyx", '{"event":"mark","mark":{}}', "no non-empty string 'mark.name'"),
    ("plivo", '{"event":"checkpoint"}', "no non-empty string 'name'"),
    ("plivo", '{"event":"playAudio","media":{"payload":"!!"}}', "not base64"),
    (
        "plivo",
        json.dumps(
            {"event": "playAudio", "media": {"contentType": "audio/x-l16", "payload": PAYLOAD}}
        ),
        "playAudio of 'audio/x-l16', but the stream is audio/x-mulaw",
    ),
    (
        "plivo",
        json.dumps({"event": "playAudio", "media": {"sampleRate": 16000, "payload": PAYLOAD}}),
        "playAudio at sampleRate 16000, but the stream is 8000",
    ),
    ("exotel", '{"event":"media","media":"x"}', "no string 'media.payload'"),
    ("exotel", "[1]", "not a JSON object"),
    ("exotel", '{"event":1}', "no string 'event'"),
    ("exotel", "x" * 101, "exceeds 100"),
]


@pytest.mark.parametrize(("name", "text", "error"), BAD_BOT_MESSAGES)
def test_bad_bot_messages_are_refused_with_a_clear_error(name: str, text: str, error: str) -> None:
    with pytest.raises(StreamProtocolError) as caught:
        dialect(name).parse(text, 100)
    assert error in str(caught.value)


# -- the formats each provider allows ---------------------------------------------------------


def test_allowed_formats() -> None:
    labels = {name: [f.label for f in cls.formats] for name, cls in DIALECTS.items()}
    assert labels == {
        "twilio": ["mulaw/8000"],
        "telnyx": ["mulaw/8000", "alaw/8000", "l16/16000", "l16/8000"],
        "plivo": ["mulaw/8000", "l16/16000", "l16/8000"],
        "exotel": ["l16/8000", "l16/16000", "l16/24000"],
    }
    assert DIALECTS["plivo"].audio_format("l16", None) == AudioFormat(L16, 16000)
    assert DIALECTS["telnyx"].audio_format("l16", 16000) == AudioFormat(L16, 16000, True)
    assert DIALECTS["twilio"].audio_format(None, 16000) is None
