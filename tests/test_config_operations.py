"""Operations settings: drain_timeout, metrics, api_keys_file (and their one-line errors)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rapida_tap import tap
from rapida_tap.config import ConfigError, Settings, build_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RAPIDA_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert (settings.drain_timeout, settings.metrics, settings.api_keys_file) == (0.0, "", "")


def test_api_keys_file_one_a_line_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text("# rotated 2025-01\nnew-key-0123456789\n\n  old-key-0123456789  \n")
    settings = build_settings({"api_keys_file": str(path)}, {}, {}, [])
    assert settings.api_keys == ["new-key-0123456789", "old-key-0123456789"]
    both = build_settings({}, {"RAPIDA_API_KEYS": "env-key-0123456789"}, {}, [])
    assert both.api_keys == ["env-key-0123456789"]
    added = build_settings(
        {}, {"RAPIDA_API_KEYS": "env-key-0123456789", "RAPIDA_API_KEYS_FILE": str(path)}, {}, []
    )
    assert added.api_keys == ["env-key-0123456789", "new-key-0123456789", "old-key-0123456789"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "api_keys_file: cannot read"),
        ("", "holds no key"),
        ("# only a comment\n\n", "holds no key"),
        ("short\n", "api_keys: each key must be 8 to 256"),
        (b"\xff\xfe\n", "is not UTF-8 text"),
    ],
)
def test_bad_api_keys_file(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "api-keys"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as caught:
        build_settings({}, {}, {"api_keys_file": str(path)}, [])
    if content == "short\n":
        assert "short" not in str(caught.value)  # a key is never echoed


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"drain_timeout": -1}, "drain_timeout: must be 0"),
        ({"drain_timeout": "soon"}, "drain_timeout: 'soon' is not a finite number"),
        ({"max_pending_per_address": 0}, "max_pending_per_address: must be at least 1"),
        ({"accept_rate": 0}, "accept_rate: must be greater than 0"),
        ({"accept_burst": 0}, "accept_burst: must be at least 1"),
        ({"http_max_connections": 0}, "http_max_connections: must be at least 1"),
        ({"http_head_timeout": -1}, "http_head_timeout: must be greater than 0"),
        ({"http_max_body": 2 * 1024 * 1024}, "http_max_body: must be between 0 and 1048576"),
        ({"http_max_body": 1.5}, "http_max_body: 1.5 is not a whole number"),
        ({"contexts": "rediss://h:6379/0"}, "--contexts: Redis URL must start with redis://"),
        ({"contexts": "redis://h:6379/x"}, "--contexts: Redis database must be a number"),
    ],
)
def test_bad_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings(values, {}, {}, [])


def test_limits_defaults_and_environment() -> None:
    settings = build_settings({}, {}, {}, [])
    assert (settings.max_pending_per_address, settings.accept_rate, settings.accept_burst) == (
        256,
        200.0,
        400,
    )
    assert (settings.http_max_connections, settings.http_head_timeout) == (10000, 10.0)
    assert settings.http_max_body == 65536
    env = {
        "RAPIDA_HTTP_HEAD_TIMEOUT": "2.5",
        "RAPIDA_ACCEPT_RATE": "50",
        "RAPIDA_HTTP_MAX_BODY": "0",
    }
    settings = build_settings({}, env, {}, [])
    assert (settings.http_head_timeout, settings.accept_rate, settings.http_max_body) == (
        2.5,
        50.0,
        0,
    )


def test_options(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("file-key-0123456789\n")
    options = tap.Options()
    options.parseOptions(
        ["--drain-timeout=5", "--metrics=tcp:9464:interface=127.0.0.1", f"--api-keys-file={path}"]
    )
    settings = options.settings
    assert settings is not None
    assert settings.drain_timeout == 5.0
    assert settings.metrics == "tcp:9464:interface=127.0.0.1"
    assert settings.api_keys == ["file-key-0123456789"]
    assert settings.api_key_generated is False


@pytest.mark.parametrize(
    ("args", "starts"),
    [
        (["--metrics", "nonsense:1"], "rapida-asterisk: --metrics: 'nonsense:1':"),
        (["--drain-timeout", "-3"], "rapida-asterisk: drain_timeout: must be 0"),
        (["--api-keys-file", "/nonexistent/keys"], "rapida-asterisk: api_keys_file: cannot read"),
        (["--http", "systemd:domain=INET:index=7"], "rapida-asterisk: --http: 'systemd:"),
    ],
)
def test_bad_options_exit_with_one_line(args: list[str], starts: str) -> None:
    with pytest.raises(SystemExit) as caught:
        tap.Options().parseOptions(args)
    message = str(caught.value.code)
    assert message.startswith(starts), message
    assert "\n" not in message
