"""`ExpiringMap` on a Clock: every entry goes at its own deadline, on one timer."""

from __future__ import annotations

from twisted.internet.task import Clock

from rapida_tap.expiring import ExpiringMap


def test_entries_expire_at_their_deadline_on_one_timer() -> None:
    clock = Clock()
    m: ExpiringMap[int] = ExpiringMap(clock, ttl=10)
    for i in range(100):
        m.set(f"k{i}", i)
        clock.advance(0.1)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.05)  # k0 was set 10.05 s ago, k1 9.95 s ago
    assert "k0" not in m and "k1" in m
    clock.advance(5)
    assert len(m) == 100 - 51
    clock.advance(5)
    assert len(m) == 0
    assert clock.getDelayedCalls() == []


def test_setting_again_moves_the_deadline_and_the_order() -> None:
    clock = Clock()
    m: ExpiringMap[str] = ExpiringMap(clock, ttl=10)
    m.set("a", "1")
    m.set("b", "1")
    clock.advance(9)
    m.set("a", "2")
    assert list(m) == ["b", "a"]
    clock.advance(1)
    assert m.get("a") == "2" and m.get("b") is None
    clock.advance(8.9)
    assert m.get("a") == "2"
    clock.advance(0.2)
    assert m.get("a") is None


def test_a_shorter_ttl_behind_a_longer_one_still_expires_on_time() -> None:
    clock = Clock()
    m: ExpiringMap[int] = ExpiringMap(clock, ttl=3600)
    m.set("long", 1)
    m.set("short", 2, ttl=5)
    clock.advance(5)
    assert "short" not in m and "long" in m
    assert [c.getTime() for c in clock.getDelayedCalls()] == [3600]


def test_pop_oldest_and_clear() -> None:
    clock = Clock()
    m: ExpiringMap[int] = ExpiringMap(clock, ttl=10)
    for key in "abc":
        m.set(key, 0)
    m.pop_oldest()
    assert list(m) == ["b", "c"]
    assert m.pop("c") == 0 and m.pop("c") is None
    m.clear()
    assert len(m) == 0 and clock.getDelayedCalls() == []
    clock.advance(20)  # stale deadlines of removed keys are harmless
    m.set("d", 1)
    assert m.get("d") == 1


def test_replace_keeps_the_deadline_and_the_place() -> None:
    clock = Clock()
    m: ExpiringMap[int] = ExpiringMap(clock, ttl=10)
    m.set("a", 1)
    m.set("b", 1)
    clock.advance(6)
    m.replace("a", 2)
    assert list(m) == ["a", "b"] and m.get("a") == 2
    clock.advance(4)
    assert "a" not in m and "b" not in m


def test_deadlines_of_entries_set_again_do_not_pile_up() -> None:
    """Each entry set again with a shorter TTL (a call's record once the call ended) leaves its
    first deadline behind; those are dropped once they outnumber the entries."""
    clock = Clock()
    m: ExpiringMap[int] = ExpiringMap(clock, ttl=3600)
    for i in range(10_000):
        m.set(f"k{i}", 0)
        m.set(f"k{i}", 1, ttl=600)
        clock.advance(0.36)  # 3600 s in all: the first ones are long gone
    assert len(m) <= 1700
    assert len(m._deadlines) <= 2 * len(m) + 64
    assert m.get("k9999") == 1
    clock.advance(600)
    assert len(m) == 0
