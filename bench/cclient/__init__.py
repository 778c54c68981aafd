"""The C AudioSocket load client (``asload.c``): build it, run one client process, read its records.

The Python client fills a core near 1000 calls; ``asload`` does the same calls for a fraction
of the CPU, so the bench can load a daemon to 2000 calls on a 2-core host.  It is compiled on
first use with the system ``gcc -O2`` into a per-user cache directory under the system temporary
directory, named by the source's hash (nothing is built into the repository).  It only records
what happened (set-up starts, frames written, frames read and what they were, send lag); this
module feeds those records to the same `EchoTracker` and `worker_results` as the Python client,
so both clients' figures are computed by one piece of code.  `run_worker` takes the Python
client's `WorkerPlan` and returns the same dict.
"""

from __future__ import annotations

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

from bench.client import (
    AUDIOSOCKET,
    EARLY,
    WorkerPlan,
    echo_tracker,
    registration_request,
    worker_results,
)
from bench.frames import TONE_FRAMES, payload

SOURCE = Path(__file__).with_name("asload.c")
C, PYTHON, AUTO = "c", "python", "auto"
CLIENTS = (AUTO, C, PYTHON)
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra")

# asload.c's ``struct rec`` (packed) and its kinds.
_RECORD = struct.Struct("<diiB")
_SETUP, _SENT, _RECV, _LAG = range(4)


class BuildFailed(RuntimeError):
    """gcc could not build the C client; the message carries its output."""


def available() -> bool:
    """Whether the C client can be built here (a ``gcc`` on PATH)."""
    return shutil.which("gcc") is not None


def choose(requested: str, transport: str) -> str:
    """``c`` or ``python`` for ``--client requested`` (auto: C for AudioSocket if gcc is here)."""
    if requested not in CLIENTS:
        raise ValueError(f"client must be one of {CLIENTS}, not {requested!r}")
    if requested == AUTO:
        return C if transport == AUDIOSOCKET and available() else PYTHON
    if requested == C and transport != AUDIOSOCKET:
        raise ValueError(f"the C client speaks AudioSocket only, not {transport}")
    if requested == C and not available():
        raise BuildFailed("the C client needs gcc on PATH (or use --client python)")
    return requested


def binary() -> Path:
    """The built client, compiled first if this source (and these flags) never was."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"rapida-bench-{os.getuid()}"
    target = cache / f"asload-{digest}"
    if target.exists():
        return target
    cache.mkdir(mode=0o700, exist_ok=True)
    partial = cache / f".asload-{digest}.{os.getpid()}"
    done = subprocess.run(
        ["gcc", *CFLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildFailed(f"gcc failed to build {SOURCE.name}:\n{done.stderr}")
    os.replace(partial, target)  # atomic: two processes building at once both end up right
    return target


def tone_bodies() -> bytes:
    """What asload reads first: bytes 4..319 of frames 50..99, i.e. each tone body in order."""
    return b"".join(payload(TONE_FRAMES + f)[4:] for f in range(TONE_FRAMES))


def identify(payloads: list[bytes]) -> list[int]:
    """asload's identity of each payload (for tests: it must agree with `frames.identify`)."""
    framed = b"".join(len(p).to_bytes(2, "little") + p for p in payloads)
    done = subprocess.run(
        [str(binary()), "identify"], input=tone_bodies() + framed, capture_output=True, check=True
    )
    return [int(line) for line in done.stdout.split()]


def _argv(plan: WorkerPlan, out: Path) -> list[str]:
    head, tail = registration_request(plan.assistant, "bench\0", plan.api_key).split(b"\0")
    options = {
        "as_port": plan.as_port,
        "http_port": plan.http_port or 0,
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
    }
    return [str(binary()), *(f"{k}={v}" for k, v in options.items())]


def run_worker(plan: WorkerPlan) -> dict[str, Any]:
    """Run ``plan`` with asload and return what `bench.client.run_worker` would."""
    if plan.transport != AUDIOSOCKET:
        raise ValueError(f"the C client speaks AudioSocket only, not {plan.transport}")
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
