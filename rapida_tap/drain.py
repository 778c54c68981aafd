"""Drain: stop taking calls, let the live ones finish, however long they take.

A rolling restart sends SIGTERM (``systemctl restart``) or ``POST /admin/drain``.  From that
moment the node is not ready (``/healthz`` 503, so a load balancer stops sending traffic),
registration answers 503 and new AudioSocket / WebSocket connections are refused, while live
calls go on.  By default (``timeout`` 0) the drain waits for the last call to end, as
Asterisk's ``core stop gracefully`` does.  With a ``timeout``, calls still live after that many
seconds are ended with ``drain-timeout``; ``force`` (a second SIGTERM) ends them at once.
Either way each call ends through its leg, so Asterisk gets the hangup frame or close.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from rapida_tap.reasons import EndReason

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call

#: the end reason of calls still live when the drain timeout passes
DRAIN_TIMEOUT = EndReason.DRAIN_TIMEOUT


class DrainState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    DRAINED = "drained"


class Drain:
    """One node's drain; ``start`` is idempotent and every caller gets its own Deferred."""

    log = Logger()

    def __init__(self, bridge: MediaBridge, clock: IReactorTime, timeout: float) -> None:
        self._bridge = bridge
        self._clock = clock
        self.timeout = timeout
        self.state = DrainState.SERVING
        self.why = ""
        self.started_at: float | None = None
        self._timer: IDelayedCall | None = None
        self._waiters: list[defer.Deferred[None]] = []
        bridge.call_ended.append(self._call_ended)

    @property
    def live_calls(self) -> int:
        return len(self._bridge.calls)

    @property
    def remaining(self) -> float | None:
        """Seconds until the deadline (0 when not draining, ``None`` when there is none)."""
        if self.state is not DrainState.DRAINING or self.started_at is None:
            return 0.0
        if not self.timeout:
            return None
        return max(0.0, self.started_at + self.timeout - self._clock.seconds())

    def start(self, why: str) -> defer.Deferred[None]:
        """Begin draining (``why`` is for the log: ``SIGTERM``, ``POST /admin/drain``).

        Fires with ``None`` once no call is left on this node.
        """
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.state is DrainState.DRAINED:
            waiter.callback(None)
            return waiter
        self._waiters.append(waiter)
        if self.state is DrainState.SERVING:
            self.state = DrainState.DRAINING
            self.why = why
            self.started_at = self._clock.seconds()
            self._bridge.accepting = False
            self.log.info(
                "draining ({why}): {calls} live call(s), {limit}",
                why=why,
                calls=len(self._bridge.calls),
                limit=f"up to {self.timeout:g} s" if self.timeout else "waiting for every call",
            )
            if not self._bridge.calls:
                self._done()
            elif self.timeout:
                self._timer = self._clock.callLater(self.timeout, self._timed_out)
        return waiter

    def force(self, why: str) -> None:
        """End every live call now (a second SIGTERM); starts the drain if it had not."""
        if self.state is DrainState.SERVING:
            self.start(why)
        if self.state is not DrainState.DRAINING:
            return
        self.log.warn(
            "drain forced ({why}): ending {calls} call(s)", why=why, calls=len(self._bridge.calls)
        )
        self.stop()
        self._bridge.end_all(EndReason.SHUTDOWN)
        if self.state is DrainState.DRAINING:
            self._done()

    def stop(self) -> None:
        """Forget the timer (service stop after the drain, or a test's clean-up)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _call_ended(self, call: Call) -> None:
        if self.state is DrainState.DRAINING and not self._bridge.calls:
            self._done()

    def _timed_out(self) -> None:
        self._timer = None
        left = len(self._bridge.calls)
        self.log.warn(
            "drain timeout ({timeout:g} s): ending {calls} call(s)",
            timeout=self.timeout,
            calls=left,
        )
        self._bridge.end_all(DRAIN_TIMEOUT)
        if self.state is DrainState.DRAINING:  # end_all ended them all: already done
            self._done()

    def _done(self) -> None:
        self.stop()
        self.state = DrainState.DRAINED
        started = self.started_at if self.started_at is not None else self._clock.seconds()
        self.log.info("drained after {seconds:.1f} s", seconds=self._clock.seconds() - started)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


def install_force_signal(drain: Drain, reactor: Any) -> Callable[[], None]:
    """While a drain runs, SIGTERM forces it (``Drain.force``); returns the undo function.

    The first SIGTERM stops the reactor, which starts the drain; the reactor ignores any
    later SIGTERM while it waits, so without this a second one would do nothing.
    """
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(drain.force, "second SIGTERM")

    signal.signal(signal.SIGTERM, handler)

    def undo() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return undo
