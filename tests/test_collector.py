"""Garbage collection: start-up objects frozen out of it, every pause timed and exposed."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.collector import PauseTimer, freeze_startup_objects
from rapida_tap.contexts import MemoryContextStore
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.metrics import NodeMetrics
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


class MetricsTests(SynchronousTestCase):
    def test_pauses_are_a_histogram_by_generation(self) -> None:
        clock = Clock()
        bridge = MediaBridge(
            clock=clock,
            contexts=MemoryContextStore(clock),
            assistants=AssistantRegistry(default=EchoAssistant()),
        )
        metrics = NodeMetrics(bridge)
        metrics.observe_gc_pause(2, 0.035)
        metrics.observe_gc_pause(0, 0.00002)
        text = generate_latest(metrics.registry).decode()
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("rapida_gc_pause_seconds")
        }
        full = (("generation", "2"),)
        self.assertEqual(found[("rapida_gc_pause_seconds_count", full)], 1)
        self.assertEqual(found[("rapida_gc_pause_seconds_bucket", (*full, ("le", "0.02")))], 0)
        self.assertEqual(found[("rapida_gc_pause_seconds_bucket", (*full, ("le", "0.05")))], 1)
        young = (("generation", "0"),)
        self.assertEqual(found[("rapida_gc_pause_seconds_bucket", (*young, ("le", "0.0001")))], 1)
        self.assertEqual(found[("rapida_gc_pause_seconds_count", (("generation", "1"),))], 0)
