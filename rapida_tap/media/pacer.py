"""One drift-free 20 ms clock for every call in the process.

Asterisk plays whatever it receives at once, so the daemon must write exactly one frame per call
every 20 ms.  One shared timer (rather than a timer per call) keeps that cheap for thousands of
calls and keeps every call on the same grid.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rapida_tap.media.audio import FRAME_SECONDS

# Fire this much before each deadline: reactors wake up late (epoll rounds timeouts up to whole
# milliseconds), so aiming early centres the error on the grid.  A tick within ``_TOLERANCE``
# intervals of its deadline counts as on time.
_EARLY = 0.0005
_TOLERANCE = 0.1

#: Upper edges (seconds) of the tick-lateness histogram; a last bucket holds everything later.
#: A call snapshots the counts when it starts and reads the difference when it ends, so each
#: call has its own pacing error at no cost per frame (see ``LatenessHistogram``).
LATENESS_EDGES = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.1, 0.2, 0.5,
)  # fmt: skip


class LatenessHistogram:
    """Counts of ticks by lateness, cumulative since the pacer was made (one list of ints)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENESS_EDGES) + 1)

    def add(self, late: float) -> None:
        self.counts[bisect.bisect_left(LATENESS_EDGES, late)] += 1

    def snapshot(self) -> list[int]:
        return self.counts.copy()

    def since(self, snapshot: list[int]) -> list[int]:
        """The ticks counted after ``snapshot`` was taken, by bucket."""
        return [now - then for now, then in zip(self.counts, snapshot, strict=True)]


class Paced(Protocol):
    def pace(self, catch_up: bool) -> None:
        """Write this tick's frame (and, when ``catch_up``, one owed frame if audio is queued)."""

    def pace_failed(self, failure: Failure) -> None:
        """``pace`` raised: end the stream (it is a bug, and the stream must not go silent)."""


class Pacer:
    """Ticks on the grid ``start + n * interval`` while it has streams; idle otherwise.

    Deadlines come from the grid, never from "now + interval", so lateness does not accumulate.
    When the reactor was late by whole intervals, the missed ticks become *debt*: each later tick
    lets every call send one extra queued frame until the debt is paid, so a backlog is worked off
    at no more than twice real time instead of in a burst.  Debt beyond ``max_debt`` ticks is
    forgiven (those ticks are skipped) and counted in ``skipped_ticks``.
    """

    log = Logger()

    def __init__(
        self, clock: IReactorTime, interval: float = FRAME_SECONDS, max_debt: int = 25
    ) -> None:
        self._clock = clock
        self.interval = interval
        self.max_debt = max_debt
        self._streams: dict[Paced, None] = {}  # insertion-ordered set
        self._timer: IDelayedCall | None = None
        self._start = 0.0
        self._next = 0  # index on the grid of the next tick
        self.position = 0  # index on the grid of the last tick (missed ones count)
        self.debt = 0
        self.ticks = 0
        self.skipped_ticks = 0
        self.late_ticks = 0
        self.lateness = LatenessHistogram()
        self.lateness_observer: Callable[[float], None] | None = None  # seconds, for metrics

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream: object) -> bool:
        return stream in self._streams

    def add(self, stream: Paced) -> None:
        self._streams[stream] = None
        if self._timer is None:
            self._start = self._clock.seconds()
            self._next = 1
            self.position = 0
            self.debt = 0
            self._timer = self._clock.callLater(self.interval - _EARLY, self._tick)

    def until_next_tick(self) -> float:
        """Seconds from now to the next tick's place on the grid (a whole interval when idle)."""
        if self._timer is None:
            return self.interval
        return self._start + self._next * self.interval - self._clock.seconds()

    def remove(self, stream: Paced) -> None:
        self._streams.pop(stream, None)
        if not self._streams and self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def stop(self) -> None:
        """Forget every stream and cancel the timer (service stop)."""
        self._streams.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stream_failed(self, stream: Paced, failure: Failure) -> None:
        """Hand the failure to its stream, which ends itself; drop it if even that fails."""
        try:
            stream.pace_failed(failure)
        except Exception:
            self.log.failure("pacing a stream failed, and so did ending it; dropping it")
        self._streams.pop(stream, None)

    def _tick(self) -> None:
        now = self._clock.seconds()
        due = math.floor((now - self._start) / self.interval + _TOLERANCE)
        missed = due - self._next
        if missed > 0:
            self.late_ticks += 1
            self.debt += missed
            if self.debt > self.max_debt:
                self.skipped_ticks += self.debt - self.max_debt
                self.debt = self.max_debt
        late = now - (self._start + self._next * self.interval)
        self.lateness.add(late)
        if self.lateness_observer is not None:
            self.lateness_observer(late)
        self._next = max(due, self._next) + 1
        self.position = self._next - 1
        catch_up = self.debt > 0
        if catch_up:
            self.debt -= 1
        self.ticks += 1
        for stream in list(self._streams):
            try:
                stream.pace(catch_up)
            except Exception:
                self._stream_failed(stream, Failure())
        if self._streams:
            delay = self._start + self._next * self.interval - _EARLY - self._clock.seconds()
            self._timer = self._clock.callLater(max(delay, 0.0), self._tick)
        else:
            self._timer = None
