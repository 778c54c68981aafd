"""The shared pacer: one frame per stream per tick, on a drift-free grid, with bounded catch-up."""

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
