"""The server under test: start it (pinned to a core), wait until it listens, watch its /proc.

Either the rapida-asterisk daemon (``twistd -n rapida-asterisk`` on free 127.0.0.1 ports, with
the rate limit lifted so the bench is not throttled) or any AudioSocket echo server given as a
command line with a ``{port}`` placeholder.  The daemon's log goes to a file; its one
"call ... ended" line per call carries the daemon's own underrun count.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench-key-0123456789"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_ENDED = re.compile(rb"call \S+ ended: .*? frames_in=(\d+) frames_out=(\d+) underruns=(\d+)")


class ServerFailed(Exception):
    """The server under test did not start, or died during the run."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all threads) from /proc/PID/stat, seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` from /proc/PID/status, MB (10**6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise ServerFailed(f"no VmRSS for pid {pid}")


def gc_pauses(server: Server) -> dict[str, float]:
    """The daemon's garbage-collection pauses so far, from ``rapida_gc_pause_seconds``:
    ``{"full": count, "full_seconds": sum, "young": ..., "young_seconds": ...,
    "over_10ms": count, "scrape_seconds": how long /metrics took to answer}`` (empty for a
    peer, or when /metrics does not answer)."""
    if server.http_port is None:
        return {}
    began = time.monotonic()
    try:
        url = f"http://127.0.0.1:{server.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    found = dict.fromkeys(("full", "full_seconds", "young", "young_seconds", "over_10ms"), 0.0)
    found["scrape_seconds"] = time.monotonic() - began
    sample = (
        r'^rapida_gc_pause_seconds_(count|sum|bucket)\{generation="(\d)"(?:,le="([^"]+)")?\} (\S+)$'
    )
    for name, gen, le, value in re.findall(sample, text, re.M):
        kind = "full" if gen == "2" else "young"
        if name == "count":
            found[kind] += float(value)
            found["over_10ms"] += float(value)
        elif name == "sum":
            found[kind + "_seconds"] += float(value)
        elif le == "0.01":
            found["over_10ms"] -= float(value)
    return found


def daemon_call_counts(log: bytes) -> tuple[int, int, int]:
    """``(calls ended, frames_out, underruns)`` summed over the daemon's "call ended" lines."""
    ended = frames_out = underruns = 0
    for match in _ENDED.finditer(log):
        ended += 1
        frames_out += int(match.group(2))
        underruns += int(match.group(3))
    return ended, frames_out, underruns


@dataclass
class Server:
    """A running server process; ``http_port`` is None for a peer without registration."""

    name: str
    process: subprocess.Popen[bytes]
    as_port: int
    http_port: int | None
    log_path: Path
    pinned: str | None
    _log: IO[bytes] | None = field(default=None, repr=False)
    ws_port: int | None = None  # chan_websocket endpoint: the --http port, or --https for wss
    tls: bool = False  # ws_port speaks TLS (a lab certificate in _tls_dir)
    _tls_dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)
    _config_dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        if self.process.poll() is not None:
            raise ServerFailed(f"{self.name} exited with {self.process.returncode}: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        return self.log().decode("utf-8", "replace")[-n:]

    def log(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except OSError:
            return b""

    def wait_calls_ended(self, calls: int, timeout: float = 10.0) -> tuple[int, int, int] | None:
        """The daemon's view once ``calls`` calls have logged their end (None for a peer)."""
        if self.http_port is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            counts = daemon_call_counts(self.log())
            if counts[0] >= calls or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
        self.log_path.unlink(missing_ok=True)
        if self._tls_dir is not None:
            self._tls_dir.cleanup()
        if self._config_dir is not None:
            self._config_dir.cleanup()


def _pin(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


def lab_certificate(directory: Path) -> tuple[Path, Path]:
    """A fresh self-signed EC certificate for 127.0.0.1 in ``directory``: ``(key, cert)``.

    Made at run time for wss:// runs only (never stored in the repository); the bench client
    does not verify it, as Asterisk with ``verify_server_cert = no`` would not.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


#: ``python -c`` code that runs twistd with tracemalloc on; each SIGUSR2 dumps a snapshot and
#: the live object counts by type to ``<dir>/<n>.snapshot`` and ``<dir>/<n>.types``.
TRACED_RUN = """
import collections, gc, json, signal, tracemalloc
tracemalloc.start(8)
dumps = [0]
def dump(signum, frame):
    gc.collect()
    n = dumps[0] = dumps[0] + 1
    tracemalloc.take_snapshot().dump("%(dir)s/%%d.snapshot" %% n)
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    counts["(traced bytes)"], counts["(traced peak bytes)"] = tracemalloc.get_traced_memory()
    with open("%(dir)s/%%d.types" %% n, "w") as f:
        json.dump(dict(counts.most_common(200)), f)
signal.signal(signal.SIGUSR2, dump)
from twisted.scripts.twistd import run
run()
"""


def start_daemon(
    core: int | None = None,
    extra_env: dict[str, str] | None = None,
    tls: bool = False,
    nofile: int | None = None,
    trace_dir: str | None = None,
    record_dir: str | None = None,
    source: str | None = None,
) -> Server:
    """The rapida-asterisk daemon on free 127.0.0.1 ports, pinned to ``core`` if given.

    Its chan_websocket endpoint is on the ``--http`` port; with ``tls`` also on an ``--https``
    port (a lab certificate made in a temporary directory), which is then ``ws_port``.  With
    ``record_dir`` every call is recorded there (a config file in a temporary directory).
    ``source``: a checkout to run the daemon from instead of this one (its ``rapida_tap`` and
    twistd plugin come first on the daemon's ``PYTHONPATH``).
    """
    as_port, http_port = free_port(), free_port()
    https: list[str] = []
    tls_dir = None
    ws_port = http_port
    if tls:
        tls_dir = tempfile.TemporaryDirectory(prefix="bench-tls-")
        key_path, cert_path = lab_certificate(Path(tls_dir.name))
        ws_port = free_port()
        https = [
            "--https",
            f"ssl:{ws_port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
        ]
    command = [
        *_pin(core),
        sys.executable,
        "-c",
        (TRACED_RUN % {"dir": trace_dir})
        if trace_dir
        else "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "rapida-asterisk",
        "--api-key",
        API_KEY,
        "--http",
        f"tcp:{http_port}:interface=127.0.0.1",
        "--audiosocket",
        f"tcp:{as_port}:interface=127.0.0.1",
        *https,
    ]
    config_dir = None
    if record_dir:
        config_dir = tempfile.TemporaryDirectory(prefix="bench-config-")
        config = Path(config_dir.name) / "record.toml"
        config.write_text(
            f"recordings_dir = {json.dumps(str(record_dir))}\n"
            '[assistants.default]\nurl = "echo"\nrecord = true\n'
        )
        command.append(f"--config={config}")
    env = dict(os.environ)
    # ``python -c`` puts its working directory first on sys.path, before PYTHONPATH.
    code = Path(source).resolve() if source else REPO
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    env.setdefault("RAPIDA_RATE_LIMIT", "1000000000")
    env.setdefault("RAPIDA_RATE_BURST", "1000000000")
    env.setdefault("RAPIDA_MAX_CONNECTIONS", "100000")
    env.setdefault("RAPIDA_ACCEPT_RATE", "1000000000")
    env.setdefault("RAPIDA_ACCEPT_BURST", "1000000000")
    env.update(extra_env or {})
    server = _spawn("rapida-asterisk", command, env, as_port, http_port, core, nofile, code)
    server.ws_port, server.tls, server._tls_dir = ws_port, tls, tls_dir
    server._config_dir = config_dir
    # tracemalloc makes start-up several times slower
    up = 120.0 if trace_dir else 15.0
    _wait(server, lambda: _healthy(http_port) and _listening(ws_port), timeout=up)
    return server


def start_peer(command: str, core: int | None = None) -> Server:
    """Any AudioSocket echo server: ``command`` with ``{port}`` for its listening port."""
    if "{port}" not in command:
        raise ValueError("the peer command needs a {port} placeholder")
    as_port = free_port()
    argv = [*_pin(core), *shlex.split(command.replace("{port}", str(as_port)))]
    server = _spawn(argv[len(_pin(core))], argv, dict(os.environ), as_port, None, core)
    _wait(server, lambda: _listening(as_port))
    return server


def _spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    as_port: int,
    http_port: int | None,
    core: int | None,
    nofile: int | None = None,
    cwd: Path = REPO,
) -> Server:
    """Start ``argv`` in ``cwd``; ``nofile``: its file descriptor limit (``ulimit -n``)."""
    fd, path = tempfile.mkstemp(prefix="bench-server-", suffix=".log")
    log = os.fdopen(fd, "wb")

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        preexec_fn=limit,
    )
    pinned = f"core {core}" if core is not None else None
    return Server(name, process, as_port, http_port, Path(path), pinned, log)


def _wait(server: Server, ready: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if server.process.poll() is not None or time.monotonic() > deadline:
            tail = server.tail()
            server.stop()
            raise ServerFailed(f"{server.name} did not come up: {tail}")
        time.sleep(0.05)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
