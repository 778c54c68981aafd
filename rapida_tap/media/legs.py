"""Small helpers shared by the transport legs (AudioSocket, chan_websocket)."""


def peer_text(transport: object) -> str:
    """``host:port`` of a transport's peer, for log lines; ``?`` when it has none."""
    try:
        address = transport.getPeer()  # type: ignore[attr-defined]
        return f"{address.host}:{address.port}"
    except Exception:
        return "?"
