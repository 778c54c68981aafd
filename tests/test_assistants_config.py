"""The [assistants] table and --assistant: what they mean, and every bad value's clear error."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task

from rapida_tap.assistants.bot_client import UpstreamAssistant
from rapida_tap.assistants.config import (
    ECHO,
    BotSpec,
    build_registry,
    expand,
    parse_assistants,
    redacted_url,
)
from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.config import ConfigError, build_settings

ENV = {"BOT_TOKEN": "s3cret", "HOST": "bot.example"}
URL = "wss://bot.example/stream"


def parse(table: dict[str, Any], default_url: str = "", env: dict[str, str] = ENV) -> Any:
    return parse_assistants(table, default_url, env)


def test_nothing_configured_is_echo_for_every_id() -> None:
    spec = parse({})
    assert spec.by_id == {} and spec.default == ECHO
    assert spec.describe() == "echo"


def test_assistant_setting_is_the_default() -> None:
    spec = parse({}, default_url=URL)
    assert spec.default == BotSpec(url=URL)
    assert parse({}, default_url="echo").default == ECHO


def test_a_map_without_default_refuses_unlisted_ids() -> None:
    spec = parse({"123456789": {"url": URL}, "support": {"url": "echo"}})
    assert spec.default is None
    assert spec.by_id["support"] == ECHO
    registry = build_registry(spec, task.Clock())
    assert isinstance(registry.lookup("123456789"), UpstreamAssistant)
    assert isinstance(registry.lookup("support"), EchoAssistant)
    assert registry.lookup("987") is None and "987" not in registry
    assert spec.describe() == "2 mapped, default none (unlisted ids: 404)"


def test_default_table_and_the_command_line_url() -> None:
    table = {
        "default": {"url": URL, "headers": {"Authorization": "Bearer ${BOT_TOKEN}"}},
        "1": {"url": "echo"},
    }
    assert parse(table).default == BotSpec(url=URL, headers={"Authorization": "Bearer s3cret"})
    # --assistant replaces the default's url and keeps its other options.
    other = parse(table, default_url="ws://127.0.0.1:9000/x").default
    assert other.url == "ws://127.0.0.1:9000/x"
    assert other.headers == {"Authorization": "Bearer s3cret"}
    assert parse(table).describe() == "1 mapped, default wss://bot.example/stream"


def test_full_spec() -> None:
    spec = parse(
        {
            "a": {
                "url": "wss://${HOST}/stream?token=${BOT_TOKEN}",
                "headers": {"X-Price": "$$5"},
                "parameters": {"language": "de"},
                "connect_timeout": 2,
                "on_failure": "continue",
                "account_sid": "AC1",
            }
        }
    ).by_id["a"]
    assert spec == BotSpec(
        url="wss://bot.example/stream?token=s3cret",
        headers={"X-Price": "$5"},
        parameters={"language": "de"},
        connect_timeout=2.0,
        on_failure="continue",
        account_sid="AC1",
    )
    assert spec.name == "wss://bot.example/stream"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("wss://user:pw@bot.example:8443/s?token=x#f", "wss://bot.example:8443/s"),
        ("ws://[::1]:9000/s", "ws://[::1]:9000/s"),
        ("ws://h:notaport/s", "ws://h/s"),
    ],
)
def test_redacted_url(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_expand() -> None:
    assert expand("a${BOT_TOKEN}b$$c", ENV, "x") == "as3cretb$c"
    with pytest.raises(ConfigError, match=r"^x: environment variable NOPE is not set$"):
        expand("${NOPE}", ENV, "x")
    with pytest.raises(ConfigError, match=r"^x: a lone '\$'"):
        expand("5$", ENV, "x")


BAD = [
    ({"bad id!": {"url": URL}}, r"^assistants\.bad id!: an assistant id is 1-64"),
    ({"a": "wss://x"}, r"^assistants\.a: must be a table"),
    ({"a": {}}, r"^assistants\.a\.url: required"),
    ({"a": {"url": 5}}, r"^assistants\.a\.url: required"),
    ({"a": {"url": URL, "token": "x"}}, r"^assistants\.a: unknown option 'token'"),
    ({"a": {"url": "https://bot.example/"}}, r"^assistants\.a\.url: 'https://bot\.example/'"),
    ({"a": {"url": "wss:///path"}}, r"^assistants\.a\.url: .* neither 'echo' nor"),
    ({"a": {"url": "wss://h:99999/"}}, r"^assistants\.a\.url: .* not a valid URL"),
    ({"a": {"url": "wss://h:0/"}}, r"^assistants\.a\.url: port 0"),
    ({"a": {"url": "wss://h/#x"}}, r"^assistants\.a\.url: a WebSocket URL has no #fragment"),
    ({"a": {"url": "wss://${NOPE}/"}}, r"^assistants\.a\.url: environment variable NOPE"),
    ({"a": {"url": "echo", "headers": {}}}, r"^assistants\.a\.headers: the echo assistant"),
    ({"a": {"url": URL, "headers": "x"}}, r"^assistants\.a\.headers: must be a table"),
    ({"a": {"url": URL, "headers": {"X": 1}}}, r"^assistants\.a\.headers\.X: must be a string"),
    ({"a": {"url": URL, "headers": {"Bad Name": "v"}}}, r"not a valid header name"),
    ({"a": {"url": URL, "headers": {"Host": "v"}}}, r"headers\.Host: set by the WebSocket"),
    ({"a": {"url": URL, "headers": {"Sec-WebSocket-Key": "v"}}}, r"set by the WebSocket"),
    ({"a": {"url": URL, "headers": {"X": "${NOPE}"}}}, r"headers\.X: environment variable NOPE"),
    ({"a": {"url": URL, "parameters": {"k": 1}}}, r"^assistants\.a\.parameters\.k: must be"),
    ({"a": {"url": URL, "parameters": {"caller": "x"}}}, r"parameters\.caller: filled in by"),
    ({"a": {"url": URL, "connect_timeout": 0}}, r"connect_timeout: seconds, more than 0"),
    ({"a": {"url": URL, "connect_timeout": 61}}, r"connect_timeout: seconds"),
    ({"a": {"url": URL, "connect_timeout": "5"}}, r"connect_timeout: seconds"),
    ({"a": {"url": URL, "connect_timeout": True}}, r"connect_timeout: seconds"),
    ({"a": {"url": URL, "on_failure": "retry"}}, r"on_failure: 'retry' is not 'hangup' or"),
    ({"a": {"url": "ws://h/", "ca_file": "/etc/hosts"}}, r"ca_file: only for a wss:// URL"),
    ({"a": {"url": URL, "ca_file": "/nonexistent/ca.pem"}}, r"ca_file: cannot read"),
    ({"a": {"url": URL, "ca_file": 3}}, r"ca_file: must be the path"),
    ({"a": {"url": URL, "account_sid": ""}}, r"account_sid: 1-64 of \[A-Za-z0-9._-\]"),
    ({"a": {"url": URL, "account_sid": "AC 1/x"}}, r"account_sid: 1-64 of .*part of a URL"),
    ({"a": {"url": URL, "transfer_endpoint": "PJSIP/{number}"}}, r"a.transfer_endpoint: .*number"),
    ({"a": {"url": URL, "transfer_endpoint": "PJSIP/trunk"}}, r"transfer_endpoint: .*contain {to}"),
    ({"a": {"url": URL, "transfer_sip_endpoint": "PJSIP/{to}"}}, r"transfer_sip_endpoint: .*{to}"),
    ({"a": {"url": URL, "transfer_fallback": "yes"}}, r"transfer_fallback: must be true or false"),
    ({"default": {"url": "ftp://x"}}, r"^assistants\.default\.url:"),
    ({"a": {"url": URL, "protocol": "vonage"}}, r"^assistants\.a\.protocol: 'vonage' is not one"),
    ({"a": {"url": URL, "protocol": 5}}, r"^assistants\.a\.protocol: '5' is not one of 'twilio'"),
    (
        {"a": {"url": URL, "sample_rate": 16000}},
        r"^assistants\.a: protocol 'twilio' carries mulaw/8000, not 16000 \(set encoding",
    ),
    (
        {"a": {"url": URL, "protocol": "plivo", "encoding": "alaw"}},
        r"^assistants\.a: protocol 'plivo' carries mulaw/8000, l16/16000, l16/8000, not alaw",
    ),
    (
        {"a": {"url": URL, "protocol": "exotel", "encoding": "l16", "sample_rate": 48000}},
        r"protocol 'exotel' carries l16/8000, l16/16000, l16/24000, not l16/48000",
    ),
    ({"a": {"url": URL, "encoding": 1}}, r"^assistants\.a\.encoding: 'mulaw', 'alaw' or 'l16'"),
    ({"a": {"url": URL, "sample_rate": "16k"}}, r"^assistants\.a\.sample_rate: a whole number"),
    ({"a": {"url": URL, "sample_rate": True}}, r"^assistants\.a\.sample_rate: a whole number"),
]


@pytest.mark.parametrize(
    ("options", "protocol", "label"),
    [
        ({}, "twilio", "mulaw/8000"),
        ({"protocol": "telnyx"}, "telnyx", "mulaw/8000"),
        ({"protocol": "telnyx", "encoding": "L16"}, "telnyx", "l16/16000"),
        ({"protocol": "plivo", "sample_rate": 16000}, "plivo", "l16/16000"),
        ({"protocol": "exotel"}, "exotel", "l16/8000"),
        ({"protocol": "exotel", "sample_rate": 24000}, "exotel", "l16/24000"),
    ],
)
def test_protocol_and_audio(options: dict[str, Any], protocol: str, label: str) -> None:
    spec = parse({"a": {"url": URL, **options}}).by_id["a"]
    assert (spec.protocol, spec.audio.label) == (protocol, label)
    assistant = UpstreamAssistant(spec, task.Clock())
    assert assistant.sample_rate == spec.audio.rate


@pytest.mark.parametrize(("table", "error"), BAD)
def test_bad_tables(table: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse(table)


def test_a_header_value_with_a_line_break_from_the_environment() -> None:
    with pytest.raises(ConfigError, match=r"headers\.X: the value has a line break or NUL"):
        parse({"a": {"url": URL, "headers": {"X": "${EVIL}"}}}, env={"EVIL": "a\r\nHost: x"})


def test_errors_never_show_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"a": {"url": "wss://u:pw@h:99999/s?token=${BOT_TOKEN}"}})
    assert "s3cret" not in str(info.value) and "pw" not in str(info.value)


def test_bad_assistant_setting_from_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^--assistant: 'http://x' is neither"):
        build_settings({}, {}, {"assistant": "http://x"}, [])
    with pytest.raises(ConfigError, match=r"^--assistant: 'wss:///x' is neither"):
        parse({}, default_url="wss:///x")


def test_start_up_fails_on_a_missing_token() -> None:
    file_values = {"assistants": {"1": {"url": URL, "headers": {"Authorization": "${T}"}}}}
    with pytest.raises(
        ConfigError, match=r"^assistants\.1\.headers\.Authorization: environment variable T is"
    ):
        build_settings(file_values, {}, {}, [])
    settings = build_settings(file_values, {"T": "x"}, {}, [])
    assert settings.assistants == file_values["assistants"]
