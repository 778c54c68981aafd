"""The media bridge of one call: a transport leg on one side, an assistant session on the other."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from rapida_tap.media.audio import FRAME_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.contexts import CallContext
    from rapida_tap.interfaces import IAssistantSession, ICallLeg
    from rapida_tap.media.pacer import Pacer

TRIM_WINDOW = 50  # ticks (1 s) a backlog must stand before real-time audio is caught up

# End reasons: the first word of every "call ended" log line and a metrics label.
CALLER_HANGUP = "caller-hangup"
ASSISTANT_HANGUP = "assistant-hangup"
ASSISTANT_FAILED = "assistant-failed"
IDLE_TIMEOUT = "idle-timeout"
PEER_NOT_READING = "peer-not-reading"
PROTOCOL_ERROR = "protocol-error"
TRANSPORT_ERROR = "transport-error"
SHUTDOWN = "shutdown"
API_HANGUP = "api-hangup"


class Call:
    """Joins one transport leg and one assistant session, and ends exactly once.

    Audio from the assistant (``play``) is cut into 20 ms frames and queued; the shared pacer
    calls ``pace`` once per tick, which writes one frame (or silence) to the leg.  Audio from the
    leg (``audio_received``) goes straight to the session.  ``ended`` fires once with the reason,
    whoever ends the call, after which nothing of the call is left in the pacer or the reactor.
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
    ) -> None:
        self.context = context
        self.leg = leg
        self.session: IAssistantSession | None = None
        self.assistant_name = ""
        self._clock = clock
        self._pacer = pacer
        self.started_at = clock.seconds()
        self.ended: defer.Deferred[str] = defer.Deferred()
        self.end_reason: str | None = None
        self.end_detail = ""
        self._queue: collections.deque[bytes] = collections.deque()
        self._partial = b""
        self._max_queue = max_queue_frames
        self._queued = 0  # frames ever queued (mark positions count in these)
        self._sent = 0  # queued frames written to the leg
        self._marks: collections.deque[tuple[int, str]] = collections.deque()
        self._playing = False
        self._gap_open = False
        self.frames_in = 0
        self.frames_out = 0
        self.silence_out = 0
        self.underruns = 0
        self.overflow_frames = 0
        self._lead = int(getattr(leg, "lead_frames", 0))
        self.trim_backlog = False  # set by real-time sources (echo): see _backlog_standing
        self._backlog_min = 0
        self._backlog_ticks = 0
        self.trimmed_frames = 0
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

    def duration(self) -> float:
        return self._clock.seconds() - self.started_at

    # -- the assistant side --------------------------------------------------------------

    def attach(self, session: IAssistantSession, name: str) -> None:
        """The assistant is connected: from now on caller audio reaches it."""
        if self.is_ended:
            session.close(self.end_reason or SHUTDOWN)
            return
        self.session = session
        self.assistant_name = name

    def play(self, pcm: bytes) -> None:
        """Queue assistant audio (bridge format, any length) for paced playback."""
        if self.is_ended or not pcm:
            return
        if self._gap_open:
            self.underruns += 1
            self._gap_open = False
        data = self._partial + pcm if self._partial else pcm
        whole = len(data) - len(data) % FRAME_BYTES
        queue = self._queue
        if len(queue) + whole // FRAME_BYTES > self._max_queue:
            self.overflow_frames += whole // FRAME_BYTES
            self._partial = b""
            return
        if whole == FRAME_BYTES and len(data) == FRAME_BYTES:
            queue.append(data)
        else:
            view = memoryview(data)
            for offset in range(0, whole, FRAME_BYTES):
                queue.append(bytes(view[offset : offset + FRAME_BYTES]))
        self._queued += whole // FRAME_BYTES
        self._partial = bytes(data[whole:])

    def mark(self, name: str) -> None:
        """Report ``name`` through ``mark_played`` once everything queued so far was played."""
        if self.is_ended:
            return
        self._flush_partial()
        if self._queued == self._sent:
            self.leg.send_mark(name)
        else:
            self._marks.append((self._queued, name))

    def clear(self) -> None:
        """Barge-in: drop queued audio at once; pending marks are settled as played."""
        if self.is_ended:
            return
        self._queue.clear()
        self._partial = b""
        self._sent = self._queued
        self._playing = False
        self.leg.send_clear()
        while self._marks:
            self.mark_played(self._marks.popleft()[1])

    def hangup(self, reason: str = ASSISTANT_HANGUP, detail: str = "") -> None:
        """The assistant ends the call."""
        self.end(reason, detail)

    # -- the transport side --------------------------------------------------------------

    def audio_received(self, pcm: bytes) -> None:
        """Caller audio from the leg, bridge format."""
        self.frames_in += 1
        session = self.session
        if session is not None:
            session.audio_received(pcm)

    def dtmf_received(self, digit: str) -> None:
        self.frames_in += 1
        if self.session is not None:
            self.session.dtmf_received(digit)

    def mark_played(self, name: str) -> None:
        """The leg reports that the caller heard everything before mark ``name``."""
        if self.session is not None and not self.is_ended:
            self.session.mark_played(name)

    # -- pacing --------------------------------------------------------------------------

    def pace(self, catch_up: bool) -> None:
        """One tick of the shared pacer: exactly one frame (two while working off pacer debt).

        A leg whose peer buffers (chan_websocket) may ask for ``lead_frames``: when audio starts
        after silence, that many extra frames go out at once, so the peer's own clock never
        runs dry between two of ours.
        """
        queue = self._queue
        if queue:
            if not self._playing and self._lead:
                for _ in range(min(self._lead, len(queue) - 1)):
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
            self._backlog_min = 0
            self._gap_open = self._playing
            self._playing = False
            self.leg.send_silence()

    def _backlog_standing(self, backlog: int) -> bool:
        """For real-time sources: has a backlog stood for a whole trim window?

        Echo input arrives at exactly the rate it is played, so frames queued by a stall of the
        input (or of the reactor) would add their delay to the rest of the call.  When at least
        one frame has been waiting at every tick for ``TRIM_WINDOW`` ticks, one extra frame goes
        out: the latency comes back at one frame per window, and nothing is dropped.  Bursty
        input drains to zero between bursts, so it never triggers this.
        """
        self._backlog_min = min(self._backlog_min, backlog)
        self._backlog_ticks += 1
        if self._backlog_ticks < TRIM_WINDOW:
            return False
        standing = self._backlog_min >= 1
        self._backlog_ticks = 0
        self._backlog_min = backlog - 1 if standing else backlog
        if standing:
            self.trimmed_frames += 1
        return standing

    def _write(self, frame: bytes) -> None:
        self._sent += 1
        self.frames_out += 1
        self._playing = True
        self._gap_open = False
        self.leg.send_audio(frame)

    def _flush_partial(self) -> None:
        if self._partial:
            self._queue.append(self._partial + bytes(FRAME_BYTES - len(self._partial)))
            self._queued += 1
            self._partial = b""

    def _settle_marks(self) -> None:
        marks = self._marks
        while marks and marks[0][0] <= self._sent:
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
            self.end(IDLE_TIMEOUT, f"nothing from caller or assistant for {self._idle_timeout:g}s")
            return
        self._idle_timer = self._clock.callLater(self._idle_timeout / 4, self._check_idle)

    def end(self, reason: str, detail: str = "") -> None:
        """End the call once; later calls are ignored.  Closes both sides, frees everything."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self.end_detail = detail
        self._pacer.remove(self)
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self._queue.clear()
        self._marks.clear()
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
        self.ended.callback(reason)
