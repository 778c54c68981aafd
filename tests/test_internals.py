"""The private library attributes the hot paths use are checked at start-up, loudly."""

from __future__ import annotations

import pytest
from autobahn.websocket.protocol import WebSocketProtocol

from rapida_tap import internals


def test_the_installed_libraries_have_what_the_daemon_relies_on() -> None:
    internals.check()


def test_a_library_without_it_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(WebSocketProtocol, "SEND_STATE_GROUND")
    with pytest.raises(internals.LibraryChanged, match="SEND_STATE_GROUND"):
        internals.check()


def test_direct_socket_only_for_plain_tcp() -> None:
    from twisted.internet.testing import StringTransport

    assert internals.direct_socket(StringTransport()) is None


def test_an_8khz_node_does_not_load_numpy() -> None:
    """numpy and soxr (about 12 MB) load with the first resampler or recording, not at start."""
    import subprocess
    import sys

    code = "import sys, rapida_tap.node, rapida_tap.tap; print('numpy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
