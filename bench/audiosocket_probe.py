"""Pretend to be Asterisk on one call: AudioSocket to HOST PORT with context CTX.

    python3 bench/audiosocket_probe.py 127.0.0.1 4574 "$CTX"

Sends the UUID frame, one second of a 440 Hz tone (50 frames of 20 ms, 8 kHz signed linear),
reads what the daemon sends for 1.5 s, hangs up, and prints how many frames came back and how
many of them were the echo (not silence).  Standard library only: it runs anywhere.
"""

import math
import socket
import struct
import sys
import time
import uuid

host, port, ctx = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port))
s.sendall(b"\x01\x00\x10" + uuid.UUID(ctx).bytes)  # UUID frame: kind 0x01, length 16
time.sleep(0.2)  # the node claims the context (from Redis) and starts the call
REFUSED = "refused: the node closed the connection (its log says why)"
try:
    for n in range(50):  # kind 0x10 (8 kHz slin), length 320
        tone = [int(8000 * math.sin(2 * math.pi * 440 * (n * 160 + i) / 8000)) for i in range(160)]
        s.sendall(b"\x10\x01\x40" + struct.pack("<160h", *tone))
        time.sleep(0.02)
except (BrokenPipeError, ConnectionResetError):
    sys.exit(REFUSED)
data, deadline = b"", time.monotonic() + 1.5
s.settimeout(0.1)
while time.monotonic() < deadline:  # the daemon sends a frame every 20 ms, silence or echo
    try:
        chunk = s.recv(65536)
    except TimeoutError:
        continue
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
if not data:
    sys.exit(REFUSED)
s.sendall(b"\x00\x00\x00")  # hang up (kind 0x00)
frames = [data[i + 3 : i + 323] for i in range(0, len(data) - 322, 323)]
print(f"received {len(frames)} frames, {sum(f != bytes(320) for f in frames)} of them the echo")
