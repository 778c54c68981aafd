"""Signed webhooks (Standard Webhooks), delivered with treq, off the media path.

Each event becomes one delivery per endpoint that wants it.  A delivery is a JSON body
``{"type": ..., "timestamp": ..., "data": {...}}`` POSTed with the headers ``webhook-id`` (the
same on every retry, so receivers can drop duplicates), ``webhook-timestamp`` and
``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body``, signed by the
``standardwebhooks`` package, re-signed on each attempt so the timestamp stays fresh).

Nothing here can slow a call: ``send`` only appends to a bounded queue; at most
``max_in_flight`` requests run at once; every attempt has a timeout on the injected clock.  A 2xx
answer delivers; 5xx, 408, 429, a timeout or a connection error is retried after
``RETRY_DELAYS`` (5 tries over two minutes); any other answer (a redirect too: it is not
followed) is final.  When more than
``max_pending`` deliveries wait (queued, in flight or between tries), new ones are dropped,
counted, and logged at most once per ``DROP_LOG_INTERVAL`` seconds.  ``flush`` (at the end of a
drain) tries the waiting retries at once and waits for what is pending, up to a deadline.
"""

from __future__ import annotations

import collections
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import treq
from standardwebhooks.webhooks import Webhook
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

#: seconds to wait before the 2nd, 3rd, 4th and 5th try (5 tries over 2 minutes)
RETRY_DELAYS = (5.0, 15.0, 30.0, 70.0)
#: statuses worth another try: the receiver is overloaded or failing, not refusing
RETRY_STATUSES = frozenset({408, 429})
DROP_LOG_INTERVAL = 5.0

CALL_STARTED = "call.started"
CALL_ENDED = "call.ended"
CALL_TRANSFERRED = "call.transferred"  # emitted by call control, once it exists
OUTBOUND_STATUS = "outbound.status"
RECORDING_COMPLETED = "recording.completed"
EVENT_TYPES = frozenset(
    {CALL_STARTED, CALL_ENDED, CALL_TRANSFERRED, OUTBOUND_STATUS, RECORDING_COMPLETED}
)


@dataclass(frozen=True)
class Endpoint:
    """One receiver.  ``secret`` is ``whsec_<base64>`` (never logged); ``name`` is for logs
    and metrics; ``events`` are the event types it gets; ``timeout`` is seconds per try."""

    name: str
    url: str
    secret: str = field(repr=False)
    events: frozenset[str] = EVENT_TYPES
    timeout: float = 10.0

    def signer(self) -> Webhook:
        return Webhook(self.secret)


class DeliveryObserver(Protocol):
    """Where outcomes go (``rapida_tap.metrics.EventMetrics``); endpoint names as labels."""

    def delivered(self, endpoint: str, seconds: float) -> None: ...
    def failed(self, endpoint: str) -> None: ...
    def dropped(self, endpoint: str) -> None: ...


class HttpClient(Protocol):
    """What is used of ``treq.client.HTTPClient`` (or ``treq.testing.StubTreq``)."""

    def post(self, url: str, /, *, data: bytes, headers: Any, allow_redirects: bool) -> Any: ...


@dataclass(eq=False)
class _Delivery:
    endpoint: Endpoint
    signer: Webhook
    message_id: str
    event_type: str
    body: bytes
    created_at: float
    tries: int = 0
    timer: IDelayedCall | None = None


class WebhookSender:
    """Queues, signs, posts and retries webhook deliveries (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        http: HttpClient,
        clock: IReactorTime,
        *,
        max_pending: int = 1000,
        max_in_flight: int = 16,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        observer: DeliveryObserver | None = None,
    ) -> None:
        self._http = http
        self._clock = clock
        self.max_pending = max_pending
        self.max_in_flight = max_in_flight
        self.retry_delays = retry_delays
        self._observer = observer
        self._signers: dict[Endpoint, Webhook] = {}
        self._ready: collections.deque[_Delivery] = collections.deque()
        self._waiting: set[_Delivery] = set()
        self._in_flight = 0
        self._flushing = False
        self._idle_waiters: list[defer.Deferred[None]] = []
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._dropped_unlogged = 0
        self._drop_logged_at: float | None = None

    @property
    def pending(self) -> int:
        """Deliveries queued, in flight, or waiting for their next try."""
        return len(self._ready) + self._in_flight + len(self._waiting)

    def send(self, endpoints: Iterable[Endpoint], event_type: str, data: dict[str, Any]) -> None:
        """Deliver one event to each of ``endpoints`` that wants ``event_type``."""
        wanted = [e for e in endpoints if event_type in e.events]
        if not wanted:
            return
        now = self._clock.seconds()
        body = json.dumps(
            {
                "type": event_type,
                "timestamp": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                "data": data,
            },
            separators=(",", ":"),
            default=str,
        ).encode("utf-8")
        for endpoint in wanted:
            if self.pending >= self.max_pending:
                self._drop(endpoint)
                continue
            signer = self._signers.get(endpoint)
            if signer is None:
                signer = self._signers[endpoint] = endpoint.signer()
            message_id = f"msg_{uuid.uuid4().hex}"
            self._ready.append(_Delivery(endpoint, signer, message_id, event_type, body, now))
        self._pump()

    def flush(self, timeout: float) -> defer.Deferred[None]:
        """Try every waiting retry now; fire once nothing is pending or after ``timeout`` s.

        Deliveries not yet tried or waiting for a retry at the deadline are counted as failed,
        in one log line; those in flight end on their own (each try has its timeout).
        """
        self._flushing = True
        for delivery in list(self._waiting):
            self._retry_now(delivery)
        self._pump()
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.pending == 0:
            waiter.callback(None)
            return waiter
        self._idle_waiters.append(waiter)
        timer = self._clock.callLater(timeout, self._flush_timed_out, waiter, timeout)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addCallback(done)

    def stop(self) -> None:
        """Forget everything pending (after a flush): cancel the retry timers."""
        for delivery in self._waiting:
            if delivery.timer is not None and delivery.timer.active():
                delivery.timer.cancel()
        self._waiting.clear()
        self._ready.clear()

    # -- delivery ------------------------------------------------------------------------

    def _pump(self) -> None:
        while self._ready and self._in_flight < self.max_in_flight:
            self._attempt(self._ready.popleft())

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.tries += 1
        self._in_flight += 1
        timestamp = int(self._clock.seconds())
        signature = delivery.signer.sign(
            delivery.message_id, datetime.fromtimestamp(timestamp, UTC), delivery.body
        )
        headers = {
            b"content-type": [b"application/json"],
            b"user-agent": [b"rapida-asterisk"],
            b"webhook-id": [delivery.message_id.encode("ascii")],
            b"webhook-timestamp": [str(timestamp).encode("ascii")],
            b"webhook-signature": [signature.encode("ascii")],
        }
        d: defer.Deferred[int] = defer.maybeDeferred(
            self._http.post,
            delivery.endpoint.url,
            data=delivery.body,
            headers=headers,
            allow_redirects=False,  # a signed body goes where it was configured to, only
        )
        d.addCallback(_drain_body)
        d.addTimeout(delivery.endpoint.timeout, self._clock)
        d.addBoth(self._answered, delivery)

    def _answered(self, result: int | Failure, delivery: _Delivery) -> None:
        self._in_flight -= 1
        try:
            if isinstance(result, int) and 200 <= result < 300:
                self.delivered += 1
                if self._observer is not None:
                    seconds = max(0.0, self._clock.seconds() - delivery.created_at)
                    self._observer.delivered(delivery.endpoint.name, seconds)
            elif isinstance(result, int) and result < 500 and result not in RETRY_STATUSES:
                self._give_up(delivery, f"HTTP {result}")
            elif delivery.tries > len(self.retry_delays):
                self._give_up(delivery, _describe(result))
            else:
                self._retry_later(delivery)
        finally:
            self._pump()
            self._check_idle()

    def _retry_later(self, delivery: _Delivery) -> None:
        self._waiting.add(delivery)
        delay = self.retry_delays[delivery.tries - 1]
        delivery.timer = self._clock.callLater(delay, self._retry_now, delivery)

    def _retry_now(self, delivery: _Delivery) -> None:
        if delivery.timer is not None and delivery.timer.active():
            delivery.timer.cancel()
        delivery.timer = None
        self._waiting.discard(delivery)
        self._ready.append(delivery)
        self._pump()

    def _give_up(self, delivery: _Delivery, why: str) -> None:
        self.failed += 1
        if self._observer is not None:
            self._observer.failed(delivery.endpoint.name)
        self.log.warn(
            "webhook {event} {message_id} to {endpoint} failed after {tries} tries: {why}",
            event=delivery.event_type,
            message_id=delivery.message_id,
            endpoint=delivery.endpoint.name,
            tries=delivery.tries,
            why=why,
        )

    def _drop(self, endpoint: Endpoint) -> None:
        self.dropped += 1
        self._dropped_unlogged += 1
        if self._observer is not None:
            self._observer.dropped(endpoint.name)
        now = self._clock.seconds()
        if self._drop_logged_at is None or now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            self.log.warn(
                "webhooks: {pending} deliveries pending (the limit): dropped {count} new "
                "one(s) since the last report; is a receiver down?",
                pending=self.pending,
                count=self._dropped_unlogged,
            )
            self._drop_logged_at = now
            self._dropped_unlogged = 0

    def _check_idle(self) -> None:
        if self.pending == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _flush_timed_out(self, waiter: defer.Deferred[None], timeout: float) -> None:
        if waiter.called:
            return
        lost = [*self._ready, *self._waiting]
        self.failed += len(lost)
        for delivery in lost:
            if self._observer is not None:
                self._observer.failed(delivery.endpoint.name)
        self.log.warn(
            "webhooks: {count} deliveries still pending after {timeout:g}s of flushing: "
            "given up ({in_flight} in flight end on their own)",
            count=len(lost),
            timeout=timeout,
            in_flight=self._in_flight,
        )
        self.stop()
        self._idle_waiters.remove(waiter)
        waiter.callback(None)


def _drain_body(response: Any) -> defer.Deferred[int]:
    """Read and discard the answer's body (so the connection can be reused); fire its code."""
    code = int(response.code)
    return treq.collect(response, lambda _chunk: None).addCallback(lambda _: code)


def _describe(result: int | Failure) -> str:
    if isinstance(result, int):
        return f"HTTP {result}"
    if result.check(defer.TimeoutError, defer.CancelledError):
        return "timed out"
    return result.getErrorMessage() or repr(result.value)
