"""The media-stream dialects bots speak, one module each; ``DIALECTS`` by ``protocol`` name.

``docs/bots.md`` lists each one's messages and audio; the daemon always plays the provider.
"""

from __future__ import annotations

from rapida_tap.assistants.dialects.base import AudioFormat, Dialect, StreamCall
from rapida_tap.assistants.dialects.exotel import Exotel
from rapida_tap.assistants.dialects.plivo import Plivo
from rapida_tap.assistants.dialects.telnyx import Telnyx
from rapida_tap.assistants.dialects.twilio import Twilio

DIALECTS: dict[str, type[Dialect]] = {d.name: d for d in (Twilio, Telnyx, Plivo, Exotel)}

__all__ = ["DIALECTS", "AudioFormat", "Dialect", "StreamCall"]
