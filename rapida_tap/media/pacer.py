"""One drift-free 20 ms clock for every call in the process.

Asterisk plays whatever it receives at once, so the daemon must write exactly one frame per call
every 20 ms.  One shared timer (rather than a timer per call) keeps that cheap for thousands of
calls and keeps every call on the same grid.

The grid has ``phases`` evenly spaced ticks per 20 ms, and each call is paced on one of them.
A call whose audio comes from a real-time source (the caller's own voice, echoed; a bot that
streams as it speaks) is moved, whenever its audio starts after silence, to the phase that
comes first at least ``margin`` after that audio arrived (`align`).  Its frames then wait
``margin`` to ``margin + 20 ms / phases`` for their tick, instead of anything from 0 to 20 ms:
less latency on average, and no frame that lands just after "its" tick and leaves a silent
gap.  It also spreads the work of one 20 ms round over several smaller ticks.
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
    """Ticks on the grid ``start + n * interval / phases`` while it has streams; idle otherwise.

    Deadlines come from the grid, never from "now + interval", so lateness does not accumulate.
    When the reactor was late by whole intervals, a phase's missed ticks become its *debt*: each
    later tick lets its calls send one extra queued frame until the debt is paid, so a backlog
    is worked off at no more than twice real time instead of in a burst.  Debt beyond
    ``max_debt`` ticks is forgiven (those ticks are skipped) and counted in ``skipped_ticks``.
    ``position`` is the index of the current 20 ms round on the grid (missed rounds count).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = FRAME_SECONDS,
        max_debt: int = 25,
        phases: int = 1,
    ) -> None:
        self._clock = clock
        self.interval = interval
        self.max_debt = max_debt
        self.phases = phases
        self._step = interval / phases
        self._groups: list[dict[Paced, None]] = [{} for _ in range(phases)]  # ordered sets
        self._phase_of: dict[Paced, int] = {}
        self._debts = [0] * phases
        self._timer: IDelayedCall | None = None
        self._start = 0.0
        self._next = 0  # index on the grid (in steps) of the next tick
        self.position = 0
        self.ticks = 0  # rounds of 20 ms paced
        self.skipped_ticks = 0
        self.late_ticks = 0
        self.lateness = LatenessHistogram()
        self.lateness_observer: Callable[[float], None] | None = None  # seconds, for metrics
        #: Reads what the sockets hold now (the reactor's ``doIteration(0)``), called before
        #: each tick.  The reactor reads a batch of events, then fires the timers that fell due
        #: meanwhile: frames that arrived while the batch was handled (or a collection, or a
        #: /metrics scrape, held the process) are not in it.  Read first, they go out on this
        #: tick instead of silence (a click) and a frame owed to the next.
        self.read_pending: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._phase_of)

    def __contains__(self, stream: object) -> bool:
        return stream in self._phase_of

    @property
    def debt(self) -> int:
        """The most ticks any phase owes."""
        return max(self._debts)

    def add(self, stream: Paced) -> None:
        """Pace ``stream`` from the next tick, on the phase with the fewest streams."""
        if self._timer is None:
            self._start = self._clock.seconds()
            self._next = 1
            self.position = 0
            self._debts = [0] * self.phases
            self._timer = self._clock.callLater(self._step - _EARLY, self._tick)
        phase = min(range(self.phases), key=lambda p: len(self._groups[p]))
        self._join(stream, phase)

    def align(self, stream: Paced, margin: float) -> None:
        """Move ``stream`` to the phase whose next tick is the first at least ``margin`` away."""
        if self.phases == 1 or stream not in self._phase_of:
            return
        now = self._clock.seconds()
        soonest = math.ceil((now + margin - self._start) / self._step - 1e-9)
        self._join(stream, max(soonest, self._next) % self.phases)

    def until_next_tick(self, stream: Paced | None = None) -> float:
        """Seconds from now to the next tick (of ``stream``'s phase); an interval when idle."""
        if self._timer is None:
            return self.interval
        index = self._next
        if stream is not None and stream in self._phase_of:
            index += (self._phase_of[stream] - index) % self.phases
        return self._start + index * self._step - self._clock.seconds()

    def remove(self, stream: Paced) -> None:
        phase = self._phase_of.pop(stream, None)
        if phase is not None:
            self._groups[phase].pop(stream, None)
        if not self._phase_of and self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def stop(self) -> None:
        """Forget every stream and cancel the timer (service stop)."""
        for group in self._groups:
            group.clear()
        self._phase_of.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _join(self, stream: Paced, phase: int) -> None:
        old = self._phase_of.get(stream)
        if old == phase:
            return
        if old is not None:
            self._groups[old].pop(stream, None)
        self._groups[phase][stream] = None
        self._phase_of[stream] = phase

    def _stream_failed(self, stream: Paced, failure: Failure) -> None:
        """Hand the failure to its stream, which ends itself; drop it if even that fails."""
        try:
            stream.pace_failed(failure)
        except Exception:
            self.log.failure("pacing a stream failed, and so did ending it; dropping it")
        self.remove(stream)

    def _tick(self) -> None:
        timer = self._timer
        now = self._clock.seconds()
        phases = self.phases
        first = self._next
        late = now - (self._start + first * self._step)
        if self.read_pending is not None:
            try:
                self.read_pending()
            except Exception:
                self.read_pending = None  # once: a broken reader must not log 200 times a second
                self.log.failure("reading the sockets before a tick failed; no longer tried")
            if self._timer is not timer:
                return  # every stream ended meanwhile, or the pacer was stopped or restarted
            now = self._clock.seconds()
        due = max(first, math.floor((now - self._start) / self._step + _TOLERANCE * phases))
        self.lateness.add(late)
        if self.lateness_observer is not None:
            self.lateness_observer(late)
        if due - first >= phases:
            self.late_ticks += 1
        rounds = due // phases - (first - 1) // phases
        self.ticks += rounds
        self.position = due // phases
        self._next = due + 1
        # Each phase due now is paced once; its older missed ticks become its debt.
        for index in range(max(first, due - phases + 1), due + 1):
            phase = index % phases
            debt = self._debts[phase] + (index - first) // phases
            if debt > self.max_debt:
                self.skipped_ticks += debt - self.max_debt
                debt = self.max_debt
            catch_up = debt > 0
            self._debts[phase] = debt - 1 if catch_up else 0
            for stream in list(self._groups[phase]):
                try:
                    stream.pace(catch_up)
                except Exception:
                    self._stream_failed(stream, Failure())
        if self._phase_of:
            delay = self._start + self._next * self._step - _EARLY - self._clock.seconds()
            self._timer = self._clock.callLater(max(delay, 0.0), self._tick)
        else:
            self._timer = None
