"""A throw-away ``redis-server`` for integration tests: real Redis on 127.0.0.1, no persistence.

Every method that waits returns a Deferred (trial ``setUp`` can return it); readiness is
polled with PING over TCP on the reactor, never with ``sleep``.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

REDIS_SERVER = "redis-server"


class RedisServerError(Exception):
    """redis-server is missing, exited early, or never answered PING."""


class _Exited(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-4096:]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class _Ping(protocol.Protocol):
    """Send one inline PING; ``answered`` fires True on ``+PONG`` (or ``-NOAUTH``: it is up)."""

    def __init__(self) -> None:
        self.answered: defer.Deferred[bool] = defer.Deferred()
        self._buf = b""

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if b"\r\n" in self._buf and not self.answered.called:
            self.answered.callback(self._buf.startswith((b"+PONG", b"-NOAUTH")))
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.answered.called:
            self.answered.callback(False)


class _Commands(protocol.Protocol):
    """Send RESP commands; ``reply`` fires with the first line of the last one's reply.

    All but the last command must have one-line replies (``AUTH``: ``+OK``).
    """

    def __init__(self, commands: list[tuple[bytes, ...]]) -> None:
        self.reply: defer.Deferred[bytes] = defer.Deferred()
        self._commands = commands
        self._buf = b""

    def connectionMade(self) -> None:
        out = []
        for args in self._commands:
            out.append(b"*%d\r\n" % len(args))
            out += [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]
        self.transport.write(b"".join(out))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        lines = self._buf.split(b"\r\n")
        if len(lines) > len(self._commands) and not self.reply.called:
            self.reply.callback(lines[len(self._commands) - 1])
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.reply.called:
            self.reply.errback(RedisServerError("connection lost before the reply"))


def free_port(reactor: Any) -> int:
    """A port the OS just handed out on 127.0.0.1 (``listenTCP(0)``), closed again for Redis."""
    port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    number: int = port.getHost().port
    port.stopListening()
    return number


class RedisServer:
    """One ``redis-server`` process in its own temp dir; ``start()`` again reuses the port.

    ``password`` turns on ``requirepass``.  ``kill()`` is a crash (SIGKILL), ``stop()`` a clean
    shutdown, ``pause()``/``resume()`` freeze the process (SIGSTOP/SIGCONT): connections stay
    open but nothing answers, i.e. a *slow* Redis.
    """

    def __init__(self, reactor: Any, port: int | None = None, password: str | None = None) -> None:
        if shutil.which(REDIS_SERVER) is None:
            raise RedisServerError(f"{REDIS_SERVER} not on PATH (apt-get install redis-server)")
        self._reactor = reactor
        self._pick_port = port is None  # until the first start succeeds
        self.port = port if port is not None else free_port(reactor)
        self.password = password
        self._dir: str | None = None
        self._process: Any = None
        self._exited: _Exited | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @defer.inlineCallbacks
    def start(self, timeout: float = 10.0) -> Any:
        """Spawn the server; fire once it answers PING, fail after ``timeout`` seconds.

        A port of our own choosing that another process took in the meantime is replaced
        (first start only: a restart keeps its port, clients expect it there).
        """
        if self._process is not None:
            raise RedisServerError("already running")
        deadline = self._reactor.seconds() + timeout
        for attempt in range(5):
            self._spawn()
            try:
                yield self._wait_ready(deadline)
            except RedisServerError:
                taken = b"Address already in use" in self._exited_output()
                if not (self._pick_port and taken) or attempt == 4:
                    raise
                self.port = free_port(self._reactor)
            else:
                self._pick_port = False
                return

    def _spawn(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="rapida-redis-")
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", self._dir, "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self._exited = _Exited()
        self._exited.ended.addCallback(self._reap)
        self._process = self._reactor.spawnProcess(
            self._exited, shutil.which(REDIS_SERVER), argv, env=None, path=self._dir
        )

    @defer.inlineCallbacks
    def _wait_ready(self, deadline: float) -> Any:
        endpoint = TCP4ClientEndpoint(self._reactor, "127.0.0.1", self.port, timeout=1)
        while True:
            if self._process is None:
                raise RedisServerError(f"redis-server exited: {self._exited_output().decode()}")
            answered = False
            try:
                ping = yield endpoint.connect(protocol.Factory.forProtocol(_Ping))
            except (error.ConnectError, error.TimeoutError):
                pass
            else:
                try:
                    answered = yield ping.answered.addTimeout(1, self._reactor)
                except defer.TimeoutError:  # something that is not Redis holds the port
                    ping.transport.abortConnection()
            if answered and self._process is not None:  # ours, not a squatter on the port
                return
            if self._reactor.seconds() > deadline:
                yield self.kill()
                raise RedisServerError(f"no PING answer on port {self.port}")
            yield deferLater(self._reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def command(self, *args: str | bytes) -> Any:
        """Run one command on a fresh connection (AUTH first if needed); fire with the reply's
        first line, e.g. ``b"+OK"`` or ``b":1"``.  For tests to plant and inspect keys."""
        commands = [tuple(a.encode() if isinstance(a, str) else a for a in args)]
        if self.password:
            commands.insert(0, (b"AUTH", self.password.encode()))
        endpoint = TCP4ClientEndpoint(self._reactor, "127.0.0.1", self.port, timeout=2)
        proto = yield endpoint.connect(protocol.Factory.forProtocol(lambda: _Commands(commands)))
        return (yield proto.reply)

    def _exited_output(self) -> bytes:
        return self._exited.output if self._exited else b""

    def _reap(self, _: None) -> None:
        self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _signal(self, signum: int) -> defer.Deferred[None]:
        if self._process is None or self._exited is None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._exited.ended.addCallback(lambda _: waiter.callback(None))
        if signum != signal.SIGKILL:
            self._process.signalProcess(signal.SIGCONT)  # a paused server must wake to exit
        self._process.signalProcess(signum)
        return waiter

    def stop(self) -> defer.Deferred[None]:
        """Clean shutdown (SIGTERM); fires when the process has exited."""
        return self._signal(signal.SIGTERM)

    def kill(self) -> defer.Deferred[None]:
        """Crash (SIGKILL); fires when the process has exited."""
        return self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the process: TCP stays up, replies stop (a slow or wedged Redis)."""
        if self._process is not None:
            self._process.signalProcess(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.signalProcess(signal.SIGCONT)
