"""Hostile calls beside clean ones: what a flood inside a call costs the daemon and its neighbours.

    python -m bench.floods dtmf|text|pings [--calls 20] [--hold 10] [--seconds 15]

Starts the daemon, measures ``--calls`` clean paced AudioSocket calls alone, then again while
one attacker process floods, and prints both runs' p99 interval error, the daemon's RSS growth
and the log lines the attack caused (those naming its call).  The attacks:

- ``dtmf``: one AudioSocket call that sends DTMF frames as fast as the socket takes them;
- ``text``: one chan_websocket call that sends 20,000 small text messages (an unknown event);
- ``pings``: one chan_websocket call that floods pings and never reads a byte.

Floods of bad connections are ``python -m bench flood`` (``bench/edges.py``).

Only 127.0.0.1 is ever connected to, and every loop stops after ``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time
import uuid
from typing import Any

from bench import server as servers
from bench import ws
from bench.client import register
from bench.load import LoadConfig, run_load
from bench.server import API_KEY

ATTACKS = ("dtmf", "text", "pings")


def _dtmf(server: dict[str, int], until: float) -> tuple[str, int]:
    frame = b"\x03\x00\x011" * 1024
    ctx = register(server["http"], "flood", "666", API_KEY)
    sent = 0
    with socket.create_connection(("127.0.0.1", server["as"])) as s:
        s.sendall(b"\x01\x00\x10" + uuid.UUID(ctx).bytes)
        try:
            while time.monotonic() < until:
                s.sendall(frame)
                sent += 1024
        except OSError:
            pass  # the daemon ended the call
    return ctx, sent


def _websocket(server: dict[str, int]) -> tuple[str, socket.socket]:
    ctx = register(server["http"], "flood", "666", API_KEY)
    s = socket.create_connection(("127.0.0.1", server["ws"]))
    s.sendall(ws.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}", "127.0.0.1"))
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    s.sendall(ws.media_start(ctx, 0))
    return ctx, s


def _text(server: dict[str, int], until: float) -> tuple[str, int]:
    message = ws.client_frame(0x1, b'{"event":"FLOOD","channel_id":"1"}')
    ctx, s = _websocket(server)
    sent = 0
    with s:
        try:
            while sent < 20000 and time.monotonic() < until:
                s.sendall(message * 100)
                sent += 100
        except OSError:
            pass
    return ctx, sent


def _pings(server: dict[str, int], until: float) -> tuple[str, int]:
    ping = ws.client_frame(0x9, b"p" * 125) * 64
    ctx, s = _websocket(server)
    sent = 0
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        try:
            while time.monotonic() < until:
                s.sendall(ping)
                sent += 64
        except OSError:
            pass
    return ctx, sent


def attack(kind: str, server: dict[str, int], seconds: float, out: Any) -> None:
    until = time.monotonic() + seconds
    out.put({"dtmf": _dtmf, "text": _text, "pings": _pings}[kind](server, until))


def log_lines(server: servers.Server, marker: str, since: int) -> int:
    """Lines of the daemon's log after byte ``since`` that mention ``marker``."""
    return sum(1 for line in server.log()[since:].splitlines() if marker.encode() in line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floods", description=__doc__)
    parser.add_argument("attack", choices=ATTACKS)
    parser.add_argument("--calls", type=int, default=20, help="clean calls [20]")
    parser.add_argument("--hold", type=float, default=10.0, help="measurement window, s [10]")
    parser.add_argument("--seconds", type=float, default=15.0, help="flood length, s [15]")
    parser.add_argument("--core", default="1", help="daemon CPU, or 'none' [1]")
    args = parser.parse_args(argv)
    core = None if args.core == "none" else int(args.core)
    daemon = servers.start_daemon(core)
    config = LoadConfig(calls=args.calls, hold=args.hold, noise_probe=0)
    try:
        clean = run_load(config, daemon)
        rss_before = servers.rss_mb(daemon.pid)
        log_from = len(daemon.log())
        ports = {"as": daemon.as_port, "http": daemon.http_port, "ws": daemon.ws_port or 0}
        queue: Any = multiprocessing.get_context("fork").Queue()
        flooder = multiprocessing.get_context("fork").Process(
            target=attack, args=(args.attack, ports, args.seconds, queue)
        )
        flood_started = time.monotonic()
        flooder.start()
        time.sleep(1.0)  # the flood is under way before the clean calls start
        flooded = run_load(config, daemon)
        flooder.join(args.seconds + 30)
        elapsed = time.monotonic() - flood_started
        marker, sent = queue.get(timeout=5)
        rss_peak = servers.rss_mb(daemon.pid)
        lines = log_lines(daemon, marker, log_from)
    finally:
        daemon.stop()
    result = {
        "attack": args.attack,
        "attack_units_sent": sent,
        "clean_p99_interval_ms": clean["interval_error_ms"]["p99"],
        "flooded_p99_interval_ms": flooded["interval_error_ms"]["p99"],
        "clean_lost": clean["frames_lost"],
        "flooded_lost": flooded["frames_lost"],
        "clean_underruns": clean["underruns_daemon"],
        "flooded_underruns": flooded["underruns_daemon"],
        "clean_client_lag_p99_ms": clean["client_send_lag_ms"]["p99"],
        "flooded_client_lag_p99_ms": flooded["client_send_lag_ms"]["p99"],
        "attack_seconds": round(elapsed, 2),
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_peak, 1),
        "log_lines_of_the_attack": lines,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
