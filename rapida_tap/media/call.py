"""The media bridge of one call: a transport leg on one side, an assistant session on the other."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rapida_tap.media.audio import SAMPLE_RATE, frame_bytes
from rapida_tap.reasons import EndReason

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.contexts import CallContext
    from rapida_tap.events.recording import CallRecorder
    from rapida_tap.interfaces import IAssistantSession, ICallLeg
    from rapida_tap.media.pacer import Pacer

TRIM_WINDOW = 50  # ticks (1 s) a backlog must stand before real-time audio is caught up
REALTIME_BACKLOG = 250  # frames (5 s) a real-time source may queue; older ones are dropped
NEAR_TICK = 0.004  # s: audio that starts this close before a tick gets a frame of cushion
ALIGN_MARGIN = 0.005  # s: audio that starts after silence waits at least this for its tick


class Call:
    """Joins one transport leg and one assistant session, and ends exactly once.

    Audio from the assistant (``play``) is cut into 20 ms frames and queued; the shared pacer
    calls ``pace`` once per tick, which writes one frame (or silence) to the leg.  Audio from the
    leg (``audio_received``) goes straight to the session.

    Flow control lives here and nowhere else: one queue (bounded, overflow counted), marks
    settled by queue position, and ``pause``/``resume`` from a leg that cannot take data (its
    peer's XOFF, a full kernel buffer).  A frame the leg did not take is counted as dropped,
    never as sent.

    The call ends once, for its *first cause*: ``ending`` records a cause whose end is delayed
    (a bot that hung up while its last words still play), and a later ``end`` for another
    reason keeps it.  An exception from the session or the leg ends the call as
    ``internal-error`` with one traceback in the log, so no call outlives a bug.
    """

    log = Logger()

    def __init__(
        self,
        context: CallContext,
        leg: ICallLeg,
        *,
        clock: IReactorTime,
        pacer: Pacer,
        idle_timeout: float = 60.0,
        max_queue_frames: int = 6000,
        rate: int | None = None,
    ) -> None:
        self.context = context
        self.leg = leg
        self.session: IAssistantSession | None = None
        self.assistant_name = ""
        # The call's rate: the assistant's (``rate``), or else the caller's, settled by the
        # leg's first word on it (``caller_rate_is``).  Frames are 20 ms at this rate.
        self.rate = rate or SAMPLE_RATE
        self.frame_bytes = frame_bytes(self.rate)
        self._rate_settled = rate is not None
        self._assistant_rate = rate
        self.caller_rate: int | None = None  # the leg's wire rate, once known
        self._clock = clock
        self._pacer = pacer
        self.started_at = clock.seconds()
        self._waiters: list[defer.Deferred[EndReason]] = []
        self.end_reason: EndReason | None = None
        self.end_detail = ""
        self._cause: tuple[EndReason, str] | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._partial = b""
        self._max_queue = max_queue_frames
        self._queued = 0  # frames ever queued (mark positions count in these)
        self._sent = 0  # queued frames handed to the leg (taken or dropped)
        self._marks: collections.deque[tuple[int, str]] = collections.deque()
        self._playout: dict[str, defer.Deferred[None]] = {}  # private marks: after_playout
        self._playout_count = 0
        self._playing = False
        self._gap_open = False
        self._cushion = 0  # frames kept in hand for a source that lands near our tick
        self._preroll = 0  # ticks waited so far to fill the cushion
        self._paused = False
        self._burst = 0  # frames to send at once on the next tick (after a resume)
        self.frames_in = 0
        self.frames_out = 0
        self.silence_out = 0
        self.underruns = 0
        self.overflow_frames = 0
        self.dropped_frames = 0
        self.pauses = 0
        self._lead = int(getattr(leg, "lead_frames", 0))
        self.trim_backlog = False  # set by real-time sources (echo): see _backlog_standing
        self._backlog_min = 0
        self._backlog_ticks = 0
        self.trimmed_frames = 0
        # Quality counters (rapida_tap.events.quality reads them when the call ends).
        self.ended_at: float | None = None
        self.dtmf_digits = 0
        self.marks_sent = 0
        self.marks_echoed = 0
        self.marks_settled = 0
        self.barge_ins = 0
        self.barge_in_seconds_total = 0.0
        self.barge_in_seconds_max = 0.0
        self._cleared_at: float | None = None
        self.first_in_at: float | None = None
        self.first_out_at: float | None = None
        self.queue_depth_sum = 0
        self.queue_depth_max = 0
        self.lateness_at_start = pacer.lateness.snapshot()
        self.pacing_ticks: list[int] = []  # pacer ticks while it lasted, by lateness (at its end)
        self.rounds_at_start = pacer.ticks
        self.pacing_rounds = 0  # 20 ms rounds of the pacer while it lasted (at its end)
        self.recorder: CallRecorder | None = None  # set by the recording subscriber
        self._idle_timeout = idle_timeout
        self._idle_seen = (0, 0)
        self._idle_since = self.started_at
        self._idle_timer: IDelayedCall | None = None
        if idle_timeout > 0:
            self._idle_timer = clock.callLater(idle_timeout / 4, self._check_idle)
        pacer.add(self)

    @property
    def context_id(self) -> str:
        return self.context.context_id

    @property
    def is_ended(self) -> bool:
        return self.end_reason is not None

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def assistant_rate(self) -> int:
        """The rate the assistant speaks: its own, or the call's when it follows the caller."""
        return self._assistant_rate or self.rate

    def caller_rate_is(self, rate: int) -> int:
        """The leg's wire runs at ``rate`` Hz; returns the call's rate, which it converts to.

        The first word settles the rate of a call whose assistant has none of its own (the
        echo), so a 16 kHz caller talks at 16 kHz with nothing resampled.  Once settled, or
        once audio is queued at it, the call's rate never changes; later words only update
        ``caller_rate`` (a leg whose peer changes rate converts from then on).
        """
        self.caller_rate = rate
        if not self._rate_settled:
            self._rate_settled = True
            if rate != self.rate:
                self.rate = rate
                self.frame_bytes = frame_bytes(rate)
        return self.rate

    def duration(self) -> float:
        """Seconds from the start to the end (to now while the call is live)."""
        end = self.ended_at if self.ended_at is not None else self._clock.seconds()
        return end - self.started_at

    def when_ended(self) -> defer.Deferred[EndReason]:
        """A Deferred of its own for each waiter, fired with the end reason."""
        if self.end_reason is not None:
            return defer.succeed(self.end_reason)
        d: defer.Deferred[EndReason] = defer.Deferred()
        self._waiters.append(d)
        return d

    # -- the assistant side --------------------------------------------------------------

    def attach(self, session: IAssistantSession, name: str) -> None:
        """The assistant is connected: from now on caller audio reaches it."""
        if self.end_reason is not None:
            session.close(self.end_reason)
            return
        self.session = session
        self.assistant_name = name

    def play(self, pcm: bytes) -> None:
        """Queue assistant audio (PCM16 at the call's rate, any length) for paced playback."""
        size = self.frame_bytes
        queue = self._queue
        if (
            len(pcm) == size
            and self._playing
            and not self._partial
            and len(queue) < self._max_queue
            and self.end_reason is None
        ):
            queue.append(pcm)  # one more frame of a stream already playing: the hot path
            self._queued += 1
            if self.trim_backlog and len(queue) > REALTIME_BACKLOG:
                self._drop_oldest(len(queue) - REALTIME_BACKLOG)
            return
        if self.end_reason is not None or not pcm:
            return
        self._rate_settled = True
        if self._gap_open:
            self.underruns += 1
            self._gap_open = False
            self._cushion = 1  # its frames land near our tick: keep one in hand from now on
        elif not self._playing and not self._queue:
            if self._pacer.phases > 1:
                self._pacer.align(self, ALIGN_MARGIN)
            elif not self._cushion:
                self._cushion = int(self._pacer.until_next_tick(self) < NEAR_TICK)
        data = self._partial + pcm if self._partial else pcm
        whole = len(data) - len(data) % size
        if len(queue) + whole // size > self._max_queue:
            self.overflow_frames += whole // size
            self._partial = b""
            return
        if whole == size and len(data) == size:
            queue.append(data)
        else:
            view = memoryview(data)
            for offset in range(0, whole, size):
                queue.append(bytes(view[offset : offset + size]))
        self._queued += whole // size
        self._partial = bytes(data[whole:])
        if self.trim_backlog and len(queue) > REALTIME_BACKLOG:
            self._drop_oldest(len(queue) - REALTIME_BACKLOG)

    def _drop_oldest(self, frames: int) -> None:
        """A real-time source's frames older than ``REALTIME_BACKLOG`` (5 s) will never be worth
        hearing: dropped (and counted as trimmed), so a node that lags holds little per call."""
        queue = self._queue
        for _ in range(frames):
            queue.popleft()
        self._sent += frames
        self.trimmed_frames += frames

    def mark(self, name: str) -> None:
        """Report ``name`` through ``mark_played`` once everything queued so far was played."""
        if self.end_reason is not None:
            return
        self._flush_partial()
        if self._queued == self._sent:
            self.marks_sent += 1
            self._guard(self.leg.send_mark, name)
        else:
            self._marks.append((self._queued, name))

    def clear(self) -> None:
        """Barge-in: drop queued audio at once; pending marks are settled as played."""
        if self.end_reason is not None:
            return
        self.barge_ins += 1
        if self._cleared_at is None:
            self._cleared_at = self._clock.seconds()
        self._queue.clear()
        self._partial = b""
        self._sent = self._queued
        self._playing = False
        self._burst = 0
        self._guard(self.leg.send_clear)
        while self._marks and self.end_reason is None:
            self._settle_mark(self._marks.popleft()[1])

    def hangup(self, reason: EndReason = EndReason.ASSISTANT_HANGUP, detail: str = "") -> None:
        """The assistant ends the call."""
        self.end(reason, detail)

    def after_playout(self) -> defer.Deferred[None]:
        """Fires once the caller heard everything queued so far (at once when nothing is).

        A private mark: the session never sees it.  Never fires if the call ends first.
        """
        self._playout_count += 1
        name = f"\0rapida-playout-{self._playout_count}"
        d: defer.Deferred[None] = defer.Deferred()
        self._playout[name] = d
        self.mark(name)
        return d

    # -- the transport side --------------------------------------------------------------

    def audio_received(self, pcm: bytes) -> None:
        """Caller audio from the leg: PCM16 at the call's rate."""
        self.frames_in += 1
        if self.first_in_at is None:
            self.first_in_at = self._clock.seconds()
        if self.recorder is not None:
            self.recorder.caller(pcm)
        session = self.session
        if session is not None:
            try:
                session.audio_received(pcm)
            except Exception:
                self.fail("the assistant session failed on caller audio")

    def dtmf_received(self, digit: str) -> None:
        self.frames_in += 1
        self.dtmf_digits += 1
        if self.session is not None:
            self._guard(self.session.dtmf_received, digit)

    def mark_played(self, name: str) -> None:
        """The leg reports that the caller heard everything before mark ``name``."""
        waiter = self._playout.pop(name, None)
        if waiter is not None:
            waiter.callback(None)
            return
        self.marks_echoed += 1
        self._settle_mark(name)

    def _settle_mark(self, name: str) -> None:
        """Tell the assistant its mark was played (echoed by the leg, or passed by a clear)."""
        if self.session is not None and self.end_reason is None:
            self.marks_settled += 1
            self._guard(self.session.mark_played, name)

    def pause(self) -> None:
        """The leg cannot take data (XOFF, full buffer): hold the queue, send nothing."""
        if not self._paused:
            self._paused = True
            self.pauses += 1

    def resume(self, burst: int = 0) -> None:
        """The leg takes data again; a peer that buffers may take ``burst`` frames at once."""
        self._paused = False
        self._burst = burst

    # -- pacing --------------------------------------------------------------------------

    def pace(self, catch_up: bool) -> None:
        """One tick of the shared pacer: exactly one frame (two while working off pacer debt).

        A leg whose peer buffers (chan_websocket) may ask for ``lead_frames``: when audio starts
        after silence, that many extra frames go out at once, so the peer's own clock never
        runs dry between two of ours.  While paused nothing goes out, not even silence.
        """
        queue = self._queue
        if queue:
            depth = len(queue)
            self.queue_depth_sum += depth
            if depth > self.queue_depth_max:
                self.queue_depth_max = depth
        if self._paused:
            return
        if queue:
            if not self._playing and len(queue) <= self._cushion and self._preroll < self._cushion:
                self._preroll += 1  # fill the cushion first; silence before audio is no gap
                self.silence_out += 1
                self.leg.send_silence()
                return
            self._preroll = 0
            extra = self._burst
            if not self._playing and self._lead > extra:
                extra = self._lead
            self._burst = 0
            for _ in range(min(extra, len(queue) - 1)):
                self._write(queue.popleft())
            self._write(queue.popleft())
            if self.trim_backlog and self._backlog_standing(len(queue)):
                catch_up = True
            if catch_up and queue:
                self._write(queue.popleft())
            if self._marks:
                self._settle_marks()
        elif self._partial:
            self._flush_partial()
            self._write(self._queue.popleft())
            if self._marks:
                self._settle_marks()
        else:
            self.silence_out += 1
            if self._cleared_at is not None:
                self._barge_in_silent()
            if self.recorder is not None:
                self.recorder.silent()
            self._backlog_min = 0
            self._gap_open = self._playing
            self._playing = False
            self.leg.send_silence()

    def _barge_in_silent(self) -> None:
        """The first silent tick after a clear: the barge-in's latency is known."""
        latency = self._clock.seconds() - self._cleared_at  # type: ignore[operator]
        self._cleared_at = None
        self.barge_in_seconds_total += latency
        if latency > self.barge_in_seconds_max:
            self.barge_in_seconds_max = latency

    def pace_failed(self, failure: Failure) -> None:
        """The pacer caught an exception from ``pace``: a bug, so the call ends."""
        self.fail("pacing the call failed", failure)

    def _backlog_standing(self, backlog: int) -> bool:
        """For real-time sources: has a backlog stood for a whole trim window?

        Echo input arrives at exactly the rate it is played, so frames queued by a stall of the
        input (or of the reactor) would add their delay to the rest of the call.  When more
        than the cushion has been waiting at every tick for ``TRIM_WINDOW`` ticks, one extra
        frame goes out: the latency comes back at one frame per window, and nothing is dropped.
        Bursty input drains to zero between bursts, so it never triggers this.

        The cushion is what keeps a real-time source without gaps: a source whose frames land
        close to our tick (within the jitter of either clock) would miss a tick now and then,
        and each miss is a silent frame in the middle of speech, an audible click.  Such a call
        keeps one frame in hand (20 ms more latency, for that call only): chosen when its audio
        starts within ``NEAR_TICK`` of a tick, or after its first gap.  Calls whose frames land
        comfortably between ticks keep none.
        """
        self._backlog_min = min(self._backlog_min, backlog)
        self._backlog_ticks += 1
        if self._backlog_ticks < TRIM_WINDOW:
            return False
        standing = self._backlog_min >= 1 + self._cushion
        self._backlog_ticks = 0
        self._backlog_min = backlog - 1 if standing else backlog
        if standing:
            self.trimmed_frames += 1
        return standing

    def _write(self, frame: bytes) -> None:
        self._sent += 1
        self._playing = True
        self._gap_open = False
        if self.leg.send_audio(frame):
            if self.first_out_at is None:
                self.first_out_at = self._clock.seconds()
            self.frames_out += 1
            if self.recorder is not None:
                self.recorder.played(frame)
        else:
            self.dropped_frames += 1

    def _flush_partial(self) -> None:
        if self._partial:
            self._queue.append(self._partial + bytes(self.frame_bytes - len(self._partial)))
            self._queued += 1
            self._partial = b""

    def _settle_marks(self) -> None:
        marks = self._marks
        while marks and marks[0][0] <= self._sent and self.end_reason is None:
            self.marks_sent += 1
            self.leg.send_mark(marks.popleft()[1])

    # -- ending --------------------------------------------------------------------------

    def _check_idle(self) -> None:
        """End the call when neither side produced anything for ``idle_timeout`` seconds."""
        self._idle_timer = None
        now = self._clock.seconds()
        seen = (self.frames_in, self._queued)
        if seen != self._idle_seen:
            self._idle_seen = seen
            self._idle_since = now
        if now - self._idle_since >= self._idle_timeout - 1e-9:
            self.end(
                EndReason.IDLE_TIMEOUT,
                f"nothing from caller or assistant for {self._idle_timeout:g}s",
            )
            return
        self._idle_timer = self._clock.callLater(self._idle_timeout / 4, self._check_idle)

    def _guard(self, method: object, *args: object) -> None:
        """Call a session or leg method; an exception from it ends the call."""
        try:
            method(*args)  # type: ignore[operator]
        except Exception:
            self.fail(f"{getattr(method, '__qualname__', method)} failed")

    def fail(self, what: str, failure: Failure | None = None) -> None:
        """A bug in a leg or a session: one traceback in the log, the call ends once."""
        if self.end_reason is not None:
            return
        failure = failure if failure is not None else Failure()
        self.log.failure("call {ctx}: {what}", failure, ctx=self.context_id, what=what)
        self.end(EndReason.INTERNAL_ERROR, f"{what}: {failure.getErrorMessage()[:120]}")

    def ending(self, reason: EndReason, detail: str = "") -> None:
        """Record the first cause of an end that comes later (e.g. after a last prompt)."""
        if self._cause is None and self.end_reason is None:
            self._cause = (reason, detail)

    def end(self, reason: EndReason, detail: str = "") -> None:
        """End the call once; later calls are ignored.  Closes both sides, frees everything.

        An earlier ``ending`` wins over ``reason``: the call ends for its first cause.
        """
        if self.end_reason is not None:
            return
        if self._cause is not None:
            reason, detail = self._cause
        self.end_reason = reason
        self.end_detail = detail
        self.ended_at = self._clock.seconds()
        self.pacing_ticks = self._pacer.lateness.since(self.lateness_at_start)
        self.pacing_rounds = self._pacer.ticks - self.rounds_at_start
        self._pacer.remove(self)
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self._queue.clear()
        self._marks.clear()
        self._playout.clear()
        self._partial = b""
        session, self.session = self.session, None
        if session is not None:
            try:
                session.close(reason)
            except Exception:
                self.log.failure("call {ctx}: assistant session close failed", ctx=self.context_id)
        try:
            self.leg.hangup(reason)
        except Exception:
            self.log.failure("call {ctx}: transport hangup failed", ctx=self.context_id)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(reason)
