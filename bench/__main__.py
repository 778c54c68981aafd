"""``python -m bench MODE ...``: measure the daemon (see bench/README.md).

Modes: ``run`` (one load), ``max`` (largest N meeting the quality bar), ``reg`` (registrations/s
at saturation), ``compare`` (the same load against rapida-asterisk and a peer echo server),
``soak`` (rounds of calls against one daemon for a long time, watching its RSS and fds),
``setup`` (the daemon's CPU for one call's set-up and end, calls one at a time),
``flood`` (clean calls alone and during a burst of bad AudioSocket connections) and
``slowloris`` (registrations while slow-header connections run under a low ``ulimit -n``) and
``drain`` (SIGTERM while calls of different lengths are live: how many were cut).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from bench import cclient, edges
from bench import server as servers
from bench.client import AUDIOSOCKET, PATTERNS, TRANSPORTS, WSS
from bench.drain import drain as run_drain
from bench.load import LoadConfig, py_spy, run_load, run_registrations_load
from bench.setup import setup_cost
from bench.soak import soak as run_soak
from bench.stats import BAR_INTERVAL_P99_MS, format_table


def _core(text: str) -> int | None:
    return None if text.lower() in ("none", "no", "") else int(text)


def _client(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--client",
        choices=cclient.CLIENTS,
        default=cclient.AUTO,
        help="the load client: c (built with gcc; wss needs OpenSSL's headers), python, or "
        "auto: c where it can [auto]",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hold", type=float, default=10.0, help="measurement window, s [10]")
    p.add_argument("--ramp", type=float, default=200.0, help="calls started per second [200]")
    p.add_argument("--pattern", choices=PATTERNS, default="paced", help="input pattern [paced]")
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=AUDIOSOCKET,
        help="audiosocket, websocket (ws://) or wss (wss://, a lab certificate) [audiosocket]",
    )
    p.add_argument("--burst", type=int, default=5, help="frames per burst (bursty) [5]")
    p.add_argument("--jitter-ms", type=float, default=10.0, help="max jitter (jittered) [10]")
    p.add_argument("--workers", type=int, default=2, help="client processes [2]")
    _client(p)
    p.add_argument(
        "--core", type=_core, default=1, help="pin the server to this CPU, or 'none' [1]"
    )
    p.add_argument("--peer", help="an AudioSocket echo server command with {port}, not rapida")
    p.add_argument(
        "--record",
        metavar="DIR",
        help="record every call into DIR (stereo WAV, docs/events.md); off by default",
    )
    p.add_argument(
        "--noise-probe", type=float, default=1.0, help="host timer-noise probe, s (0: off) [1]"
    )
    p.add_argument(
        "--daemon-src",
        metavar="DIR",
        help="run the daemon from this checkout (before/after comparisons) [this one]",
    )
    p.add_argument("--json", help="write the JSON result to this file ('-': stdout)")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    run = modes.add_parser("run", help="one load of N calls")
    run.add_argument("-n", "--calls", type=int, default=100, help="concurrent calls [100]")
    run.add_argument("--py-spy", help="profile the server over the hold (file .svg/.json/.txt)")
    _common(run)
    top = modes.add_parser("max", help="the largest N meeting the quality bar")
    top.add_argument("--start", type=int, default=100, help="first N tried [100]")
    top.add_argument("--limit", type=int, default=2000, help="largest N tried [2000]")
    top.add_argument("--steps", type=int, default=7, help="at most this many runs [7]")
    _common(top)
    cmp = modes.add_parser("compare", help="the same load against rapida and --peer")
    cmp.add_argument("-n", "--calls", type=int, default=100, help="concurrent calls [100]")
    _common(cmp)
    reg = modes.add_parser("reg", help="registrations/s at saturation")
    reg.add_argument("--concurrency", default="1,4,16,64", help="in-flight requests to try")
    reg.add_argument("--seconds", type=float, default=3.0, help="per concurrency [3]")
    reg.add_argument("--workers", type=int, default=2, help="client processes [2]")
    reg.add_argument("--core", type=_core, default=1, help="pin the daemon to this CPU [1]")
    reg.add_argument("--json", help="write the JSON result to this file ('-': stdout)")
    soak = modes.add_parser("soak", help="calls for a long time: the daemon's RSS and fds")
    soak.add_argument("-n", "--calls", type=int, default=200, help="concurrent calls [200]")
    soak.add_argument("--minutes", type=float, default=60.0, help="length of the load [60]")
    soak.add_argument("--round", type=float, default=60.0, help="seconds each call lasts [60]")
    soak.add_argument("--every", type=float, default=30.0, help="seconds between samples [30]")
    soak.add_argument("--idle", type=float, default=30.0, help="idle watch at the end, s [30]")
    soak.add_argument("--transport", choices=TRANSPORTS, default=AUDIOSOCKET)
    _client(soak)
    soak.add_argument("--core", type=_core, default=1, help="pin the daemon to this CPU [1]")
    soak.add_argument("--json", help="write the JSON result to this file ('-': stdout)")
    soak.add_argument(
        "--trace", help="run the daemon with tracemalloc, snapshots in this directory"
    )
    fl = modes.add_parser("flood", help="clean calls alone and during bad connections")
    fl.add_argument("-n", "--calls", type=int, default=20, help="clean calls [20]")
    fl.add_argument("--bad", type=int, default=10000, help="bad connections [10000]")
    fl.add_argument("--hold", type=float, default=15.0, help="measurement window, s [15]")
    fl.add_argument(
        "--rate", type=float, default=770.0, help="bad connections a second, 0: flat out [770]"
    )
    fl.add_argument("--core", type=_core, default=1, help="pin the daemon to this CPU [1]")
    fl.add_argument("--unlimited", action="store_true", help="lift the accept rate, as `run` does")
    fl.add_argument("--json", help="write the JSON result to this file ('-': stdout)")
    sl = modes.add_parser("slowloris", help="registrations during slow-header connections")
    sl.add_argument("--connections", type=int, default=300, help="slow connections [300]")
    sl.add_argument("--sources", type=int, default=1, help="their client addresses [1]")
    sl.add_argument("--nofile", type=int, default=256, help="the daemon's ulimit -n [256]")
    sl.add_argument("--seconds", type=float, default=30.0, help="length of the attack [30]")
    sl.add_argument("--period", type=float, default=3.0, help="s between bytes [3]")
    sl.add_argument("--json", help="write the JSON result to this file ('-': stdout)")
    dr = modes.add_parser("drain", help="SIGTERM during live calls: how many are cut")
    dr.add_argument("-n", "--calls", type=int, default=50, help="live calls [50]")
    dr.add_argument("--shortest", type=float, default=5.0, help="shortest call, s [5]")
    dr.add_argument("--longest", type=float, default=60.0, help="longest call, s [60]")
    dr.add_argument("--sigterm-at", type=float, default=2.0, help="SIGTERM after, s [2]")
    dr.add_argument("--second-sigterm-at", type=float, help="a second SIGTERM after, s")
    dr.add_argument("--drain-timeout", help="the daemon's drain_timeout [its default]")
    dr.add_argument("--json", help="write the JSON result to this file ('-': stdout)")
    su = modes.add_parser("setup", help="the daemon's CPU per call set-up, calls one at a time")
    su.add_argument("-n", "--calls", type=int, default=200, help="calls [200]")
    su.add_argument("--transport", choices=TRANSPORTS, default=AUDIOSOCKET, help="[audiosocket]")
    su.add_argument("--core", type=_core, default=1, help="pin the server to this CPU [1]")
    su.add_argument("--daemon-src", help="run the daemon from this checkout")
    su.add_argument("--json", help="write the JSON result to this file ('-': stdout)")
    args = parser.parse_args(argv)
    if args.mode == "compare" and not args.peer:
        parser.error("compare needs --peer 'COMMAND {port}'")
    if getattr(args, "peer", None) and args.transport != AUDIOSOCKET:
        parser.error("--peer servers speak AudioSocket only: --transport audiosocket")
    return args


def _config(args: argparse.Namespace, calls: int) -> LoadConfig:
    return LoadConfig(
        calls=calls,
        hold=args.hold,
        ramp=args.ramp,
        pattern=args.pattern,
        burst=args.burst,
        jitter_ms=args.jitter_ms,
        workers=args.workers,
        noise_probe=args.noise_probe,
        transport=args.transport,
        client=args.client,
    )


def _start(args: argparse.Namespace, peer: str | None) -> servers.Server:
    if peer:
        return servers.start_peer(peer, args.core)
    return servers.start_daemon(
        args.core,
        tls=args.transport == WSS,
        record_dir=getattr(args, "record", None),
        source=args.daemon_src,
    )


def one_run(args: argparse.Namespace, calls: int, peer: str | None = None) -> dict[str, Any]:
    server = _start(args, peer)
    try:
        profile = py_spy(args.py_spy) if getattr(args, "py_spy", None) else None
        return run_load(_config(args, calls), server, profile)
    finally:
        server.stop()


def find_max(args: argparse.Namespace) -> dict[str, Any]:
    """Double N from ``--start`` while the bar holds, then bisect; fresh server per run."""
    tried: dict[int, dict[str, Any]] = {}

    def ok(n: int) -> bool:
        metrics = one_run(args, n, args.peer)
        tried[n] = metrics
        print(_line(n, metrics), flush=True)
        return bool(metrics["meets_bar"])

    good, bad, n = 0, None, args.start
    while len(tried) < args.steps and n <= args.limit:
        if ok(n):
            good, n = n, min(n * 2, args.limit) if n < args.limit else args.limit + 1
        else:
            bad = n
            break
    while bad is not None and len(tried) < args.steps and bad - good > max(10, good // 10):
        n = (good + bad) // 2
        if ok(n):
            good = n
        else:
            bad = n
    return {"max_calls": good, "first_failing": bad, "runs": {str(k): v for k, v in tried.items()}}


def _line(n: int, m: dict[str, Any]) -> str:
    return (
        f"N={n:5d}  bar={'PASS' if m['meets_bar'] else 'fail'}  "
        f"p99 err={m['interval_error_ms']['p99']:.3f} ms  lost={m['frames_lost']}  "
        f"underruns={m['underruns_daemon'] if m['underruns_daemon'] is not None else '-'}/"
        f"{m['underruns_client']}  server={m['server_cpu_core_percent']:.0f}%  "
        f"client={m['client']} {m['client_cpu_core_percent']:.0f}% "
        f"lag p99={m['client_send_lag_ms']['p99']:.3f} ms  failed={m['calls_failed']}  "
        f"full GCs={m['server_gc'].get('full', '-')}"
    )


def _emit(result: dict[str, Any], target: str | None) -> None:
    if not target:
        return
    text = json.dumps(_clean(result), indent=2, sort_keys=True)
    if target == "-":
        print(text)
    else:
        with open(target, "w") as f:
            f.write(text + "\n")


def _clean(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    core = getattr(args, "core", None)
    pinned = f"server pinned to CPU {core}" if core is not None else "server unpinned"
    if args.mode == "reg":
        server = servers.start_daemon(args.core)
        try:
            rows = []
            for c in (int(x) for x in args.concurrency.split(",")):
                rows.append(run_registrations_load(server, c, args.seconds, args.workers))
        finally:
            server.stop()
        print(f"registrations ({pinned}, {args.seconds:g} s per row)")
        print("concurrency   reg/s    p50 ms    p99 ms    max ms  server%  client%")
        for r in rows:
            lat = r["registration_latency_ms"]
            print(
                f"{r['concurrency']:11d} {r['registrations_per_second']:7.0f} "
                f"{lat['p50']:9.3f} {lat['p99']:9.3f} {lat['max']:9.3f} "
                f"{r['server_cpu_core_percent']:7.0f}  {r['client_cpu_core_percent']:7.0f}"
            )
        fit = [r for r in rows if r["registration_latency_ms"]["p99"] <= 5.0]
        best = max(fit or rows, key=lambda r: r["registrations_per_second"])
        result = {"rows": rows, "best_within_p99_5ms": best if fit else None}
        _emit(result, args.json)
        return 0
    if args.mode == "flood":
        # The daemon's own accept limits (the bench lifts them for capacity runs).
        env = {} if args.unlimited else {"RAPIDA_ACCEPT_RATE": "200", "RAPIDA_ACCEPT_BURST": "400"}
        result = edges.flood(args.calls, args.bad, args.hold, args.core, env, args.rate or None)
        print(f"{args.calls} clean calls, {args.bad} bad AudioSocket connections, {pinned}")
        for label, r in result.items():
            print(
                f"  {label:6s} p99 interval error {r['p99_ms']:.2f} ms (p50 {r['p50_ms']:.2f}), "
                f"lost {r['frames_lost']}, server {r['server_cpu_percent']:.0f}% CPU, "
                f"{r['log_lines']} log lines, bad: {r['bad']}"
            )
            for name, count in sorted(r["refused"].items()):
                print(f"         {name} {count:g}")
        _emit(result, args.json)
        return 0
    if args.mode == "slowloris":
        env = {"RAPIDA_ACCEPT_RATE": "200", "RAPIDA_ACCEPT_BURST": "400"}
        result = edges.slowloris(
            args.connections, args.sources, args.nofile, args.seconds, args.period, env
        )
        print(
            f"{args.connections} slow-header connections from {args.sources} address(es), "
            f"ulimit -n {args.nofile}, {args.seconds:g} s: registrations from another address "
            f"{result['answered_200']}/{result['registrations']} answered 200 "
            f"(statuses {result['statuses']}), p50 {result['latency_ms_p50']} ms, "
            f"max {result['latency_ms_max']} ms"
        )
        print(f"  attack: {result['attack']}")
        for name, count in sorted(result["refused"].items()):
            print(f"  {name} {count:g}")
        _emit(result, args.json)
        return 0
    if args.mode == "drain":
        env = {"RAPIDA_DRAIN_TIMEOUT": args.drain_timeout} if args.drain_timeout else {}
        result = run_drain(
            args.calls, args.shortest, args.longest, args.sigterm_at, args.second_sigterm_at, env
        )
        print(
            f"{result['calls']} calls of {args.shortest:g}-{args.longest:g} s, signals at "
            f"{result['signals_at']}: {result['cut_by_daemon']} cut by the daemon "
            f"({result['cut_with_hangup_frame']} with a hangup frame); daemon exited "
            f"{result['daemon_exit_code']} at {result['daemon_exited_at']} s"
        )
        _emit(result, args.json)
        return 0
    if args.mode == "setup":
        result = setup_cost(args.transport, args.calls, args.core, args.daemon_src)
        print(
            f"{result['calls']} {args.transport} calls one at a time ({result['calls_ended']} "
            f"ended in the daemon's log): daemon CPU {result['daemon_cpu_ms_per_call']:.2f} ms "
            f"per call set-up and end, {100 * result['daemon_cpu_share']:.0f} % of a core; "
            f"a call took {result['call_wall_ms_p50']:.1f} ms (p50)"
        )
        _emit(result, args.json)
        return 0
    if args.mode == "soak":
        server = servers.start_daemon(args.core, tls=args.transport == WSS, trace_dir=args.trace)
        try:
            result = run_soak(
                server,
                calls=args.calls,
                minutes=args.minutes,
                round_seconds=args.round,
                every=args.every,
                idle=args.idle,
                transport=args.transport,
                out=sys.stdout,
                trace_dir=args.trace,
                client=args.client,
            )
        finally:
            server.stop()
        _emit(result, args.json)
        return 0
    if args.mode == "max":
        result = find_max(args)
        print(
            f"max N meeting the bar (p99 interval error <= {BAR_INTERVAL_P99_MS:g} ms, 0 lost, "
            f"0 underruns), {args.pattern}, {pinned}: {result['max_calls']}"
        )
        _emit(result, args.json)
        return 0
    if args.mode == "compare":
        columns = {
            "rapida": one_run(args, args.calls),
            "peer": one_run(args, args.calls, args.peer),
        }
        print(f"{args.calls} calls, {args.pattern}, hold {args.hold:g} s, {pinned}")
        print(format_table(columns))
        _emit(columns, args.json)
        return 0
    metrics = one_run(args, args.calls, args.peer)
    print(f"{args.calls} calls, {args.transport}, {args.pattern}, hold {args.hold:g} s, {pinned}")
    print(format_table({metrics["server"]: metrics}))
    if metrics["errors"]:
        print(f"errors: {metrics['errors']}")
    _emit(metrics, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
