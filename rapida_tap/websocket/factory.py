"""The chan_websocket listener of one node: Autobahn's factory with the daemon's limits."""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory

from rapida_tap.media.listener import LegListener
from rapida_tap.websocket import control
from rapida_tap.websocket.handshake import SUBPROTOCOL
from rapida_tap.websocket.protocol import MediaWebSocketProtocol


class MediaWebSocketFactory(WebSocketServerFactory):
    """Serves chan_websocket sessions for one ``MediaBridge``; limits are per node.

    Times are seconds on the listener's clock; sizes are bytes.  ``max_message`` bounds any
    message (audio or text, Autobahn closes with 1009 beyond it), ``max_text`` text messages,
    ``max_unread`` what may pile up for a peer that stops reading.  The listener's
    ``ping_interval`` 0 disables keep-alive pings (a vanished peer is then found by the call's
    idle timeout only).  Autobahn's own timers are off: every timer runs on the clock.
    """

    protocol = MediaWebSocketProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        listener: LegListener,
        *,
        handshake_timeout: float = 10.0,
        start_timeout: float = 5.0,
        max_message: int = 65536,
        max_text: int = control.MAX_EVENT_LENGTH,
        max_unread: int = 1_048_576,
        lead_frames: int = 3,
    ) -> None:
        super().__init__(protocols=[SUBPROTOCOL], server="rapida-asterisk")
        self.listener = listener
        self.bridge = listener.bridge
        self.handshake_timeout = handshake_timeout
        self.start_timeout = start_timeout
        self.max_message = max_message
        self.max_text = max_text
        self.max_unread = max_unread
        self.lead_frames = lead_frames
        self.setProtocolOptions(
            maxFramePayloadSize=max_message,
            maxMessagePayloadSize=max_message,
            perMessageCompressionAccept=lambda offers: None,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            autoPingInterval=0,
            requireMaskedClientFrames=True,
            failByDrop=True,
            webStatus=False,
        )
