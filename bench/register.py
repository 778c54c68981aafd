"""One registration-load client process: ``concurrency`` GETs in flight, back to back.

Each registration is a fresh connection, exactly as ``CURL()`` makes it; its latency runs from
``connect()`` to the server closing the connection after the reply.  `run_registrations` is the
entry point given to ``multiprocessing``; it returns a plain picklable dict.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from array import array
from dataclasses import dataclass
from typing import Any

from bench.client import parse_reply, registration_request


@dataclass(frozen=True)
class RegistrationPlan:
    start_at: float  # absolute time.monotonic()
    stop_at: float  # no new registration after this; in-flight ones finish (1 s grace)
    http_port: int
    api_key: str
    concurrency: int
    assistant: str = "echo"
    cpu: int | None = None
    first_index: int = 0


def run_registrations(plan: RegistrationPlan) -> dict[str, Any]:
    if plan.cpu is not None:
        os.sched_setaffinity(0, {plan.cpu})
    ep = select.epoll()
    latencies: array[float] = array("d")
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    flight: dict[int, tuple[socket.socket, float, bytearray]] = {}
    counter = plan.first_index
    requests = [registration_request(plan.assistant, f"reg{i}", plan.api_key) for i in range(64)]

    def start(now: float) -> None:
        nonlocal counter
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", plan.http_port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            errors[errno.errorcode.get(err, str(err))] = errors.get(str(err), 0) + 1
            return
        counter += 1
        flight[sock.fileno()] = (sock, now, bytearray())
        ep.register(sock.fileno(), select.EPOLLOUT)

    def finish(fd: int, now: float) -> None:
        sock, began, inbox = flight.pop(fd)
        ep.unregister(fd)
        sock.close()
        status, _ = parse_reply(bytes(inbox))
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            latencies.append(now - began)

    while time.monotonic() < plan.start_at:
        time.sleep(min(0.01, max(0.0, plan.start_at - time.monotonic())))
    cpu0 = time.process_time()
    began_at = time.monotonic()
    done_at = began_at
    grace = plan.stop_at + 1.0
    while True:
        now = time.monotonic()
        if now < plan.stop_at:
            while len(flight) < plan.concurrency:
                start(now)
        elif not flight or now > grace:
            break
        for fd, mask in ep.poll(0.05):
            now = time.monotonic()
            sock, _, inbox = flight[fd]
            if mask & select.EPOLLOUT:
                ep.modify(fd, select.EPOLLIN)
                try:
                    sock.send(requests[fd % len(requests)])
                except OSError as e:
                    errors[e.strerror or "send"] = errors.get(e.strerror or "send", 0) + 1
                    finish(fd, now)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:
                inbox += data
            else:
                finish(fd, now)
                done_at = now
    for sock, _, _ in flight.values():
        sock.close()
    ep.close()
    cpu1 = time.process_time()
    return {
        "latencies": latencies,
        "statuses": statuses,
        "errors": errors,
        "in_flight_at_end": len(flight),
        "seconds": done_at - began_at,
        "cpu_seconds": cpu1 - cpu0,
    }
