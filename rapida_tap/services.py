"""The twistd services of one node, and the order in which they start and stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer

from rapida_tap.collector import PauseTimer, freeze_startup_objects
from rapida_tap.drain import DrainState, install_force_signal
from rapida_tap.listeners import one_line_exit
from rapida_tap.reasons import EndReason

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.drain import Drain
    from rapida_tap.interfaces import IContextStore
    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.outbound import OutboundCalls


class BridgeService(service.Service):
    """Stops taking calls and ends the live ones (none are left after a drain)."""

    def __init__(self, bridge: MediaBridge) -> None:
        self.bridge = bridge

    def stopService(self) -> None:
        super().stopService()
        self.bridge.accepting = False
        self.bridge.end_all(EndReason.SHUTDOWN)
        self.bridge.pacer.stop()


class CollectorService(service.Service):
    """Times every garbage collection, and freezes the start-up objects once the reactor runs
    (`rapida_tap.collector`)."""

    def __init__(self, reactor: Any, observe: Callable[[int, float], None]) -> None:
        self.reactor = reactor
        self.timer = PauseTimer(observe)

    def startService(self) -> None:
        super().startService()
        self.timer.install()
        self.reactor.callWhenRunning(freeze_startup_objects)

    def stopService(self) -> None:
        super().stopService()
        self.timer.uninstall()


class EventsService(service.Service):
    """Finalises recordings and flushes pending webhooks when the node stops.

    Added to ``NodeService`` before ``BridgeService``, so it is stopped after it (a
    ``MultiService`` stops its children in reverse order): by then every call has ended and its
    ``call.ended`` is queued.
    """

    def __init__(self, stop: Callable[[], defer.Deferred[None]]) -> None:
        self._stop = stop

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._stop()


class ContextStoreService(service.Service):
    """Connects the Redis store at start; closes any store (memory timers, Redis) at stop."""

    def __init__(self, store: IContextStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        start = getattr(self.store, "start", None)
        if start is not None:
            start()

    def stopService(self) -> Any:
        super().stopService()
        stop = getattr(self.store, "stop", None) or getattr(self.store, "close", None)
        return defer.maybeDeferred(stop) if stop is not None else None


class NodeService(service.MultiService):
    """The whole node.  Stopping it (twistd runs ``stopService`` on SIGTERM, as a "before
    shutdown" trigger whose Deferred the reactor waits for) drains first: no new calls, live
    calls finish within ``drain_timeout``, then the listeners, the outbound calls and the bridge
    stop, and the context store closes last.
    """

    #: A listener that fails to bind ends twistd with one line (False when daemonized).
    one_line_errors = True

    def __init__(self, drain: Drain, store: ContextStoreService, reactor: Any = None) -> None:
        super().__init__()
        self.drain = drain
        self.store = store
        self.reactor = reactor

    def privilegedStartService(self) -> None:
        with one_line_exit(self.one_line_errors):
            super().privilegedStartService()

    def startService(self) -> None:
        self.store.startService()
        with one_line_exit(self.one_line_errors):
            super().startService()

    def stopService(self) -> defer.Deferred[None]:
        d = self.drain.start("stopping")
        if self.reactor is not None and self.drain.state is DrainState.DRAINING:
            d.addBoth(_undo_after(install_force_signal(self.drain, self.reactor)))
        d.addCallback(self._drained)
        d.addCallback(lambda _: service.MultiService.stopService(self))
        d.addBoth(self._close_store)
        return d.addCallback(lambda _: None)

    def _close_store(self, result: Any) -> Any:
        """Close the store whatever happened before, then pass the outcome on."""
        return defer.maybeDeferred(self.store.stopService).addCallback(lambda _: result)

    def _drained(self, _: None) -> None:
        """SIGTERM was handled in full (drained): exit 0, not by the signal.

        twistd re-raises the signal that stopped the reactor once it returns (status 143);
        after a completed drain that signal was a request served, so the daemon exits 0 as
        documented (systemd counts both as a clean stop).
        """
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None


def _undo_after(undo: Callable[[], None]) -> Callable[[Any], Any]:
    def run(result: Any) -> Any:
        undo()
        return result

    return run


class OutboundService(service.Service):
    """Hangs up ringing outbound calls and closes the ARI clients when the daemon stops.

    Added after ``BridgeService``, so it stops first, while contexts still exist.
    """

    def __init__(self, outbound: OutboundCalls) -> None:
        self.outbound = outbound

    def stopService(self) -> Any:
        super().stopService()
        return self.outbound.stop()
