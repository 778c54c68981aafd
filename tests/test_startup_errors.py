"""A bad setting stops a real ``twistd -n rapida-asterisk`` with one line naming it, exit 1.

One case per kind of setting: listeners (endpoint string, port range, port in use), API keys,
TLS files, Redis, providers and assistants.  Each runs the daemon as a process, as a user
would, because the point is what twistd prints: one line, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, error, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.certs import make_cert
from tests.redis_server import free_port
from tests.support import API_KEY, ProcessOutput, curl_get, raw_http, wait_until

#: Seconds between two looks at another process (its output, its port): a bounded poll of
#: something no Clock can drive, not a wait on a timer of ours.
PROCESS_POLL = 0.05

ROOT = Path(__file__).resolve().parents[1]
LOCAL = "tcp:0:interface=127.0.0.1"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def environment(**extra: str) -> dict[str, str]:
    """This environment without RAPIDA_* settings, finding the plugin in this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAPIDA_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def argv(*options: str) -> list[str]:
    return [
        *TWISTD, "--nodaemon", "--pidfile=", "rapida-asterisk",
        f"--audiosocket={LOCAL}", f"--http={LOCAL}", f"--api-key={API_KEY}", *options,
    ]  # fmt: skip


def run_daemon(tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> Any:
    """Run the daemon, which must exit by itself (bounded by ``timeout``)."""
    return subprocess.run(
        argv(*options),
        cwd=tmp_path,
        env=environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line(result: Any, starts: str) -> str:
    """Exit status 1, no traceback, and exactly one line saying what is wrong."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "rapida-asterisk: " in line]
    assert len(lines) == 1, output
    line = lines[0]
    assert line[line.index("rapida-asterisk: ") :].startswith(starts), output
    return line


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- errors found while reading the settings: stderr is the one line, nothing else ----------


def test_listener_with_a_bad_endpoint_string(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, "--http=tcp:eighty")
    assert_one_line(result, "rapida-asterisk: --http: 'tcp:eighty': the port must be a number")
    assert result.stdout == ""


def test_listener_with_an_unknown_endpoint_kind(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, "--audiosocket=tpc:4573")
    assert_one_line(result, "rapida-asterisk: --audiosocket: 'tpc:4573':")


@pytest.mark.parametrize(
    ("option", "starts"),
    [
        ("--http=tcp:70000", "rapida-asterisk: --http: 'tcp:70000': port 70000 is out of range"),
        ("--audiosocket=tcp:-1", "rapida-asterisk: --audiosocket: 'tcp:-1': port -1 is out of"),
        ("--metrics=tcp:port=99999", "rapida-asterisk: --metrics: 'tcp:port=99999': port 99999"),
    ],
)
def test_listener_port_out_of_range(tmp_path: Path, option: str, starts: str) -> None:
    assert_one_line(run_daemon(tmp_path, option), starts)


def test_api_key_too_short(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, "--api-key=short")
    assert_one_line(result, "rapida-asterisk: api_keys: each key must be 8 to 256")


def test_api_keys_file_missing(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, f"--api-keys-file={tmp_path / 'nope'}")
    assert_one_line(result, "rapida-asterisk: api_keys_file: cannot read")


def test_tls_key_file_missing(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, f"--https=ssl:0:privateKey={tmp_path / 'missing.pem'}")
    assert_one_line(result, "rapida-asterisk: --https: private key file")


def test_tls_certificate_not_pem(tmp_path: Path) -> None:
    key, _ = make_cert(tmp_path)
    junk = write(tmp_path / "cert.pem", "not a certificate\n")
    result = run_daemon(tmp_path, f"--https=ssl:0:privateKey={key}:certKey={junk}")
    assert_one_line(result, f"rapida-asterisk: --https: {junk} holds no PEM certificate")


def test_redis_url_invalid(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, "--contexts=redis://127.0.0.1:notaport/0")
    assert_one_line(result, "rapida-asterisk: --contexts:")


def test_provider_without_its_password(tmp_path: Path) -> None:
    config = write(
        tmp_path / "r.toml",
        '[providers.pbx1]\nari_url = "http://127.0.0.1:8088"\nari_user = "rapida"\n'
        'password_env = "ARI_PASSWORD_UNSET"\n',
    )
    result = run_daemon(tmp_path, f"--config={config}")
    assert_one_line(
        result,
        "rapida-asterisk: providers.pbx1.password_env: the environment variable "
        "ARI_PASSWORD_UNSET is not set",
    )


def test_provider_endpoint_template_with_an_unknown_placeholder(tmp_path: Path) -> None:
    config = write(
        tmp_path / "r.toml",
        '[providers.pbx1]\nari_url = "http://127.0.0.1:8088"\nari_user = "rapida"\n'
        'password_env = "ARI_PASSWORD"\nendpoint = "PJSIP/{number}@{trunk}"\n',
    )
    result = run_daemon(tmp_path, f"--config={config}", env={"ARI_PASSWORD": "secret"})
    line = assert_one_line(result, "rapida-asterisk: providers.pbx1.endpoint: unknown placeholder")
    assert "secret" not in result.stdout + result.stderr
    assert "{number}" in line


def test_transfer_template_without_its_placeholder(tmp_path: Path) -> None:
    config = write(tmp_path / "r.toml", 'transfer_endpoint = "PJSIP/agents@trunk"\n')
    result = run_daemon(tmp_path, f"--config={config}")
    line = assert_one_line(result, "rapida-asterisk: transfer_endpoint: endpoint")
    assert "must contain {to}" in line


def test_assistant_with_a_bad_url(tmp_path: Path) -> None:
    config = write(tmp_path / "r.toml", '[assistants."123456789"]\nurl = "http://bot.example"\n')
    result = run_daemon(tmp_path, f"--config={config}")
    assert_one_line(result, "rapida-asterisk: assistants.123456789.url:")


# --- errors found while binding (after makeService): one line among the start-up log -------


def taken_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_http_port_in_use(tmp_path: Path) -> None:
    with taken_port() as sock:
        port = sock.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        result = run_daemon(tmp_path, f"--http={endpoint}")
    assert_one_line(
        result, f"rapida-asterisk: --http: '{endpoint}': cannot listen: the port is already in use"
    )
    assert result.stdout == ""  # found before twistd logs anything


def test_http_port_in_use_when_daemonized(tmp_path: Path) -> None:
    """Without -n, twistd forks; the port is checked before, so the error is the same line."""
    with taken_port() as sock:
        endpoint = f"tcp:{sock.getsockname()[1]}:interface=127.0.0.1"
        args = argv(f"--http={endpoint}")
        args.remove("--nodaemon")
        args[args.index("--pidfile=")] = f"--pidfile={tmp_path / 'twistd.pid'}"
        args.insert(args.index("rapida-asterisk"), f"--logfile={tmp_path / 'twistd.log'}")
        result = subprocess.run(
            args, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=60
        )
    assert_one_line(
        result, f"rapida-asterisk: --http: '{endpoint}': cannot listen: the port is already in use"
    )
    assert result.stdout == ""


def test_https_port_in_use(tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path)
    with taken_port() as sock:
        port = sock.getsockname()[1]
        https = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        result = run_daemon(tmp_path, f"--https={https}")
    assert_one_line(
        result,
        f"rapida-asterisk: --https: 'ssl:{port}:interface=127.0.0.1': cannot listen: "
        "the port is already in use",
    )


def test_interface_not_on_this_machine(tmp_path: Path) -> None:
    result = run_daemon(tmp_path, "--http=tcp:0:interface=192.0.2.1")  # TEST-NET-1
    assert_one_line(
        result, "rapida-asterisk: --http: 'tcp:0:interface=192.0.2.1': cannot listen: this machine"
    )


# --- Redis unreachable at start-up: the node starts, and says why it refuses calls ----------


class RedisUnreachableTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_starts_logs_one_line_and_reports_not_ready(self) -> Any:
        http_port, redis_port = free_port(reactor), free_port(reactor)  # nothing on redis_port
        process = ProcessOutput()
        args = argv(
            f"--http=tcp:{http_port}:interface=127.0.0.1",
            f"--contexts=redis://127.0.0.1:{redis_port}/0",
        )
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir(parents=True)
        transport = reactor.spawnProcess(
            process, sys.executable, args, env=environment(), path=str(cwd)
        )
        self.addCleanup(lambda: process.ended)
        self.addCleanup(lambda: None if process.ended.called else transport.signalProcess("KILL"))
        wanted = (
            b"contexts: Redis at redis://127.0.0.1:%d/0 is unreachable at start-up" % redis_port
        )
        # Another process: only its output can tell (a bounded poll, not a sleep).
        yield wait_until(lambda: wanted in process.out or process.ended.called, timeout=30)
        self.assertIn(wanted, process.out, process.out.decode(errors="replace"))
        health = None
        while health is None:
            try:
                health = yield raw_http(
                    http_port, curl_get("/healthz", headers={"Connection": "close"})
                )
            except (error.ConnectError, defer.TimeoutError):
                yield deferLater(reactor, PROCESS_POLL, lambda: None)
        self.assertEqual(health.status, 503)
        self.assertIn("contexts", json.loads(health.body)["problems"])
        transport.signalProcess(signal.SIGTERM)
        yield process.ended
        assert process.reason is not None
        self.assertIsInstance(process.reason.value, error.ProcessDone, process.out.decode())
        self.assertEqual(process.out.count(b"is unreachable at start-up"), 1)
        self.assertNotIn(b"Traceback", process.out)
