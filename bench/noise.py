"""The host's own timer noise: how late a bare 20 ms loop wakes on the server's core.

On a shared or virtualised machine the scheduler alone can delay a wake-up by milliseconds;
measuring that floor next to each run tells the reader which part of the interval error is
the server's and which is the host's.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import time

from bench.frames import FRAME_SECONDS
from bench.stats import spread_ms


def _probe(core: int | None, seconds: float) -> list[float]:
    if core is not None:
        os.sched_setaffinity(0, {core})
    ep = select.epoll()
    late = []
    deadline = time.monotonic() + FRAME_SECONDS
    end = deadline + seconds
    while deadline < end:
        ep.poll(max(0.0, deadline - time.monotonic() - 0.001))
        while time.monotonic() < deadline:  # spin the last millisecond: measure the host only
            pass
        late.append(time.monotonic() - deadline)
        deadline += FRAME_SECONDS
    ep.close()
    return late


def timer_noise(core: int | None, seconds: float = 1.0) -> dict[str, float]:
    """Wake-up lateness p50/p99/max (ms) of a bare 20 ms loop on ``core``, in a child process."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        late = pool.apply(_probe, (core, seconds))
    return spread_ms(late, 50, 99, 100)
