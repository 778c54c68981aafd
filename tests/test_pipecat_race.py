"""``bench.pipecat_race``: its log reading, and a one-call run as documented, so it cannot rot.

The run checks that every figure is there and adds up, not how the race went: that is what the
bench reports (and what ``tests/test_pipecat.py`` demands).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pipecat_race import log_counts, parse

REPO = Path(__file__).resolve().parents[1]

LOG = b"""\
2026-12-05T08:44:44+0000 [AudioSocketProtocol,0,127.0.0.1] Unhandled Error
\tTraceback (most recent call last):
\t  File "x.py", line 1, in f
\tautobahn.exception.Disconnected: Attempt to send on a closed protocol
2026-12-05T08:44:44+0000 [rapida_tap.media.call.Call#critical] call 28: session close failed
\tTraceback (most recent call last):
2026-12-05T08:44:44+0000 [rapida_tap.x#error] something
2026-12-05T08:44:44+0000 [rapida_tap.media.bridge.MediaBridge#info] call 28 ended: caller-hangup \
after 0.7s; transport=audiosocket frames_in=37 frames_out=33 underruns=1
2026-12-05T08:44:45+0000 [rapida_tap.media.bridge.MediaBridge#info] call 29 ended: \
assistant-hangup (bot closed the stream (1000)) after 3.1s; transport=audiosocket
2026-12-05T08:44:46+0000 [rapida_tap.media.bridge.MediaBridge#info] call 30 ended: \
assistant-hangup after 3.0s; transport=audiosocket
"""


def test_log_counts_reads_reasons_and_trouble() -> None:
    assert log_counts(LOG) == {
        "end_reasons": {"assistant-hangup": 2, "caller-hangup": 1},
        "tracebacks": 2,
        "unhandled_errors": 1,
        "critical_lines": 1,
        "error_lines": 1,
    }
    assert log_counts(b"") == {
        "end_reasons": {},
        "tracebacks": 0,
        "unhandled_errors": 0,
        "critical_lines": 0,
        "error_lines": 0,
    }


def test_parse_refuses_an_unknown_transport(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--transport", "audiosocket,carrier-pigeon"])
    assert "unknown transport(s): carrier-pigeon" in capsys.readouterr().err
    assert parse([]).transports == ["audiosocket", "websocket"]


def test_one_call_per_transport(tmp_path: Path) -> None:
    out = tmp_path / "race.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.pipecat_race",
            "-n",
            "1",
            "--end-silence",
            "0",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"audiosocket", "websocket"}
    right = {"audiosocket": "0x00 then close", "websocket": "HANGUP then close 1000"}
    for transport, metrics in result.items():
        assert metrics["calls"] == 1
        assert sum(metrics["outcomes"].values()) == 1
        assert metrics["right_hangup"] == metrics["outcomes"].get(right[transport], 0)
        assert metrics["bot_ended_its_pipeline"] == 1
        assert sum(metrics["end_reasons"].values()) == 1
        for key in ("tracebacks", "unhandled_errors", "critical_lines", "error_lines"):
            assert isinstance(metrics[key], int)
    assert "right hangup toward Asterisk" in done.stdout
