"""Requests between nodes over the context store's pub/sub: "you hold this call, end it".

Each node listens on its own channel, ``rapida:node:<node id>``.  A request carries an id and
the asking node's id; the answering node publishes the reply on the asker's channel.  A request
that nobody receives (the node is gone: its calls went with it) fails with ``NodeGone`` at once;
one without a reply within ``timeout`` seconds fails with ``NodeTimeout``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime

    from rapida_tap.interfaces import IContextStore

Handler = Callable[[dict[str, Any]], "defer.Deferred[dict[str, Any]] | dict[str, Any]"]
MAX_MESSAGE = 65536  # bytes; every message this daemon sends is far smaller


class RelayError(Exception):
    pass


class NodeGone(RelayError):
    """No node listens on the target's channel any more."""


class NodeTimeout(RelayError):
    """The target node did not answer in time."""


def channel_of(node_id: str) -> str:
    return f"rapida:node:{node_id}"


class Relay:
    """Sends requests to other nodes and answers theirs with ``handlers[op]``."""

    log = Logger()

    def __init__(
        self, store: IContextStore, node_id: str, clock: IReactorTime, timeout: float = 2.0
    ) -> None:
        self._store = store
        self.node_id = node_id
        self._clock = clock
        self.timeout = timeout
        self.handlers: dict[str, Handler] = {}
        self._waiting: dict[str, defer.Deferred[dict[str, Any]]] = {}

    def start(self) -> None:
        self._store.listen(channel_of(self.node_id), self._received)

    def request(self, node_id: str, op: str, **args: Any) -> defer.Deferred[dict[str, Any]]:
        """Ask ``node_id`` to run ``op``; fires with its reply (a JSON object)."""
        rid = uuid.uuid4().hex
        reply: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiting[rid] = reply
        message = {"id": rid, "from": self.node_id, "op": op, "args": args}
        sent = self._store.publish(channel_of(node_id), json.dumps(message))

        def delivered(receivers: int) -> None:
            if receivers == 0 and rid in self._waiting:
                self._waiting.pop(rid).errback(NodeGone(node_id))

        def not_sent(failure: Any) -> None:
            if rid in self._waiting:
                self._waiting.pop(rid).errback(failure)

        sent.addCallbacks(delivered, not_sent)

        def timed_out(failure: Any) -> Any:
            self._waiting.pop(rid, None)
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise NodeTimeout(node_id)
            return failure

        reply.addTimeout(self.timeout, self._clock)
        return reply.addErrback(timed_out)

    def _received(self, text: str) -> None:
        try:
            if len(text) > MAX_MESSAGE:
                raise ValueError("too long")
            message = json.loads(text)
            rid = str(message["id"])
        except (ValueError, KeyError, TypeError) as e:
            self.log.warn(
                "relay: a bad message on {node}'s channel, dropped: {e}",
                node=self.node_id,
                e=repr(e),
            )
            return
        if "reply" in message:
            waiting = self._waiting.pop(rid, None)
            if waiting is not None and isinstance(message["reply"], dict):
                waiting.callback(message["reply"])
            return
        handler = self.handlers.get(str(message.get("op")))
        asker = str(message.get("from", ""))
        if handler is None or not asker:
            self.log.warn(
                "relay: unknown request {op!r} from {node}, dropped",
                op=message.get("op"),
                node=asker,
            )
            return
        d = defer.maybeDeferred(handler, dict(message.get("args") or {}))

        def failed(failure: Any) -> dict[str, Any]:
            self.log.failure("relay: request {op} failed", failure, op=message.get("op"))
            return {"error": "internal"}

        d.addErrback(failed)
        d.addCallback(
            lambda reply: self._store.publish(
                channel_of(asker), json.dumps({"id": rid, "reply": reply})
            )
        )
        d.addErrback(lambda f: self.log.warn("relay: reply not sent: {e}", e=f.getErrorMessage()))
