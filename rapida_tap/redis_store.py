"""``RedisContextStore``: call contexts shared by several nodes through one Redis.

Registration on node A mints, AudioSocket on node B claims.  Semantics and exceptions are those
of ``MemoryContextStore``; the differences are that time is Redis' (TTLs are ``PX`` expiries) and
that every call can fail with ``ContextStoreUnavailable``, always within ``command_timeout``.

Keys, per context id ``ID`` (the ``{ID}`` hash tag keeps both in one Redis Cluster slot):

- ``<prefix>{ID}``: the context JSON, expiring after the context's TTL;
- ``<prefix>{ID}:call``: the call's record (a hash: status, the node holding the media, a
  transfer's target and outcome), kept after the call so that any node can answer for it;
- ``<prefix>{ID}:state``: a tombstone, ``live`` while minted, then ``claimed`` or ``discarded``,
  expiring ``tombstone_ttl`` after the context's end.  It is what lets a refusal say *why*:
  ``claimed`` -> ``ContextReused``; ``live`` with the context gone (expired) or ``discarded`` ->
  ``ContextExpired``; no tombstone -> ``ContextUnknown``.  It also stops an id being minted twice.

Nodes also talk to each other through Redis pub/sub (``publish``/``listen``), on a connection of
their own: a subscribed Redis connection can run no other command.

Mint, claim and discard are Lua scripts, so each is atomic: two nodes racing to claim one id
get one context and one ``ContextReused``.  A claim that times out after Redis ran it has
consumed the context; the caller refuses the call, and Asterisk's retry gets a fresh one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rapida_tap.contexts import (
    CallContext,
    ContextError,
    ContextExpired,
    ContextReused,
    ContextStoreUnavailable,
    ContextUnknown,
)
from rapida_tap.interfaces import IContextStore
from rapida_tap.reasons import Refusal
from rapida_tap.redis_pubsub import SubscriberFactory, text_of
from rapida_tap.redis_url import parse_redis_url

_MINT = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], 'live', 'PX', ARGV[3])
return 1
"""

_CLAIM = """
local context = redis.call('GET', KEYS[1])
if context then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], 'claimed', 'PX', ARGV[1])
  return {'context', context}
end
return {'state', redis.call('GET', KEYS[2]) or 'none'}
"""

_DISCARD = """
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], 'discarded', 'PX', ARGV[1])
end
return 0
"""

_UPDATE_CALL = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""

_CLAIM_CALL_FIELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""

_REFUSAL: dict[bytes, type[ContextError]] = {
    b"claimed": ContextReused,
    b"live": ContextExpired,
    b"discarded": ContextExpired,
}


class ContextCorrupt(ContextError):
    """What Redis holds under a context id is not a context this daemon wrote.

    Refused like any bad context; a claim has still consumed (deleted) it.
    """

    reason = Refusal.CONTEXT_CORRUPT


@implementer(IContextStore)
class RedisContextStore:
    """An ``IContextStore`` in Redis, via ``txredisapi`` (one lazy, self-reconnecting connection).

    ``connect_timeout`` and ``command_timeout`` are seconds; a command fails with
    ``ContextStoreUnavailable`` if it has no reply within ``command_timeout`` of being called,
    including the time spent waiting for a (re)connection.  A PING every ``health_interval``
    seconds keeps ``healthy`` true to the facts when there is no traffic.
    """

    log = Logger()

    #: reconnect backoff (seconds), short: a context lives for seconds, not minutes
    reconnect_initial_delay = 0.1
    reconnect_max_delay = 2.0

    def __init__(
        self,
        reactor: Any,
        url: str,
        key_prefix: str = "rapida:ctx:",
        connect_timeout: float = 2.0,
        command_timeout: float = 1.0,
        tombstone_ttl: float = 600.0,
        health_interval: float = 1.0,
    ) -> None:
        self._reactor = reactor
        self.address = parse_redis_url(url)
        self._prefix = key_prefix
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._tombstone_ms = _ms(tombstone_ttl)
        self._health = LoopingCall(self._ping)
        self._health.clock = reactor
        self._health_interval = health_interval
        self._factory: Any = None
        self._redis: Any = None
        self._stopped = False
        self._pending: set[defer.Deferred[Any]] = set()
        self._ok: bool | None = None  # None: no outcome yet since start()
        self._error = "not started"
        self._connect_error = ""
        self.stats: dict[str, float] = {"commands": 0, "errors": 0, "last_latency_ms": 0.0}
        self._listeners: dict[str, Callable[[str], None]] = {}
        self._subscriber: Any = None

    @property
    def healthy(self) -> bool:
        """Connected, and the last command (or health PING) succeeded."""
        return bool(self._ok) and self._factory is not None and self._factory.size > 0

    @property
    def last_error(self) -> str:
        """Why the store is not ``healthy`` (for /healthz); ``""`` when it is."""
        if self.healthy:
            return ""
        if self._factory is not None and not self._factory.size and self._connect_error:
            return f"not connected ({self._connect_error})"
        return self._error or "not connected"

    def start(self) -> None:
        """Start connecting (in the background); commands issued meanwhile wait for it."""
        if self._factory is not None:
            return
        self._stopped = False
        self._ok = None
        self._error = "connecting"
        a = self.address
        factory = txredisapi.RedisFactory(
            uuid.uuid4().hex,
            a.db,
            1,
            isLazy=True,
            charset=None,
            password=a.password,
            username=a.username,
            replyTimeout=self._command_timeout,
            convertNumbers=False,
        )
        factory.initialDelay = self.reconnect_initial_delay
        factory.maxDelay = self.reconnect_max_delay
        factory.deferred.addErrback(self._connection_refused)
        endpoint = HostnameEndpoint(self._reactor, a.host, a.port, timeout=self._connect_timeout)
        factory.startConnecting(_ObservedEndpoint(endpoint, self._connect_failed))
        self._factory = factory
        self._redis = factory.handler
        self._health.start(self._health_interval, now=False)
        if self._listeners:
            self._subscribe()
        self.log.info("context store: {address}", address=str(a))

    def stop(self) -> defer.Deferred[None]:
        """Fail the commands in flight, stop reconnecting, close; fires when closed."""
        self._stopped = True
        self._ok = False
        self._error = "stopped"
        if self._health.running:
            self._health.stop()
        for pending in list(self._pending):
            pending.cancel()
        factory, self._factory, self._redis = self._factory, None, None
        subscriber, self._subscriber = self._subscriber, None
        waits: list[defer.Deferred[Any]] = []
        if subscriber is not None:
            waits.append(subscriber.disconnect())
        if factory is not None:
            waits.append(factory.disconnect())
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def mint(self, context: CallContext, ttl: float) -> defer.Deferred[str]:
        cid = context.context_id
        if ttl <= 0:
            return defer.fail(ValueError(f"ttl must be > 0 seconds, not {ttl!r}"))
        ttl_ms = _ms(ttl)
        args = [context.to_json(), ttl_ms, ttl_ms + self._tombstone_ms]
        d = self._command("mint", lambda r: r.eval(_MINT, self._keys(cid), args), cid)

        def minted(created: Any) -> str:
            if int(created) != 1:
                raise ValueError(f"context id {cid} already used")
            return cid

        return d.addCallback(minted)

    def claim(self, context_id: str) -> defer.Deferred[CallContext]:
        keys = self._keys(context_id)
        d = self._command("claim", lambda r: r.eval(_CLAIM, keys, [self._tombstone_ms]), context_id)

        def claimed(reply: list[bytes]) -> CallContext:
            kind, value = reply
            if kind == b"context":
                return self._decode(context_id, value)
            raise _REFUSAL.get(value, ContextUnknown)(context_id)

        return d.addCallback(claimed)

    def get(self, context_id: str) -> defer.Deferred[CallContext | None]:
        d = self._command("get", lambda r: r.get(self._keys(context_id)[0]), context_id)
        return d.addCallback(lambda v: None if v is None else self._decode(context_id, v))

    def discard(self, context_id: str) -> defer.Deferred[None]:
        keys = self._keys(context_id)
        d = self._command(
            "discard", lambda r: r.eval(_DISCARD, keys, [self._tombstone_ms]), context_id
        )
        return d.addCallback(lambda _: None)

    def update_call(
        self, context_id: str, fields: Mapping[str, str], ttl: float
    ) -> defer.Deferred[None]:
        args: list[Any] = [_ms(ttl)]
        for name, value in fields.items():
            args += [name, value]
        key = self._call_key(context_id)
        d = self._command("update", lambda r: r.eval(_UPDATE_CALL, [key], args), context_id)
        return d.addCallback(lambda _: None)

    def load_call(self, context_id: str) -> defer.Deferred[dict[str, str]]:
        key = self._call_key(context_id)
        d = self._command("load", lambda r: r.hgetall(key), context_id)

        def decoded(reply: Any) -> dict[str, str]:
            return {text_of(name): text_of(value) for name, value in (reply or {}).items()}

        return d.addCallback(decoded)

    def claim_call_field(self, context_id: str, field: str, value: str) -> defer.Deferred[bool]:
        key = self._call_key(context_id)
        d = self._command(
            "update", lambda r: r.eval(_CLAIM_CALL_FIELD, [key], [field, value]), context_id
        )
        return d.addCallback(lambda n: int(n) == 1)

    def publish(self, channel: str, message: str) -> defer.Deferred[int]:
        d = self._command("publish", lambda r: r.publish(channel, message))
        return d.addCallback(int)

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        """Subscribe on the store's subscriber connection (re-subscribed after reconnects)."""
        self._listeners[channel] = handler
        if self._factory is not None and self._subscriber is None:
            self._subscribe()

    def _subscribe(self) -> None:
        a = self.address
        factory = SubscriberFactory(a, self._listeners)
        factory.initialDelay = self.reconnect_initial_delay
        factory.maxDelay = self.reconnect_max_delay
        endpoint = HostnameEndpoint(self._reactor, a.host, a.port, timeout=self._connect_timeout)
        factory.deferred.addErrback(
            lambda f: self.log.warn("context store: subscriber: {e}", e=f.getErrorMessage())
        )
        factory.startConnecting(endpoint)
        self._subscriber = factory

    def _call_key(self, context_id: str) -> str:
        return f"{self._prefix}{{{context_id}}}:call"

    def _keys(self, context_id: str) -> list[str]:
        live = f"{self._prefix}{{{context_id}}}"
        return [live, live + ":state"]

    def _decode(self, context_id: str, value: bytes) -> CallContext:
        try:
            context = CallContext.from_json(value)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.log.warn(
                "context {ctx} in Redis is corrupt: {error}", ctx=context_id, error=repr(e)
            )
            raise ContextCorrupt(context_id) from e
        if context.context_id != context_id:
            self.log.warn("context {ctx} in Redis has another id", ctx=context_id)
            raise ContextCorrupt(context_id)
        return context

    def _command(
        self, name: str, call: Callable[[Any], Any], context_id: str = ""
    ) -> defer.Deferred[Any]:
        """Run ``call(redis)`` bounded by ``command_timeout``.

        Redis failures become ``ContextStoreUnavailable``, except ``WRONGTYPE`` (someone else's
        value under our key): ``ContextCorrupt``.
        """
        redis, factory = self._redis, self._factory
        if redis is None:
            why = "stopped" if self._stopped else "not started"
            return defer.fail(ContextStoreUnavailable(f"redis {name}: store {why}"))
        started = self._reactor.seconds()
        self.stats["commands"] += 1
        d: defer.Deferred[Any] = defer.maybeDeferred(call, redis)
        d.addTimeout(self._command_timeout, self._reactor)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            if self._stopped:
                raise ContextStoreUnavailable(f"redis {name}: store stopped")
            self.stats["last_latency_ms"] = (self._reactor.seconds() - started) * 1000.0
            if not isinstance(result, Failure):
                self._set_health(True, "")
                return result
            self.stats["errors"] += 1
            if result.check(txredisapi.ResponseError) and str(result.value).startswith("WRONGTYPE"):
                raise ContextCorrupt(context_id) from result.value
            if result.check(defer.TimeoutError, txredisapi.RedisError, defer.CancelledError):
                if not factory.size:
                    error = f"not connected ({self._connect_error or 'connecting'})"
                elif result.check(defer.TimeoutError, txredisapi.TimeoutError):
                    error = f"no reply within {self._command_timeout} s"
                else:
                    error = str(result.value) or type(result.value).__name__
                self._set_health(False, f"redis {name}: {error}")
                raise ContextStoreUnavailable(self._error)
            return result

        return d.addBoth(done)

    def _ping(self) -> defer.Deferred[None]:
        """The health check: its outcome is recorded by ``_command``; never stops the loop."""
        d = self._command("ping", lambda r: r.ping())
        d.addErrback(lambda f: f.trap(ContextStoreUnavailable))
        return d.addCallback(lambda _: None)

    def _set_health(self, ok: bool, error: str) -> None:
        """Record the outcome; log transitions only (one line per outage, not per command).

        A Redis that cannot be reached at start-up is logged at once, naming the setting: the
        node starts anyway (see ``docs/operations.md``), and the log must say why it refuses.
        """
        if ok != self._ok:
            if ok:
                self.log.info("context store {address} is up", address=str(self.address))
            elif self._ok is None:
                self.log.error(
                    "contexts: Redis at {address} is unreachable at start-up ({error}); "
                    "registrations answer 503 and /healthz is not ready until it answers "
                    "(reconnecting)",
                    address=str(self.address),
                    error=error,
                )
            else:
                self.log.error("context store is down: {error}", error=error)
        self._ok = ok
        self._error = error
        if ok:
            self._connect_error = ""

    def _connect_failed(self, failure: Failure) -> None:
        self._connect_error = failure.getErrorMessage()
        if self._ok is None:  # never reached since start(): say so now, not at the first PING
            self._set_health(False, f"redis: {self._connect_error}")

    def _connection_refused(self, failure: Failure) -> None:
        """Authentication or SELECT failed: txredisapi stops retrying for good."""
        self._connect_error = f"{failure.getErrorMessage()}; not retrying"
        self._set_health(False, f"redis: {self._connect_error}")


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """Tells the store why a connection attempt failed (txredisapi retries silently)."""

    def __init__(self, endpoint: Any, on_failure: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            if not failure.check(defer.CancelledError):
                self._on_failure(failure)
            return failure

        return d.addErrback(failed)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
