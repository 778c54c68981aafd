"""Sans-IO bookkeeping for the bench: per-call echo tracking, percentiles, the quality bar, tables.

Times are seconds on one monotonic clock (``time.monotonic`` is system-wide on Linux, so client
processes and the controller agree).  Reported figures are milliseconds where the name says
``_ms`` and seconds or megabytes otherwise.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.frames import FRAME_SECONDS, IS_CORRUPT, IS_SILENCE

#: The quality bar (docs/benchmarks.md): p99 outbound interval error at most this (ms), no loss,
#: no underrun.
BAR_INTERVAL_P99_MS = 2.0


class EchoTracker:
    """What one call sent and what came back, judged frame by frame.

    ``sent`` numbers frames 1, 2, ...; ``received`` takes each frame the server returned (its
    `bench.frames.identify` value) with its arrival time.  Samples of the measurement window
    (frames sent, or received, in ``[hold_from, hold_to)``) go to the shared arrays so a whole
    client process is summarised without per-call lists:

    * ``intervals``: ``|gap between two returned frames - 20 ms|`` (seconds), any frame kind;
    * ``latencies``: arrival of an echoed frame minus the time it was written (seconds);
    * ``early`` / ``late``: latencies of frames sent in the window's first / last second, whose
      medians' difference shows latency growing over the call.

    An underrun is a run of silence between two echoed frames: the caller hears a gap.

    ``lead`` (chan_websocket) says the server sends *nothing* during silence and ``lead``
    extra frames at once when audio starts again (its ``ws_lead_frames``).  Then an arrival
    gap over 1.5 frames is a silent stretch (an underrun when it falls between two echoed
    frames), its interval error is its distance from the nearest whole number of 20 ms ticks
    (the server's pacer keeps its grid through silence), and up to ``lead`` frames arriving
    less than half a frame after their predecessor right after the start of a stretch are the
    lead burst, not sampled.  Every other gap is sampled as ``|gap - 20 ms|``.
    """

    __slots__ = (
        "_early",
        "_gap",
        "_hold_from",
        "_hold_to",
        "_intervals",
        "_late",
        "_latencies",
        "_lead",
        "_playing",
        "_skip",
        "corrupt",
        "duplicated",
        "echoed",
        "expect",
        "first_echo_at",
        "last_rx",
        "lost",
        "send_times",
        "silence",
        "underruns",
    )

    def __init__(
        self,
        hold_from: float,
        hold_to: float,
        intervals: array[float],
        latencies: array[float],
        early: array[float],
        late: array[float],
        lead: int | None = None,
    ) -> None:
        self._lead = lead
        self._skip = 0
        self._hold_from = hold_from
        self._hold_to = hold_to
        self._intervals = intervals
        self._latencies = latencies
        self._early = early
        self._late = late
        self.send_times: list[float] = [math.nan]  # index = sequence number
        self.expect = 1
        self.echoed = self.lost = self.duplicated = self.corrupt = self.silence = 0
        self.underruns = 0
        self._playing = self._gap = False
        self.last_rx: float | None = None
        self.first_echo_at: float | None = None

    @property
    def sent_frames(self) -> int:
        return len(self.send_times) - 1

    def sent(self, at: float) -> int:
        """Record a frame written at ``at``; return its sequence number."""
        self.send_times.append(at)
        return len(self.send_times) - 1

    def received(self, ident: int, at: float) -> None:
        last, self.last_rx = self.last_rx, at
        if self._lead is not None:
            self._gapless_interval(last, at)
        elif last is not None and self._hold_from <= at < self._hold_to:
            self._intervals.append(abs(at - last - FRAME_SECONDS))
        if ident == IS_SILENCE:
            self.silence += 1
            if self._playing:
                self._gap, self._playing = True, False
            return
        if ident == IS_CORRUPT or ident >= len(self.send_times):
            self.corrupt += 1
            return
        if ident < self.expect:
            self.duplicated += 1
            return
        self.lost += ident - self.expect
        self.expect = ident + 1
        self.echoed += 1
        if self._gap:
            self.underruns += 1
            self._gap = False
        self._playing = True
        if self.first_echo_at is None:
            self.first_echo_at = at
        sent_at = self.send_times[ident]
        if self._hold_from <= sent_at < self._hold_to:
            latency = at - sent_at
            self._latencies.append(latency)
            if sent_at < self._hold_from + 1.0:
                self._early.append(latency)
            if sent_at >= self._hold_to - 1.0:
                self._late.append(latency)

    def _gapless_interval(self, last: float | None, at: float) -> None:
        if last is None:
            self._skip = self._lead or 0
            return
        gap = at - last
        if gap > 1.5 * FRAME_SECONDS:
            if self._playing:
                self._gap = True
            error = abs(gap - round(gap / FRAME_SECONDS) * FRAME_SECONDS)
            self._skip = self._lead or 0
        elif self._skip and gap < 0.5 * FRAME_SECONDS:
            self._skip -= 1
            return
        else:
            self._skip = 0
            error = abs(gap - FRAME_SECONDS)
        if self._hold_from <= at < self._hold_to:
            self._intervals.append(error)

    def finish(self) -> None:
        """The call is over: frames never echoed are lost."""
        self.lost += len(self.send_times) - self.expect
        self.expect = len(self.send_times)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank ``q``-th percentile (0..100) of ``values`` (any order); NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be 0..100, not {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def spread_ms(values: Sequence[float], *qs: float) -> dict[str, float]:
    """``{"p50": ..., "p99": ..., "max": ...}`` in ms of ``values`` given in seconds."""
    ordered = sorted(values)
    out = {}
    for q in qs:
        out["max" if q == 100 else f"p{q:g}"] = _ms(percentile(ordered, q))
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3) if not math.isnan(seconds) else math.nan


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def meets_bar(metrics: Mapping[str, Any]) -> bool:
    """The quality bar of docs/benchmarks.md: p99 interval error <= 2 ms, no frame lost, no
    underrun, and every call set up.  Underruns count from the daemon's view when it gave one."""
    underruns = metrics.get("underruns_daemon")
    if underruns is None:
        underruns = metrics["underruns_client"]
    p99 = metrics["interval_error_ms"]["p99"]
    return (
        metrics["calls_failed"] == 0
        and metrics["frames_lost"] == 0
        and underruns == 0
        and not math.isnan(p99)
        and p99 <= BAR_INTERVAL_P99_MS
    )


# -- tables ---------------------------------------------------------------------------------

# (label, path into the metrics dict, format)
ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("calls", ("calls",), "{:d}"),
    ("calls failed", ("calls_failed",), "{:d}"),
    ("frames sent", ("frames_sent",), "{:d}"),
    ("frames lost", ("frames_lost",), "{:d}"),
    ("frames corrupt/dup", ("frames_bad",), "{:d}"),
    ("underruns (daemon)", ("underruns_daemon",), "{}"),
    ("underruns (client)", ("underruns_client",), "{:d}"),
    ("interval err p50 ms", ("interval_error_ms", "p50"), "{:.3f}"),
    ("interval err p99 ms", ("interval_error_ms", "p99"), "{:.3f}"),
    ("interval err max ms", ("interval_error_ms", "max"), "{:.3f}"),
    ("echo latency p50 ms", ("echo_latency_ms", "p50"), "{:.3f}"),
    ("echo latency p99 ms", ("echo_latency_ms", "p99"), "{:.3f}"),
    ("latency drift ms", ("latency_drift_ms",), "{:.3f}"),
    ("setup p50 ms", ("setup_ms", "p50"), "{:.3f}"),
    ("setup p99 ms", ("setup_ms", "p99"), "{:.3f}"),
    ("server CPU % core", ("server_cpu_core_percent",), "{:.1f}"),
    ("server CPU s/call-s", ("server_cpu_per_call_second",), "{:.6f}"),
    ("server full GCs, hold", ("server_gc", "full"), "{:.0f}"),
    ("server full GC s, hold", ("server_gc", "full_seconds"), "{:.3f}"),
    ("server GC pauses >10 ms", ("server_gc", "over_10ms"), "{:.0f}"),
    ("/metrics scrape ms", ("server_gc", "scrape_ms"), "{:.1f}"),
    ("server RSS MB", ("server_rss_mb",), "{:.1f}"),
    ("server RSS MB/call", ("server_rss_per_call_mb",), "{:.4f}"),
    ("client", ("client",), "{}"),
    ("client CPU % core", ("client_cpu_core_percent",), "{:.1f}"),
    ("client CPU % core, hold", ("client_cpu_hold_core_percent",), "{:.1f}"),
    ("client send lag p99 ms", ("client_send_lag_ms", "p99"), "{:.3f}"),
    ("host timer noise p99 ms", ("host_timer_noise_ms", "p99"), "{:.3f}"),
    ("quality bar", ("meets_bar",), "{}"),
)


def _cell(metrics: Mapping[str, Any], path: tuple[str, ...], fmt: str) -> str:
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return "-"
        value = value[key]
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, bool):
        return "PASS" if value else "fail"
    return fmt.format(value)


def format_table(columns: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per metric, one column per run (e.g. ``{"rapida": m}``)."""
    rows = [("metric", *columns)]
    for label, path, fmt in ROWS:
        rows.append((label, *(_cell(m, path, fmt) for m in columns.values())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def merge(arrays: Iterable[Sequence[float]]) -> list[float]:
    out: list[float] = []
    for a in arrays:
        out.extend(a)
    return out
