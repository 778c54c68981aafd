"""Call contexts: what registration hands to the media connection, single-use and short-lived."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from rapida_tap.expiring import ExpiringMap
from rapida_tap.interfaces import IContextStore
from rapida_tap.reasons import CallRefused, Refusal

INBOUND = "inbound"
OUTBOUND = "outbound"


class ContextError(CallRefused):
    """A media connection presented a context id that cannot start a call."""

    reason = Refusal.CONTEXT_REFUSED


class ContextUnknown(ContextError):
    reason = Refusal.CONTEXT_UNKNOWN


class ContextExpired(ContextError):
    reason = Refusal.CONTEXT_EXPIRED


class ContextReused(ContextError):
    reason = Refusal.CONTEXT_REUSED


class ContextStoreUnavailable(CallRefused):
    """The store cannot be reached (e.g. Redis is down); registration answers 503."""

    reason = Refusal.CONTEXT_STORE_UNAVAILABLE


def new_context_id() -> str:
    """A random (version 4) UUID in canonical text form: 122 unguessable bits.

    Asterisk's ``AudioSocket()`` refuses any id that is not exactly ``8-4-4-4-12``.
    """
    return str(uuid.uuid4())


def is_context_id(text: str) -> bool:
    """True for a canonical lower-case UUID text, the only form the daemon ever mints."""
    if len(text) != 36:
        return False
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class CallContext:
    """One registered call, before and while its media connection runs.

    ``created_at`` is in seconds on the daemon's clock (``IReactorTime.seconds``).
    """

    context_id: str
    assistant_id: str
    caller: str = ""
    direction: str = INBOUND
    created_at: float = 0.0
    variables: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CallContext:
        data: dict[str, Any] = json.loads(text)
        return cls(
            context_id=str(data["context_id"]),
            assistant_id=str(data["assistant_id"]),
            caller=str(data.get("caller", "")),
            direction=str(data.get("direction", INBOUND)),
            created_at=float(data.get("created_at", 0.0)),
            variables={str(k): str(v) for k, v in data.get("variables", {}).items()},
        )


#: Seconds a call's record stays readable after it was last written.
CALL_RECORD_TTL = 3600.0
#: In the memory store, seconds an ended call's record stays when no transfer is on it: nothing
#: but ``GET`` of an ended call reads it, and longer at a few hundred calls a minute would hold
#: megabytes in the daemon.  (Redis keeps every record for ``CALL_RECORD_TTL``.)
ENDED_RECORD_TTL = 300.0


@implementer(IContextStore)
class MemoryContextStore:
    """The embedded default: contexts of this process only.

    Expired and claimed ids are remembered for ``tombstone_ttl`` seconds so that a refusal
    can say *why* (expired, reused) rather than just "unknown"; a claimed id's call record,
    once written, says "reused" in place of its tombstone.  Call records are kept for
    their TTL (``ENDED_RECORD_TTL`` at most once the call ended without a transfer), at most
    ``max_records`` of them (the least recently written go first), each as compact JSON: a
    third of a dict's memory.
    """

    def __init__(
        self,
        clock: IReactorTime,
        tombstone_ttl: float = 600.0,
        max_records: int = 10000,
    ) -> None:
        self._clock = clock
        self._max_records = max_records
        self._live: dict[str, tuple[CallContext, IDelayedCall]] = {}
        self._tombstones: ExpiringMap[type[ContextError]] = ExpiringMap(clock, tombstone_ttl)
        self._records: ExpiringMap[str] = ExpiringMap(clock, CALL_RECORD_TTL)
        self._listeners: dict[str, Callable[[str], None]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def mint(self, context: CallContext, ttl: float) -> defer.Deferred[str]:
        cid = context.context_id
        if cid in self._live or cid in self._tombstones or cid in self._records:
            return defer.fail(ValueError(f"context id {cid} already used"))
        timer = self._clock.callLater(ttl, self._expire, cid)
        self._live[cid] = (context, timer)
        return defer.succeed(cid)

    def claim(self, context_id: str) -> defer.Deferred[CallContext]:
        entry = self._live.pop(context_id, None)
        if entry is None:
            why = self._tombstones.get(context_id)
            if why is None:
                why = ContextReused if context_id in self._records else ContextUnknown
            return defer.fail(why(context_id))
        context, timer = entry
        timer.cancel()
        self._bury(context_id, ContextReused)
        return defer.succeed(context)

    def get(self, context_id: str) -> defer.Deferred[CallContext | None]:
        entry = self._live.get(context_id)
        return defer.succeed(entry[0] if entry else None)

    def discard(self, context_id: str) -> defer.Deferred[None]:
        entry = self._live.pop(context_id, None)
        if entry is not None:
            entry[1].cancel()
            self._bury(context_id, ContextExpired)
        return defer.succeed(None)

    def update_call(
        self, context_id: str, fields: Mapping[str, str], ttl: float
    ) -> defer.Deferred[None]:
        record = self._record(context_id)
        record.update(fields)
        if "ended" in record and "transfer" not in record:
            ttl = min(ttl, ENDED_RECORD_TTL)
        self._records.set(context_id, _compact(record), ttl)
        if self._tombstones.get(context_id) is ContextReused:
            self._tombstones.pop(context_id)  # the record says it from now on
        while len(self._records) > self._max_records:
            self._records.pop_oldest()
        return defer.succeed(None)

    def load_call(self, context_id: str) -> defer.Deferred[dict[str, str]]:
        return defer.succeed(self._record(context_id))

    def claim_call_field(self, context_id: str, field: str, value: str) -> defer.Deferred[bool]:
        record = self._record(context_id)
        if not record or field in record:
            return defer.succeed(False)
        record[field] = value
        self._records.replace(context_id, _compact(record))
        return defer.succeed(True)

    def publish(self, channel: str, message: str) -> defer.Deferred[int]:
        handler = self._listeners.get(channel)
        if handler is None:
            return defer.succeed(0)
        handler(message)
        return defer.succeed(1)

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        self._listeners[channel] = handler

    def close(self) -> None:
        """Cancel every timer (service stop, tests)."""
        for _, timer in self._live.values():
            timer.cancel()
        self._live.clear()
        self._tombstones.clear()
        self._records.clear()

    def _record(self, context_id: str) -> dict[str, str]:
        text = self._records.get(context_id)
        return json.loads(text) if text else {}

    def _expire(self, context_id: str) -> None:
        del self._live[context_id]
        self._bury(context_id, ContextExpired)

    def _bury(self, context_id: str, why: type[ContextError]) -> None:
        self._tombstones.set(context_id, why)


def _compact(record: dict[str, str]) -> str:
    return json.dumps(record, separators=(",", ":"))
