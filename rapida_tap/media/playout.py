"""Ending a call after the caller heard what was already queued: a bot's goodbye, a transfer.

Whoever asks for the end (the bot closing its stream, a REST hang-up, a transfer) records its
reason at once with ``Call.ending``, so a caller hanging up meanwhile does not change why the
call ended; the end itself waits for a private mark behind the queued audio, bounded by the
audio's own length plus ``slack`` seconds (a peer that never acknowledges marks cannot hold
the call open).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rapida_tap.media.audio import FRAME_SECONDS

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime

    from rapida_tap.media.call import Call
    from rapida_tap.reasons import EndReason

#: Seconds beyond the queued audio's own length that its playout may take.
DRAIN_SLACK = 2.0


def end_after_playout(
    call: Call, clock: IReactorTime, reason: EndReason, detail: str, slack: float = DRAIN_SLACK
) -> None:
    """End ``call`` for ``reason`` once its queued audio played, within a bound."""
    if call.is_ended:
        return
    call.ending(reason, detail)
    bound = (call.queued_frames + 1) * FRAME_SECONDS + slack
    timer = clock.callLater(bound, call.hangup, reason, detail)

    def cancel(_: object) -> object:
        if timer.active():
            timer.cancel()
        return _

    call.when_ended().addCallback(cancel)
    call.after_playout().addCallback(lambda _: call.hangup(reason, detail))
