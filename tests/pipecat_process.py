"""Run ``tests/pipecat_bot.py`` as a child process of a test on the real reactor.

The bot prints one JSON object per line on stdout (``{"event": "listening", "port": N}`` first);
`PipecatBotProcess` collects them in ``events`` and lets a test wait for any of them.  Its
stderr (Pipecat's log) is kept, bounded, to explain a failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.python.failure import Failure

BOT = Path(__file__).resolve().with_name("pipecat_bot.py")
REPO = BOT.parents[1]
REQUIREMENTS = BOT.with_name("pipecat-bot-requirements.txt")
PYTHON_ENV = "RAPIDA_PIPECAT_PYTHON"  # another interpreter with Pipecat, instead of .venv-pipecat
START_TIMEOUT = 60.0  # seconds: importing Pipecat takes 1-2 s on an idle machine
STOP_TIMEOUT = 10.0
STDERR_KEEP = 64 * 1024


class BotExited(Exception):
    """The bot process ended before it was asked to."""


class PipecatBotProcess(protocol.ProcessProtocol):
    """The bot's process: ``listening`` fires with its port once it accepts connections."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self.port = 0
        self.listening: defer.Deferred[int] = defer.Deferred()
        self._exit_waiters: list[defer.Deferred[None]] = []
        self.running = False
        self._line = b""
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    # -- the process ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.running = True
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        *lines, self._line = (self._line + data).split(b"\n")
        for line in lines:
            if line.strip():
                self._event(_parse_line(line))
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-STDERR_KEEP:]

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if not self.listening.called:
            self.listening.errback(BotExited(f"the Pipecat bot did not start: {self.log_tail()}"))
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(None)
        self._check()

    def _event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["event"] == "listening" and not self.listening.called:
            self.port = int(event["port"])
            self.listening.callback(self.port)

    # -- what tests use ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_tail(self, n: int = 3000) -> str:
        return self.stderr.decode("utf-8", "replace")[-n:]

    def of(self, event: str, call: str | None = None) -> list[dict[str, Any]]:
        """The events named ``event`` (for one call id, when given), in order."""
        return [
            e for e in self.events if e["event"] == event and (call is None or e["call"] == call)
        ]

    def wait_for(self, event: str, call: str | None = None, timeout: float = 15.0) -> Any:
        """Fires with the first ``event`` (of ``call``) once the bot has reported it."""
        d = self.wait_until(lambda: bool(self.of(event, call)), timeout, f"{event} {call or ''}")
        return d.addCallback(lambda _: self.of(event, call)[0])

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition"
    ) -> defer.Deferred[None]:
        """Fires when ``predicate()`` holds, checked on each line the bot prints."""
        d: defer.Deferred[None] = defer.Deferred()
        if predicate():
            d.callback(None)
            return d
        self._waiters.append((predicate, d))

        def explain(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                raise AssertionError(
                    f"the Pipecat bot did not report {what} within {timeout}s; it said "
                    f"{self.events[-10:]}; its log: {self.log_tail()}"
                )
            return failure

        return d.addTimeout(timeout, reactor).addErrback(explain)

    def _check(self) -> None:
        for item in list(self._waiters):
            predicate, d = item
            if d.called:
                self._waiters.remove(item)
            elif predicate():
                self._waiters.remove(item)
                d.callback(None)
            elif not self.running:
                self._waiters.remove(item)
                d.errback(BotExited(f"the Pipecat bot exited: {self.log_tail()}"))

    def when_exited(self) -> defer.Deferred[None]:
        """A new Deferred that fires once the process is gone."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.running:
            self._exit_waiters.append(d)
        else:
            d.callback(None)
        return d

    def stop(self) -> defer.Deferred[None]:
        """SIGTERM (uvicorn shuts down gracefully); SIGKILL if it is not gone in time."""
        gone = self.when_exited()
        if not self.running:
            return gone
        self.transport.signalProcess("TERM")

        def kill() -> None:
            if self.running:
                self.transport.signalProcess("KILL")

        timer = reactor.callLater(STOP_TIMEOUT, kill)

        def cancel(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return gone.addBoth(cancel)


def _parse_line(line: bytes) -> dict[str, Any]:
    """One stdout line as the bot's report; anything else something printed is kept as text."""
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if isinstance(event, dict) and isinstance(event.get("event"), str):
        return event
    return {"event": "stdout", "call": None, "text": line.decode("utf-8", "replace")}


class NoPipecat(Exception):
    """The bot's interpreter is missing; the message says how to install it."""


def bot_python() -> str:
    """The Python that runs the bot: ``$RAPIDA_PIPECAT_PYTHON``, else ``.venv-pipecat``'s.

    Pipecat lives in its own environment (``tests/pipecat-bot-requirements.txt`` says why);
    without it the tests fail here, saying how to make it, rather than being skipped.
    """
    python = os.environ.get(PYTHON_ENV) or str(REPO / ".venv-pipecat" / "bin" / "python")
    if not os.access(python, os.X_OK):
        raise NoPipecat(
            f"no Python for the Pipecat bot at {python}: run .ci/run, or "
            f"python3 -m venv .venv-pipecat && .venv-pipecat/bin/pip install -r "
            f"{REQUIREMENTS.relative_to(REPO)} (or set {PYTHON_ENV})"
        )
    return python


def spawn_pipecat_bot(mode: str, *options: str) -> PipecatBotProcess:
    """Spawn the bot with ``--mode mode`` and ``options``; the caller stops it."""
    python = bot_python()
    bot = PipecatBotProcess()
    argv = [python, str(BOT), "--port", "0", "--mode", mode, *options]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    reactor.spawnProcess(bot, python, argv, env=env, path=str(REPO))
    return bot


def listening(bot: PipecatBotProcess) -> defer.Deferred[PipecatBotProcess]:
    """Fires with ``bot`` once it listens; fails with its log if it has not within
    ``START_TIMEOUT`` seconds, or if it exited."""

    def explain(failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError):
            raise AssertionError(
                f"the Pipecat bot did not start within {START_TIMEOUT}s: {bot.log_tail()}"
            )
        return failure

    d = bot.listening.addTimeout(START_TIMEOUT, reactor).addErrback(explain)
    return d.addCallback(lambda _: bot)


def start_pipecat_bot(testcase: Any, mode: str, *options: str) -> defer.Deferred[Any]:
    """The bot for one test: fires with it once it listens; stopped when the test ends."""
    bot = spawn_pipecat_bot(mode, *options)
    testcase.addCleanup(bot.stop)
    return listening(bot)
