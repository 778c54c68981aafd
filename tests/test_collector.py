"""Garbage collection: start-up objects frozen out of it, and every pause timed."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap.collector import PauseTimer, freeze_startup_objects
from rapida_tap.services import CollectorService


class _Cycle:
    def __init__(self) -> None:
        self.me = self


class FreezeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)

    def test_live_objects_leave_collections_and_garbage_is_collected_first(self) -> None:
        garbage = _Cycle()
        collected = []
        gc.callbacks.append(lambda phase, info: collected.append(info.get("collected", 0)))
        self.addCleanup(gc.callbacks.pop)
        del garbage
        alive = _Cycle()
        frozen = freeze_startup_objects()
        self.assertGreater(sum(collected), 0)  # the cycle dropped above went first
        self.assertGreater(frozen, 1000)  # the test process's modules, at least
        self.assertGreater(gc.get_freeze_count(), 1000)  # (a frozen object freed leaves it)
        for generation in range(3):
            self.assertFalse(any(o is alive for o in gc.get_objects(generation=generation)))


class PauseTimerTests(SynchronousTestCase):
    def test_each_collection_is_reported_with_its_generation_until_uninstalled(self) -> None:
        pauses: list[tuple[int, float]] = []
        timer = PauseTimer(lambda generation, seconds: pauses.append((generation, seconds)))
        timer.install()
        timer.install()  # once only
        self.addCleanup(timer.uninstall)
        gc.collect(2)
        gc.collect(0)
        self.assertEqual([g for g, _ in pauses], [2, 0])
        self.assertTrue(all(0 < seconds < 5 for _, seconds in pauses))
        timer.uninstall()
        timer.uninstall()
        gc.collect(1)
        self.assertEqual(len(pauses), 2)


class _Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.when_running: list[Callable[[], Any]] = []

    def callWhenRunning(self, f: Callable[[], Any]) -> None:
        self.when_running.append(f)


class CollectorServiceTests(SynchronousTestCase):
    def test_times_collections_while_running_and_freezes_once_the_reactor_runs(self) -> None:
        reactor = _Reactor()
        pauses: list[int] = []
        service = CollectorService(reactor, lambda generation, _: pauses.append(generation))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.assertEqual(reactor.when_running, [freeze_startup_objects])
        gc.collect(1)
        self.assertEqual(pauses, [1])
        service.stopService()
        gc.collect(1)
        self.assertEqual(pauses, [1])
