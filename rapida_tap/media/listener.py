"""What every connection of one transport shares: limits, counts and a log throttle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rapida_tap.ratelimit import LogThrottle, held_note
from rapida_tap.reasons import Refusal

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.bridge import MediaBridge


def peer_text(transport: object) -> str:
    """``host:port`` of a transport's peer, for log lines; ``?`` when it has none."""
    try:
        address = transport.getPeer()  # type: ignore[attr-defined]
        return f"{address.host}:{address.port}"
    except Exception:
        return "?"


class LegListener:
    """What every connection of one transport shares: limits, timers, counts, log throttle.

    Times are seconds on ``bridge.clock``.  ``ping_interval`` 0 turns keep-alive off;
    ``dtmf_rate``/``control_rate`` are per call and second, with bursts of four times that.
    """

    log = Logger()

    def __init__(
        self,
        bridge: MediaBridge,
        transport_name: str,
        *,
        stall_timeout: float = 5.0,
        close_timeout: float = 2.0,
        ping_interval: float = 0.0,
        max_connections: int = 5000,
        dtmf_rate: float = 20.0,
        control_rate: float = 50.0,
        log_interval: float = 5.0,
    ) -> None:
        self.bridge = bridge
        self.clock: IReactorTime = bridge.clock
        self.transport_name = transport_name
        self.stall_timeout = stall_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.max_connections = max_connections
        self.dtmf_rate = dtmf_rate
        self.control_rate = control_rate
        self.connections = 0
        self.refused: dict[Refusal, int] = {}
        self.throttle = LogThrottle(log_interval)

    def note(self, key: str, message: str, **fields: object) -> None:
        """An info line that a peer can cause over and over: at most one per key and interval."""
        held = self.throttle.allow(key, self.clock.seconds())
        if held is not None:
            self.log.info(message + "{held}", held=held_note(held), **fields)

    def count_refusal(self, peer: str, why: Refusal, detail: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        held = self.throttle.allow(f"refused:{why}", self.clock.seconds())
        if held is not None:
            self.log.warn(
                "{transport} {peer}: connection refused: {why} ({detail}){held}",
                transport=self.transport_name,
                peer=peer,
                why=str(why),
                detail=detail,
                held=held_note(held),
            )
