"""The seams of the daemon: each has an in-memory implementation and at least one other.

Audio crossing these interfaces is always the bridge format: PCM16 little-endian, mono, in
20 ms frames, at the call's rate (``call.rate``: 320 bytes a frame at 8 kHz, 640 at 16 kHz;
``docs/wideband.md``).  Transports convert their wire formats and rates at the edge;
assistants never see them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable, Mapping

    from twisted.internet.defer import Deferred

    from rapida_tap.contexts import CallContext
    from rapida_tap.media.call import Call
    from rapida_tap.reasons import EndReason


class IContextStore(Interface):
    """Where registered calls wait for their media connection.

    A context is minted by registration (or by an outbound originate) and claimed exactly once
    by the transport that carries its audio.  Claiming is atomic even across nodes.
    """

    def mint(context: CallContext, ttl: float) -> Deferred[str]:
        """Store ``context`` for ``ttl`` seconds; fire with its id."""

    def claim(context_id: str) -> Deferred[CallContext]:
        """Take the context, once.

        Fires with the context, or fails with ``ContextUnknown`` / ``ContextExpired`` /
        ``ContextReused`` (stores that cannot tell these apart use ``ContextUnknown``), or
        ``ContextStoreUnavailable`` when the store cannot be reached.
        """

    def get(context_id: str) -> Deferred[CallContext | None]:
        """Look at an unclaimed context without claiming it."""

    def discard(context_id: str) -> Deferred[None]:
        """Forget an unclaimed context (e.g. an outbound call that was never answered)."""

    def update_call(context_id: str, fields: Mapping[str, str], ttl: float) -> Deferred[None]:
        """Set ``fields`` of the call's record (created if missing); it lives ``ttl`` seconds.

        The record outlives the context: it is how every node can answer for a call (its
        status, the node holding its media, a transfer's target and outcome).
        """

    def load_call(context_id: str) -> Deferred[dict[str, str]]:
        """Every field of the call's record; ``{}`` for an unknown or expired call."""

    def claim_call_field(context_id: str, field: str, value: str) -> Deferred[bool]:
        """Set ``field`` only if the record exists and lacks it: True for the one who set it."""

    def publish(channel: str, message: str) -> Deferred[int]:
        """Send ``message`` to ``channel``; fires with the number of listeners that got it."""

    def listen(channel: str, handler: Callable[[str], None]) -> None:
        """Call ``handler(message)`` for each message published to ``channel`` (any node)."""


class ICallLeg(Interface):
    """A transport's side of one call (AudioSocket connection, chan_websocket session).

    A leg may have ``sample_rate``: its wire's rate in Hz when known before the call starts
    (chan_websocket's ``MEDIA_START``).  A leg that learns it later tells the call
    (``Call.caller_rate_is``), and converts between its wire's rate and ``call.rate``.
    """

    transport_name = Attribute("Short name for logs and metrics: 'audiosocket', 'websocket'.")
    lead_frames = Attribute(
        "Optional (default 0): frames to send ahead when audio starts, for peers that buffer."
    )

    def send_audio(frame: bytes) -> bool:
        """Write one 20 ms frame at the call's rate; called by the pacer, at most once per tick.

        False when the leg did not take it (its connection is closing): the call counts the
        frame as dropped, never as sent.
        """

    def send_silence() -> None:
        """The pacer had nothing queued for this tick."""

    def send_clear() -> None:
        """Barge-in: the bridge emptied its queue; drop whatever the far end still buffers."""

    def send_mark(name: str) -> None:
        """All audio queued before mark ``name`` has been written.

        The leg calls ``call.mark_played(name)`` when the caller has heard it (at once for
        transports that play on receipt, on the peer's acknowledgement otherwise).
        """

    def hangup(reason: EndReason) -> None:
        """End the transport side of the call (the call itself is already ending)."""


class IAssistant(Interface):
    """Something a call can talk to: the echo, an upstream bot...

    An assistant may have ``sample_rate``: the rate in Hz it speaks, at which its calls run.
    Without one (the echo) a call runs at its caller's rate.
    """

    name = Attribute("For logs: 'echo', the bot URL without credentials.")

    def connect(call: Call) -> Deferred[IAssistantSession]:
        """Start a session for ``call``; fail if the assistant cannot be reached."""


class IAssistantSession(Interface):
    """One assistant's side of one call.

    The session drives the call through ``call.play(pcm)``, ``call.mark(name)``,
    ``call.clear()`` and ``call.hangup(reason)``.
    """

    def audio_received(pcm: bytes) -> None:
        """Caller audio, bridge format; any length that is a multiple of 2 bytes."""

    def dtmf_received(digit: str) -> None:
        """The caller pressed ``digit`` (one of ``0-9*#A-D``)."""

    def mark_played(name: str) -> None:
        """The caller has heard everything queued before ``call.mark(name)``."""

    def close(reason: EndReason) -> None:
        """The call ended (for ``reason``); release everything."""
