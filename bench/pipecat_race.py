"""The Pipecat hang-up race, counted: does the bot hanging up mid-speech end each call right?

    .venv/bin/python -m bench.pipecat_race [-n 50] [--transport audiosocket,websocket]
        [--concurrency 10] [--end-silence S] [--after-frames K] [--json FILE]

One real Pipecat bot (``tests/pipecat_bot.py --mode hangup-after``: it echoes, and after
``--after-frames`` caller frames says goodbye and ends its pipeline, then Pipecat sends
``audio_out_end_silence_secs`` of silence and closes the WebSocket), and per transport a fresh
daemon process (``twistd -n rapida-asterisk``, the bot as its assistant).  Each of the N calls
talks without pause until the daemon ends it.  Per transport it prints how many calls ended
with the right hangup toward Asterisk (``0x00`` then close on AudioSocket; ``HANGUP`` then
close 1000 on chan_websocket), the end reasons the daemon logged, and the tracebacks,
``Unhandled Error``, critical and error lines in its log.  Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from typing import Any

from twisted.internet import defer, reactor, task

from bench import server as servers
from rapida_tap.assistants.upstream import stream_sids
from tests.callers import Caller, call_over_audiosocket, call_over_chan_websocket
from tests.pipecat_process import PipecatBotProcess, listening, spawn_pipecat_bot

ASSISTANT = "pipecat"
CALL_TIMEOUT = 30.0  # seconds a call may last before the bench hangs it up itself
CALLERS = {"audiosocket": call_over_audiosocket, "websocket": call_over_chan_websocket}
_ENDED = re.compile(rb"call (\S+) ended: (\S+)")


def log_counts(log: bytes) -> dict[str, Any]:
    """End reasons and trouble in a daemon log (twistd's text format)."""
    reasons = collections.Counter(m.group(2).decode() for m in _ENDED.finditer(log))
    return {
        "end_reasons": dict(sorted(reasons.items())),
        "tracebacks": log.count(b"Traceback (most recent call last)"),
        "unhandled_errors": log.count(b"Unhandled Error"),
        "critical_lines": len(re.findall(rb"#critical\]", log)),
        "error_lines": len(re.findall(rb"#error\]", log)),
    }


@defer.inlineCallbacks
def one_call(server: servers.Server, transport: str) -> Any:
    """One call that talks until the daemon hangs up; fires with ``(call_sid, outcome, right)``."""
    try:
        caller: Caller = yield CALLERS[transport](server, ASSISTANT, api_key=servers.API_KEY)
    except Exception as e:
        return "", f"call not set up: {e}", False
    caller.talk()
    timer = reactor.callLater(CALL_TIMEOUT, caller.hang_up)
    yield caller.closed
    timed_out = not timer.active()
    if timer.active():
        timer.cancel()
    outcome = f"no hangup within {CALL_TIMEOUT:g}s" if timed_out else caller.daemon_hangup()
    return stream_sids(caller.ctx)[1], outcome, outcome == caller.expected_hangup()


@defer.inlineCallbacks
def run_transport(bot: PipecatBotProcess, transport: str, calls: int, concurrency: int) -> Any:
    server = servers.start_daemon(extra_env={"RAPIDA_ASSISTANT": bot.url})
    try:
        limit = defer.DeferredSemaphore(concurrency)
        results = yield defer.gatherResults(
            [limit.run(one_call, server, transport) for _ in range(calls)], consumeErrors=True
        )
        sids = {sid for sid, _outcome, _right in results}
        yield settled(lambda: servers.daemon_call_counts(server.log())[0] >= calls)
        yield settled(lambda: sids <= {e["call"] for e in bot.of("ended")})
        bot_ended = sum(
            1 for e in bot.of("finished") if e["call"] in sids and e["frame"] == "EndFrame"
        )
        return {
            "calls": calls,
            "right_hangup": sum(right for _sid, _outcome, right in results),
            "outcomes": dict(collections.Counter(outcome for _sid, outcome, _r in results)),
            "bot_ended_its_pipeline": bot_ended,
            **log_counts(server.log()),
        }
    finally:
        server.stop()


@defer.inlineCallbacks
def settled(done: Any, timeout: float = 10.0) -> Any:
    """Let the daemon's log and the bot's reports catch up: until ``done()`` or ``timeout``."""
    for _ in range(int(timeout / 0.1)):
        if done():
            return
        yield task.deferLater(reactor, 0.1, lambda: None)


def _table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("calls", "calls"),
        ("right hangup toward Asterisk", "right_hangup"),
        ("what Asterisk got", "outcomes"),
        ("bot ended its pipeline", "bot_ended_its_pipeline"),
        ("end reasons (daemon log)", "end_reasons"),
        ("tracebacks", "tracebacks"),
        ("Unhandled Error", "unhandled_errors"),
        ("critical lines", "critical_lines"),
        ("error lines", "error_lines"),
    ]
    width = max(len(label) for label, _key in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{t:<48}" for t in results)]
    for label, key in rows:
        cells = []
        for metrics in results.values():
            value = metrics[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            cells.append(f"{value!s:<48}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipecat_race", description=__doc__)
    parser.add_argument("-n", "--calls", type=int, default=50, help="calls per transport [50]")
    parser.add_argument(
        "--transport", default="audiosocket,websocket", help="comma separated [both]"
    )
    parser.add_argument("--concurrency", type=int, default=10, help="calls at once [10]")
    parser.add_argument(
        "--end-silence", type=int, help="the bot's audio_out_end_silence_secs [Pipecat's, 2]"
    )
    parser.add_argument(
        "--after-frames", type=int, default=25, help="caller frames before the bot ends [25]"
    )
    parser.add_argument("--json", help="write the result to this file ('-': stdout)")
    args = parser.parse_args(argv)
    args.transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    unknown = set(args.transports) - set(CALLERS)
    if unknown:
        parser.error(f"unknown transport(s): {', '.join(sorted(unknown))}")
    return args


@defer.inlineCallbacks
def main(_reactor: Any, args: argparse.Namespace) -> Any:
    options = ["--after-frames", str(args.after_frames)]
    if args.end_silence is not None:
        options += ["--end-silence", str(args.end_silence)]
    bot = spawn_pipecat_bot("hangup-after", *options)
    try:
        yield listening(bot)
        results = {}
        for transport in args.transports:
            results[transport] = yield run_transport(bot, transport, args.calls, args.concurrency)
    finally:
        yield bot.stop()
    print(_table(results))
    if args.json == "-":
        print(json.dumps(results, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    task.react(main, [parse(sys.argv[1:])])
