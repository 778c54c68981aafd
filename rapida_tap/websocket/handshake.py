"""What a chan_websocket connection must show before its call may start (sans-IO checks).

Two moments: the HTTP upgrade (subprotocol, a well-formed context id, a node that takes
calls), refused with an HTTP status so ``Dial()`` fails at once; and ``MEDIA_START`` (a
format the daemon speaks, the ``__RAPIDA_CONTEXT_ID`` cross-check), refused with close 1008.
Each check returns or raises a ``HandshakeRefused`` that names its ``Refusal``.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapida_tap.contexts import is_context_id
from rapida_tap.reasons import Refusal
from rapida_tap.websocket import control
from rapida_tap.websocket.formats import MEDIA_FORMATS, MediaFormat, media_format

SUBPROTOCOL = "media"
CONTEXT_VARIABLE = "__RAPIDA_CONTEXT_ID"


class HandshakeRefused(Exception):
    """A connection that cannot carry a call; ``status`` is for the HTTP upgrade only."""

    def __init__(self, reason: Refusal, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status


class BadContextId(ValueError):
    """The request names no context id, or not a well-formed one (HTTP 400)."""


def context_id_from(path: str, params: dict[str, list[str]]) -> str:
    """The context id of a handshake: ``?ctx=<id>`` or the last segment of ``.../ctx/<id>``.

    Both forms at once must agree.  Raises ``BadContextId`` naming the problem.
    """
    from_query = params.get("ctx", [])
    if len(from_query) > 1:
        raise BadContextId("more than one ctx= parameter")
    segments = [s for s in path.split("/") if s]
    from_path = segments[-1] if len(segments) >= 2 and segments[-2] == "ctx" else None
    if from_query and from_path is not None and from_query[0] != from_path:
        raise BadContextId("the context id in the path and in ?ctx= differ")
    found = from_query[0] if from_query else from_path
    if not found:
        raise BadContextId("no context id (expected ?ctx=<id> or .../ctx/<id>)")
    if not is_context_id(found):
        raise BadContextId(f"not a context id: {found[:40]!r}")
    return found


def check_upgrade(path: str, params: dict[str, list[str]], protocols: Sequence[str]) -> str:
    """The context id of an acceptable upgrade request, or ``HandshakeRefused``."""
    if SUBPROTOCOL not in protocols:
        offered = ",".join(protocols) or "none"
        raise HandshakeRefused(
            Refusal.WRONG_SUBPROTOCOL,
            f"Sec-WebSocket-Protocol must offer {SUBPROTOCOL!r} (offered: {offered}); "
            "set protocols = media in websocket_client.conf",
        )
    try:
        return context_id_from(path, params)
    except BadContextId as e:
        raise HandshakeRefused(Refusal.BAD_CONTEXT_ID, str(e)) from None


def check_media_start(event: control.MediaStart, context_id: str) -> MediaFormat:
    """The call's wire format, or ``HandshakeRefused`` unless ``MEDIA_START`` may start the
    call of ``context_id``.

    Asterisk keeps a previous call's ``v()`` query on a later dial of the same section; the
    inheritable ``__RAPIDA_CONTEXT_ID`` in the channel variables tells such a call apart, and
    it is refused *without* claiming (using up) the URL's context.
    """
    fmt = media_format(event.format)
    if fmt is None:
        raise HandshakeRefused(
            Refusal.UNSUPPORTED_FORMAT,
            f"format {event.format[:20]!r}: dial with c(ulaw), c(alaw), c(slin16) "
            f"or another slin rate ({len(MEDIA_FORMATS) - 2} from slin to slin192)",
        )
    claimed = event.channel_variables.get(CONTEXT_VARIABLE)
    if claimed is not None and claimed != context_id:
        raise HandshakeRefused(
            Refusal.CONTEXT_MISMATCH,
            f"URL ctx {context_id} but {CONTEXT_VARIABLE}={claimed[:40]!r} "
            "(a previous call's v() query left on the dial: Asterisk bug)",
        )
    return fmt


def frame_size_of(event: control.MediaStart, default: int = 160) -> int:
    """The bytes per frame Asterisk wants (``optimal_frame_size``), within reason."""
    size = event.optimal_frame_size
    return size if 0 < size <= 8000 else default
