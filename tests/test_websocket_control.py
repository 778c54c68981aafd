"""chan_websocket control codec against real Asterisk captures, tables and properties."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapida_tap.websocket import commands as c
from rapida_tap.websocket import control
from rapida_tap.websocket.commands import COMMANDS, MarkTracker, build_command
from rapida_tap.websocket.control import (
    ControlError,
    ControlFormat,
    DtmfEnd,
    ErrorEvent,
    MediaBufferingCompleted,
    MediaMarkProcessed,
    MediaStart,
    MediaXoff,
    MediaXon,
    QueueDrained,
    Status,
    UnknownEvent,
    detect_format,
    parse_event,
)
from tests.captures import FIXTURES

JSON = ControlFormat.JSON
PLAIN = ControlFormat.PLAIN_TEXT


def _load(name: str) -> list[dict[str, Any]]:
    with (FIXTURES / name).open() as f:
        return [json.loads(line) for line in f]


FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("websocket-*.jsonl"))
TRANSCRIPTS = {name: _load(name) for name in FIXTURE_FILES}


def _texts(direction: str) -> list[tuple[str, str, str, str]]:
    """(file, control format, text, recorded name) of every TEXT frame sent in ``direction``."""
    found = []
    for name, records in TRANSCRIPTS.items():
        fmt = records[0]["control_format"]
        for r in records:
            if r["type"] == "ws" and r["opcode"] == "text" and r["dir"] == direction:
                found.append((name, fmt, r["text"], r["name"]))
    return found


FROM_ASTERISK = _texts("asterisk->daemon")
FROM_DAEMON = _texts("daemon->asterisk")


def _events(file: str) -> list[control.Event]:
    return [parse_event(text) for name, _, text, _ in FROM_ASTERISK if name == file]


def _first(file: str, kind: type[control.Event]) -> Any:
    return next(e for e in _events(file) if isinstance(e, kind))


# --- real captures ------------------------------------------------------------------------


def test_fixtures_present() -> None:
    assert len(FIXTURE_FILES) == 5
    assert len(FROM_ASTERISK) == 21
    assert len(FROM_DAEMON) == 14


@pytest.mark.parametrize(("file", "fmt", "text", "name"), FROM_ASTERISK)
def test_every_asterisk_text_parses(file: str, fmt: str, text: str, name: str) -> None:
    event = parse_event(text)
    assert not isinstance(event, UnknownEvent)
    assert event.name == name
    assert detect_format(text) == fmt


def test_media_start_json() -> None:
    context_id = TRANSCRIPTS["websocket-json.jsonl"][0]["context_id"]
    event = _first("websocket-json.jsonl", MediaStart)
    assert event == MediaStart(
        connection_id="rapida",
        channel="WebSocket/rapida/0x7fba70009000",
        channel_id="1795501832.7",
        format="ulaw",
        optimal_frame_size=160,
        ptime=20,
        channel_variables={
            "DIALEDPEERNUMBER": f"rapida/c(ulaw)f(json)v(ctx={context_id})",
            "MEDIA_WEBSOCKET_CONNECTION_ID": "rapida",
            "MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE": "160",
            "__RAPIDA_CONTEXT_ID": context_id,
        },
    )
    assert event.channel_variables["__RAPIDA_CONTEXT_ID"] == "e49ec698-467d-4b50-853c-e2fbe3a87c50"


def test_media_start_plain() -> None:
    event = _first("websocket-plain.jsonl", MediaStart)
    assert event.name == "MEDIA_START"
    assert event.connection_id == "rapida"
    assert event.channel == "WebSocket/rapida/0x7fba6c009130"
    assert event.channel_id == "1795501860.10"
    assert event.format == "ulaw"
    assert (event.optimal_frame_size, event.ptime) == (160, 20)
    assert event.channel_variables == {}


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("websocket-json.jsonl", DtmfEnd(channel_id="1795501832.7", digit="7")),
        ("websocket-plain.jsonl", DtmfEnd(channel_id="1795501860.10", digit="7")),
        ("websocket-json-daemon-hangup.jsonl", DtmfEnd(channel_id="1795501910.16", digit="#")),
        ("websocket-json-daemon-close.jsonl", DtmfEnd(channel_id="1795501916.19", digit="*")),
    ],
)
def test_dtmf_end(file: str, expected: DtmfEnd) -> None:
    assert _first(file, DtmfEnd) == expected


def _status(channel_id: str, queue_length: int, queue_full: bool = False) -> Status:
    return Status(
        channel_id=channel_id,
        queue_length=queue_length,
        xon_level=800,
        xoff_level=900,
        queue_full=queue_full,
        bulk_media=False,
        media_paused=False,
    )


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("websocket-json.jsonl", [_status("1795501832.7", 250), _status("1795501832.7", 0)]),
        ("websocket-plain.jsonl", [_status("1795501860.10", 250), _status("1795501860.10", 0)]),
        (
            "websocket-json-flood.jsonl",
            [_status("1795501873.13", 0), _status("1795501873.13", 1000, queue_full=True)],
        ),
    ],
)
def test_status(file: str, expected: list[Status]) -> None:
    assert [e for e in _events(file) if isinstance(e, Status)] == expected


def test_flow_control_json() -> None:
    cid = "1795501873.13"
    flow = [e for e in _events("websocket-json-flood.jsonl") if e.name != "STATUS"][2:]
    assert flow == [
        MediaXoff(channel_id=cid),
        MediaXon(channel_id=cid),
        QueueDrained(channel_id=cid),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # plain-text forms from docs/protocols.md (the plain flood was not captured)
        ("MEDIA_XOFF", MediaXoff()),
        ("MEDIA_XON", MediaXon()),
        ("QUEUE_DRAINED", QueueDrained()),
        ("MEDIA_BUFFERING_COMPLETED", MediaBufferingCompleted()),
        ("MEDIA_BUFFERING_COMPLETED b1", MediaBufferingCompleted(correlation_id="b1")),
        ("MEDIA_MARK_PROCESSED", MediaMarkProcessed(correlation_id="")),
        ("MEDIA_MARK_PROCESSED a:b", MediaMarkProcessed(correlation_id="a:b")),
        (
            "ERROR channel_id:1.2 error_text:MARK_MEDIA not supported in passthrough mode",
            ErrorEvent(channel_id="1.2", error_text="MARK_MEDIA not supported in passthrough mode"),
        ),
        (  # some of Asterisk's error texts end with a newline
            "ERROR channel_id:1.2 error_text:'x' is not a valid direction.\n",
            ErrorEvent(channel_id="1.2", error_text="'x' is not a valid direction."),
        ),
        (
            '{"event":"ERROR","channel_id":"1.2","error_text":"Unable to parse JSON command"}',
            ErrorEvent(channel_id="1.2", error_text="Unable to parse JSON command"),
        ),
        (
            '{"event":"MEDIA_BUFFERING_COMPLETED","channel_id":"1.2","correlation_id":""}',
            MediaBufferingCompleted(channel_id="1.2"),
        ),
        ("DTMF_END digit:a channel_id:1.2", DtmfEnd(channel_id="1.2", digit="A")),
        (  # tolerated: surrounding whitespace, unknown extra fields
            "  STATUS channel_id:1 queue_length:5 xon_level:800 xoff_level:900 queue_full:true "
            "bulk_media:true media_paused:true new_field:x \r\n",
            Status(
                channel_id="1",
                queue_length=5,
                xon_level=800,
                xoff_level=900,
                queue_full=True,
                bulk_media=True,
                media_paused=True,
            ),
        ),
    ],
)
def test_other_event_forms(text: str, expected: control.Event) -> None:
    assert parse_event(text) == expected


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        (
            "websocket-json.jsonl",
            MediaMarkProcessed(channel_id="1795501832.7", correlation_id="after-flush"),
        ),
        ("websocket-plain.jsonl", MediaMarkProcessed(channel_id="", correlation_id="after-flush")),
    ],
)
def test_mark_processed_only_after_flush(file: str, expected: MediaMarkProcessed) -> None:
    assert [e for e in _events(file) if isinstance(e, MediaMarkProcessed)] == [expected]


@pytest.mark.parametrize(
    ("text", "name", "channel_id", "fields"),
    [
        (
            '{"event":"NEW_THING","channel_id":"1.2","n":1,"x":[true]}',
            "NEW_THING",
            "1.2",
            {"n": 1, "x": [True]},
        ),
        ("NEW_THING channel_id:1.2 a:b bare c:", "NEW_THING", "1.2", {"a": "b", "c": ""}),
        ("NEW_THING", "NEW_THING", "", {}),
    ],
)
def test_unknown_event(text: str, name: str, channel_id: str, fields: dict[str, object]) -> None:
    event = parse_event(text)
    assert event == UnknownEvent(name=name, channel_id=channel_id, fields=fields, text=text)


# --- parse errors -------------------------------------------------------------------------

MEDIA_START_PLAIN = (
    "MEDIA_START connection_id:rapida channel:WebSocket/rapida/0x1 channel_id:1.2 format:ulaw "
    "optimal_frame_size:160 ptime:20"
)
MEDIA_START_JSON = {
    "event": "MEDIA_START",
    "connection_id": "rapida",
    "channel": "WebSocket/rapida/0x1",
    "channel_id": "1.2",
    "format": "ulaw",
    "optimal_frame_size": 160,
    "ptime": 20,
    "channel_variables": {"A": "1"},
}


def _media_start_json(**changes: object) -> str:
    obj = {**MEDIA_START_JSON, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty control message"),
        (" \t\r\n", "empty control message"),
        ("{", "invalid JSON at column 2: Expecting property name enclosed in double quotes"),
        ('{"event": "MEDIA_XON"', "invalid JSON at column 22: Expecting ',' delimiter"),
        ('{"event":"MEDIA_XON","event":"MEDIA_XOFF"}', "duplicate JSON key 'event'"),
        ("[" * 5000, "control message too long (5000 > 4096 characters)"),
        ('{"a":' + "[" * 4000, "invalid JSON: RecursionError"),
        ('{"channel_id":"1.2"}', "JSON control message has no 'event' member"),
        ('{"event":5}', "not a valid event name: 5"),
        ('{"event":""}', "not a valid event name: ''"),
        ('{"event":"BAD NAME"}', "not a valid event name: 'BAD NAME'"),
        ("[1]", "not a valid event name: '[1]'"),
        ("héllo world", "not a valid event name: 'héllo'"),
        (
            '{"event":"MEDIA_XON","channel_id":7}',
            "MEDIA_XON: field 'channel_id' must be a string, got 7",
        ),
        (
            _media_start_json(optimal_frame_size="abc"),
            "MEDIA_START: field 'optimal_frame_size' must be a non-negative integer, got 'abc'",
        ),
        (
            _media_start_json(optimal_frame_size="160"),
            "MEDIA_START: field 'optimal_frame_size' must be a non-negative integer, got '160'",
        ),
        (
            _media_start_json(ptime=True),
            "MEDIA_START: field 'ptime' must be a non-negative integer, got True",
        ),
        (
            _media_start_json(ptime=-20),
            "MEDIA_START: field 'ptime' must be a non-negative integer, got -20",
        ),
        (
            _media_start_json(ptime=20.0),
            "MEDIA_START: field 'ptime' must be a non-negative integer, got 20.0",
        ),
        (_media_start_json(format=None), "MEDIA_START: missing field 'format'"),
        (
            _media_start_json(format=["ulaw"]),
            "MEDIA_START: field 'format' must be a string, got ['ulaw']",
        ),
        (
            _media_start_json(channel_variables={"A": 1}),
            "MEDIA_START: field 'channel_variables' must be an object of strings, got {'A': 1}",
        ),
        (
            _media_start_json(channel_variables=["A"]),
            "MEDIA_START: field 'channel_variables' must be an object of strings, got ['A']",
        ),
        (
            MEDIA_START_PLAIN.replace("160", "abc"),
            "MEDIA_START: field 'optimal_frame_size' must be a non-negative integer, got 'abc'",
        ),
        (
            MEDIA_START_PLAIN.replace("ptime:20", "ptime:-20"),
            "MEDIA_START: field 'ptime' must be a non-negative integer, got '-20'",
        ),
        (
            MEDIA_START_PLAIN.replace("ptime:20", "ptime:1234567890"),
            "MEDIA_START: field 'ptime' must be a non-negative integer, got '1234567890'",
        ),
        (MEDIA_START_PLAIN.replace(" ptime:20", ""), "MEDIA_START: missing field 'ptime'"),
        (MEDIA_START_PLAIN + " ptime:20", "MEDIA_START: duplicate field 'ptime'"),
        (MEDIA_START_PLAIN + " junk", "MEDIA_START: expected key:value, got 'junk'"),
        (MEDIA_START_PLAIN + " :x", "MEDIA_START: expected key:value, got ':x'"),
        (
            "DTMF_END digit:55 channel_id:1",
            "DTMF_END: field 'digit' must be one of 0-9 * # A-D, got '55'",
        ),
        (
            "DTMF_END digit:x channel_id:1",
            "DTMF_END: field 'digit' must be one of 0-9 * # A-D, got 'x'",
        ),
        (
            "DTMF_END digit: channel_id:1",
            "DTMF_END: field 'digit' must be one of 0-9 * # A-D, got ''",
        ),
        ('{"event":"DTMF_END","digit":5}', "DTMF_END: field 'digit' must be a string, got 5"),
        ('{"event":"DTMF_END","channel_id":"1"}', "DTMF_END: missing field 'digit'"),
        (
            "STATUS channel_id:1 queue_length:0 xon_level:800 xoff_level:900 queue_full:yes "
            "bulk_media:false media_paused:false",
            "STATUS: field 'queue_full' must be a boolean (true or false), got 'yes'",
        ),
        (
            '{"event":"STATUS","queue_length":0,"xon_level":800,"xoff_level":900,'
            '"queue_full":"false","bulk_media":false,"media_paused":false}',
            "STATUS: field 'queue_full' must be a boolean (true or false), got 'false'",
        ),
        (
            '{"event":"STATUS","queue_length":1e3}',
            "STATUS: field 'queue_length' must be a non-negative integer, got 1000.0",
        ),
        (
            '{"event":"MEDIA_MARK_PROCESSED","channel_id":"1"}',
            "MEDIA_MARK_PROCESSED: missing field 'correlation_id'",
        ),
        (
            '{"event":"MEDIA_MARK_PROCESSED","correlation_id":null}',
            "MEDIA_MARK_PROCESSED: field 'correlation_id' must be a string, got None",
        ),
        ("ERROR channel_id:1", "ERROR: missing field 'error_text'"),
        ('{"event":"ERROR","error_text":{}}', "ERROR: field 'error_text' must be a string, got {}"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ControlError) as info:
        parse_event(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_max_length_is_adjustable() -> None:
    text = _media_start_json(channel_variables={"V": "x" * 5000})
    with pytest.raises(ControlError, match=r"too long \(\d+ > 4096 characters\)"):
        parse_event(text)
    assert isinstance(parse_event(text, max_length=8192), MediaStart)
    with pytest.raises(ControlError, match=r"too long \(10 > 9 characters\)"):
        parse_event("MEDIA_XOFF", max_length=9)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(ControlError) as info:
        parse_event('{"event":"DTMF_END","digit":"' + "9" * 1000 + '"}')
    assert len(str(info.value)) < 120


def test_events_are_frozen() -> None:
    event = parse_event(_media_start_json())
    assert isinstance(event, MediaStart)
    with pytest.raises(AttributeError):
        event.ptime = 40  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.channel_variables["A"] = "2"  # type: ignore[index]


# --- commands -----------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "fmt", "text", "recorded"), FROM_DAEMON)
def test_builder_reproduces_every_daemon_text(
    file: str, fmt: str, text: str, recorded: str
) -> None:
    if fmt == "json":
        params = json.loads(text)
        name = params.pop("command")
    else:
        name, _, value = text.partition(" ")
        param = COMMANDS[name].param
        params = {param: value} if value and param else {}
    assert name == recorded
    assert build_command(ControlFormat(fmt), name, **params) == text


@pytest.mark.parametrize(
    ("helper", "args", "plain", "as_json"),
    [
        (c.answer, (), "ANSWER", {"command": "ANSWER"}),
        (c.hangup, (), "HANGUP", {"command": "HANGUP"}),
        (
            c.start_media_buffering,
            (),
            "START_MEDIA_BUFFERING",
            {"command": "START_MEDIA_BUFFERING"},
        ),
        (c.stop_media_buffering, (), "STOP_MEDIA_BUFFERING", {"command": "STOP_MEDIA_BUFFERING"}),
        (
            c.stop_media_buffering,
            ("b-1",),
            "STOP_MEDIA_BUFFERING b-1",
            {"command": "STOP_MEDIA_BUFFERING", "correlation_id": "b-1"},
        ),
        (
            c.mark_media,
            ("m:1",),
            "MARK_MEDIA m:1",
            {"command": "MARK_MEDIA", "correlation_id": "m:1"},
        ),
        (c.flush_media, (), "FLUSH_MEDIA", {"command": "FLUSH_MEDIA"}),
        (c.report_queue_drained, (), "REPORT_QUEUE_DRAINED", {"command": "REPORT_QUEUE_DRAINED"}),
        (c.get_status, (), "GET_STATUS", {"command": "GET_STATUS"}),
        (c.pause_media, (), "PAUSE_MEDIA", {"command": "PAUSE_MEDIA"}),
        (c.continue_media, (), "CONTINUE_MEDIA", {"command": "CONTINUE_MEDIA"}),
    ],
)
def test_every_command_both_formats(
    helper: Any, args: tuple[str, ...], plain: str, as_json: dict[str, str]
) -> None:
    assert helper(PLAIN, *args) == plain
    assert helper(JSON, *args) == json.dumps(as_json)


@pytest.mark.parametrize("direction", ["both", "in", "out"])
def test_set_media_direction(direction: str) -> None:
    assert c.set_media_direction(JSON, direction) == (
        f'{{"command": "SET_MEDIA_DIRECTION", "direction": "{direction}"}}'
    )


def test_commands_table_covers_protocol() -> None:
    assert set(COMMANDS) == {
        "ANSWER", "HANGUP", "START_MEDIA_BUFFERING", "STOP_MEDIA_BUFFERING", "MARK_MEDIA",
        "FLUSH_MEDIA", "REPORT_QUEUE_DRAINED", "GET_STATUS", "PAUSE_MEDIA", "CONTINUE_MEDIA",
        "SET_MEDIA_DIRECTION",
    }  # fmt: skip


def test_format_names_match_dial_option() -> None:
    assert build_command("json", "GET_STATUS") == '{"command": "GET_STATUS"}'  # type: ignore[arg-type]
    assert build_command("plain-text", "GET_STATUS") == "GET_STATUS"  # type: ignore[arg-type]


def test_longest_ids_fit_in_128_bytes() -> None:
    longest = "x" * c.MAX_CORRELATION_ID_LENGTH
    for fmt in ControlFormat:
        for name in ("MARK_MEDIA", "STOP_MEDIA_BUFFERING"):
            assert (
                len(build_command(fmt, name, correlation_id=longest).encode())
                <= c.MAX_COMMAND_BYTES
            )


@pytest.mark.parametrize(
    ("fmt", "name", "params", "message"),
    [
        (JSON, "DANCE", {}, "unknown command 'DANCE'"),
        (PLAIN, "mark_media", {"correlation_id": "x"}, "unknown command 'mark_media'"),
        ("text", "HANGUP", {}, "unknown control format 'text'"),
        (JSON, "HANGUP", {"correlation_id": "x"}, "HANGUP: unexpected parameter 'correlation_id'"),
        (JSON, "MARK_MEDIA", {"id": "x"}, "MARK_MEDIA: unexpected parameter 'id'"),
        (JSON, "MARK_MEDIA", {}, "MARK_MEDIA: missing parameter 'correlation_id'"),
        (
            PLAIN,
            "MARK_MEDIA",
            {"correlation_id": ""},
            "correlation id must be printable ASCII without spaces, got ''",
        ),
        (
            PLAIN,
            "MARK_MEDIA",
            {"correlation_id": "a b"},
            "correlation id must be printable ASCII without spaces, got 'a b'",
        ),
        (
            PLAIN,
            "MARK_MEDIA",
            {"correlation_id": "a\n"},
            "correlation id must be printable ASCII without spaces, got 'a\\n'",
        ),
        (
            JSON,
            "MARK_MEDIA",
            {"correlation_id": "café"},
            "correlation id must be printable ASCII without spaces, got 'café'",
        ),
        (JSON, "MARK_MEDIA", {"correlation_id": 5}, "correlation id must be a string, got 5"),
        (
            PLAIN,
            "MARK_MEDIA",
            {"correlation_id": "x" * 65},
            "correlation id too long (65 > 64 characters)",
        ),
        (
            PLAIN,
            "STOP_MEDIA_BUFFERING",
            {"correlation_id": "x" * 200},
            "correlation id too long (200 > 64 characters)",
        ),
        (  # JSON escaping doubles quotes and backslashes past Asterisk's limit
            JSON,
            "MARK_MEDIA",
            {"correlation_id": '"' * 64},
            "MARK_MEDIA: command is 175 bytes, Asterisk ignores more than 128",
        ),
        (
            PLAIN,
            "SET_MEDIA_DIRECTION",
            {"direction": "in"},
            "SET_MEDIA_DIRECTION is only supported in JSON format",
        ),
        (JSON, "SET_MEDIA_DIRECTION", {}, "SET_MEDIA_DIRECTION: missing parameter 'direction'"),
        (
            JSON,
            "SET_MEDIA_DIRECTION",
            {"direction": "IN"},
            "SET_MEDIA_DIRECTION: direction must be both, in or out: 'IN'",
        ),
    ],
)
def test_build_errors(fmt: Any, name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ControlError) as info:
        build_command(fmt, name, **params)
    assert str(info.value) == message


def test_quotes_within_limit_are_escaped() -> None:
    text = c.mark_media(JSON, 'a"b\\c')
    assert json.loads(text) == {"command": "MARK_MEDIA", "correlation_id": 'a"b\\c'}
    assert c.mark_media(PLAIN, 'a"b\\c') == 'MARK_MEDIA a"b\\c'


# --- marks --------------------------------------------------------------------------------


def test_tracker_barge_in_as_captured() -> None:
    """websocket-json.jsonl: mark, flush (mark never reported), mark, ack for the second."""
    tracker = MarkTracker()
    tracker.sent("before-flush")
    assert tracker.flushed() == ("before-flush",)
    tracker.sent("after-flush")
    ack = _first("websocket-json.jsonl", MediaMarkProcessed)
    assert tracker.processed(ack.correlation_id) == ("after-flush",)
    assert tracker.pending == ()


def test_tracker_ack_settles_earlier_marks() -> None:
    tracker = MarkTracker()
    for name in ("a", "b", "c", "d"):
        tracker.sent(name)
    assert tracker.processed("a") == ("a",)
    assert tracker.processed("c") == ("b", "c")
    assert tracker.pending == ("d",)


def test_tracker_unknown_and_repeated_acks_settle_nothing() -> None:
    tracker = MarkTracker()
    tracker.sent("a")
    assert tracker.processed("zzz") == ()
    assert tracker.processed("a") == ("a",)
    assert tracker.processed("a") == ()
    assert tracker.flushed() == ()


def test_tracker_duplicate_ids_settle_oldest_first() -> None:
    tracker = MarkTracker()
    for name in ("turn", "x", "turn"):
        tracker.sent(name)
    assert tracker.processed("turn") == ("turn",)
    assert tracker.pending == ("x", "turn")
    assert tracker.processed("turn") == ("x", "turn")


@given(
    st.lists(st.sampled_from("abcde"), max_size=20),
    st.lists(st.sampled_from("abcdef"), max_size=20),
)
def test_tracker_settles_each_sent_mark_exactly_once(sent: list[str], acks: list[str]) -> None:
    tracker = MarkTracker()
    for name in sent:
        tracker.sent(name)
    settled: list[str] = []
    for ack in acks:
        settled.extend(tracker.processed(ack))
    settled.extend(tracker.flushed())
    assert settled == sent


# --- properties ---------------------------------------------------------------------------

EVENT_NAMES = [*control._KNOWN_EVENTS, "NEW_THING"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
FIELD_NAMES = [
    *("channel_id", "digit", "correlation_id", "error_text", "queue_length", "queue_full"),
    *("optimal_frame_size", "ptime", "channel_variables", "connection_id", "format"),
]


def _parses_or_control_error(text: str) -> None:
    try:
        event = parse_event(text)
    except ControlError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(event, control.Event)


@given(st.text(max_size=300))
def test_random_text_raises_only_control_error(text: str) -> None:
    _parses_or_control_error(text)


@given(
    st.sampled_from(EVENT_NAMES),
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values, max_size=8),
)
def test_random_json_events_raise_only_control_error(name: str, fields: dict[str, Any]) -> None:
    _parses_or_control_error(json.dumps({"event": name, **fields}))


@given(
    st.sampled_from(EVENT_NAMES),
    st.lists(
        st.tuples(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), st.text(max_size=8)),
        max_size=8,
    ),
)
def test_random_plain_events_raise_only_control_error(
    name: str, pairs: list[tuple[str, str]]
) -> None:
    _parses_or_control_error(" ".join([name, *(f"{k}:{v}" for k, v in pairs)]))


uints = st.integers(min_value=0, max_value=100_000)
ids = st.from_regex(r"[0-9]{1,10}\.[0-9]{1,5}", fullmatch=True)


@given(ids, uints, uints, uints, st.booleans(), st.booleans(), st.booleans())
def test_status_as_asterisk_prints_it(
    cid: str, length: int, xon: int, xoff: int, full: bool, bulk: bool, paused: bool
) -> None:
    """Both of Asterisk's renderings (chan_websocket.c ``_create_event_STATUS``) parse back."""
    expected = Status(
        channel_id=cid, queue_length=length, xon_level=xon, xoff_level=xoff,
        queue_full=full, bulk_media=bulk, media_paused=paused,
    )  # fmt: skip
    b = {True: "true", False: "false"}
    plain = (
        f"STATUS channel_id:{cid} queue_length:{length} xon_level:{xon} xoff_level:{xoff} "
        f"queue_full:{b[full]} bulk_media:{b[bulk]} media_paused:{b[paused]}"
    )
    compact = json.dumps(
        {"event": "STATUS", "channel_id": cid, "queue_length": length, "xon_level": xon,
         "xoff_level": xoff, "queue_full": full, "bulk_media": bulk, "media_paused": paused},
        separators=(",", ":"),
    )  # fmt: skip
    assert parse_event(plain) == expected
    assert parse_event(compact) == expected


@given(st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True))
def test_mark_ids_survive_asterisk_echo(correlation_id: str) -> None:
    """What we send as a mark id comes back unchanged in Asterisk's MEDIA_MARK_PROCESSED."""
    plain_param = c.mark_media(PLAIN, correlation_id).partition(" ")[2]
    assert parse_event(f"MEDIA_MARK_PROCESSED {plain_param}").correlation_id == correlation_id  # type: ignore[attr-defined]
    try:
        sent = json.loads(c.mark_media(JSON, correlation_id))["correlation_id"]
    except ControlError:
        return  # escaping made it too long: refused, never silently dropped by Asterisk
    echo = json.dumps({"event": "MEDIA_MARK_PROCESSED", "channel_id": "1", "correlation_id": sent})
    assert parse_event(echo) == MediaMarkProcessed(channel_id="1", correlation_id=correlation_id)
