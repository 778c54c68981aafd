"""Why calls end and why connections are refused: one vocabulary for logs, metrics and code.

Both enums are ``StrEnum``s, so a member *is* its text: the first word of a "call ended" or
"connection refused" log line and the value of the ``reason`` metric label.  Expected errors
form one hierarchy under ``CallRefused``; each carries its ``Refusal`` and is checked by type.
"""

from __future__ import annotations

import enum


class EndReason(enum.StrEnum):
    """How a call that started came to its end (the first cause wins)."""

    CALLER_HANGUP = "caller-hangup"
    ASSISTANT_HANGUP = "assistant-hangup"
    ASSISTANT_FAILED = "assistant-failed"
    IDLE_TIMEOUT = "idle-timeout"
    PEER_NOT_READING = "peer-not-reading"
    PROTOCOL_ERROR = "protocol-error"
    TRANSPORT_ERROR = "transport-error"
    INTERNAL_ERROR = "internal-error"
    SHUTDOWN = "shutdown"
    DRAIN_TIMEOUT = "drain-timeout"
    API_HANGUP = "api-hangup"
    TRANSFER = "transfer"  # the bot handed the caller to a dial target (docs/call-control.md)


class Refusal(enum.StrEnum):
    """Why a media connection was closed before its call started."""

    TOO_MANY_CONNECTIONS = "too-many-connections"
    NOT_ACCEPTING = "not-accepting"
    NO_UUID = "no-uuid"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    NO_MEDIA_START = "no-media-start"
    WRONG_SUBPROTOCOL = "wrong-subprotocol"
    BAD_CONTEXT_ID = "bad-context-id"
    UNSUPPORTED_FORMAT = "unsupported-format"
    CONTEXT_MISMATCH = "context-mismatch"
    CONTEXT_REFUSED = "context-refused"
    CONTEXT_UNKNOWN = "context-unknown"
    CONTEXT_EXPIRED = "context-expired"
    CONTEXT_REUSED = "context-reused"
    CONTEXT_CORRUPT = "context-corrupt"
    CONTEXT_STORE_UNAVAILABLE = "context-store-unavailable"
    UNKNOWN_ASSISTANT = "unknown-assistant"
    PROTOCOL_ERROR = "protocol-error"
    PEER_NOT_READING = "peer-not-reading"
    PEER_SILENT = "peer-silent"
    INTERNAL_ERROR = "internal-error"


class CallRefused(Exception):
    """An expected reason not to start a call; ``reason`` names it for logs and metrics."""

    reason: Refusal = Refusal.CONTEXT_REFUSED


class NotAccepting(CallRefused):
    """The node is draining or stopping: new calls are refused."""

    reason = Refusal.NOT_ACCEPTING


class UnknownAssistant(CallRefused):
    reason = Refusal.UNKNOWN_ASSISTANT


def refusal_of(error: BaseException) -> Refusal:
    """The refusal an error stands for: its own for a ``CallRefused``, else internal-error."""
    if isinstance(error, CallRefused):
        return error.reason
    return Refusal.INTERNAL_ERROR
