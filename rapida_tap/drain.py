"""Drain: stop taking calls, let the live ones finish, end the rest after a deadline.

A rolling restart sends SIGTERM (``systemctl restart``) or ``POST /admin/drain``.  From that
moment the node is not ready (``/healthz`` 503, so a load balancer stops sending traffic),
registration answers 503 and new AudioSocket / WebSocket connections are refused, while live
calls go on.  When the last one ends, or ``timeout`` seconds have passed and the rest were
ended with ``drain-timeout``, the drain is done.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

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
    def remaining(self) -> float:
        """Seconds until the deadline (0 when not draining)."""
        if self.state is not DrainState.DRAINING or self.started_at is None:
            return 0.0
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
                "draining ({why}): {calls} live call(s), up to {timeout:g} s",
                why=why,
                calls=len(self._bridge.calls),
                timeout=self.timeout,
            )
            if self._bridge.calls:
                self._timer = self._clock.callLater(self.timeout, self._timed_out)
            else:
                self._done()
        return waiter

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
