"""One outbound call as the node that placed it follows it: a record and its state machine,
and the errors the outbound service reports.

::

    originating ──ARI created the channel──▶ ringing ──media connected──▶ connected ──▶ ended
         │  └────────────── media connected (before ARI answered) ──────────▶ connected
         └──────── failed, cancelled, not answered, timed out ─────────────────────────▶ ended

Every change of status goes through ``OutboundCall.move`` and the ``TRANSITIONS`` table.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.call import Call


class Status(enum.StrEnum):
    """Statuses, in the order a call goes through them."""

    ORIGINATING = "originating"
    RINGING = "ringing"
    CONNECTED = "connected"
    ENDED = "ended"


TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.ORIGINATING: frozenset({Status.RINGING, Status.CONNECTED, Status.ENDED}),
    Status.RINGING: frozenset({Status.CONNECTED, Status.ENDED}),
    Status.CONNECTED: frozenset({Status.ENDED}),
    Status.ENDED: frozenset(),
}

# End reasons of calls that never connected (connected calls end with the bridge's reasons).
NO_ANSWER = "no-answer"
NOT_ANSWERED = "not-answered"
NOT_CONNECTED = "not-connected"
CANCELLED = "cancelled"
ORIGINATE_FAILED = "originate-failed"


class OutboundError(Exception):
    """A request the outbound service cannot carry out; ``str()`` is for the API's caller."""


class UnknownAssistantId(OutboundError):
    pass


class UnknownCall(OutboundError):
    pass


class CallElsewhere(OutboundError):
    """The call's media connected to another node; only that node can end it."""


class Unavailable(OutboundError):
    """This node cannot place calls now (draining, stopping, context store down)."""


class IllegalTransition(RuntimeError):
    """A status change the table does not allow: a bug in the daemon."""


@dataclasses.dataclass(eq=False)
class OutboundCall:
    """One outbound call as this node follows it.  Times are ``IReactorTime.seconds()``."""

    context_id: str
    channel_id: str
    provider: str
    assistant_id: str
    to: str
    caller_id: str
    transport: str
    created_at: float
    status: Status = Status.ORIGINATING
    reason: str | None = None
    detail: str = ""
    ringing_at: float | None = None
    connected_at: float | None = None
    ended_at: float | None = None
    originated: bool = False  # ARI created the channel
    answered: bool = False  # ARI reported the channel Up
    claiming: bool = False  # a take-back of the context is under way
    call: Call | None = dataclasses.field(default=None, repr=False)
    ring_timer: IDelayedCall | None = dataclasses.field(default=None, repr=False)
    check_timer: IDelayedCall | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "context_id": self.context_id,
            "channel_id": self.channel_id,
            "provider": self.provider,
            "assistant_id": self.assistant_id,
            "to": self.to,
            "from": self.caller_id,
            "transport": self.transport,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
            "created_at": self.created_at,
            "connected_at": self.connected_at,
            "ended_at": self.ended_at,
        }

    def move(self, status: Status) -> None:
        """Go to ``status``; a move the table does not allow is a bug, and raises."""
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"outbound call {self.context_id}: {self.status} -> {status}")
        self.status = status

    @property
    def connected_or_ended(self) -> bool:
        return self.status is Status.CONNECTED or self.status is Status.ENDED

    def stop_timers(self) -> None:
        for timer in (self.ring_timer, self.check_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.ring_timer = self.check_timer = None


class CallRecords:
    """The calls this node follows: live ones, and ended ones for a while.

    Ended calls are kept so that programs can read how they ended, bounded in number
    (``max_ended``) and age (``retention`` seconds).
    """

    def __init__(self, clock: IReactorTime, *, max_ended: int, retention: float) -> None:
        self._clock = clock
        self.max_ended = max_ended
        self.retention = retention
        self.live: dict[str, OutboundCall] = {}
        self._ended: collections.OrderedDict[str, tuple[float, OutboundCall]] = (
            collections.OrderedDict()
        )

    def get(self, context_id: str) -> OutboundCall | None:
        self._prune()
        record = self.live.get(context_id)
        if record is None and context_id in self._ended:
            record = self._ended[context_id][1]
        return record

    def all(self) -> list[OutboundCall]:
        """Live calls, then recently ended ones, oldest first."""
        self._prune()
        return [*self.live.values(), *(record for _, record in self._ended.values())]

    def retain(self, record: OutboundCall) -> None:
        """``record`` is no longer followed here: keep it among the ended ones."""
        self.live.pop(record.context_id, None)
        self._ended[record.context_id] = (self._clock.seconds(), record)
        self._prune()

    def _prune(self) -> None:
        ended = self._ended
        while len(ended) > self.max_ended:
            ended.popitem(last=False)
        horizon = self._clock.seconds() - self.retention
        while ended and next(iter(ended.values()))[0] < horizon:
            ended.popitem(last=False)
