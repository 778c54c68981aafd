"""The shared pacer: one frame per stream per tick, on a drift-free grid, with bounded catch-up."""

import itertools

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap.media.pacer import Pacer


class Stream:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.ticks: list[tuple[float, bool]] = []

    def pace(self, catch_up: bool) -> None:
        self.ticks.append((self.clock.seconds(), catch_up))


class PacerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock, interval=0.02, max_debt=5)

    def test_ticks_every_interval_for_every_stream(self) -> None:
        a, b = Stream(self.clock), Stream(self.clock)
        self.pacer.add(a)
        self.pacer.add(b)
        self.clock.pump([0.02] * 50)
        self.assertEqual(len(a.ticks), 50)
        self.assertEqual(len(b.ticks), 50)
        self.assertEqual(self.pacer.ticks, 50)

    def test_grid_does_not_drift_when_ticks_run_late(self) -> None:
        """Each deadline comes from the grid, not from when the previous tick ran."""
        s = Stream(self.clock)
        self.pacer.add(s)
        for _ in range(100):
            self.clock.advance(0.0201)  # every tick 0.1 ms late
        times = [t for t, _ in s.ticks]
        # 100 * 20.1 ms = 2.01 s: a pacer re-armed from "now" would have ticked 100 times at
        # 20.1 ms spacing; the grid pacer is never more than one interval behind the grid.
        self.assertGreaterEqual(len(times), 100)
        for n, t in enumerate(times, start=1):
            self.assertLess(t - n * 0.02, 0.02 + 1e-6)

    def test_late_tick_catches_up_one_extra_frame_per_tick(self) -> None:
        s = Stream(self.clock)
        self.pacer.add(s)
        self.clock.advance(0.02)
        self.clock.advance(0.08)  # reactor blocked: 3 ticks missed
        self.assertEqual(self.pacer.debt, 2)  # 3 owed, one paid with this tick's catch-up
        self.clock.pump([0.02] * 4)
        flags = [c for _, c in s.ticks]
        self.assertEqual(flags, [False, True, True, True, False, False])
        self.assertEqual(self.pacer.debt, 0)
        self.assertEqual(self.pacer.late_ticks, 1)

    def test_debt_is_capped(self) -> None:
        s = Stream(self.clock)
        self.pacer.add(s)
        self.clock.advance(1.0)  # 49 ticks missed, at most 5 are worked off
        self.assertEqual(self.pacer.skipped_ticks, 49 - 5)
        self.clock.pump([0.02] * 10)
        self.assertEqual(sum(1 for _, c in s.ticks if c), 5)

    def test_idle_pacer_has_no_timer(self) -> None:
        s = Stream(self.clock)
        self.pacer.add(s)
        self.clock.advance(0.02)
        self.pacer.remove(s)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.pacer), 0)

    def test_stream_removed_during_tick(self) -> None:
        class Leaving(Stream):
            def pace(inner, catch_up: bool) -> None:
                super().pace(catch_up)
                self.pacer.remove(inner)

        s = Leaving(self.clock)
        self.pacer.add(s)
        self.clock.pump([0.02] * 3)
        self.assertEqual(len(s.ticks), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_stream_is_told_and_dropped_others_go_on(self) -> None:
        failures: list[Failure] = []

        class Broken:
            def pace(self, catch_up: bool) -> None:
                raise RuntimeError("boom")

            def pace_failed(self, failure: Failure) -> None:
                failures.append(failure)

        good = Stream(self.clock)
        self.pacer.add(Broken())
        self.pacer.add(good)
        self.clock.pump([0.02] * 3)
        self.assertEqual(len(good.ticks), 3)
        self.assertEqual(len(self.pacer), 1)
        self.assertEqual([f.getErrorMessage() for f in failures], ["boom"])

    def test_a_stream_that_fails_to_end_itself_is_still_dropped(self) -> None:
        class Broken:
            def pace(self, catch_up: bool) -> None:
                raise RuntimeError("boom")

            def pace_failed(self, failure: Failure) -> None:
                raise RuntimeError("worse")

        self.pacer.add(Broken())
        self.pacer.add(Stream(self.clock))
        self.clock.pump([0.02] * 2)
        self.assertEqual(len(self.pacer), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_forgets_everything(self) -> None:
        self.pacer.add(Stream(self.clock))
        self.pacer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.pacer), 0)

    def test_lateness_observer(self) -> None:
        seen: list[float] = []
        self.pacer.lateness_observer = seen.append
        self.pacer.add(Stream(self.clock))
        self.clock.advance(0.025)
        self.assertAlmostEqual(seen[0], 0.005)

    def test_each_tick_reads_what_arrived_before_it_paces(self) -> None:
        order: list[str] = []
        s = Stream(self.clock)
        s.pace = lambda catch_up: order.append("pace")  # type: ignore[method-assign]
        self.pacer.read_pending = lambda: order.append("read")
        self.pacer.add(s)
        self.clock.advance(0.0195)
        self.assertEqual(order, ["read", "pace"])
        self.clock.advance(0.030)  # late: something held the process
        self.assertEqual(order, ["read", "pace", "read", "pace"])

    def test_streams_that_end_while_reading_are_not_paced_and_the_grid_stays_one(self) -> None:
        a, b = Stream(self.clock), Stream(self.clock)
        self.pacer.add(a)
        self.clock.advance(0.0195)

        def read() -> None:  # a ends, the pacer goes idle, b starts a new grid
            self.pacer.remove(a)
            self.pacer.add(b)

        self.pacer.read_pending = read
        self.clock.advance(0.030)
        self.assertEqual(len(a.ticks), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # b's grid's timer only
        self.pacer.read_pending = None
        self.clock.pump([0.02] * 5)
        self.assertEqual(len(b.ticks), 5)

    def test_a_failing_read_is_logged_and_the_tick_goes_on(self) -> None:
        s = Stream(self.clock)
        self.pacer.add(s)
        self.pacer.read_pending = lambda: 1 / 0  # type: ignore[assignment,func-returns-value]
        self.clock.pump([0.025, 0.02, 0.02])
        self.assertEqual(len(s.ticks), 3)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)  # then not tried
        self.assertIsNone(self.pacer.read_pending)


class PhasedPacerTests(SynchronousTestCase):
    """Four ticks per 20 ms; each stream on one of them, once per 20 ms."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock, interval=0.02, max_debt=5, phases=4)

    def go(self, seconds: float) -> None:
        """Fire every timer at its own time."""
        end = self.clock.seconds() + seconds
        while (calls := self.clock.getDelayedCalls()) and min(c.getTime() for c in calls) <= end:
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))
        self.clock.advance(max(0.0, end - self.clock.seconds()))

    def test_streams_spread_over_the_phases_each_once_per_interval(self) -> None:
        streams = [Stream(self.clock) for _ in range(8)]
        for s in streams:
            self.pacer.add(s)
        self.go(1.0)
        for s in streams:
            times = [t for t, _ in s.ticks]
            self.assertEqual(len(times), 50)
            gaps = {round(b - a, 6) for a, b in itertools.pairwise(times)}
            self.assertEqual(gaps, {0.02})
        phases = sorted(round(s.ticks[0][0] % 0.02, 4) for s in streams)
        self.assertEqual(phases, [0.0045, 0.0045, 0.0095, 0.0095, 0.0145, 0.0145, 0.0195, 0.0195])
        self.assertEqual(self.pacer.ticks, 50)
        self.assertEqual(self.pacer.position, 50)

    def test_align_picks_the_first_tick_at_least_the_margin_away(self) -> None:
        s = Stream(self.clock)
        self.pacer.add(s)
        for offset in (0.0, 0.001, 0.0031, 0.007, 0.0149):
            self.go(offset)
            self.pacer.align(s, 0.005)
            wait = self.pacer.until_next_tick(s)
            self.assertGreaterEqual(wait, 0.005 - 1e-9)
            self.assertLess(wait, 0.010)
            before = len(s.ticks)
            self.go(wait)
            self.assertEqual(len(s.ticks), before + 1)  # it really ticks then

    def test_a_stall_puts_debt_only_on_the_phases_that_missed_a_whole_tick(self) -> None:
        streams = [Stream(self.clock) for _ in range(4)]
        for s in streams:
            self.pacer.add(s)
        self.go(0.02)  # each stream ticked once; the last tick was at 19.5 ms
        self.clock.advance(0.03)  # blocked: the phases due at 25 and 30 ms missed a tick
        self.assertEqual(self.pacer.late_ticks, 1)
        self.assertEqual([len(s.ticks) for s in streams], [2, 2, 2, 2])
        owed = sorted(round(s.ticks[0][0], 4) for s in streams if s.ticks[1][1])
        self.assertEqual(owed, [0.0045, 0.0095])  # their catch-up frame, now
        self.assertEqual(self.pacer.debt, 0)

    def test_a_long_stall_is_forgiven_beyond_the_cap_on_every_phase(self) -> None:
        streams = [Stream(self.clock) for _ in range(4)]
        for s in streams:
            self.pacer.add(s)
        self.clock.advance(1.0)
        self.assertEqual(self.pacer.skipped_ticks, 4 * (49 - 5))
        self.go(0.4)
        for s in streams:
            self.assertEqual(sum(1 for _, c in s.ticks if c), 5)
