"""The context store's pub/sub side: one subscriber connection that re-subscribes after each
reconnect and hands every message of a channel to its listener."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger

from rapida_tap.redis_url import RedisAddress


class Subscriber(txredisapi.SubscriberProtocol):
    """Subscribes to the factory's channels once connected (again after each reconnect)."""

    factory: SubscriberFactory
    log = Logger()

    def connectionMade(self) -> Any:
        d: defer.Deferred[Any] = defer.maybeDeferred(super().connectionMade)

        def ready(_: Any) -> Any:
            if self.connected and self.factory.listeners:
                return self.subscribe(list(self.factory.listeners))
            return None

        d.addCallback(ready)
        d.addErrback(
            lambda f: self.log.warn("context store: subscribe failed: {e}", e=f.getErrorMessage())
        )
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        handler = self.factory.listeners.get(text_of(channel))
        if handler is None:
            return
        try:
            handler(text_of(message))
        except Exception:
            self.log.failure("context store: a message handler failed")


class SubscriberFactory(txredisapi.RedisFactory):  # type: ignore[misc]
    protocol = Subscriber

    def __init__(self, address: RedisAddress, listeners: dict[str, Callable[[str], None]]):
        super().__init__(
            uuid.uuid4().hex,
            None,
            1,
            isLazy=True,
            charset=None,
            password=address.password,
            username=address.username,
            replyTimeout=None,
            convertNumbers=False,
        )
        self.listeners = listeners


def text_of(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
