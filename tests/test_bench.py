"""The bench harness: its sans-IO bookkeeping, and a tiny real run so it cannot rot.

The real runs start the daemon (and the naive asyncio peer) as subprocesses on free 127.0.0.1
ports through ``python -m bench`` exactly as documented, for about a second each; they assert
that every metric is present and that a healthy tiny load loses nothing, not any timing figure
(this machine is shared, timing is what the benchmark reports, not what a test can demand).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
import warnings
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench import cclient, frames, ws
from bench.__main__ import parse
from bench.client import WorkerPlan, parse_reply, registration_request, run_worker, ws_path
from bench.server import cpu_seconds, daemon_call_counts, free_port, lab_certificate, rss_mb
from bench.stats import EchoTracker, format_table, meets_bar, percentile, spread_ms

REPO = Path(__file__).resolve().parents[1]
needs_gcc = pytest.mark.skipif(not cclient.available(), reason="the C client needs gcc")
needs_tls = pytest.mark.skipif(
    not cclient.tls_available(), reason="the C client's wss needs gcc and OpenSSL's headers"
)

# -- frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 2, 49, 50, 51, 12345, 2**31 - 1])
def test_numbered_frames_identify_themselves(seq: int) -> None:
    payload = frames.payload(seq)
    assert len(payload) == frames.PAYLOAD_BYTES
    assert frames.identify(payload) == seq
    assert frames.audio_frame(seq) == b"\x10\x01\x40" + payload


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (frames.SILENCE, frames.IS_SILENCE),
        (frames.payload(7)[:-1], frames.IS_CORRUPT),  # short
        (frames.payload(7)[:100] + b"\x01" + frames.payload(7)[101:], frames.IS_CORRUPT),
        (b"\x07\x00\x00\x00" + frames.payload(7)[4:], frames.IS_CORRUPT),  # mark bit missing
        (b"\x00\x00\x00\x80" + frames.payload(7)[4:], frames.IS_CORRUPT),  # sequence 0
        (bytes(range(256)) + bytes(64), frames.IS_CORRUPT),
    ],
)
def test_identify_rejects_what_we_did_not_send(data: bytes, expected: int) -> None:
    assert frames.identify(data) == expected


@needs_gcc
def test_the_c_client_identifies_returned_frames_as_frames_py_does() -> None:
    p7 = frames.payload(7)
    payloads = [frames.payload(seq) for seq in (1, 2, 49, 50, 51, 12345, 2**31 - 1)]
    payloads += [
        frames.SILENCE,
        p7[:-1],
        p7 + b"\x00\x00",
        p7[:100] + b"\x01" + p7[101:],
        b"\x07\x00\x00\x00" + p7[4:],
        b"\x00\x00\x00\x80" + p7[4:],
        bytes(4) + p7[4:],
        frames.payload(8)[:4] + p7[4:],
        bytes(range(256)) + bytes(64),
        bytes(319) + b"\x01",
    ]
    expected = [frames.identify(p) for p in payloads]
    assert expected.count(frames.IS_CORRUPT) == 9
    assert cclient.identify(payloads) == expected


@pytest.mark.parametrize("seq", [0, -1, 2**31])
def test_sequence_numbers_out_of_range_are_refused(seq: int) -> None:
    with pytest.raises(ValueError, match="sequence number must be"):
        frames.payload(seq)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def _daemon_echo(ulaw: bytes) -> bytes:
    """What the daemon's echo does to μ-law: decode, then encode again."""
    return audioop.lin2ulaw(audioop.ulaw2lin(ulaw, 2), 2)


def test_only_ulaw_minus_zero_changes_on_the_daemons_round_trip() -> None:
    changed = [b for b in range(256) if _daemon_echo(bytes([b])) != bytes([b])]
    assert changed == [0x7F]


@pytest.mark.parametrize("seq", [1, 2, 49, 50, 127, 128, 16383, 16384, 12345678, 2**31 - 1])
def test_ulaw_frames_survive_the_daemons_codec_and_identify_themselves(seq: int) -> None:
    payload = frames.ulaw_payload(seq)
    assert len(payload) == frames.ULAW_BYTES
    assert 0x7F not in payload
    assert _daemon_echo(payload) == payload
    assert frames.identify_ulaw(payload) == seq
    assert audioop.ulaw2lin(frames.ULAW_BODIES[seq % 50], 2) != bytes(310)  # a tone, not silence


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (frames.ULAW_SILENCE, frames.IS_SILENCE),
        (frames.ulaw_payload(7)[:-1], frames.IS_CORRUPT),
        (frames.ulaw_payload(7)[:50] + b"\x01" + frames.ulaw_payload(7)[51:], frames.IS_CORRUPT),
        (b"\x07" + frames.ulaw_payload(7)[1:], frames.IS_CORRUPT),  # top bit missing
        (b"\x80" * 5 + frames.ulaw_payload(7)[5:], frames.IS_CORRUPT),  # sequence 0
        (frames.ulaw_payload(8)[:5] + frames.ulaw_payload(7)[5:], frames.IS_CORRUPT),  # body
        (b"\xff" * 5 + frames.ulaw_payload(7)[5:], frames.IS_CORRUPT),  # 2**35 - 1
    ],
)
def test_identify_ulaw_rejects_what_we_did_not_send(data: bytes, expected: int) -> None:
    assert frames.identify_ulaw(data) == expected


@needs_gcc
def test_the_c_client_identifies_returned_ulaw_frames_as_frames_py_does() -> None:
    p7 = frames.ulaw_payload(7)
    seqs = (1, 2, 49, 50, 51, 127, 128, 16384, 12345678, 2**31 - 1)
    payloads = [frames.ulaw_payload(seq) for seq in seqs]
    payloads += [
        frames.ULAW_SILENCE,
        p7[:-1],
        p7 + b"\xff",
        p7[:50] + b"\x01" + p7[51:],
        b"\x07" + p7[1:],
        b"\x80" * 5 + p7[5:],
        frames.ulaw_payload(8)[:5] + p7[5:],
        b"\xff" * 5 + p7[5:],  # 2**35 - 1
        b"\xff\xff\xff\xff\x88" + frames.ulaw_payload(3)[5:],  # 2**31 + 2**28 - 1
        frames.ULAW_SILENCE[:-1] + b"\xfe",
        frames.payload(7),  # a PCM frame is not a μ-law one
    ]
    expected = [frames.identify_ulaw(p) for p in payloads]
    assert expected[: len(seqs)] == list(seqs)
    assert expected.count(frames.IS_CORRUPT) == 10
    assert cclient.identify(payloads, ulaw=True) == expected


@pytest.mark.parametrize("seq", [0, 2**31])
def test_ulaw_sequence_numbers_out_of_range_are_refused(seq: int) -> None:
    with pytest.raises(ValueError, match="sequence number must be"):
        frames.ulaw_payload(seq)


# -- the WebSocket client codec ----------------------------------------------------------------


def _unmask_client_frame(data: bytes) -> tuple[int, bytes]:
    """RFC 6455 by hand: a client frame must be final, masked, and unmask to its payload."""
    b0, b1 = data[0], data[1]
    assert b0 & 0x80 and b1 & 0x80
    n, pos = b1 & 0x7F, 2
    if n == 126:
        (n,) = struct.unpack("!H", data[2:4])
        pos = 4
    key, body = data[pos : pos + 4], data[pos + 4 :]
    assert len(body) == n
    return b0 & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(body))


@pytest.mark.parametrize("seq", [1, 50, 51, 99999])
def test_audio_frames_are_masked_binary_messages_of_the_ulaw_payload(seq: int) -> None:
    assert _unmask_client_frame(ws.audio_frame(seq)) == (ws.BINARY, frames.ulaw_payload(seq))


@pytest.mark.parametrize("n", [0, 1, 3, 125, 126, 1000])
def test_client_frames_unmask_to_their_payload(n: int) -> None:
    payload = bytes(range(256)) * 4
    assert _unmask_client_frame(ws.client_frame(ws.TEXT, payload[:n])) == (ws.TEXT, payload[:n])


def test_media_start_names_the_context_like_chan_websocket_with_json() -> None:
    opcode, text = _unmask_client_frame(ws.media_start("a" * 36, 7))
    event = json.loads(text)
    assert opcode == ws.TEXT
    assert event["event"] == "MEDIA_START"
    assert (event["format"], event["optimal_frame_size"], event["ptime"]) == ("ulaw", 160, 20)
    assert event["channel_variables"]["__RAPIDA_CONTEXT_ID"] == "a" * 36
    assert _unmask_client_frame(ws.close_frame(1000)) == (ws.CLOSE, b"\x03\xe8")


def test_upgrade_request_is_chan_websockets() -> None:
    request = ws.upgrade_request("/v1/talk/asterisk/ctx?ctx=abc", "127.0.0.1:1")
    assert request.startswith(b"GET /v1/talk/asterisk/ctx?ctx=abc HTTP/1.1\r\n")
    assert b"\r\nSec-WebSocket-Protocol: media\r\n" in request
    assert request.endswith(f"Sec-WebSocket-Key: {ws.KEY}\r\n\r\n".encode())


_ACCEPT = base64.b64encode(
    hashlib.sha1(ws.KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
).decode()


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (
            f"HTTP/1.1 101 Switching\r\nSec-WebSocket-Accept: {_ACCEPT}\r\n"
            "Sec-WebSocket-Protocol: media",
            None,
        ),
        ("HTTP/1.1 404 Not Found\r\nContent-Length: 0", "upgrade answered"),
        ("garbage", "upgrade answered"),
        (
            "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: x\r\nSec-WebSocket-Protocol: media",
            "Sec-WebSocket-Accept",
        ),
        (f"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: {_ACCEPT}", "subprotocol None"),
    ],
)
def test_upgrade_answers_are_checked(head: str, error: str | None) -> None:
    if error is None:
        ws.check_upgrade(head.encode())
        return
    with pytest.raises(ws.HandshakeFailed, match=error):
        ws.check_upgrade(head.encode())


def _server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([0x80 | opcode, n]) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def test_server_frames_are_parsed_across_any_split() -> None:
    stream = b"".join(
        [
            _server_frame(ws.BINARY, frames.ulaw_payload(1)),
            _server_frame(ws.PING, b"p"),
            _server_frame(ws.BINARY, bytes(70000)),
            _server_frame(ws.TEXT, b""),
        ]
    )
    expected = [
        (ws.BINARY, frames.ulaw_payload(1)),
        (ws.PING, b"p"),
        (ws.BINARY, bytes(70000)),
        (ws.TEXT, b""),
    ]
    for step in (1, 3, 163, len(stream)):
        decoder = ws.ServerFrames()
        got = []
        for at in range(0, len(stream), step):
            got += decoder.feed(stream[at : at + step])
        assert got == expected, step


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x82, 0x80 | 2]) + b"abcdef",  # masked
        bytes([0x02, 2]) + b"ab",  # not final
        bytes([0xC2, 2]) + b"ab",  # reserved bit
        struct.pack("!BBQ", 0x82, 127, 1 << 40),  # absurd length
    ],
)
def test_bad_server_frames_are_refused(data: bytes) -> None:
    with pytest.raises(ws.BadServerFrame):
        ws.ServerFrames().feed(data)


def test_websocket_transport_refuses_a_peer() -> None:
    with pytest.raises(SystemExit):
        parse(["run", "--transport", "websocket", "--peer", "x {port}"])
    assert parse(["run", "--transport", "wss"]).transport == "wss"


# -- echo tracking -------------------------------------------------------------------------------


def _tracker(
    hold_from: float = 0.0, hold_to: float = 100.0, lead: int | None = None
) -> tuple[EchoTracker, dict]:
    arrays = {k: array("d") for k in ("intervals", "latencies", "early", "late")}
    return EchoTracker(hold_from, hold_to, **arrays, lead=lead), arrays


def test_clean_echo_counts_nothing_bad() -> None:
    t, a = _tracker()
    for i in range(1, 6):
        assert t.sent(i * 0.02) == i
        t.received(i, i * 0.02 + 0.005)
    t.finish()
    assert (t.echoed, t.lost, t.duplicated, t.corrupt, t.underruns) == (5, 0, 0, 0, 0)
    assert list(a["latencies"]) == pytest.approx([0.005] * 5)
    assert list(a["intervals"]) == pytest.approx([0.0] * 4, abs=1e-9)
    assert t.first_echo_at == pytest.approx(0.025)


@pytest.mark.parametrize(
    ("returned", "lost", "duplicated", "corrupt", "underruns"),
    [
        ([1, 2, 3, 4], 0, 0, 0, 0),
        ([1, 3, 4], 1, 0, 0, 0),  # a gap is loss
        ([1, 2], 2, 0, 0, 0),  # never echoed by the end is loss
        ([1, 2, 2, 3, 4], 0, 1, 0, 0),
        ([1, 2, frames.IS_CORRUPT, 3, 4], 0, 0, 1, 0),
        ([1, 9, 2, 3, 4], 0, 0, 1, 0),  # a frame never sent
        ([1, 0, 0, 2, 3, 0, 4], 0, 0, 0, 2),  # silence between echoes: two gaps
        ([0, 0, 1, 2, 3, 4, 0, 0], 0, 0, 0, 0),  # silence before and after is not a gap
    ],
)
def test_tracker_judges_each_returned_frame(
    returned: list[int], lost: int, duplicated: int, corrupt: int, underruns: int
) -> None:
    t, _ = _tracker()
    for i in range(4):
        t.sent(i * 0.02)
    for n, ident in enumerate(returned):
        t.received(ident, 0.01 + n * 0.02)
    t.finish()
    assert (t.lost, t.duplicated, t.corrupt, t.underruns) == (lost, duplicated, corrupt, underruns)


@pytest.mark.parametrize(
    ("arrivals_ms", "errors_ms", "underruns"),
    [
        ([0, 20, 40, 60], [0, 0, 0], 0),  # steady
        ([0, 0.1, 0.2, 0.3, 20.3, 40], [0, 0.3], 0),  # the lead burst at the start
        ([0, 0.1, 0.2, 0.3, 0.4, 20.4], [19.9, 0], 0),  # a fourth frame at once is not lead
        ([0, 20, 80, 80.1, 80.2, 80.3, 100.3], [0, 0, 0], 1),  # silence, lead again
        ([0, 20, 75, 95], [0, 5, 0], 1),  # silence off the tick grid
        ([0, 20, 45, 65], [0, 5, 0], 0),  # late, not silence (<= 1.5 frames)
        ([0, 20, 21, 40], [0, 19, 1], 0),  # two in a tick after the lead: sampled
    ],
)
def test_websocket_intervals_allow_for_silence_and_lead(
    arrivals_ms: list[float], errors_ms: list[float], underruns: int
) -> None:
    t, a = _tracker(lead=3)
    for n, at in enumerate(arrivals_ms, 1):
        t.sent(at / 1000 - 0.001)
        t.received(n, at / 1000)
    t.finish()
    assert [round(e * 1000, 6) for e in a["intervals"]] == pytest.approx(errors_ms)
    assert (t.underruns, t.lost, t.echoed) == (underruns, 0, len(arrivals_ms))


def test_only_the_hold_window_is_sampled() -> None:
    t, a = _tracker(hold_from=1.0, hold_to=3.0)
    times = [0.5, 1.5, 2.5, 3.5]
    for at in times:
        t.sent(at)
    for seq, at in enumerate(times, 1):
        t.received(seq, at + 0.01)
    assert list(a["latencies"]) == pytest.approx([0.01, 0.01])
    assert list(a["early"]) == pytest.approx([0.01])  # sent in [1, 2)
    assert list(a["late"]) == pytest.approx([0.01])  # sent in [2, 3)
    assert list(a["intervals"]) == pytest.approx([0.98, 0.98])  # arrivals 1.51 and 2.51


# -- statistics and the bar ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        (list(map(float, range(1, 101))), 99, 99.0),
        (list(map(float, range(1, 101))), 100, 100.0),
        ([5.0], 0, 5.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_percentile_of_nothing_is_nan_and_bad_q_is_refused() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match=r"percentile must be 0\.\.100"):
        percentile([1.0], 101)
    assert spread_ms([0.001, 0.002], 50, 100) == {"p50": 1.0, "max": 2.0}


def _metrics(**over: object) -> dict:
    m = {
        "calls_failed": 0,
        "frames_lost": 0,
        "underruns_daemon": 0,
        "underruns_client": 0,
        "interval_error_ms": {"p99": 1.5},
    }
    m.update(over)
    return m


@pytest.mark.parametrize(
    ("over", "passes"),
    [
        ({}, True),
        ({"interval_error_ms": {"p99": 2.0}}, True),
        ({"interval_error_ms": {"p99": 2.01}}, False),
        ({"interval_error_ms": {"p99": math.nan}}, False),
        ({"frames_lost": 1}, False),
        ({"underruns_daemon": 1}, False),
        ({"underruns_daemon": None, "underruns_client": 1}, False),
        ({"underruns_daemon": 0, "underruns_client": 3}, True),  # the daemon's view wins
        ({"calls_failed": 1}, False),
    ],
)
def test_quality_bar(over: dict, passes: bool) -> None:
    assert meets_bar(_metrics(**over)) is passes


def test_table_has_a_column_per_run_and_marks_missing_figures() -> None:
    table = format_table({"a": {"calls": 3, "meets_bar": True}, "b": {"calls": 4}})
    header, rule, *rows = table.splitlines()
    assert header.split() == ["metric", "a", "b"]
    assert set(rule) <= {"-", " "}
    assert rows[0].split() == ["calls", "3", "4"]
    assert rows[-1].split()[-2:] == ["PASS", "-"]


# -- HTTP, logs, /proc -----------------------------------------------------------------------------


def test_registration_request_is_curl_like_and_replies_parse() -> None:
    request = registration_request("echo", "bench1", "k" * 12)
    assert request.startswith(b"GET /v1/talk/asterisk/call/echo?from=bench1 HTTP/1.1\r\n")
    assert b"\r\nX-Api-Key: kkkkkkkkkkkk\r\n\r\n" in request
    assert parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab") == (200, b"ab")
    assert parse_reply(b"HTTP/1.1 401 Unauthorized\r\n\r\n") == (401, b"")
    assert parse_reply(b"garbage") == (0, b"")
    assert parse_reply(b"") == (0, b"")


def test_daemon_call_lines_are_summed() -> None:
    log = (
        b"x [rapida_tap.media.bridge.MediaBridge#info] call a ended: caller-hangup after 1.0s;"
        b" assistant=echo caller='1' transport=audiosocket frames_in=50 frames_out=49"
        b" underruns=2\n"
        b"x call b started: assistant=echo\n"
        b"x call c ended: idle-timeout (nothing) after 60.0s; assistant=echo caller='' "
        b"transport=audiosocket frames_in=0 frames_out=0 underruns=0\n"
    )
    assert daemon_call_counts(log) == (2, 49, 2)
    assert daemon_call_counts(b"") == (0, 0, 0)


def test_proc_readers_see_this_process() -> None:
    assert cpu_seconds(os.getpid()) > 0
    assert 1 < rss_mb(os.getpid()) < 10_000


# -- the harness itself, tiny and real -------------------------------------------------------------

LOAD_METRICS = {
    "calls",
    "calls_failed",
    "frames_sent",
    "frames_echoed",
    "frames_lost",
    "frames_bad",
    "underruns_daemon",
    "underruns_client",
    "interval_error_ms",
    "echo_latency_ms",
    "latency_drift_ms",
    "setup_ms",
    "server_cpu_seconds",
    "server_cpu_core_percent",
    "server_cpu_per_call_second",
    "server_rss_idle_mb",
    "server_rss_mb",
    "server_rss_per_call_mb",
    "client",
    "client_cpu_seconds",
    "client_cpu_core_percent",
    "client_cpu_hold_core_percent",
    "client_send_lag_ms",
    "host_timer_noise_ms",
    "meets_bar",
}


def _bench(tmp_path: Path, *args: str) -> tuple[str, object]:
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def _check_load(m: dict, calls: int, daemon: bool) -> None:
    assert LOAD_METRICS <= set(m), LOAD_METRICS - set(m)
    assert m["calls"] == calls
    assert m["calls_failed"] == 0, m["errors"]
    assert m["frames_sent"] > calls * 20  # a second of audio each, at least
    assert m["frames_lost"] == 0
    assert m["frames_bad"] == 0
    assert m["frames_echoed"] == m["frames_sent"]
    if daemon:
        assert m["daemon_calls_ended"] == calls
        assert isinstance(m["underruns_daemon"], int)
    else:
        assert m["underruns_daemon"] is None
    for key in ("interval_error_ms", "echo_latency_ms"):
        assert set(m[key]) == {"p50", "p99", "max"}
        assert all(isinstance(v, float) for v in m[key].values()), m[key]
    assert set(m["setup_ms"]) == {"p50", "p99"}
    assert m["echo_latency_ms"]["p50"] > 0
    assert m["server_rss_mb"] > 0
    assert m["client_cpu_seconds"] > 0
    assert isinstance(m["client_cpu_hold_core_percent"], float)  # not null: the hold was seen
    assert set(m["host_timer_noise_ms"]) == {"p50", "p99", "max"}
    assert set(m["client_send_lag_ms"]) == {"p99", "max"}
    assert all(isinstance(v, float) for v in m["client_send_lag_ms"].values())
    assert isinstance(m["meets_bar"], bool)


def test_compare_runs_the_same_tiny_load_on_the_daemon_and_a_peer(tmp_path: Path) -> None:
    peer = f"{sys.executable} -m bench.peers.asyncio_echo {{port}}"
    stdout, result = _bench(
        tmp_path,
        *("compare", "-n", "3", "--hold", "1", "--ramp", "50", "--workers", "2"),
        *("--core", "none", "--noise-probe", "0.2", "--pattern", "bursty", "--peer", peer),
    )
    assert isinstance(result, dict)
    _check_load(result["rapida"], 3, daemon=True)
    _check_load(result["peer"], 3, daemon=False)
    default = "c" if cclient.available() else "python"
    assert result["rapida"]["client"] == result["peer"]["client"] == default
    assert "interval err p99 ms" in stdout
    assert stdout.splitlines()[1].split() == ["metric", "rapida", "peer"]


@pytest.mark.parametrize(
    ("transport", "client"),
    [
        pytest.param("websocket", "c", marks=needs_gcc),
        pytest.param("wss", "c", marks=needs_tls),
        ("websocket", "python"),
        ("wss", "python"),
    ],
)
def test_a_tiny_websocket_load_loses_nothing_with_either_client(
    tmp_path: Path, transport: str, client: str
) -> None:
    stdout, result = _bench(
        tmp_path,
        *("run", "-n", "2", "--hold", "1", "--ramp", "50", "--workers", "2"),
        *("--core", "none", "--noise-probe", "0.2", "--transport", transport),
        *("--client", client, "--daemon-src", str(REPO)),  # before/after runs name a checkout
    )
    assert isinstance(result, dict)
    _check_load(result, 2, daemon=True)
    assert result["config"]["transport"] == transport
    assert result["client"] == client
    assert result["silence_frames"] == 0  # the daemon sends nothing during silence
    assert f"2 calls, {transport}, paced" in stdout


@pytest.mark.parametrize(
    ("client", "pattern"),
    [
        pytest.param("c", "paced", marks=needs_gcc),
        pytest.param("c", "jittered", marks=needs_gcc),
        ("python", "paced"),
    ],
)
def test_a_tiny_audiosocket_load_loses_nothing_with_either_client(
    tmp_path: Path, client: str, pattern: str
) -> None:
    stdout, result = _bench(
        tmp_path,
        *("run", "-n", "3", "--hold", "1", "--ramp", "50", "--workers", "2"),
        *("--core", "none", "--noise-probe", "0.2", "--client", client, "--pattern", pattern),
    )
    assert isinstance(result, dict)
    _check_load(result, 3, daemon=True)
    assert result["client"] == result["config"]["client"] == client
    assert result["client_processes"] == 2
    assert ["client", client] in [line.split() for line in stdout.splitlines()]


@pytest.mark.parametrize(
    "worker", [pytest.param(cclient.run_worker, marks=needs_gcc, id="c"), run_worker]
)
def test_both_clients_count_failed_connections_with_a_reason(
    worker: Callable[[WorkerPlan], dict[str, Any]],
) -> None:
    t0 = time.monotonic()
    plan = WorkerPlan(
        starts=(t0, t0),
        first_index=0,
        stop_at=t0 + 0.2,
        hold_from=t0,
        as_port=free_port(),  # nobody listens
        http_port=None,
        drain=0.0,
    )
    result = worker(plan)
    assert (result["calls"], result["failed"]) == (2, 2)
    assert result["errors"] == {"connect: ECONNREFUSED": 2}
    assert result["sent"] == result["lost"] == 0


class _ScriptedDaemon:
    """Registration over HTTP and a chan_websocket endpoint (TLS if ``tls_dir``), scripted.

    Registration answers ``from=benchN`` with context id ``UUID(int=N)``.  The endpoint records
    every byte each call sends (by context id), answers the upgrade, and then as ``script`` says:
    ``echo`` sends a text message and a ping, then echoes each binary message (the 2nd and 3rd
    together, in one message, as a server may); ``hangup`` / ``close`` / ``masked`` send a text
    ``HANGUP`` / a close 1011 / a masked frame after the third frame; ``bad-accept`` answers the
    upgrade with a wrong Sec-WebSocket-Accept; ``no-tls`` answers a plain HTTP 400 at once (to a
    client that speaks TLS).  Frames are coded here from RFC 6455.
    """

    def __init__(self, script: str, tls_dir: Path | None = None) -> None:
        self.script = script
        self.tls = None
        if tls_dir is not None:
            key, cert = lab_certificate(tls_dir)
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(cert, key)
        self.streams: dict[str, bytearray] = {}
        self._threads: list[threading.Thread] = []
        self.http_port, self._http = self._listen(self._register)
        self.ws_port, self._ws = self._listen(self._call)

    def close(self) -> None:
        """Stop listening; wait for each connection to end (the client's last bytes are in)."""
        self._http.close()
        self._ws.close()
        for thread in self._threads:
            thread.join(5)

    def _listen(self, handle: Callable[[socket.socket], None]) -> tuple[int, socket.socket]:
        listener = socket.create_server(("127.0.0.1", 0))

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                thread = threading.Thread(target=self._serve, args=(handle, conn), daemon=True)
                self._threads.append(thread)
                thread.start()

        threading.Thread(target=accept, daemon=True).start()
        return listener.getsockname()[1], listener

    @staticmethod
    def _serve(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
        with conn:
            try:
                handle(conn)
            except OSError:  # the client drops TCP at its end, as Asterisk does
                pass

    @staticmethod
    def _head(conn: socket.socket) -> tuple[bytes, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionResetError
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n", rest

    def _register(self, conn: socket.socket) -> None:
        head, _ = self._head(conn)
        index = int(head.split(b"from=bench")[1].split(b" ")[0])
        ctx = str(uuid.UUID(int=index)).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 36\r\n\r\n" + ctx)

    def _call(self, conn: socket.socket) -> None:
        if self.script == "no-tls":
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            while conn.recv(4096):
                pass
            return
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        head, data = self._head(conn)
        ctx = head.split(b"ctx=")[1].split(b" ")[0].decode()
        stream = self.streams[ctx] = bytearray(head)
        accept = "d3Jvbmc=" if self.script == "bad-accept" else ws.ACCEPT
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: media\r\n\r\n".encode()
        )
        if self.script == "echo":
            conn.sendall(_server_frame(ws.TEXT, b'{"event":"STATUS"}'))
            conn.sendall(_server_frame(ws.PING, b"p1"))
        audio, held, pending = 0, b"", b""
        while True:
            stream += data
            messages, pending = _client_frames(pending + data)
            for opcode, payload in messages:
                if opcode != ws.BINARY:
                    continue
                audio += 1
                if audio == 3 and self.script == "hangup":
                    conn.sendall(_server_frame(ws.TEXT, b'{"command":"HANGUP"}'))
                elif audio == 3 and self.script == "close":
                    conn.sendall(_server_frame(ws.CLOSE, b"\x03\xf3gone"))
                elif audio == 3 and self.script == "masked":
                    conn.sendall(bytes([0x82, 0x85]) + b"abcd" + b"12345")
                elif audio == 2:
                    held = payload
                else:
                    conn.sendall(_server_frame(ws.BINARY, held + payload))
                    held = b""
            data = conn.recv(65536)
            if not data:
                return


def _client_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole client frames at the start of ``data`` (unmasked), and what is left."""
    out = []
    while len(data) >= 2:
        n, head = data[1] & 0x7F, 2
        if n == 126:
            if len(data) < 4:
                break
            n, head = int.from_bytes(data[2:4], "big"), 4
        if len(data) < head + 4 + n:
            break
        out.append(_unmask_client_frame(data[: head + 4 + n]))
        data = data[head + 4 + n :]
    return out, data


def _raw_client_frames(data: bytes) -> list[bytes]:
    """``data`` cut into whole client frames, as sent."""
    out = []
    while data:
        n, head = data[1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        out.append(data[: head + 4 + n])
        data = data[head + 4 + n :]
    return out


_WORKERS = [
    pytest.param(cclient.run_worker, marks=needs_gcc, id="c"),
    pytest.param(run_worker, id="python"),
]


def _scripted_run(
    worker: Callable[[WorkerPlan], dict[str, Any]],
    daemon: _ScriptedDaemon,
    transport: str,
    drain: float = 1.0,
) -> dict[str, Any]:
    """Two calls of about a second (set-up included: this CPU may be shared) with ``worker``."""
    if worker is cclient.run_worker:
        cclient.binary()  # built before the calls' clock starts, as bench.load does
    t0 = time.monotonic()
    plan = WorkerPlan(
        starts=(t0, t0 + 0.01),
        first_index=5,
        stop_at=t0 + 1.0,
        hold_from=t0,
        as_port=free_port(),  # not used on WebSocket
        http_port=daemon.http_port,
        transport=transport,
        ws_port=daemon.ws_port,
        drain=drain,
    )
    return worker(plan)


@pytest.mark.parametrize("transport", ["websocket", "wss"])
@pytest.mark.parametrize("worker", _WORKERS)
def test_both_clients_send_chan_websockets_bytes_and_take_the_echo(
    tmp_path: Path, worker: Callable[[WorkerPlan], dict[str, Any]], transport: str
) -> None:
    if worker is cclient.run_worker and transport == "wss" and not cclient.tls_available():
        pytest.skip("the C client's wss needs OpenSSL's headers")
    daemon = _ScriptedDaemon("echo", tmp_path if transport == "wss" else None)
    try:
        result = _scripted_run(worker, daemon, transport)
    finally:
        daemon.close()
    assert (result["calls"], result["failed"]) == (2, 0), result["errors"]
    audio_frames = 0
    for index in (5, 6):
        ctx = str(uuid.UUID(int=index))
        stream = bytes(daemon.streams[ctx])
        upgrade = ws.upgrade_request(ws_path(ctx), f"127.0.0.1:{daemon.ws_port}")
        assert stream.startswith(upgrade)
        sent = _raw_client_frames(stream[len(upgrade) :])
        assert sent[0] == ws.media_start(ctx, index)
        assert sent[-1] == ws.close_frame(1000)  # the hang-up, after every frame
        assert sent.count(ws.client_frame(ws.PONG, b"p1")) == 1
        audio = [f for f in sent if _unmask_client_frame(f)[0] == ws.BINARY]
        assert audio == [ws.audio_frame(seq) for seq in range(1, len(audio) + 1)]
        assert len(sent) == len(audio) + 3  # nothing else
        audio_frames += len(audio)
    assert result["sent"] == result["echoed"] == audio_frames > 10
    assert result["lost"] == result["duplicated"] == result["corrupt"] == 0


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ("hangup", "server sent HANGUP"),
        ("close", "server closed the websocket: 1011 gone"),
        ("masked", "bad frame from server: frame header 0x82 0x85"),
        ("bad-accept", "websocket: wrong Sec-WebSocket-Accept"),
    ],
)
@pytest.mark.parametrize("worker", _WORKERS)
def test_both_clients_fail_a_websocket_call_alike(
    worker: Callable[[WorkerPlan], dict[str, Any]], script: str, error: str
) -> None:
    daemon = _ScriptedDaemon(script)
    try:
        result = _scripted_run(worker, daemon, "websocket", drain=0.1)
    finally:
        daemon.close()
    assert (result["calls"], result["failed"]) == (2, 2)
    assert result["errors"] == {error: 2}


@pytest.mark.parametrize(
    "worker", [pytest.param(cclient.run_worker, marks=needs_tls, id="c"), run_worker]
)
def test_both_clients_fail_a_wss_call_whose_server_speaks_no_tls(
    worker: Callable[[WorkerPlan], dict[str, Any]],
) -> None:
    daemon = _ScriptedDaemon("no-tls")
    try:
        result = _scripted_run(worker, daemon, "wss", drain=0.1)
    finally:
        daemon.close()
    assert result["failed"] == 2
    [(why, count)] = result["errors"].items()
    assert count == 2
    assert why.startswith("TLS: ") and "version number" in why.lower().replace("_", " "), why


def test_the_client_is_chosen_per_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(["run", "--transport", "websocket", "--client", "c"]).client == "c"
    assert cclient.choose("python", "wss") == "python"
    with pytest.raises(ValueError, match="client must be one of"):
        cclient.choose("rust", "audiosocket")
    with pytest.raises(ValueError, match="transport must be one of"):
        cclient.choose("c", "sip")
    # gcc and OpenSSL here: C everywhere
    monkeypatch.setattr(cclient, "available", lambda: True)
    monkeypatch.setattr(cclient, "tls_available", lambda: True)
    for transport in ("audiosocket", "websocket", "wss"):
        assert cclient.choose("auto", transport) == cclient.choose("c", transport) == "c"
    # gcc without OpenSSL's headers: C but for wss
    monkeypatch.setattr(cclient, "tls_available", lambda: False)
    assert cclient.choose("auto", "websocket") == "c"
    assert cclient.choose("auto", "wss") == "python"
    with pytest.raises(cclient.BuildFailed, match="libssl-dev"):
        cclient.choose("c", "wss")
    assert cclient.build_options() == (cclient.CFLAGS, ())
    # no gcc: Python everywhere
    monkeypatch.setattr(cclient, "available", lambda: False)
    assert cclient.choose("auto", "audiosocket") == "python"
    with pytest.raises(cclient.BuildFailed, match="gcc"):
        cclient.choose("c", "websocket")


@needs_gcc
def test_the_tls_probe_matches_whether_openssl_headers_are_here() -> None:
    cclient.tls_available.cache_clear()
    assert cclient.tls_available() is Path("/usr/include/openssl/ssl.h").exists()
    flags, libs = cclient.build_options()
    assert ("-DASLOAD_TLS" in flags) is ("-lssl" in libs) is cclient.tls_available()


def test_max_mode_prints_one_figure(tmp_path: Path) -> None:
    stdout, result = _bench(
        tmp_path,
        *("max", "--start", "2", "--steps", "1", "--hold", "1", "--ramp", "50"),
        *("--core", "none", "--noise-probe", "0"),
    )
    assert isinstance(result, dict)
    assert set(result["runs"]) == {"2"}
    _check_load(result["runs"]["2"], 2, daemon=True)
    assert result["max_calls"] in (0, 2)
    assert stdout.strip().splitlines()[-1].endswith(f": {result['max_calls']}")


def test_registration_mode_reports_rate_and_latency(tmp_path: Path) -> None:
    stdout, result = _bench(
        tmp_path, "reg", "--concurrency", "1,2", "--seconds", "0.5", "--core", "none"
    )
    assert isinstance(result, dict)
    rows = result["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert r["registrations"] > 0
        assert r["statuses"] == {"200": r["registrations"]}
        assert r["registrations_per_second"] > 0
        assert set(r["registration_latency_ms"]) == {"p50", "p99", "max"}
    assert "reg/s" in stdout


@pytest.mark.parametrize("transport", ["audiosocket", "websocket", "wss"])
def test_setup_mode_runs_each_call_to_its_end_and_reports_cpu_per_call(
    tmp_path: Path, transport: str
) -> None:
    stdout, result = _bench(
        tmp_path, "setup", "-n", "20", "--transport", transport, "--core", "none"
    )
    assert isinstance(result, dict)
    assert (result["transport"], result["calls"], result["calls_ended"]) == (transport, 20, 20)
    assert result["daemon_cpu_ms_per_call"] > 0  # 20 calls take several of the kernel's ticks
    assert f"20 {transport} calls one at a time (20 ended" in stdout


# -- the hostile-peer, drain and soak modes, tiny ------------------------------------------------


def test_flood_mode_measures_clean_calls_alone_and_during_bad_connections(
    tmp_path: Path,
) -> None:
    stdout, result = _bench(
        tmp_path, "flood", "-n", "2", "--bad", "300", "--hold", "1", "--core", "none", "--rate", "0"
    )
    assert isinstance(result, dict)
    assert set(result) == {"alone", "flood"}
    assert result["alone"]["bad"] is None
    assert result["flood"]["bad"]["opened"] == 300
    assert all(r["frames_lost"] == 0 and r["calls_failed"] == 0 for r in result.values())
    refused = result["flood"]["refused"]
    assert any("audiosocket" in name for name in refused), refused  # counted by the daemon
    assert "p99 interval error" in stdout


def test_slowloris_mode_reports_registrations_during_the_attack(tmp_path: Path) -> None:
    stdout, result = _bench(
        tmp_path, "slowloris", "--connections", "20", "--nofile", "128", "--seconds", "3"
    )
    assert isinstance(result, dict)
    assert result["registrations"] > 0
    assert result["answered_200"] == result["registrations"]
    assert result["attack"]["opened"] >= 20
    assert "registrations from another address" in stdout


def test_drain_mode_counts_calls_cut(tmp_path: Path) -> None:
    stdout, result = _bench(
        tmp_path,
        *("drain", "-n", "3", "--shortest", "1", "--longest", "3", "--sigterm-at", "0.5"),
        *("--second-sigterm-at", "2"),
    )
    assert isinstance(result, dict)
    assert result["calls"] == 3
    assert result["cut_by_daemon"] == 1  # the 3 s call, by the second SIGTERM
    assert result["cut_with_hangup_frame"] == 1
    assert result["daemon_exit_code"] == 0
    assert result["every_call_echoed"] is True
    assert "cut by the daemon" in stdout


def test_soak_mode_prints_rss_and_fds_and_a_summary(tmp_path: Path) -> None:
    stdout, result = _bench(
        tmp_path,
        *("soak", "-n", "2", "--minutes", "0.05", "--round", "1", "--every", "1"),
        *("--idle", "1", "--core", "none"),
    )
    assert isinstance(result, dict)
    assert result["rounds"] >= 1
    assert result["calls_failed"] == 0 and result["frames_lost"] == 0
    for key in ("rss_warm_idle_mb", "rss_idle_end_mb", "fds_idle_start", "fds_idle_end"):
        assert result[key] > 0, key
    assert "idle-end" in stdout and "RSS idle at end" in stdout
