"""Hostile peers against the daemon: what a flood of bad connections costs clean calls, and
whether slow-header connections starve registrations.

``flood``: the `run` load of N clean calls, once alone and once while another process opens
``bad`` malformed AudioSocket connections (an unknown kind byte, then close) as fast as it can
from another address (127.0.0.2); the clean calls' p99 interval error of both runs.

``slowloris``: the daemon started with a file descriptor limit (``ulimit -n``), ``conns``
connections from ``sources`` addresses send one byte of a request head every ``period``
seconds (and reconnect when closed, as an attacker would), while a registration is made
every 0.2 s from a third address; how many registrations answered, and how fast.
"""

from __future__ import annotations

import errno
import multiprocessing
import re
import selectors
import socket
import time
import urllib.request
from typing import Any

from bench import server as servers
from bench.client import registration_request
from bench.load import SETTLE, LoadConfig, run_load
from bench.stats import percentile

BAD_FRAME = b"\x02\x00\x00"  # kind 0x02: not an AudioSocket kind
SLOW_HEAD = (
    b"GET /v1/talk/asterisk/call/echo?from=slow HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 500
)


def _open(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    err = sock.connect_ex(("127.0.0.1", port))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, errno.errorcode.get(err, str(err)))
    return sock


def bad_connections(port: int, count: int, start_at: float, source: str = "127.0.0.2") -> dict:
    """Open ``count`` connections (at most 256 at a time) that send a bad frame and close."""
    while time.monotonic() < start_at:
        time.sleep(0.01)
    sel = selectors.DefaultSelector()
    began = time.monotonic()
    opened = failed = 0
    while opened < count or sel.get_map():
        while opened < count and len(sel.get_map()) < 256:
            try:
                sel.register(_open(port, source), selectors.EVENT_WRITE)
            except OSError:
                failed += 1
            opened += 1
        for key, _ in sel.select(timeout=1.0):
            sock = key.fileobj
            sel.unregister(sock)
            try:
                sock.send(BAD_FRAME)  # type: ignore[union-attr]
            except OSError:
                failed += 1
            sock.close()  # type: ignore[union-attr]
    return {"opened": opened, "failed": failed, "seconds": round(time.monotonic() - began, 2)}


def flood(calls: int, bad: int, hold: float, core: int | None, env: dict[str, str]) -> dict:
    """p99 interval error of ``calls`` clean calls, alone and during the bad connections."""
    results: dict[str, Any] = {}
    for label in ("alone", "flood"):
        server = servers.start_daemon(core, extra_env=env)
        try:
            config = LoadConfig(calls=calls, hold=hold, noise_probe=0)
            hold_from = time.monotonic() + 0.3 + calls / config.ramp + SETTLE
            context = multiprocessing.get_context("fork")
            with context.Pool(1) as pool:
                pending = None
                if label == "flood":
                    pending = pool.apply_async(
                        bad_connections, (server.as_port, bad, hold_from + 0.5)
                    )
                metrics = run_load(config, server)
                bad_result = pending.get(timeout=120) if pending is not None else None
            results[label] = {
                "p99_ms": metrics["interval_error_ms"]["p99"],
                "p50_ms": metrics["interval_error_ms"]["p50"],
                "frames_lost": metrics["frames_lost"],
                "calls_failed": metrics["calls_failed"],
                "server_cpu_percent": metrics["server_cpu_core_percent"],
                "bad": bad_result,
                "refused": refused_counts(server),
                "log_lines": len(server.log().splitlines()),
            }
        finally:
            server.stop()
    return results


def refused_counts(server: servers.Server) -> dict[str, float]:
    """``rapida_listener_refused_total`` and ``rapida_connections_refused_total`` samples."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics") as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    found = {}
    for match in re.finditer(
        r"^(rapida_(?:listener|connections|http)_refused_total)\{([^}]*)\} (\S+)$", text, re.M
    ):
        found[f"{match.group(1)}{{{match.group(2)}}}"] = float(match.group(3))
    return found


def _slow_attack(port: int, conns: int, sources: int, period: float, until: float) -> dict:
    """Keep ``conns`` slow-header connections open until ``until``; reconnect closed ones."""
    sel = selectors.DefaultSelector()
    sent: dict[socket.socket, int] = {}
    opened = closed = refused = 0
    next_byte = time.monotonic()

    def connect(i: int) -> None:
        nonlocal opened, refused
        n = i % sources
        try:
            sock = _open(port, f"127.0.{1 + n // 250}.{1 + n % 250}")
        except OSError:
            refused += 1
            return
        opened += 1
        sent[sock] = 0
        sel.register(sock, selectors.EVENT_READ, i)

    for i in range(conns):
        connect(i)
    while time.monotonic() < until:
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sent.pop(sock, None)  # type: ignore[call-overload]
                sock.close()  # type: ignore[union-attr]
                closed += 1
                connect(key.data)
        if time.monotonic() >= next_byte:
            next_byte += period
            for sock, n in list(sent.items()):
                try:
                    sock.send(SLOW_HEAD[n : n + 1])
                    sent[sock] = n + 1
                except OSError:
                    pass
    for sock in sent:
        sock.close()
    return {"opened": opened, "closed_by_server": closed, "connect_failed": refused}


def _register_once(port: int, source: str, timeout: float = 2.0) -> tuple[int, float]:
    began = time.monotonic()
    try:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
    except OSError:
        return 0, time.monotonic() - began
    try:
        sock.sendall(registration_request("echo", "edge", servers.API_KEY))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    finally:
        sock.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, time.monotonic() - began


def slowloris(
    conns: int, sources: int, nofile: int, seconds: float, period: float, env: dict[str, str]
) -> dict:
    """Registrations from 127.0.9.9 while ``conns`` slow-header connections run."""
    server = servers.start_daemon(None, extra_env=env, nofile=nofile)
    assert server.http_port is not None
    try:
        until = time.monotonic() + seconds
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            attack = pool.apply_async(
                _slow_attack, (server.http_port, conns, sources, period, until)
            )
            time.sleep(1.0)  # the attack is in place
            statuses: dict[int, int] = {}
            latencies = []
            while time.monotonic() < until - 0.5:
                status, took = _register_once(server.http_port, "127.0.9.9")
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(took)
                time.sleep(0.2)
            attacked = attack.get(timeout=seconds + 30)
        refused = refused_counts(server)
        ok = statuses.get(200, 0)
        return {
            "registrations": sum(statuses.values()),
            "answered_200": ok,
            "statuses": {str(k): v for k, v in statuses.items()},
            "latency_ms_p50": round(percentile(sorted(latencies), 50) * 1000, 2) if ok else None,
            "latency_ms_max": round(max(latencies) * 1000, 2) if ok else None,
            "attack": attacked,
            "refused": refused,
        }
    finally:
        server.stop()
