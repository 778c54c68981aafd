"""The quality report of one call: how it went, from the counters its ``Call`` kept.

Built once, when the call ends, from integers the media path keeps anyway (frames, underruns,
marks...), the pacer's lateness histogram (its counts when the call started and when it ended,
so the call's own pacing error costs nothing per frame) and, for outbound calls, when the
callee's phone rang.  The report is a flat dict of JSON scalars, so the same object goes into
the ``call.ended`` webhook, the call-end log line (JSON logs) and the metrics.  Times are in
seconds (``_s``) or milliseconds (``_ms``), as their names say.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rapida_tap.media.pacer import LATENESS_EDGES
from rapida_tap.reasons import EndReason

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.call import Call

#: Who ended the call, by end reason: the caller's side, the assistant, the calls API, the
#: network between Asterisk and the daemon, or the daemon itself (a limit, a bug, a stop).
ENDED_BY: dict[EndReason, str] = {
    EndReason.CALLER_HANGUP: "caller",
    EndReason.ASSISTANT_HANGUP: "assistant",
    EndReason.ASSISTANT_FAILED: "assistant",
    EndReason.API_HANGUP: "api",
    EndReason.TRANSFER: "assistant",  # the bot asked for it
    EndReason.TRANSPORT_ERROR: "network",
    EndReason.IDLE_TIMEOUT: "daemon",
    EndReason.PEER_NOT_READING: "daemon",
    EndReason.PROTOCOL_ERROR: "daemon",
    EndReason.INTERNAL_ERROR: "daemon",
    EndReason.SHUTDOWN: "daemon",
    EndReason.DRAIN_TIMEOUT: "daemon",
}

#: (setup, ring) seconds of an outbound call, or None for a call this node did not place.
OutboundTimes = Callable[[str], "tuple[float, float] | None"]


def percentile_ms(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (0-1) of a lateness histogram, as its bucket's upper edge in ms.

    The edge is an upper bound: "p99 2.0" means 99 % of ticks were at most 2 ms late.  The
    last bucket has no upper edge; it reports the last edge (a lower bound).  None: no ticks.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            edge = LATENESS_EDGES[min(index, len(LATENESS_EDGES) - 1)]
            return round(edge * 1000, 3)
    return round(LATENESS_EDGES[-1] * 1000, 3)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def build_report(call: Call, outbound_times: OutboundTimes | None = None) -> dict[str, Any]:
    """The report of an ended ``call`` (see docs/events.md for every field)."""
    context = call.context
    leg = call.leg
    reason = call.end_reason
    ended_at = call.ended_at if call.ended_at is not None else call.started_at
    ticks = call.pacing_ticks
    rounds = call.pacing_rounds
    times = outbound_times(context.context_id) if outbound_times is not None else None
    if times is not None:
        setup, ring = times
    else:
        setup, ring = max(0.0, call.started_at - context.created_at), None
    first_audio = None
    if call.first_in_at is not None and call.first_out_at is not None:
        first_audio = max(0.0, call.first_out_at - call.first_in_at)
    barge_in_mean = call.barge_in_seconds_total / call.barge_ins if call.barge_ins else None
    return {
        "context_id": context.context_id,
        "assistant_id": context.assistant_id,
        "caller": context.caller,
        "direction": context.direction,
        "transport": leg.transport_name,
        "codec": getattr(leg, "codec", "slin"),
        "sample_rate": int(getattr(leg, "sample_rate", None) or 8000),
        "caller_rate": call.caller_rate or None,
        "call_rate": call.rate,
        "assistant_rate": call.assistant_rate,
        "setup_s": round(setup, 3),
        "ring_s": None if ring is None else round(ring, 3),
        "talk_s": round(ended_at - call.started_at, 3),
        "ended_by": ENDED_BY.get(reason, "daemon") if reason is not None else "daemon",
        "end_reason": str(reason) if reason is not None else "",
        "end_detail": call.end_detail,
        "frames_in": call.frames_in,
        "frames_out": call.frames_out,
        "silence_frames": call.silence_out,
        "underruns": call.underruns,
        "overflow_frames": call.overflow_frames,
        "trimmed_frames": call.trimmed_frames,
        "dropped_frames": call.dropped_frames,
        "ticks": rounds,
        "pacing_error_p50_ms": percentile_ms(ticks, 0.50),
        "pacing_error_p99_ms": percentile_ms(ticks, 0.99),
        "queue_depth_max": call.queue_depth_max,
        "queue_depth_mean": round(call.queue_depth_sum / rounds, 2) if rounds else 0.0,
        "xoff": int(getattr(leg, "xoff_count", 0)),
        "pauses": call.pauses,
        "first_audio_ms": _ms(first_audio),
        "barge_ins": call.barge_ins,
        "barge_in_ms_mean": _ms(barge_in_mean),
        "barge_in_ms_max": _ms(call.barge_in_seconds_max) if call.barge_ins else None,
        "marks_sent": call.marks_sent,
        "marks_echoed": call.marks_echoed,
        "marks_settled": call.marks_settled,
        "dtmf": call.dtmf_digits,
    }
