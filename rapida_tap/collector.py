"""Python's garbage collector, kept from stalling every call's pacing at once.

A full collection walks every object the collector tracks, and the pacer's next tick waits
for it.  After start-up that is some 60,000 objects of imports and configuration that never
become garbage: on a slow core a full collection of them took ~35 ms, two missed 20 ms ticks for
every call at once (each caller hears a click).  Once the reactor runs they are collected one
last time and frozen (``gc.freeze``), out of every later collection.

Every collection is timed, so that what is left of the pauses is visible
(``rapida_gc_pause_seconds``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

log = Logger()


def freeze_startup_objects() -> int:
    """Collect once, then leave every object alive now out of later collections.

    Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    frozen: int = gc.get_freeze_count()
    log.debug("froze {count} start-up objects out of garbage collection", count=frozen)
    return frozen


class PauseTimer:
    """Calls ``observe(generation, seconds)`` after each garbage collection."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._observe(info["generation"], time.perf_counter() - self._started)
