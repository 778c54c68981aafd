"""What happened on every call, told to whoever listens: webhooks, recordings, metrics, logs.

``CallEvents`` subscribes to the bridge (call started, call ended, and the end line's quality
report) and to the outbound service (status changes); it adds no logic to either.  Every
subscriber runs on the reactor thread and returns at once: deliveries are queued, recordings
are written by their own thread.  An exception in here is logged and never reaches the call.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rapida_tap.events import webhooks
from rapida_tap.events.config import EventsSpec
from rapida_tap.events.quality import build_report
from rapida_tap.events.recording import CallRecorder, RecordingResult, RecordingWriter
from rapida_tap.outbound_call import (
    CANCELLED,
    NO_ANSWER,
    NOT_ANSWERED,
    OutboundCall,
    Status,
    UnknownCall,
)

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call
    from rapida_tap.metrics import EventMetrics
    from rapida_tap.outbound import OutboundCalls

_UNSAFE = re.compile(r"[^A-Za-z0-9+._-]")

#: ``outbound.status`` of a call that ended before it connected, by its end reason; any other
#: reason (originate failed, not connected, cancelled, shutdown) is ``failed``.  ``busy`` is
#: every channel that ended before it was answered: ARI's channel look-ups cannot tell a busy
#: callee from a rejected or unreachable one.
ENDED_STATUS = {NO_ANSWER: "no-answer", NOT_ANSWERED: "busy", CANCELLED: "failed"}


class CallEvents:
    """Wires the event consumers of one node to its bridge and outbound service."""

    log = Logger()

    def __init__(
        self,
        bridge: MediaBridge,
        spec: EventsSpec,
        *,
        clock: IReactorTime,
        sender: webhooks.WebhookSender,
        writer: RecordingWriter | None = None,
        recordings_dir: str = "",
        recording_name: str = "{context_id}.wav",
        outbound: OutboundCalls | None = None,
        metrics: EventMetrics | None = None,
    ) -> None:
        self._bridge = bridge
        self.spec = spec
        self._clock = clock
        self.sender = sender
        self.writer = writer
        self.recordings_dir = recordings_dir
        self.recording_name = recording_name
        self._outbound = outbound
        self._metrics = metrics
        self._reports: dict[Call, dict[str, Any]] = {}
        self._recorders: dict[Call, CallRecorder] = {}  # live calls' recordings
        self._recordings: set[defer.Deferred[Any]] = set()  # being finalised
        self._keys = itertools.count(1)
        bridge.call_started.append(self._guarded(self._call_started))
        # First of the end hooks: another may finish a drain and stop the node, whose flush
        # must find this call's events queued already.
        bridge.call_ended.insert(0, self._guarded(self._call_ended))
        bridge.end_report = self._end_report
        if outbound is not None:
            outbound.changed.append(self._guarded(self._outbound_status))

    def _guarded(self, hook: Callable[[Any], None]) -> Callable[[Any], None]:
        def guarded(subject: Any) -> None:
            try:
                hook(subject)
            except Exception:
                self.log.failure("call events: {hook} failed", hook=hook.__name__)

        return guarded

    # -- calls ---------------------------------------------------------------------------

    def _call_started(self, call: Call) -> None:
        context = call.context
        self.sender.send(
            self.spec.endpoints_for(context.assistant_id),
            webhooks.CALL_STARTED,
            self._call_data(call),
        )
        if self.writer is not None and self.spec.of(context.assistant_id).record:
            self._start_recording(call)

    def report(self, call: Call) -> dict[str, Any]:
        """The ended call's quality report (for its end log line, its webhook, the metrics)."""
        report = build_report(call, self._outbound_times)
        self._reports[call] = report
        if self._metrics is not None:
            self._metrics.call_quality(report)
        return report

    def _end_report(self, call: Call) -> dict[str, Any]:
        """For the bridge's end line: the report, or a word that it failed (logged once)."""
        try:
            return self.report(call)
        except Exception:
            self.log.failure("call {ctx}: the quality report failed", ctx=call.context_id)
            return {"error": "the quality report failed"}

    def _call_ended(self, call: Call) -> None:
        report = self._reports.pop(call, None)
        if report is None:
            report = self.report(call)
        data = self._call_data(call)
        data.update(
            end_reason=report["end_reason"],
            ended_by=report["ended_by"],
            talk_s=report["talk_s"],
            quality=report,
        )
        self.sender.send(
            self.spec.endpoints_for(call.context.assistant_id), webhooks.CALL_ENDED, data
        )
        call.recorder = None
        recorder = self._recorders.pop(call, None)
        if recorder is not None:
            d = recorder.finish()
            self._recordings.add(d)
            d.addCallback(self._recorded, call)
            d.addErrback(lambda f: self.log.failure("recording {path}", f, path=recorder.path))
            d.addBoth(lambda _: self._recordings.discard(d))

    def transferred(self, context_id: str, record: dict[str, str], outcome: str) -> None:
        """Call control reported a transfer's outcome (the call's media ended before it)."""
        assistant_id = record.get("assistant_id", "")
        data = {
            "context_id": context_id,
            "assistant_id": assistant_id,
            "caller": record.get("caller", ""),
            "direction": record.get("direction", ""),
            "transfer": {
                "to": record.get("transfer_to", ""),
                "outcome": outcome,
                "dialstatus": record.get("dialstatus", ""),
            },
        }
        self.sender.send(self.spec.endpoints_for(assistant_id), webhooks.CALL_TRANSFERRED, data)

    def _call_data(self, call: Call) -> dict[str, Any]:
        context = call.context
        return {
            "context_id": context.context_id,
            "assistant_id": context.assistant_id,
            "caller": context.caller,
            "direction": context.direction,
            "transport": call.leg.transport_name,
            "variables": dict(context.variables),
            "started_at": _iso(call.started_at),
        }

    def _outbound_times(self, context_id: str) -> tuple[float, float] | None:
        """(setup, ring) seconds of a call this node placed: originate to ringing to media."""
        if self._outbound is None:
            return None
        try:
            record = self._outbound.get(context_id)
        except UnknownCall:  # an inbound call, or one placed by another node
            return None
        if record.connected_at is None:
            return None
        ringing = record.ringing_at if record.ringing_at is not None else record.connected_at
        return max(0.0, ringing - record.created_at), max(0.0, record.connected_at - ringing)

    # -- outbound ------------------------------------------------------------------------

    def _outbound_status(self, record: OutboundCall) -> None:
        if record.status is Status.RINGING:
            status = "ringing"
        elif record.status is Status.CONNECTED:
            status = "answered"
        elif record.status is Status.ENDED and record.connected_at is None:
            status = ENDED_STATUS.get(str(record.reason), "failed")
        else:
            return  # a connected call's end is call.ended
        data = record.to_json()
        data["status"] = status
        self.sender.send(
            self.spec.endpoints_for(record.assistant_id), webhooks.OUTBOUND_STATUS, data
        )

    # -- recordings ----------------------------------------------------------------------

    def recording_path(self, call: Call) -> str:
        """The file of ``call``'s recording: ``recording_name`` under ``recordings_dir``."""
        context = call.context
        started = datetime.fromtimestamp(call.started_at, UTC)
        fields = {
            "context_id": context.context_id,
            "assistant_id": context.assistant_id,
            "caller": context.caller or "unknown",
            "direction": context.direction,
            "transport": call.leg.transport_name,
            "date": started.strftime("%Y-%m-%d"),
            "time": started.strftime("%H%M%S"),
        }
        safe = {k: _safe(v) for k, v in fields.items()}
        return os.path.join(self.recordings_dir, self.recording_name.format(**safe))

    def _start_recording(self, call: Call) -> None:
        assert self.writer is not None
        path = self.recording_path(call)

        def stopped(why: str) -> None:
            call.recorder = None
            if self._metrics is not None:
                self._metrics.recording("stopped")
            self.log.warn(
                "call {ctx}: recording stopped, the call goes on: {why} ({path})",
                ctx=call.context_id,
                why=why,
                path=path,
            )

        recorder = CallRecorder(
            next(self._keys), path, self.writer, self._bridge.pacer, self._clock, stopped
        )
        call.recorder = self._recorders[call] = recorder

    def _recorded(self, result: RecordingResult, call: Call) -> None:
        if self._metrics is not None and result.complete:
            self._metrics.recording("completed")
        data = self._call_data(call)
        data.update(
            path=result.path,
            duration_s=result.duration_s,
            size=result.size,
            sha256=result.sha256,
            format="wav, stereo PCM16, 8000 Hz: left the caller, right what was played",
            complete=result.complete,
            error=result.error,
        )
        self.sender.send(
            self.spec.endpoints_for(call.context.assistant_id),
            webhooks.RECORDING_COMPLETED,
            data,
        )

    # -- stopping ------------------------------------------------------------------------

    def stop(self, flush_timeout: float) -> defer.Deferred[None]:
        """After the calls ended: finalise the recordings, then flush the webhooks."""
        d: defer.Deferred[Any] = defer.gatherResults(list(self._recordings), consumeErrors=True)
        if self.writer is not None:
            writer = self.writer
            d.addBoth(lambda _: writer.stop())
        d.addBoth(lambda _: self.sender.flush(flush_timeout))
        d.addBoth(lambda _: self.sender.stop())
        return d


def _safe(value: str) -> str:
    """A field value usable as (part of) a file name: no separators, no dot-only names."""
    text = _UNSAFE.sub("_", value)[:64]
    return text if text.strip(".") else "_" * max(1, len(text))


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
