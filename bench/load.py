"""The controller: start the server, drive client processes, sample the server, summarise.

One run is: start the server (pinned to one core), note its idle RSS, ramp ``n`` calls up at
``ramp`` calls/s spread over the client processes, let them settle, then *hold* for ``hold``
seconds (the measurement window: server CPU, interval error and latency are taken over it),
stop sending, drain, hang up, and read the daemon's own per-call underrun counts from its log.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench import cclient
from bench import server as servers
from bench.client import AUDIOSOCKET, PACED, WorkerPlan, run_worker
from bench.noise import timer_noise
from bench.register import RegistrationPlan, run_registrations
from bench.stats import median, meets_bar, merge, spread_ms

SETTLE = 0.5  # seconds between the last call's start and the measurement window


@dataclass(frozen=True)
class LoadConfig:
    calls: int
    hold: float = 10.0  # seconds of measurement window
    ramp: float = 200.0  # calls started per second
    pattern: str = PACED
    burst: int = 5
    jitter_ms: float = 10.0
    workers: int = 2  # client processes
    seed: int = 1
    noise_probe: float = 1.0  # seconds of host timer-noise probe before the run (0: none)
    transport: str = AUDIOSOCKET  # or websocket (ws://), wss (wss://)
    client: str = cclient.AUTO  # c, python, or auto: c when gcc (for wss: OpenSSL) is here


def client_cores(server_core: int | None) -> list[int | None]:
    """CPUs for the client processes: every CPU but the server's (none pinned if unpinned)."""
    if server_core is None:
        return [None]
    others = sorted(os.sched_getaffinity(0) - {server_core})
    return list(others) or [None]


def plan_workers(
    config: LoadConfig, t0: float, server: servers.Server, cores: list[int | None]
) -> tuple[list[WorkerPlan], float, float]:
    """Split the calls round-robin over the workers; return the plans, hold start and stop."""
    starts = [t0 + i / config.ramp for i in range(config.calls)]
    hold_from = (starts[-1] if starts else t0) + SETTLE
    stop_at = hold_from + config.hold
    workers = max(1, min(config.workers, config.calls))
    plans = []
    for w in range(workers):
        mine = tuple(starts[w::workers])
        plans.append(
            WorkerPlan(
                starts=mine,
                first_index=w * config.calls,
                stop_at=stop_at,
                hold_from=hold_from,
                as_port=server.as_port,
                http_port=server.http_port,
                api_key=servers.API_KEY,
                pattern=config.pattern,
                burst=config.burst,
                jitter=config.jitter_ms / 1000,
                cpu=cores[w % len(cores)],
                seed=config.seed * 1000 + w,
                transport=config.transport,
                ws_port=server.ws_port,
            )
        )
    return plans, hold_from, stop_at


def _sleep_until(at: float, server: servers.Server) -> None:
    while (left := at - time.monotonic()) > 0:
        server.check()
        time.sleep(min(left, 0.1))


def run_load(
    config: LoadConfig,
    server: servers.Server,
    profile: Callable[[servers.Server, float], subprocess.Popen[bytes] | None] | None = None,
) -> dict[str, Any]:
    """Play ``config`` against a started ``server``; return the metrics dict."""
    if config.transport != AUDIOSOCKET and server.ws_port is None:
        raise ValueError(f"{server.name} has no chan_websocket endpoint")
    config = replace(config, client=cclient.choose(config.client, config.transport))
    worker = run_worker
    if config.client == cclient.C:
        cclient.binary()  # built once here, not by each client process at its start
        worker = cclient.run_worker
    cores = client_cores(_server_core(server))
    noise = dict.fromkeys(("p50", "p99", "max"), math.nan)
    if config.noise_probe:
        noise = timer_noise(_server_core(server), config.noise_probe)
    rss_idle = servers.rss_mb(server.pid)
    t0 = time.monotonic() + 0.3
    plans, hold_from, stop_at = plan_workers(config, t0, server, cores)
    context = multiprocessing.get_context("fork")
    with context.Pool(len(plans)) as pool:
        pending = pool.map_async(worker, plans)
        _sleep_until(hold_from, server)
        gc_a = servers.gc_pauses(server)
        cpu_a = servers.cpu_seconds(server.pid)
        profiler = profile(server, config.hold) if profile else None
        _sleep_until(hold_from + config.hold / 2, server)
        rss_at_n = servers.rss_mb(server.pid)
        _sleep_until(stop_at, server)
        cpu_b = servers.cpu_seconds(server.pid)
        gc_b = servers.gc_pauses(server)
        results = pending.get(timeout=60 + config.calls / config.ramp + config.hold)
    if profiler is not None:
        profiler.wait(30)
    ok_calls = config.calls - sum(r["failed"] for r in results)
    daemon = server.wait_calls_ended(ok_calls)
    metrics = summarize(
        config,
        server,
        results,
        cpu=cpu_b - cpu_a,
        rss_idle=rss_idle,
        rss_at_n=rss_at_n,
        daemon=daemon,
    )
    metrics["host_timer_noise_ms"] = noise
    metrics["server_gc"] = {k: gc_b[k] - gc_a[k] for k in gc_b.keys() & gc_a.keys()}
    if gc_b:  # a /metrics scrape stalls the daemon: every call's tick waits for it
        metrics["server_gc"]["scrape_ms"] = 1000 * max(
            gc_a["scrape_seconds"], gc_b["scrape_seconds"]
        )
        del metrics["server_gc"]["scrape_seconds"]
    return metrics


def summarize(
    config: LoadConfig,
    server: servers.Server | None,
    results: list[dict[str, Any]],
    *,
    cpu: float,
    rss_idle: float,
    rss_at_n: float,
    daemon: tuple[int, int, int] | None,
) -> dict[str, Any]:
    """The metrics dict (every key always present) from the workers' raw results."""
    total = {k: sum(r[k] for r in results) for k in ("calls", "failed", "sent", "lost")}
    errors: dict[str, int] = {}
    for r in results:
        for why, count in r["errors"].items():
            errors[why] = errors.get(why, 0) + count
    ok_calls = total["calls"] - total["failed"]
    call_seconds = ok_calls * config.hold
    client_cpu = sum(r["cpu_seconds"] for r in results)
    client_wall = max((r["wall_seconds"] for r in results), default=math.nan)
    early, late = merge(r["early"] for r in results), merge(r["late"] for r in results)
    metrics: dict[str, Any] = {
        "server": server.name if server else "",
        "pinned": server.pinned if server else None,
        "config": asdict(config),
        "calls": total["calls"],
        "calls_failed": total["failed"],
        "errors": errors,
        "frames_sent": total["sent"],
        "frames_echoed": sum(r["echoed"] for r in results),
        "frames_lost": total["lost"],
        "frames_bad": sum(r["corrupt"] + r["duplicated"] for r in results),
        "silence_frames": sum(r["silence"] for r in results),
        "underruns_daemon": daemon[2] if daemon else None,
        "daemon_calls_ended": daemon[0] if daemon else None,
        "underruns_client": sum(r["underruns"] for r in results),
        "interval_error_ms": spread_ms(merge(r["intervals"] for r in results), 50, 99, 100),
        "echo_latency_ms": spread_ms(merge(r["latencies"] for r in results), 50, 99, 100),
        "latency_drift_ms": round((median(late) - median(early)) * 1000, 3),
        "setup_ms": spread_ms(merge(r["setup"] for r in results), 50, 99),
        "server_cpu_seconds": round(cpu, 3),
        "server_cpu_core_percent": round(100 * cpu / config.hold, 1),
        "server_cpu_per_call_second": cpu / call_seconds if call_seconds else math.nan,
        "server_rss_idle_mb": round(rss_idle, 2),
        "server_rss_mb": round(rss_at_n, 2),
        "server_rss_per_call_mb": (rss_at_n - rss_idle) / ok_calls if ok_calls else math.nan,
        "client": config.client,
        "client_processes": len(results),
        "client_cpu_seconds": round(client_cpu, 3),
        "client_cpu_core_percent": round(100 * client_cpu / client_wall, 1),
        "client_cpu_hold_core_percent": round(100 * sum(r["hold_share"] for r in results), 1),
        "client_send_lag_ms": spread_ms(merge(r["lag"] for r in results), 99, 100),
        "client_blocked_writes": sum(r["blocked_writes"] for r in results),
        "host_timer_noise_ms": {},
        "server_gc": {},
    }
    metrics["meets_bar"] = meets_bar(metrics)
    return metrics


def _server_core(server: servers.Server) -> int | None:
    if server.pinned is None:
        return None
    return int(server.pinned.split()[-1])


def py_spy(output: str) -> Callable[[servers.Server, float], subprocess.Popen[bytes] | None]:
    """A ``profile`` hook for `run_load`: py-spy records the server over the hold window."""
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")

    def start(server: servers.Server, seconds: float) -> subprocess.Popen[bytes]:
        fmt = "speedscope" if output.endswith(".json") else "flamegraph"
        if output.endswith(".txt"):
            fmt = "raw"
        argv = [exe, "record", "--pid", str(server.pid), "--duration", str(int(seconds))]
        argv += ["--rate", "200", "--format", fmt, "--output", output, "--nonblocking"]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return start


# -- registrations ---------------------------------------------------------------------------


def run_registrations_load(
    server: servers.Server, concurrency: int, seconds: float, workers: int = 2
) -> dict[str, Any]:
    """Registrations/s with ``concurrency`` requests in flight (split over ``workers``)."""
    if server.http_port is None:
        raise ValueError("this server has no registration endpoint")
    cores = client_cores(_server_core(server))
    workers = max(1, min(workers, concurrency))
    t0 = time.monotonic() + 0.3
    plans = [
        RegistrationPlan(
            start_at=t0,
            stop_at=t0 + seconds,
            http_port=server.http_port,
            api_key=servers.API_KEY,
            concurrency=concurrency // workers + (1 if w < concurrency % workers else 0),
            cpu=cores[w % len(cores)],
            first_index=w * 10_000_000,
        )
        for w in range(workers)
    ]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending = pool.map_async(run_registrations, plans)
        _sleep_until(t0, server)
        cpu_a = servers.cpu_seconds(server.pid)
        _sleep_until(t0 + seconds, server)
        cpu_b = servers.cpu_seconds(server.pid)
        results = pending.get(timeout=seconds + 30)
    latencies = merge(r["latencies"] for r in results)
    statuses: dict[str, int] = {}
    for r in results:
        for status, count in r["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + count
    span = max(r["seconds"] for r in results) or math.nan
    return {
        "concurrency": concurrency,
        "registrations": len(latencies),
        "statuses": statuses,
        "registrations_per_second": round(len(latencies) / span, 1),
        "registration_latency_ms": spread_ms(latencies, 50, 99, 100),
        "server_cpu_core_percent": round(100 * (cpu_b - cpu_a) / seconds, 1),
        "client_cpu_core_percent": round(100 * sum(r["cpu_seconds"] for r in results) / span, 1),
    }
