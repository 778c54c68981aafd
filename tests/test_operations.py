"""Operations: the systemd units, socket activation endpoints, JSON logs, and a real twistd
process that drains on SIGTERM and exits 0."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.application import strports
from twisted.internet import defer, endpoints, error, reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import TestCase

from rapida_tap.config import ConfigError, Settings
from rapida_tap.listeners import check_listener
from rapida_tap.logs import event_as_json, json_logger, log_line
from rapida_tap.node import Daemon
from tests.redis_server import free_port
from tests.support import (
    API_KEY,
    FakeAsterisk,
    ProcessOutput,
    connect_audiosocket,
    curl_get,
    raw_http,
    register,
)

ROOT = Path(__file__).resolve().parents[1]
ETC = ROOT / "etc"


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as ``{section: {key: [values in order]}}`` (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = ""
    text = (ETC / name).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            sections[section] = {}
            continue
        key, _, value = line.partition("=")
        sections[section].setdefault(key.strip(), []).append(value.strip())
    return sections


# --- systemd units ---------------------------------------------------------------------------


def test_service_unit_is_hardened_and_drains_within_its_stop_timeout() -> None:
    service = unit("rapida-asterisk.service")["Service"]
    one = {key: values[-1] for key, values in service.items()}
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "LoadCredential": "api-keys:/etc/rapida-asterisk/api-keys",
    }.items():
        assert one.get(key) == value, key
    assert service["SystemCallFilter"][0] == "@system-service"
    assert "MemoryDenyWriteExecute" not in service  # see the comment in the unit
    # The default drain waits for every call: systemd must not kill it meanwhile.
    assert Settings().drain_timeout == 0 and one["TimeoutStopSec"] == "infinity"
    exec_start = one["ExecStart"].split()
    assert exec_start[1:4] == ["--nodaemon", "--pidfile=", "rapida-asterisk"]
    assert "--api-keys-file=%d/api-keys" in exec_start  # %d: $CREDENTIALS_DIRECTORY


def test_socket_unit_order_matches_the_endpoints_the_service_names() -> None:
    socket_unit = unit("rapida-asterisk.socket")
    assert socket_unit["Socket"]["ListenStream"] == ["0.0.0.0:4573", "0.0.0.0:8080"]
    assert socket_unit["Socket"]["Service"] == ["rapida-asterisk.service"]
    commented = [
        line
        for line in (ETC / "rapida-asterisk.service").read_text().splitlines()
        if line.startswith("#Environment=RAPIDA_AUDIOSOCKET")
    ]
    assert commented == [
        "#Environment=RAPIDA_AUDIOSOCKET=systemd:domain=INET:index=0 "
        "RAPIDA_HTTP=systemd:domain=INET:index=1"
    ]


def test_systemd_analyze_verify_in_the_install_layout() -> None:
    """systemd's own check of both units, installed as docs/operations.md says, under a
    temporary root (``.ci/verify-units``). ``.ci/run`` installs systemd-analyze (Debian's
    ``systemd`` package); without it this fails rather than pass unchecked."""
    assert shutil.which("systemd-analyze"), "apt-get install systemd (.ci/run does)"
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "verify-units"), sys.prefix],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr + out.stdout


def test_every_path_the_units_name_is_in_the_documented_layout() -> None:
    """The layout table of docs/operations.md, the unit and .ci/verify-units agree: a path
    changed in one of them alone fails here."""
    docs = (ROOT / "docs" / "operations.md").read_text()
    table = docs[docs.index("### Install layout") :]
    table = table[: table.index("\n\n", table.index("| path |"))]
    documented = set(re.findall(r"^\| `(/[^`]+)`", table, flags=re.MULTILINE))
    script = (ROOT / ".ci" / "verify-units").read_text()
    named: set[str] = set()
    for name in ("rapida-asterisk.service", "rapida-asterisk.socket"):
        text = (ETC / name).read_text()
        named |= {p.rstrip(".,") for p in re.findall(r"(?:file://|[=:\s])(/[\w./-]+)", text)}
        assert f"/etc/systemd/system/{name}" in documented
    named -= {"/etc/systemd/system/"}  # the install hint in the units' comments
    assert named, "no paths found in the units"
    for path in sorted(named):
        assert path in documented, f"{path} is named by a unit but not in docs/operations.md"
        assert path.split("/")[-1] in script, f"{path} is not installed by .ci/verify-units"


# --- systemd: endpoints -----------------------------------------------------------------------


class SocketActivationTests(TestCase):
    """``systemd:`` endpoints adopt a socket passed by systemd: here, one made by the test."""

    def pass_sockets(self, *socks: socket.socket) -> None:
        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs([s.fileno() for s in socks]))

    def listening(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def test_the_daemon_serves_on_an_adopted_socket(self) -> Any:
        audio, http = self.listening(), self.listening()
        self.pass_sockets(audio, http)
        for name, endpoint in [
            ("audiosocket", "systemd:domain=INET:index=0"),
            ("http", "systemd:domain=INET:index=1"),
        ]:
            check_listener(reactor, name, endpoint)
        daemon = Daemon(Settings(api_keys=[API_KEY]), reactor)
        port = http.getsockname()[1]
        http.detach()  # the endpoint adopts a copy and closes this descriptor, as systemd's
        listener = strports.service("systemd:domain=INET:index=1", daemon.site, reactor=reactor)
        listener.startService()
        self.addCleanup(listener.stopService)
        reply = yield raw_http(port, curl_get("/healthz", headers={"Connection": "close"}))
        self.assertEqual(reply.status, 200)
        daemon.contexts.close()  # type: ignore[attr-defined]

    def test_a_socket_systemd_did_not_pass_is_one_clear_line(self) -> None:
        self.pass_sockets(self.listening())
        for endpoint in ["systemd:domain=INET:index=1", "systemd:domain=INET:name=http"]:
            with self.assertRaises(ConfigError) as caught:
                check_listener(reactor, "http", endpoint)
            self.assertIn("systemd passed no such socket", str(caught.exception))
            self.assertIn("is the .socket unit running", str(caught.exception))


# --- JSON logs --------------------------------------------------------------------------------


def test_json_lines_carry_the_message_and_the_fields() -> None:
    out = io.StringIO()
    log = Logger(namespace="rapida_tap.test", observer=json_logger(out))
    log.info(
        "call {ctx} ended: {reason}", ctx="c-1", reason="caller-hangup", frames_in=3, obj=object()
    )
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("pacing failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "call c-1 ended: caller-hangup"
    assert (first["level"], first["namespace"]) == ("info", "rapida_tap.test")
    assert (first["ctx"], first["reason"], first["frames_in"]) == ("c-1", "caller-hangup", 3)
    assert "obj" not in first and "log_format" not in first
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "critical" and "ZeroDivisionError" in second["traceback"]


def test_a_line_formatted_beforehand_reads_the_same_and_keeps_its_fields() -> None:
    events: list[dict[str, Any]] = []
    out = io.StringIO()
    json_observer = json_logger(out)

    def both(event: dict[str, Any]) -> None:
        events.append(event)
        json_observer(event)

    log = Logger(namespace="rapida_tap.test", observer=both)
    text = "call c-1 ended: caller-hangup {not a field} after 1.0s"
    log_line(log, LogLevel.info, text, ctx="c-1", reason="caller-hangup", frames_in=3)
    (event,) = events
    assert formatEvent(event) == text  # braces in the text are text, not fields
    (record,) = (json.loads(line) for line in out.getvalue().splitlines())
    assert record["message"] == text
    assert (record["ctx"], record["reason"], record["frames_in"]) == ("c-1", "caller-hangup", 3)
    assert not [key for key in record if key.startswith("log_")]


def test_a_json_line_survives_odd_events() -> None:
    for event in [{}, {"log_format": "{x}"}, {"log_level": "weird", "log_time": "then", "n": 1}]:
        line = event_as_json(event)
        assert line.endswith("\n") and line.count("\n") == 1
        json.loads(line)


# --- a real twistd process: SIGTERM drains, then exit 0 ----------------------------------------


class TwistdProcessTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def wait_ready(self, port: int, process: ProcessOutput) -> Any:
        while True:
            try:
                reply = yield raw_http(port, curl_get("/healthz", headers={"Connection": "close"}))
                if reply.status == 200:
                    return
            except (error.ConnectError, defer.TimeoutError):
                pass
            if process.ended.called:
                self.fail(f"twistd exited: {process.out.decode(errors='replace')}")
            # Another process is starting: only its port can tell us when it is up.
            yield deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def twistd(self, *options: str) -> Any:
        """Run ``twistd -n rapida-asterisk`` as a process; fire with (process, transport,
        http port, AudioSocket port) once /healthz answers 200."""
        http_port, as_port = free_port(reactor), free_port(reactor)
        process = ProcessOutput()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env = {k: v for k, v in env.items() if not k.startswith("RAPIDA_")}
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logger=rapida_tap.logs.json_logger",
            "rapida-asterisk",
            f"--http=tcp:{http_port}:interface=127.0.0.1",
            f"--audiosocket=tcp:{as_port}:interface=127.0.0.1",
            f"--api-key={API_KEY}", *options,
        ]  # fmt: skip
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        transport = reactor.spawnProcess(process, sys.executable, argv, env=env, path=str(cwd))
        self.addCleanup(lambda: process.ended)  # runs second: wait for the exit
        self.addCleanup(lambda: None if process.ended.called else transport.signalProcess("KILL"))
        yield self.wait_ready(http_port, process)
        return process, transport, http_port, as_port

    @defer.inlineCallbacks
    def test_admin_drain_exits_0(self) -> Any:
        process, _, http_port, _ = yield self.twistd("--drain-timeout=20")
        request = curl_get("/admin/drain", headers={"X-Api-Key": API_KEY, "Connection": "close"})
        reply = yield raw_http(http_port, request.replace(b"GET", b"POST", 1))
        self.assertEqual(reply.status, 202)
        yield process.ended
        assert process.reason is not None
        self.assertIsInstance(process.reason.value, error.ProcessDone, process.out.decode())
        self.assertIn(b"drain requested by 127.0.0.1", process.out)

    @defer.inlineCallbacks
    def test_sigterm_drains_logs_json_and_exits_0(self) -> Any:
        process, transport, http_port, as_port = yield self.twistd("--drain-timeout=20")
        ctx = yield register(http_port)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(as_port, client)
        while b"call " + ctx.encode() + b" started" not in process.out:
            yield deferLater(reactor, 0.05, lambda: None)

        transport.signalProcess(signal.SIGTERM)
        while b"draining (stopping)" not in process.out:
            yield deferLater(reactor, 0.05, lambda: None)
        health = yield raw_http(http_port, curl_get("/healthz", headers={"Connection": "close"}))
        self.assertEqual(health.status, 503)  # still listening, but not ready
        refused = yield raw_http(
            http_port,
            curl_get("/v1/talk/asterisk/call/123456789", headers={"X-Api-Key": API_KEY}),
        )
        self.assertEqual((refused.status, refused.body), (503, b""))
        self.assertFalse(process.ended.called)  # the live call holds the exit

        client.transport.loseConnection()
        yield process.ended
        assert process.reason is not None
        self.assertIsInstance(process.reason.value, error.ProcessDone, process.out.decode())
        self.assertEqual(process.reason.value.exitCode, 0)
        lines = [json.loads(line) for line in process.out.decode().splitlines() if line.strip()]
        messages = [line["message"] for line in lines]
        self.assertTrue(
            any(m.startswith("draining (stopping): 1 live call(s), up to 20 s") for m in messages),
            messages,
        )
        self.assertTrue(any(m.startswith(f"call {ctx} ended: caller-hangup") for m in messages))
        self.assertTrue(any(m.startswith("drained after") for m in messages))
        ended = next(line for line in lines if line["message"].startswith(f"call {ctx} ended"))
        self.assertEqual((ended["ctx"], ended["reason"]), (ctx, "caller-hangup"))
        self.assertNotIn(API_KEY, process.out.decode())
