"""Webhook endpoints and recording options: what is accepted, and the one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rapida_tap.assistants.config import ECHO, parse_assistants
from rapida_tap.config import ConfigError, build_settings
from rapida_tap.events.config import parse_events
from rapida_tap.events.webhooks import CALL_ENDED, EVENT_TYPES
from tests.test_startup_errors import assert_one_line, run_daemon, write
from tests.webhook_receiver import new_secret

SECRET = new_secret()
ENV = {"HOOK_SECRET": SECRET}


def endpoint(**extra: Any) -> dict[str, Any]:
    return {"url": "https://hooks.example.com/x", "secret_env": "HOOK_SECRET", **extra}


def test_global_and_per_assistant_endpoints() -> None:
    spec = parse_events(
        {"ops": endpoint()},
        {
            "sales": {
                "url": "echo",
                "record": True,
                "webhooks": {"crm": endpoint(events=[CALL_ENDED])},
            },
            "default": {"url": "echo", "webhooks": {"all": endpoint(timeout=2)}},
        },
        ENV,
    )
    (ops,) = spec.endpoints
    assert (ops.name, ops.url, ops.secret, ops.events, ops.timeout) == (
        "ops", "https://hooks.example.com/x", SECRET, EVENT_TYPES, 10.0
    )  # fmt: skip
    assert [e.name for e in spec.endpoints_for("sales")] == ["ops", "crm"]
    assert spec.of("sales").endpoints[0].events == {CALL_ENDED}
    assert [e.name for e in spec.endpoints_for("unlisted")] == ["ops", "all"]
    assert spec.of("sales").record and not spec.of("unlisted").record
    assert spec.records_any
    assert "secret" not in repr(ops) and SECRET not in repr(ops)


def test_a_secret_from_a_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text(SECRET + "\n")
    table = {"url": "http://127.0.0.1:9/", "secret_credential": "hook"}
    spec = parse_events({"ops": table}, {}, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert spec.endpoints[0].secret == SECRET


def test_a_secret_without_its_prefix_is_accepted() -> None:
    spec = parse_events({"ops": endpoint()}, {}, {"HOOK_SECRET": SECRET.removeprefix("whsec_")})
    assert spec.endpoints[0].secret == SECRET


@pytest.mark.parametrize(
    ("table", "env", "message"),
    [
        (endpoint(secret="x"), ENV, "webhooks.ops.secret: keep the secret out of the config file"),
        (endpoint(secret_credential="c"), ENV, "webhooks.ops: set exactly one of secret_env"),
        ({"url": "https://h/"}, ENV, "webhooks.ops: set exactly one of secret_env"),
        (endpoint(), {}, "webhooks.ops.secret_env: the environment variable HOOK_SECRET is not"),
        (endpoint(), {"HOOK_SECRET": "whsec_c2hvcnQ="}, "webhooks.ops.secret_env: the secret must"),
        (endpoint(), {"HOOK_SECRET": "whsec_%%%"}, "webhooks.ops.secret_env: the secret must"),
        (endpoint(secret_env="1BAD"), ENV, "webhooks.ops.secret_env: '1BAD' is not a variable"),
        (
            {"url": "https://h/", "secret_credential": "../x"},
            ENV,
            "webhooks.ops.secret_credential: '../x' is not a credential name",
        ),
        (
            {"url": "https://h/", "secret_credential": "x"},
            ENV,
            "webhooks.ops.secret_credential: $CREDENTIALS_DIRECTORY is not set",
        ),
        (endpoint(url="ftp://h/"), ENV, "webhooks.ops.url: required: an http:// or https://"),
        ({"secret_env": "HOOK_SECRET"}, ENV, "webhooks.ops.url: required"),
        (endpoint(events=[]), ENV, "webhooks.ops.events: a non-empty list"),
        (endpoint(events=["call.ringing"]), ENV, "webhooks.ops.events: unknown event type"),
        (endpoint(timeout=0), ENV, "webhooks.ops.timeout: seconds, more than 0"),
        (endpoint(timeout=True), ENV, "webhooks.ops.timeout: seconds"),
        (endpoint(retries=3), ENV, "webhooks.ops.retries: unknown setting"),
    ],
)
def test_bad_endpoints(table: dict[str, Any], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_events({"ops": table}, {}, env)
    assert str(e.value).startswith(message), e.value
    assert SECRET not in str(e.value)


@pytest.mark.parametrize(
    ("webhooks", "assistants", "message"),
    [
        ({"bad name": endpoint()}, {}, "webhooks.bad name: an endpoint name is"),
        ({"ops": "https://h/"}, {}, "webhooks: must be a table of tables"),
        ({}, {"a": {"url": "echo", "record": "yes"}}, "assistants.a.record: must be true or false"),
        ({}, {"a": {"url": "echo", "webhooks": []}}, "assistants.a.webhooks: must be a table"),
        (
            {},
            {"a": {"url": "echo", "webhooks": {"x": {"url": "https://h/"}}}},
            "assistants.a.webhooks.x: set exactly one of secret_env",
        ),
    ],
)
def test_bad_event_options(webhooks: Any, assistants: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_events(webhooks, assistants, ENV)
    assert str(e.value).startswith(message), e.value


def test_the_echo_assistant_takes_the_call_options_too() -> None:
    table = {"url": "echo", "record": True, "webhooks": {"x": endpoint()}}
    assert parse_assistants({"a": table}, "", ENV).by_id["a"] == ECHO


def test_settings_validate_the_events_at_once() -> None:
    with pytest.raises(ConfigError, match=r"^webhooks\.ops\.secret_env: the environment"):
        build_settings({"webhooks": {"ops": endpoint()}}, {}, {}, [])
    with pytest.raises(ConfigError, match=r"^recording_name: must contain \{context_id\}"):
        build_settings({"recording_name": "x.wav"}, {}, {}, [])
    with pytest.raises(ConfigError, match=r"^webhook_max_pending: must be at least 1"):
        build_settings({"webhook_max_pending": 0}, {}, {}, [])
    settings = build_settings({"webhooks": {"ops": endpoint()}}, ENV, {}, [])
    assert settings.webhooks == {"ops": endpoint()}


def test_a_webhook_without_its_secret_stops_start_up_with_one_line(tmp_path: Path) -> None:
    config = write(
        tmp_path / "r.toml",
        '[webhooks.ops]\nurl = "https://hooks.example.com/x"\nsecret_env = "UNSET_HOOK_SECRET"\n',
    )
    result = run_daemon(tmp_path, f"--config={config}")
    assert_one_line(
        result,
        "rapida-asterisk: webhooks.ops.secret_env: the environment variable UNSET_HOOK_SECRET",
    )
