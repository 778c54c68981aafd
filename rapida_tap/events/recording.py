"""Call recordings: one stereo 16-bit WAV per call, written off the reactor thread.

The left channel is the caller as received, the right channel what was actually played to the
caller, both at the bridge's rate (8 kHz: every transport converts to it at the edge, so no
other rate exists inside the daemon).  They are aligned on the pacer's grid: tick ``n`` of the
call (``Pacer.position``) is sample ``n * 160`` of both channels.  The right channel is what
each tick sent, a silent tick being silence; the left channel is caller audio as it arrived.
Short lags (jitter, a stall made up by a burst) stay contiguous; a channel that lags the grid
by more than ``GAP`` (the caller fell silent, the leg was held) gets silence in the gap.

On the reactor thread a ``CallRecorder`` only appends frames to two lists (the media path
calls ``caller``, ``played`` and ``silent``) and, once a second, interleaves them into one
block for the ``RecordingWriter``, whose thread then only makes write system calls (the GIL
is free meanwhile, so the media path never waits for it).
The writer is one thread for the node with a bounded queue: when it holds ``max_blocks``
blocks (the disk is slow) or a write fails (the disk is full), that recording stops with one
log line and a metric, and the call goes on.  Whatever was written is finalised (a valid WAV
header) when the call ends, however it ends.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from rapida_tap.media.audio import FRAME_BYTES, SAMPLE_RATE, SILENCE

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.pacer import Pacer

CHANNELS = 2
BYTES_PER_SECOND = SAMPLE_RATE * 2  # one channel, 16-bit
HEADER_BYTES = 44
#: a channel lagging the grid by more than this stopped (the caller fell silent, the leg was
#: held, the process stalled): the gap becomes silence...
GAP = 10 * FRAME_BYTES
#: ...up to this lag behind the grid (jitter: frames held up may still come)
SLACK = 3 * FRAME_BYTES
#: how far one channel may run ahead of the other before the gap is written as silence
MAX_AHEAD = 5 * BYTES_PER_SECOND
FLUSH_INTERVAL = 1.0  # seconds between blocks handed to the writer
#: seconds between the writer thread's rounds while recordings are open: blocks wait for the
#: next round instead of waking the thread one by one (one wake-up, not one per call)
WRITE_INTERVAL = 0.5


def wav_header(data_bytes: int, rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte RIFF/WAVE header for ``data_bytes`` of stereo PCM16 at ``rate``."""
    block = CHANNELS * 2
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        CHANNELS,
        rate,
        rate * block,
        block,
        16,
        b"data",
        data_bytes,
    )


def interleave(left: bytes | memoryview, right: bytes | memoryview) -> memoryview:
    """Two mono PCM16 buffers of equal length as one stereo buffer (L R L R ...)."""
    import numpy as np  # loaded by the first recording, not by every node

    out = np.empty(len(left), dtype="<i2")  # len(left) bytes = 2 channels of len/2 samples
    out[0::2] = np.frombuffer(left, dtype="<i2")
    out[1::2] = np.frombuffer(right, dtype="<i2")
    return out.data.cast("B")


@dataclass
class RecordingResult:
    """What ``recording.completed`` reports.  ``error`` is empty for a whole recording."""

    path: str
    duration_s: float
    size: int
    sha256: str
    error: str = ""

    @property
    def complete(self) -> bool:
        return not self.error


class RecordingStopped(Exception):
    """A recording could not go on (slow or full disk); ``str()`` says why."""


# -- the writer thread -----------------------------------------------------------------------


class _OpenFile:
    """A recording as the writer thread holds it; ``on_error`` runs on the reactor thread."""

    def __init__(
        self, path: str, handle: IO[bytes] | None, error: str, on_error: Callable[[str], None]
    ) -> None:
        self.path = path
        self.handle = handle
        self.error = error
        self.on_error = on_error
        self.data_bytes = 0


Opener = Callable[[str], IO[bytes]]


def open_new(path: str) -> IO[bytes]:
    """Create ``path`` (and its directories); never overwrite an existing file."""
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    return open(path, "xb")


class RecordingWriter:
    """One thread that writes every recording of the node, fed through a bounded queue.

    ``submit_*`` run on the reactor thread and never block: a block that does not fit is
    refused (``False``); opening and closing always fit, so every file is finalised.  Blocks
    are taken every ``WRITE_INTERVAL`` seconds, all at once; opening, closing and stopping wake
    the thread at once.  Results come back on the reactor thread through ``call_from_thread``.
    """

    log = Logger()

    def __init__(
        self,
        call_from_thread: Callable[..., Any],
        *,
        max_blocks: int = 1024,
        opener: Opener = open_new,
    ) -> None:
        self._call_from_thread = call_from_thread
        self.max_blocks = max_blocks
        self.opener = opener  # how files are created (tests give failing ones)
        self._jobs: collections.deque[tuple[Any, ...]] = collections.deque()
        self._blocks = 0
        self._cond = threading.Condition()
        self._files: dict[int, _OpenFile] = {}  # the writer thread's own
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred[None] | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rapida-recordings", daemon=True)
            self._thread.start()

    def stop(self) -> defer.Deferred[None]:
        """Finish every queued job, then end the thread; fires on the reactor thread."""
        if self._stopped is None:
            self._stopped = defer.Deferred()
            if self._thread is None:
                self._stopped.callback(None)
            else:
                self._put(("stop",))
        return self._stopped

    def submit_open(self, key: int, path: str, error: Callable[[str], None]) -> None:
        self.start()
        self._put(("open", key, path, error))

    def submit_block(self, key: int, stereo: memoryview) -> bool:
        """Queue one block of interleaved audio; the writer owns it now."""
        with self._cond:
            if self._blocks >= self.max_blocks:
                return False
            self._blocks += 1
            self._jobs.append(("write", key, stereo))
        return True  # no wake-up: the thread takes blocks in batches (WRITE_INTERVAL)

    def submit_close(self, key: int, done: Callable[[RecordingResult], None]) -> None:
        self._put(("close", key, done))

    def _put(self, job: tuple[Any, ...]) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    # -- on the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait(WRITE_INTERVAL if self._files else None)
                jobs, self._jobs = self._jobs, collections.deque()
            for job in jobs:
                if job[0] == "stop":
                    self._call_from_thread(self._stopped_now)
                    return
                try:
                    getattr(self, "_" + job[0])(*job[1:])
                except Exception:  # a bug must not end the thread: later calls still record
                    self._call_from_thread(self.log.failure, "recording writer: " + job[0])
                if job[0] == "write":
                    with self._cond:
                        self._blocks -= 1
                    time.sleep(0)  # let the reactor thread have the GIL between blocks

    def _stopped_now(self) -> None:
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)

    def _open(self, key: int, path: str, error: Callable[[str], None]) -> None:
        try:
            handle = self.opener(path)
        except OSError as e:
            why = f"cannot create {path}: {e.strerror or e}"
            self._files[key] = _OpenFile(path, None, why, error)
            self._call_from_thread(error, why)
            return
        f = self._files[key] = _OpenFile(path, handle, "", error)
        try:
            handle.write(wav_header(0))
        except OSError as e:
            f.error = _os_error(e)
            self._call_from_thread(error, f.error)

    def _write(self, key: int, stereo: memoryview) -> None:
        f = self._files.get(key)
        if f is None or f.handle is None or f.error:
            return
        try:
            f.handle.write(stereo)  # the GIL is released while the kernel copies
            f.data_bytes += len(stereo)
        except OSError as e:
            f.error = _os_error(e)
            self._call_from_thread(f.on_error, f.error)

    def _close(self, key: int, done: Callable[[RecordingResult], None]) -> None:
        f = self._files.pop(key, None)
        if f is None:
            return
        size, digest = 0, ""
        if f.handle is not None:
            try:
                f.handle.flush()
                f.handle.seek(0)
                f.handle.write(wav_header(f.data_bytes))
                f.handle.close()
            except OSError as e:
                f.error = f.error or _os_error(e)
                try:
                    f.handle.close()
                except OSError:
                    pass
            size, digest = _size_and_digest(f.path)
        seconds = f.data_bytes / (CHANNELS * BYTES_PER_SECOND)
        result = RecordingResult(f.path, round(seconds, 3), size, digest, f.error)
        self._call_from_thread(done, result)


def _os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    return e.strerror or str(e)


def _size_and_digest(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                digest.update(chunk)
                size += len(chunk)
    except OSError:
        return 0, ""
    return size, digest.hexdigest()


# -- the reactor side ------------------------------------------------------------------------


class CallRecorder:
    """Collects one call's two channels on the pacer's grid; see the module docstring.

    ``caller`` and ``played`` are on the media path: they only append to a buffer (and pad it
    with silence up to the grid after a gap).  ``on_stopped(why)`` runs once if the recording
    stops early; ``finish()`` fires with the ``RecordingResult`` once the file is final.
    """

    log = Logger()

    def __init__(
        self,
        key: int,
        path: str,
        writer: RecordingWriter,
        pacer: Pacer,
        clock: IReactorTime,
        on_stopped: Callable[[str], None],
    ) -> None:
        self.key = key
        self.path = path
        self._writer = writer
        self._pacer = pacer
        self._clock = clock
        self._on_stopped = on_stopped
        self._tick0 = pacer.position
        # Each channel: the frames since the last block, by reference (joined once a second,
        # so the media path copies nothing); the caller's bytes, to notice a gap as it ends.
        self._left: list[bytes] = []
        self._right: list[bytes] = []
        self._left_bytes = 0
        self._written = 0  # bytes per channel handed to the writer
        self._set_offsets()
        self.stopped = ""  # why the recording stopped early
        self._finished: defer.Deferred[RecordingResult] | None = None
        writer.submit_open(key, path, self.stop)
        self._timer: IDelayedCall | None = clock.callLater(FLUSH_INTERVAL, self._flush)

    def _grid(self) -> int:
        """Bytes per channel from the start to the end of the current tick."""
        return (self._pacer.position - self._tick0) * FRAME_BYTES

    def _set_offsets(self) -> None:
        """Precompute where a channel's buffer ends when it lags the grid by ``GAP``."""
        self._gap_offset = self._tick0 * FRAME_BYTES + self._written + GAP

    def _silence_to(self, have: int) -> bytes:
        """After a gap: the silence that brings ``have`` bytes to ``SLACK`` behind the grid."""
        return bytes(max(0, self._grid() - SLACK - self._written - have))

    def caller(self, pcm: bytes) -> None:
        """Caller audio as received (media path)."""
        if self._left_bytes < self._pacer.position * FRAME_BYTES - self._gap_offset:
            gap = self._silence_to(self._left_bytes)
            self._left.append(gap)
            self._left_bytes += len(gap)
        self._left.append(pcm)
        self._left_bytes += len(pcm)

    def played(self, frame: bytes) -> None:
        """A frame the leg took (media path).  Every tick adds a frame or silence, so only
        ticks without either (a held leg, a stalled process) leave a gap: ``_flush`` fills it."""
        self._right.append(frame)

    def silent(self) -> None:
        """A tick with nothing to play (media path)."""
        self._right.append(SILENCE)

    def _flush(self, final: bool = False) -> None:
        self._timer = None
        left, right = b"".join(self._left), b"".join(self._right)
        if final:
            n = max(len(left), len(right), self._grid() - self._written)
        else:
            lagging = self._pacer.position * FRAME_BYTES - self._gap_offset
            if len(left) < lagging:
                left += self._silence_to(len(left))
            if len(right) < lagging:
                right += self._silence_to(len(right))
            n = min(len(left), len(right))
            n = max(n, len(left) - MAX_AHEAD, len(right) - MAX_AHEAD)
        if len(left) < n:
            left += bytes(n - len(left))
        if len(right) < n:
            right += bytes(n - len(right))
        # What is past ``n`` (audio ahead of the other channel) starts the next block.
        self._left, self._right = [left[n:]], [right[n:]]
        self._left_bytes = len(left) - n
        if n > 0:
            self._written += n
            self._set_offsets()
            # Interleaved here, spread over the calls' timers: the writer thread then holds
            # the GIL for next to nothing, so it never holds up the media path.
            if not self._writer.submit_block(self.key, interleave(left[:n], right[:n])):
                self.stop(
                    f"the disk is too slow: {self._writer.max_blocks} blocks wait to be written"
                )
                return
        if not final:
            self._timer = self._clock.callLater(FLUSH_INTERVAL, self._flush)

    def stop(self, why: str) -> None:
        """Stop recording (the file keeps what was written); the call goes on."""
        if self.stopped or self._finished is not None:
            return
        self.stopped = why
        self._cancel_timer()
        self._left, self._right = [], []
        self._on_stopped(why)

    def finish(self) -> defer.Deferred[RecordingResult]:
        """The call ended: write what is left and finalise the file (once)."""
        if self._finished is None:
            self._finished = defer.Deferred()
            self._cancel_timer()
            if not self.stopped:
                self._flush(final=True)
            self._writer.submit_close(self.key, self._closed)
        return self._finished

    def _closed(self, result: RecordingResult) -> None:
        if self.stopped and not result.error:
            result.error = self.stopped
        assert self._finished is not None
        self._finished.callback(result)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
