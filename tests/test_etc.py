"""The shipped files in etc/ agree with the code."""

import tomllib
from pathlib import Path

from rapida_tap.config import build_settings
from rapida_tap.dialplan import SAMPLE_VALUES, audiosocket_dialplan

ETC = Path(__file__).resolve().parents[1] / "etc"


def test_audiosocket_dialplan_is_the_one_printed_at_start_up() -> None:
    shipped = (ETC / "extensions-audiosocket.conf").read_text()
    assert audiosocket_dialplan(**SAMPLE_VALUES) in shipped


def test_dialplans_avoid_what_real_asterisk_rejects_or_runs_unsafely() -> None:
    for path in ETC.glob("extensions*.conf"):
        text = "\n".join(line.split(";", 1)[0] for line in path.read_text().splitlines())
        assert "CHANNEL(audioreadformat)" not in text, path
        assert 'GotoIf($["${CTX}" = ""]' not in text, path
        assert "WebSocket(" not in text.replace("Dial(WebSocket/", ""), path
        if "CURL(" in text:
            assert "LEN(${CTX})} != 36" in text, path
            assert "CURLOPT(httptimeout)" in text, path
            assert "URIENCODE(${CALLERID(num)})" in text, path


def test_sample_config_is_valid() -> None:
    values = tomllib.loads((ETC / "rapida-asterisk.toml").read_text())
    build_settings(values, {}, {}, [])
