"""The shipped files in etc/ agree with the code."""

import re
import tomllib
from pathlib import Path
from typing import Any

from rapida_tap.assistants.config import BOT_OPTIONS, CALL_OPTIONS, ECHO, parse_assistants
from rapida_tap.config import SCALARS, TABLES, Settings, build_settings
from rapida_tap.dialplan import SAMPLE_VALUES, audiosocket_dialplan
from rapida_tap.events.config import ENDPOINT_KEYS
from rapida_tap.providers import PROVIDER_KEYS

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
        for line in text.splitlines():
            if "/v1/talk/asterisk/call/${ASSISTANT_ID}" in line:
                assert "from=${URIENCODE(${CALLERID(num)})}" in line, (path, line)


def test_every_dialplan_line_belongs_to_a_context() -> None:
    """Asterisk refuses a setting before the first [category] ("No category context")."""
    for path in ETC.glob("extensions*.conf"):
        category = None
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.split(";", 1)[0].strip()
            if text.startswith("["):
                category = text
            elif text:
                assert category is not None, f"{path.name}:{number}: {line!r} before any [context]"


def test_every_dialplan_runs_the_transfer_steps_after_the_call() -> None:
    """After the media leg: ask …/next, dial it, report …/outcome, back to the bot on a new
    context id; the h extension reports a transfer the caller hung up on."""
    for path in ETC.glob("extensions*.conf"):
        text = "\n".join(line.split(";", 1)[0] for line in path.read_text().splitlines())
        legs = text.count("(talk),")
        assert legs >= 1, path
        assert text.count("/v1/talk/asterisk/call/${CTX}/next)") == legs, path
        assert text.count(" same => n,Dial(${NEXT})") == legs, path
        assert text.count("/outcome?dialstatus=${DIALSTATUS})") == 2 * legs, path
        assert text.count("GotoIf($[${LEN(${CTX})} = 36]?talk)") == legs, path
        assert text.count("exten => h,1,GotoIf($[${LEN(${RAPIDA_DIALLING})} != 36]?end)") == legs


def test_sample_config_is_valid() -> None:
    values = tomllib.loads((ETC / "rapida-asterisk.toml").read_text())
    build_settings(values, {}, {}, [])


# --- the sample configuration documents every setting ----------------------------------------

# A commented-out setting or table header: "# name = value", "# [providers.pbx1]".
_COMMENTED = re.compile(r"^# ?(\[[A-Za-z0-9_.\"-]+\](?:\s+#.*)?|[A-Za-z_][A-Za-z0-9_]* = .*)$")


def sample_uncommented() -> dict[str, Any]:
    """The sample with every commented-out setting put back: all the settings it documents."""
    lines = []
    for line in (ETC / "rapida-asterisk.toml").read_text().splitlines():
        match = _COMMENTED.match(line)
        lines.append(match.group(1) if match else line)
    return tomllib.loads("\n".join(lines))


def test_sample_config_lists_every_setting_the_daemon_knows() -> None:
    documented = sample_uncommented()
    top_level = {key for key, value in documented.items() if not isinstance(value, dict)}
    assert top_level == set(SCALARS) | {"api_keys"}
    assert set(documented) - top_level == set(TABLES)
    (provider,) = documented["providers"].values()
    assert set(provider) == set(PROVIDER_KEYS)
    listed = [t for name, t in documented["assistants"].items() if name != "default"]
    assert set().union(*listed) == BOT_OPTIONS | CALL_OPTIONS
    (endpoint,) = documented["webhooks"].values()
    assert set(endpoint) == set(ENDPOINT_KEYS)
    (own,) = documented["assistants"]["123456789"]["webhooks"].values()
    assert set(own) <= set(ENDPOINT_KEYS)


def test_sample_config_documents_each_setting_with_its_default() -> None:
    """A value shown uncommented in the sample is the embedded default, so the file changes
    nothing until it is edited."""
    values = tomllib.loads((ETC / "rapida-asterisk.toml").read_text())
    defaults = Settings()
    for key, value in values.items():
        assert getattr(defaults, key) == value, key


def test_sample_assistants_leave_unlisted_ids_to_a_404() -> None:
    """The sample must not set ``assistant``: with its [assistants."123456789"] table put back,
    an unlisted id is refused (docs/bots.md), not silently given the echo."""
    values = tomllib.loads((ETC / "rapida-asterisk.toml").read_text())
    assert "assistant" not in values
    assert parse_assistants({}, values.get("assistant", ""), {}).default == ECHO
    documented = sample_uncommented()["assistants"]["123456789"]
    documented.pop("ca_file")  # a file of the example machine, not of this one
    spec = parse_assistants(
        {"123456789": documented}, values.get("assistant", ""), {"SALES_BOT_TOKEN": "t"}
    )
    assert spec.default is None
    assert set(spec.by_id) == {"123456789"}


def test_the_key_rule_is_documented_where_keys_are_configured() -> None:
    rule = "8 to 256"
    assert rule in (ETC / "rapida-asterisk.toml").read_text()
    readme = (ETC.parent / "README.rst").read_text()
    assert "8 to 256 printable characters" in readme
