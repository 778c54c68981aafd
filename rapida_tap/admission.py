"""Who may connect: connection caps and an accept rate, enforced when the socket is accepted.

Every listener (AudioSocket, HTTP, HTTPS) is wrapped in an `AdmissionFactory`.  When a
connection is accepted it is refused at once, before any protocol, TLS or buffer exists for it,
and counted, if

* the listener already holds ``max_connections`` connections (``too-many-connections``);
* the node as a whole would run out of file descriptors (``out-of-descriptors``: every
  listener shares one `DescriptorBudget`, the soft ``RLIMIT_NOFILE`` less a reserve for
  logs, Redis, bots and ARI), so ``accept()`` never fails with EMFILE and a flood on one
  listener cannot starve the others;
* its address already holds ``max_pending_per_address`` connections that have not yet said
  who they are (``too-many-pending``): an AudioSocket connection before its UUID frame, an
  HTTP connection before the head of its first request.  Live calls do not count here: one
  Asterisk carries hundreds of calls from one address, and those are bounded by the total.
  The cap is never more than a quarter of the descriptor budget, so one address cannot
  hold the node's last descriptors however the cap is set;
* its address opened connections faster than ``accept_rate`` a second, in bursts of up to
  ``accept_burst`` (``accept-rate``), so a flood of new connections from one address costs
  the calls of others one ``accept()`` and one ``close()`` each.

Refusals are logged at most one line per reason every few seconds, with the count held back.

The wrapper stays out of the data path: the wrapped protocol gets the real transport (so
AudioSocket's direct send and ``setTcpNoDelay`` see a TCP socket) and writes go straight to
it; only reads (one extra call each) and the end of the connection pass through the wrapper.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure

from rapida_tap.ratelimit import LogThrottle, RateLimiter

#: refusal reasons (log lines and the ``reason`` label of ``rapida_listener_refused``)
TOO_MANY_CONNECTIONS = "too-many-connections"
OUT_OF_DESCRIPTORS = "out-of-descriptors"
TOO_MANY_PENDING = "too-many-pending"
ACCEPT_RATE = "accept-rate"

#: AudioSocket: a connection has identified itself once its UUID frame (3 + 16 bytes) is in
AUDIOSOCKET_ID_BYTES = 19


class DescriptorBudget:
    """Connections the whole node may hold: the soft ``RLIMIT_NOFILE`` less ``reserve``."""

    def __init__(self, limit: int | None = None, reserve: int = 64) -> None:
        if limit is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        self.limit = max(1, limit - reserve)
        self.open = 0


class AdmittedProtocol(ProtocolWrapper):
    """Sits between the transport and the wrapped protocol for reads and the end only.

    A `ProtocolWrapper` so that autobahn's WebSocket upgrade, which swaps the protocol of a
    taken-over transport, replaces ``wrappedProtocol`` here rather than unhooking us.
    """

    def __init__(
        self, factory: AdmissionFactory, wrapped: IProtocol, host: str, pending_bytes: int
    ) -> None:
        # ProtocolWrapper.__init__ is not called: it only sets these two.
        self.factory = factory  # type: ignore[assignment]
        self.wrappedProtocol = wrapped
        self.host = host
        self.pending = True
        self._pending_bytes = pending_bytes  # 0: identified by `identified()` only

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.wrappedProtocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.pending and self._pending_bytes:
            self._pending_bytes -= len(data)
            if self._pending_bytes <= 0:
                self.identified()
        self.wrappedProtocol.dataReceived(data)

    def identified(self) -> None:
        """The peer said who it is: it no longer counts against its address's pending cap."""
        if self.pending:
            self.pending = False
            self.factory.release_pending(self.host)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.factory.release(self)
        self.wrappedProtocol.connectionLost(reason)


def mark_identified(transport: Any) -> None:
    """Tell the admission wrapper under ``transport`` that its peer identified itself.

    For protocols the wrapper cannot judge by bytes (HTTP: the head of the first request is
    in).  ``transport`` is a TCP transport whose ``protocol`` is the wrapper, or a TLS
    protocol whose own ``transport`` is; anything else (tests, memory transports) is ignored.
    """
    for _ in range(3):
        protocol = getattr(transport, "protocol", None)
        if isinstance(protocol, AdmittedProtocol):
            protocol.identified()
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return


class AdmissionFactory(Factory):
    """Wraps one listener's factory with the caps and the accept rate described above.

    ``pending_bytes``: a connection is identified after that many bytes in (AudioSocket:
    `AUDIOSOCKET_ID_BYTES`); 0 means the protocol says so through `mark_identified`.
    A refused connection gets ``None`` from `buildProtocol`, which makes the TCP port close the
    socket at once; so this factory must be the outermost one (for TLS: around the TLS
    factory, see ``rapida_tap.tls.TlsListener``).
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        wrapped: Factory,
        *,
        name: str,
        clock: IReactorTime,
        budget: DescriptorBudget,
        max_connections: int,
        max_pending_per_address: int,
        accept_rate: float,
        accept_burst: int,
        pending_bytes: int = 0,
        log_interval: float = 5.0,
    ) -> None:
        self.wrapped = wrapped
        self.name = name
        self.clock = clock
        self.budget = budget
        self.max_connections = max_connections
        self.max_pending_per_address = max(1, min(max_pending_per_address, budget.limit // 4))
        self.accept = RateLimiter(accept_rate, accept_burst)
        self.pending_bytes = pending_bytes
        self.connections = 0
        self.pending: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self._throttle = LogThrottle(log_interval)
        self.on_refused: list[Callable[[str, str], None]] = []  # (reason, host), for tests

    def doStart(self) -> None:
        super().doStart()
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
        super().doStop()

    def logPrefix(self) -> str:
        prefix: str = getattr(self.wrapped, "logPrefix", lambda: self.name)()
        return prefix

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        host = str(getattr(addr, "host", "?"))
        why = self._refusal(host)
        if why:
            self._refuse(why, host)
            return None
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        self.connections += 1
        self.budget.open += 1
        self.pending[host] = self.pending.get(host, 0) + 1
        return AdmittedProtocol(self, inner, host, self.pending_bytes)

    def _refusal(self, host: str) -> str:
        if self.connections >= self.max_connections:
            return TOO_MANY_CONNECTIONS
        if self.budget.open >= self.budget.limit:
            return OUT_OF_DESCRIPTORS
        if self.pending.get(host, 0) >= self.max_pending_per_address:
            return TOO_MANY_PENDING
        if not self.accept.allow(host, self.clock.seconds()):
            return ACCEPT_RATE
        return ""

    def _refuse(self, why: str, host: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        for hook in self.on_refused:
            hook(why, host)
        held = self._throttle.allow(why, self.clock.seconds())
        if held is None:
            return
        self.log.warn(
            "{listener}: connection from {host} refused: {why} ({detail}){more}",
            listener=self.name,
            host=host,
            why=why,
            detail=self._detail(why),
            more=f"; {held} more refusal(s) for this reason not logged" if held else "",
        )

    def _detail(self, why: str) -> str:
        return {
            TOO_MANY_CONNECTIONS: f"{self.max_connections} open on this listener",
            OUT_OF_DESCRIPTORS: f"{self.budget.open} connections open, the file descriptor "
            f"limit allows {self.budget.limit}",
            TOO_MANY_PENDING: f"{self.max_pending_per_address} connections from this address "
            "have not identified themselves yet",
            ACCEPT_RATE: f"over {self.accept.rate:g} new connections a second from this address",
        }[why]

    def release_pending(self, host: str) -> None:
        left = self.pending.get(host, 0) - 1
        if left > 0:
            self.pending[host] = left
        else:
            self.pending.pop(host, None)

    def release(self, protocol: AdmittedProtocol) -> None:
        self.connections -= 1
        self.budget.open -= 1
        if protocol.pending:
            protocol.pending = False
            self.release_pending(protocol.host)
