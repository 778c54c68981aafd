"""A deliberately naive AudioSocket echo peer: asyncio, unpaced (writes each frame on receipt).

For ``python -m bench compare --peer 'python -m bench.peers.asyncio_echo {port}'``: it shows
what an unpaced server costs and how it passes the caller's timing (and bursts) straight back.
"""

from __future__ import annotations

import asyncio
import sys


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(3)
            payload = await reader.readexactly(int.from_bytes(header[1:], "big"))
            if header[0] == 0x00:
                break
            if 0x10 <= header[0] <= 0x18:
                writer.write(header + payload)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
