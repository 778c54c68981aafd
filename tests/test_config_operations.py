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
        ({"contexts": "rediss://h:6379/0"}, "--contexts: Redis URL must start with redis://"),
        ({"contexts": "redis://h:6379/x"}, "--contexts: Redis database must be a number"),
    ],
)
def test_bad_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_settings(values, {}, {}, [])


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
