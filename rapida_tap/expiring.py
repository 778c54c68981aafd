"""A map whose entries expire ``ttl`` seconds after they were last set, on one timer.

The memory context store keeps an entry for every call for minutes to an hour (why an id was
refused, the call's record).  A ``callLater`` per entry cost more memory than most entries
(about 600 bytes) and put thousands of timers in the reactor's heap.  Here the deadlines are
in a heap of their own, and one timer wakes up for the earliest.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

V = TypeVar("V")


class ExpiringMap(Generic[V]):
    """``str`` keys to values, each forgotten ``ttl`` seconds after its last ``set``.

    Iteration, and ``pop_oldest``, follow the order in which entries were last set.
    """

    def __init__(self, clock: IReactorTime, ttl: float) -> None:
        self._clock = clock
        self.ttl = ttl
        self._entries: dict[str, tuple[float, V]] = {}  # key -> (expires at, value)
        self._deadlines: list[tuple[float, str]] = []  # a heap; stale items are skipped
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def set(self, key: str, value: V, ttl: float | None = None) -> None:
        """Store ``value``, forgotten ``ttl`` (default: the map's) seconds from now."""
        expires = self._clock.seconds() + (self.ttl if ttl is None else ttl)
        self._entries.pop(key, None)
        self._entries[key] = (expires, value)
        heapq.heappush(self._deadlines, (expires, key))
        if len(self._deadlines) > 2 * len(self._entries) + 64:
            self._compact()
        if self._timer is None:
            self._timer = self._clock.callLater(expires - self._clock.seconds(), self._expire)
        elif expires < self._timer.getTime():
            self._timer.reset(expires - self._clock.seconds())

    def replace(self, key: str, value: V) -> None:
        """Change the value of an entry that is there, keeping its deadline and its place."""
        expires, _ = self._entries[key]
        self._entries[key] = (expires, value)

    def pop(self, key: str) -> V | None:
        entry = self._entries.pop(key, None)
        return entry[1] if entry is not None else None

    def pop_oldest(self) -> None:
        """Forget the entry set longest ago."""
        if self._entries:
            del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        self._entries.clear()
        self._deadlines.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _compact(self) -> None:
        """Forget the deadlines of entries set again or removed since (an entry set again with
        a shorter TTL would otherwise leave its old deadline in the heap for the longer one)."""
        self._deadlines = [(expires, key) for key, (expires, _) in self._entries.items()]
        heapq.heapify(self._deadlines)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        deadlines, entries = self._deadlines, self._entries
        while deadlines and deadlines[0][0] <= now:
            expires, key = heapq.heappop(deadlines)
            entry = entries.get(key)
            if entry is not None and entry[0] == expires:
                del entries[key]
        if deadlines:
            self._timer = self._clock.callLater(deadlines[0][0] - now, self._expire)
