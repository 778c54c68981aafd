"""Settings: defaults < TOML file < environment (RAPIDA_*) < command line, and clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from rapida_tap.config import ConfigError, Settings, build_settings, load_toml

SAMPLE = """\
audiosocket = "tcp:14573"
http = "tcp:18080"
context-ttl = 12.5
rate_burst = 7
api_keys = ["file-key-0001", "file-key-0002"]

[assistants.sales]
url = "wss://bot.example.com/sales"
"""


def build(
    file_values: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    cli: dict[str, Any] | None = None,
    cli_keys: list[str] | None = None,
) -> Settings:
    return build_settings(file_values or {}, environ or {}, cli or {}, cli_keys or [])


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "rapida-asterisk.toml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    settings = build()
    assert settings == Settings()
    assert settings.audiosocket == "tcp:4573"
    assert settings.http == "tcp:8080"
    assert settings.https == ""
    assert settings.assistant == ""  # not set: echo, unless [assistants] says otherwise
    assert settings.contexts == "memory"
    assert settings.api_keys == []
    assert settings.context_ttl == 30.0
    assert settings.api_key_generated is False


def test_toml_file_values(tmp_path: Path) -> None:
    settings = build(load_toml(write(tmp_path, SAMPLE)))
    assert settings.audiosocket == "tcp:14573"
    assert settings.http == "tcp:18080"
    assert settings.context_ttl == 12.5  # dashes in names are accepted
    assert settings.rate_burst == 7
    assert settings.api_keys == ["file-key-0001", "file-key-0002"]
    assert settings.assistants == {"sales": {"url": "wss://bot.example.com/sales"}}
    assert settings.idle_timeout == Settings().idle_timeout  # untouched settings keep defaults


def test_environment_overrides_file(tmp_path: Path) -> None:
    env = {
        "RAPIDA_HTTP": "tcp:28080",
        "RAPIDA_CONTEXT_TTL": "3",
        "RAPIDA_RATE_BURST": "9",
        "RAPIDA_API_KEYS": "env-key-0001",
        "RAPIDA_AUDIOSOCKET": "",  # empty: not set
        "OTHER_HTTP": "tcp:1",
    }
    settings = build(load_toml(write(tmp_path, SAMPLE)), env)
    assert settings.http == "tcp:28080"
    assert settings.context_ttl == 3.0
    assert settings.rate_burst == 9
    assert settings.api_keys == ["env-key-0001"]
    assert settings.audiosocket == "tcp:14573"


def test_command_line_overrides_environment(tmp_path: Path) -> None:
    env = {"RAPIDA_HTTP": "tcp:28080", "RAPIDA_CONTEXTS": "redis://r:6379/0"}
    cli = {"http": "tcp:38080", "contexts": None, "public_url": " https://rapida.example.com "}
    settings = build(load_toml(write(tmp_path, SAMPLE)), env, cli, ["cli-key-0001"])
    assert settings.http == "tcp:38080"
    assert settings.contexts == "redis://r:6379/0"  # None: not given on the command line
    assert settings.public_url == "https://rapida.example.com"  # stripped
    assert settings.api_keys == ["cli-key-0001"]


def test_api_keys_from_environment_are_a_comma_list() -> None:
    settings = build(environ={"RAPIDA_API_KEYS": " env-key-0001 , env-key-0002,,env-key-0003 "})
    assert settings.api_keys == ["env-key-0001", "env-key-0002", "env-key-0003"]


def test_repeated_command_line_keys_all_count() -> None:
    settings = build(
        cli_keys=["cli-key-0001", "cli-key-0002"], environ={"RAPIDA_API_KEYS": "e" * 9}
    )
    assert settings.api_keys == ["cli-key-0001", "cli-key-0002"]


def test_redis_and_websocket_urls_are_accepted() -> None:
    for contexts in ["redis://localhost:6379/0", "redis://:pw@redis.example.com:6380/1"]:
        assert build(cli={"contexts": contexts}).contexts == contexts
    for assistant in ["ws://127.0.0.1:9000/bot", "wss://bot.example.com/x"]:
        assert build(cli={"assistant": assistant}).assistant == assistant


def test_listeners_may_be_turned_off_but_not_all() -> None:
    settings = build(cli={"audiosocket": "", "https": "ssl:8443"})
    assert (settings.audiosocket, settings.http, settings.https) == ("", "tcp:8080", "ssl:8443")


BAD = [
    # (file values, environment, command line, the message starts with)
    ({"context_ttl": "soon"}, {}, {}, "context_ttl: 'soon' is not a finite number"),
    ({}, {"RAPIDA_CONTEXT_TTL": "abc"}, {}, "RAPIDA_CONTEXT_TTL: 'abc' is not a finite number"),
    ({}, {"RAPIDA_RATE_BURST": "2.5"}, {}, "RAPIDA_RATE_BURST: '2.5' is not a whole number"),
    ({"rate_burst": 2.5}, {}, {}, "rate_burst: 2.5 is not a whole number"),
    ({"rate_burst": float("inf")}, {}, {}, "rate_burst: inf is not a whole number"),
    ({"context_ttl": float("nan")}, {}, {}, "context_ttl: nan is not a finite number"),
    ({}, {"RAPIDA_CONTEXT_TTL": "nan"}, {}, "RAPIDA_CONTEXT_TTL: 'nan'"),
    ({}, {"RAPIDA_RATE_LIMIT": "inf"}, {}, "RAPIDA_RATE_LIMIT: 'inf'"),
    ({"rate_limit": True}, {}, {}, "rate_limit: True is not a finite number"),
    ({"context_ttl": -1}, {}, {}, "context_ttl: must be greater than 0"),
    ({"context_ttl": 0}, {}, {}, "context_ttl: must be greater than 0"),
    ({}, {"RAPIDA_ID_TIMEOUT": "-5"}, {}, "id_timeout: must be greater than 0"),
    ({"rate_limit": 0}, {}, {}, "rate_limit: must be greater than 0"),
    ({"idle_timeout": -0.5}, {}, {}, "idle_timeout: must be 0 (off) or more"),
    ({"rate_burst": 0}, {}, {}, "rate_burst: must be at least 1"),
    ({"max_connections": 0}, {}, {}, "max_connections: must be at least 1"),
    ({"max_audio_payload": 319}, {}, {}, "max_audio_payload: must be between 320 and 65535"),
    ({"max_audio_payload": 65536}, {}, {}, "max_audio_payload: must be between 320 and 65535"),
    ({"colour": "blue"}, {}, {}, "colour: unknown setting in the config file"),
    ({"api_key_generated": True}, {}, {}, "api_key_generated: unknown setting"),
    ({"http": 8080}, {}, {}, "http: must be a string"),
    ({"api_keys": "one-key-0001"}, {}, {}, "api_keys: must be a list of strings"),
    ({"api_keys": ["short"]}, {}, {}, "api_keys: each key must be 8 to 256"),
    ({}, {"RAPIDA_API_KEYS": "has space 123"}, {}, "api_keys: each key must be 8 to 256"),
    ({"api_keys": ["k" * 257]}, {}, {}, "api_keys: each key must be 8 to 256"),
    ({"assistants": {"sales": "wss://x"}}, {}, {}, "assistants: must be a table of tables"),
    ({"providers": []}, {}, {}, "providers: must be a table of tables"),
    ({}, {}, {"contexts": "mysql://db"}, "--contexts: 'mysql://db' is neither"),
    ({"contexts": "redis:/oops"}, {}, {}, "--contexts: 'redis:/oops' is neither"),
    ({}, {}, {"assistant": "http://bot"}, "--assistant: 'http://bot' is neither"),
    ({}, {"RAPIDA_ASSISTANT": "Echo"}, {}, "--assistant: 'Echo' is neither"),
    ({}, {}, {"public_url": "ftp://host"}, "--public-url: 'ftp://host' is not an http(s)"),
    ({}, {}, {"public_url": "https://"}, "--public-url: 'https://' is not an http(s)"),
    ({}, {}, {"public_url": "rapida.example.com"}, "--public-url:"),
    (
        {},
        {},
        {"audiosocket": "", "http": "", "https": ""},
        "--audiosocket/--http/--https: at least one listener",
    ),
]


@pytest.mark.parametrize(("file_values", "environ", "cli", "message"), BAD)
def test_bad_values_name_the_setting(
    file_values: dict[str, Any], environ: dict[str, str], cli: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build(file_values, environ, cli)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, 'http = "tcp:8080\n')
    with pytest.raises(ConfigError) as caught:
        load_toml(path)
    assert str(caught.value).startswith(f"--config: {path} is not valid TOML:")


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as caught:
        load_toml(path)
    assert str(caught.value) == f"--config: cannot read {path}: No such file or directory"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_toml(str(tmp_path))
    assert str(caught.value).startswith(f"--config: cannot read {tmp_path}:")


def test_build_does_not_share_mutable_state() -> None:
    first = build(cli_keys=["cli-key-0001"])
    first.api_keys.append("x")
    assert build().api_keys == []
    assert dataclasses.asdict(build()) == dataclasses.asdict(Settings())
