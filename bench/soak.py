"""Soak: many calls for a long time against one daemon, watching its memory and descriptors.

The same load generator as ``run`` (registration over HTTP, AudioSocket or chan_websocket,
numbered echo frames), played in back-to-back rounds against one daemon that is never
restarted: each round ramps ``calls`` calls up, holds them ``round`` seconds and hangs them
all up, so the daemon sees ``calls`` concurrent calls and a steady churn of call set-ups and
tear-downs for ``minutes``.  A sampler prints the daemon's RSS and open descriptors every
``every`` seconds; after the last round the daemon is watched idle for ``idle`` seconds.

What it answers (the summary at the end):

* *warm idle*: RSS once the first round has ended (imports, pools and caches are warm);
* *growth after warm-up*: RSS at load in the last rounds minus at load in the second round,
  and the least-squares slope of RSS at load over the run (MB per hour);
* *back to idle*: RSS after the calls end minus warm idle (the quality bar: within 2 MB);
* descriptors: at idle before, during, and after (a leaked socket shows here first).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench import server as servers
from bench.load import LoadConfig, run_load


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sample:
    at: float  # seconds since the soak started
    rss_mb: float
    fds: int
    phase: str  # "idle-start", "load", "idle-end"


@dataclass
class SoakLog:
    """Samples, printed as they are taken (one line each) to ``out``."""

    out: TextIO
    t0: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, pid: int, phase: str) -> Sample:
        sample = Sample(time.monotonic() - self.t0, servers.rss_mb(pid), open_fds(pid), phase)
        with self.lock:
            self.samples.append(sample)
        print(
            f"t={sample.at:7.0f}s  {phase:10s}  rss={sample.rss_mb:8.2f} MB  fds={sample.fds:5d}",
            file=self.out,
            flush=True,
        )
        return sample


def _sampler(log: SoakLog, pid: int, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            log.take(pid, "load")
        except (OSError, servers.ServerFailed):
            return


def slope_mb_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, MB)`` points, in MB per hour (0 for < 2 points)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return 0.0
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 3600


def idle_rss(log: SoakLog, pid: int, seconds: float, label: str) -> float:
    """Watch the idle daemon for ``seconds`` (a sample a second); return the last RSS."""
    last = log.take(pid, label)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        last = log.take(pid, label)
    return last.rss_mb


def soak(
    server: servers.Server,
    *,
    calls: int,
    minutes: float,
    round_seconds: float,
    every: float,
    idle: float,
    transport: str,
    out: TextIO,
    trace_dir: str | None = None,
    client: str = "auto",
) -> dict[str, Any]:
    """Run the soak against a started daemon; return the summary (also printed to ``out``).

    ``trace_dir``: the daemon runs with tracemalloc (`servers.TRACED_RUN`); a snapshot is taken
    at warm idle and at the end, and what grew between them is printed.
    """
    log = SoakLog(out)
    rss_start = idle_rss(log, server.pid, min(idle, 5.0), "idle-start")
    fds_start = log.samples[-1].fds
    stop = threading.Event()
    sampler = threading.Thread(
        target=_sampler, args=(log, server.pid, every, stop), daemon=True, name="soak-sampler"
    )
    sampler.start()
    deadline = time.monotonic() + minutes * 60
    rounds: list[dict[str, Any]] = []
    warm_idle = None
    try:
        while not rounds or time.monotonic() < deadline:
            hold = max(1.0, min(round_seconds, deadline - time.monotonic()))
            config = LoadConfig(
                calls=calls, hold=hold, noise_probe=0, transport=transport, client=client
            )
            metrics = run_load(config, server)
            rounds.append(
                {
                    "at": time.monotonic() - log.t0,
                    "rss_at_load_mb": metrics["server_rss_mb"],
                    "rss_before_mb": metrics["server_rss_idle_mb"],
                    "calls_failed": metrics["calls_failed"],
                    "frames_lost": metrics["frames_lost"],
                    "p99_ms": metrics["interval_error_ms"]["p99"],
                }
            )
            r = rounds[-1]
            print(
                f"round {len(rounds):3d}: rss at load {r['rss_at_load_mb']:.2f} MB, "
                f"failed {r['calls_failed']}, lost {r['frames_lost']}, "
                f"p99 interval error {r['p99_ms']:.2f} ms",
                file=out,
                flush=True,
            )
            if warm_idle is None:
                time.sleep(2.0)  # the last hang-ups are processed
                warm_idle = log.take(server.pid, "warm-idle").rss_mb
                if trace_dir:
                    _dump(server, trace_dir, 1)
    finally:
        stop.set()
        sampler.join()
    rss_end = idle_rss(log, server.pid, idle, "idle-end")
    if trace_dir:
        _dump(server, trace_dir, 2)
        print(growth_report(trace_dir), file=out, flush=True)
    fds_end = log.samples[-1].fds
    load_points = [(s.at, s.rss_mb) for s in log.samples if s.phase == "load"]
    after_warmup = [p for p in load_points if len(rounds) < 2 or p[0] >= rounds[0]["at"]]
    second = rounds[1]["rss_at_load_mb"] if len(rounds) > 1 else rounds[0]["rss_at_load_mb"]
    last = rounds[-2]["rss_at_load_mb"] if len(rounds) > 2 else rounds[-1]["rss_at_load_mb"]
    summary = {
        "calls": calls,
        "minutes": minutes,
        "rounds": len(rounds),
        "calls_total": calls * len(rounds),
        "calls_failed": sum(r["calls_failed"] for r in rounds),
        "frames_lost": sum(r["frames_lost"] for r in rounds),
        "rss_idle_start_mb": round(rss_start, 2),
        "rss_warm_idle_mb": round(warm_idle or rss_start, 2),
        "rss_at_load_round2_mb": second,
        "rss_at_load_last_full_round_mb": last,
        "rss_at_load_max_mb": max((v for _, v in load_points), default=float("nan")),
        "rss_growth_after_warmup_mb": round(last - second, 2),
        "rss_slope_after_warmup_mb_per_hour": round(slope_mb_per_hour(after_warmup), 2),
        "rss_idle_end_mb": round(rss_end, 2),
        "rss_end_minus_warm_idle_mb": round(rss_end - (warm_idle or rss_start), 2),
        "fds_idle_start": fds_start,
        "fds_at_load_max": max((s.fds for s in log.samples if s.phase == "load"), default=0),
        "fds_idle_end": fds_end,
        "round_log": rounds,
    }
    print(format_summary(summary), file=out, flush=True)
    return summary


def _dump(server: servers.Server, trace_dir: str, n: int) -> None:
    """Ask the traced daemon for snapshot ``n`` and wait until it is written."""
    os.kill(server.pid, signal.SIGUSR2)
    path = Path(trace_dir) / f"{n}.types"
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)


def growth_report(trace_dir: str, top: int = 15) -> str:
    """What grew from snapshot 1 (warm idle) to 2 (idle at the end): lines and object types."""
    first = tracemalloc.Snapshot.load(f"{trace_dir}/1.snapshot")
    second = tracemalloc.Snapshot.load(f"{trace_dir}/2.snapshot")
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = second.filter_traces(ignore).compare_to(first.filter_traces(ignore), "lineno")
    lines = ["tracemalloc, warm idle -> end idle (largest growth first):"]
    for stat in stats[:top]:
        frame = stat.traceback[0]
        lines.append(
            f"  {stat.size_diff / 1e6:+8.3f} MB {stat.count_diff:+8d} blocks  "
            f"{frame.filename}:{frame.lineno}"
        )
    before = json.loads(Path(f"{trace_dir}/1.types").read_text())
    after = json.loads(Path(f"{trace_dir}/2.types").read_text())
    heap = [before.pop("(traced bytes)") / 1e6, after.pop("(traced bytes)") / 1e6]
    peak = after.pop("(traced peak bytes)") / 1e6
    before.pop("(traced peak bytes)")
    lines.append(
        f"Python heap (tracemalloc): warm idle {heap[0]:.2f} MB, end idle {heap[1]:.2f} MB, "
        f"peak {peak:.2f} MB"
    )
    diffs = sorted(
        ((after.get(k, 0) - before.get(k, 0), k) for k in set(before) | set(after)),
        reverse=True,
    )
    lines.append("gc objects, warm idle -> end idle (most grown types):")
    lines += [f"  {d:+8d} {k}" for d, k in diffs[:top] if d]
    return "\n".join(lines)


def format_summary(s: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"soak: {s['calls']} calls x {s['rounds']} rounds ({s['calls_total']} calls, "
            f"{s['minutes']:g} min): failed {s['calls_failed']}, frames lost {s['frames_lost']}",
            f"  RSS idle at start     {s['rss_idle_start_mb']:8.2f} MB",
            f"  RSS warm idle         {s['rss_warm_idle_mb']:8.2f} MB  (after round 1)",
            f"  RSS at load, round 2  {s['rss_at_load_round2_mb']:8.2f} MB",
            f"  RSS at load, last     {s['rss_at_load_last_full_round_mb']:8.2f} MB  "
            f"(growth after warm-up {s['rss_growth_after_warmup_mb']:+.2f} MB, slope "
            f"{s['rss_slope_after_warmup_mb_per_hour']:+.2f} MB/h)",
            f"  RSS idle at end       {s['rss_idle_end_mb']:8.2f} MB  "
            f"({s['rss_end_minus_warm_idle_mb']:+.2f} MB against warm idle)",
            f"  fds idle start / max at load / idle end: {s['fds_idle_start']} / "
            f"{s['fds_at_load_max']} / {s['fds_idle_end']}",
        ]
    )
