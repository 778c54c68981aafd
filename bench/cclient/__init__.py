"""The C load client (``asload.c``): build it, run one client process, read its records.

The Python client fills a core near 1000 AudioSocket calls (far fewer on WebSocket); ``asload``
does the same calls for a fraction of the CPU, so the bench can load a daemon to thousands of
calls on a 2-core host.  It speaks every transport the Python client does: AudioSocket, and
chan_websocket over ws:// and wss:// (the upgrade bytes, MEDIA_START, masked μ-law frames, pongs
and the close exactly as `bench.client` sends them; TLS through OpenSSL, the lab certificate not
verified).  It is compiled on first use with the system ``gcc -O2`` (and ``-lssl -lcrypto``
where OpenSSL's headers are: without them, no wss) into a per-user cache directory under the
system temporary directory, named by the hash of its source and flags (nothing is built into the
repository).  It only records what happened (set-up starts, frames written, frames read and what
they were, send lag); this module feeds those records to the same `EchoTracker` and
`worker_results` as the Python client, so both clients' figures are computed by one piece of
code.  `run_worker` takes the Python client's `WorkerPlan` and returns the same dict.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

from bench import ws
from bench.client import (
    EARLY,
    TRANSPORTS,
    WSS,
    WorkerPlan,
    echo_tracker,
    registration_request,
    worker_results,
    ws_path,
)
from bench.frames import TONE_FRAMES, ULAW_BODIES, payload

SOURCE = Path(__file__).with_name("asload.c")
C, PYTHON, AUTO = "c", "python", "auto"
CLIENTS = (AUTO, C, PYTHON)
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra")
TLS_FLAGS = ("-DASLOAD_TLS",)  # with OpenSSL: wss too
TLS_LIBS = ("-lssl", "-lcrypto")
_TLS_PROBE = b"""#include <openssl/ssl.h>
int main(void) { return SSL_CTX_new(TLS_client_method()) == NULL; }
"""

# asload.c's ``struct rec`` (packed) and its kinds.
_RECORD = struct.Struct("<diiB")
_SETUP, _SENT, _RECV, _LAG = range(4)


class BuildFailed(RuntimeError):
    """gcc could not build the C client; the message carries its output."""


def available() -> bool:
    """Whether the C client can be built here (a ``gcc`` on PATH)."""
    return shutil.which("gcc") is not None


@functools.cache
def tls_available() -> bool:
    """Whether the C client can be built with OpenSSL here (a test-compile, once a process)."""
    if not available():
        return False
    with tempfile.TemporaryDirectory(prefix="asload-tls-") as tmp:
        done = subprocess.run(
            ["gcc", "-x", "c", "-", "-o", os.path.join(tmp, "probe"), *TLS_LIBS],
            input=_TLS_PROBE,
            capture_output=True,
            check=False,
        )
    return done.returncode == 0


def choose(requested: str, transport: str) -> str:
    """``c`` or ``python`` for ``--client requested`` on ``transport``.

    auto: C when gcc is here, on wss only if it can also be built with OpenSSL.
    """
    if requested not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, not {requested!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    if requested == AUTO:
        usable = tls_available() if transport == WSS else available()
        return C if usable else PYTHON
    if requested == C and not available():
        raise BuildFailed("the C client needs gcc on PATH (or use --client python)")
    if requested == C and transport == WSS and not tls_available():
        raise BuildFailed(
            "the C client's wss needs OpenSSL's headers (libssl-dev), or use --client python"
        )
    return requested


def build_options() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """gcc's flags and libraries for asload here: OpenSSL's too where it can be built with it."""
    if tls_available():
        return (*CFLAGS, *TLS_FLAGS), TLS_LIBS
    return CFLAGS, ()


def binary() -> Path:
    """The built client, compiled first if this source (with these options) never was."""
    source = SOURCE.read_bytes()
    flags, libs = build_options()
    digest = hashlib.sha256(source + " ".join((*flags, *libs)).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"rapida-bench-{os.getuid()}"
    target = cache / f"asload-{digest}"
    if target.exists():
        return target
    cache.mkdir(mode=0o700, exist_ok=True)
    partial = cache / f".asload-{digest}.{os.getpid()}"
    done = subprocess.run(
        ["gcc", *flags, "-o", str(partial), str(SOURCE), *libs], capture_output=True, text=True
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildFailed(f"gcc failed to build {SOURCE.name}:\n{done.stderr}")
    os.replace(partial, target)  # atomic: two processes building at once both end up right
    return target


def tone_bodies() -> bytes:
    """What asload reads first: each PCM tone body in order (bytes 4..319 of frames 50..99),
    then each μ-law one (`bench.frames.ULAW_BODIES`)."""
    pcm = b"".join(payload(TONE_FRAMES + f)[4:] for f in range(TONE_FRAMES))
    return pcm + b"".join(ULAW_BODIES)


def identify(payloads: list[bytes], ulaw: bool = False) -> list[int]:
    """asload's identity of each payload (for tests: it must agree with `frames.identify`, or
    with `frames.identify_ulaw` for ``ulaw``)."""
    framed = b"".join(len(p).to_bytes(2, "little") + p for p in payloads)
    command = "identify-ulaw" if ulaw else "identify"
    done = subprocess.run(
        [str(binary()), command], input=tone_bodies() + framed, capture_output=True, check=True
    )
    return [int(line) for line in done.stdout.split()]


def _argv(plan: WorkerPlan, out: Path) -> list[str]:
    head, tail = registration_request(plan.assistant, "bench\0", plan.api_key).split(b"\0")
    upgrade = ws.upgrade_request(ws_path("\0"), f"127.0.0.1:{plan.ws_port}")
    ws_head, ws_tail = upgrade.split(b"\0")
    options = {
        "transport": plan.transport,
        "as_port": plan.as_port,
        "http_port": plan.http_port or 0,
        "ws_port": plan.ws_port or 0,
        "first_index": plan.first_index,
        "hold_from": repr(plan.hold_from),
        "stop_at": repr(plan.stop_at),
        "drain": plan.drain,
        "early": EARLY,
        "pattern": plan.pattern,
        "burst": plan.burst,
        "jitter": plan.jitter,
        "seed": plan.seed,
        "out_path": out,
        "reg_head": head.decode("latin-1"),
        "reg_tail": tail.decode("latin-1"),
        "ws_head": ws_head.decode("latin-1"),
        "ws_tail": ws_tail.decode("latin-1"),
        "ws_accept": ws.ACCEPT,
    }
    return [str(binary()), *(f"{k}={v}" for k, v in options.items())]


def run_worker(plan: WorkerPlan) -> dict[str, Any]:
    """Run ``plan`` with asload and return what `bench.client.run_worker` would."""
    choose(C, plan.transport)
    if plan.cpu is not None:
        os.sched_setaffinity(0, {plan.cpu})  # asload inherits it
    with tempfile.TemporaryDirectory(prefix="asload-") as tmp:
        out = Path(tmp) / "records"
        stdin = tone_bodies() + array("d", plan.starts).tobytes()
        timeout = max(0.0, plan.stop_at - time.monotonic()) + plan.drain + 60
        done = subprocess.run(
            _argv(plan, out), input=stdin, capture_output=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"asload exited {done.returncode}: {done.stderr.decode()[-2000:]}")
        return _results(plan, done.stdout.decode(), out)


def _results(plan: WorkerPlan, summary: str, records: Path) -> dict[str, Any]:
    """Replay asload's records into the Python client's trackers, then its results."""
    intervals: array[float] = array("d")
    latencies: array[float] = array("d")
    early: array[float] = array("d")
    late: array[float] = array("d")
    lag: array[float] = array("d")
    trackers = [echo_tracker(plan, intervals, latencies, early, late) for _ in plan.starts]
    setup_start = [float("nan")] * len(plan.starts)
    chunk = _RECORD.size * 65536
    with records.open("rb") as f:
        while data := f.read(chunk):
            for t, call, value, kind in _RECORD.iter_unpack(data):
                if kind == _RECV:
                    trackers[call].received(value, t)
                elif kind == _SENT:
                    if trackers[call].sent(t) != value:
                        raise RuntimeError(f"asload numbered call {call}'s frames out of order")
                elif kind == _LAG:
                    lag.append(t)
                else:
                    setup_start[call] = t
    stats: dict[str, float] = {}
    errors: dict[int, str] = {}
    for line in summary.splitlines():
        word, _, rest = line.partition(" ")
        if word == "fail":
            call, _, why = rest.partition(" ")
            errors[int(call)] = why
        else:
            stats[word] = float(rest)
    outcomes = [
        (t, errors.get(i), start)
        for i, (t, start) in enumerate(zip(trackers, setup_start, strict=True))
    ]
    return worker_results(
        outcomes,
        intervals,
        latencies,
        early,
        late,
        lag,
        int(stats["blocked"]),
        cpu_seconds=stats["cpu"],
        hold_share=stats["hold_share"],
        wall_seconds=stats["wall"],
    )
