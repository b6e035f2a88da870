#!/usr/bin/env python3
"""WebSocket echo application (the `websockets` library) for Sidecar's end-to-end tests.

On connect it sends a JSON text message describing the handshake it received (path and the
X-Forwarded-For header). Then it echoes every message, text as text and binary as binary. The
text message `close-me` makes it close the connection with code 4001 and reason `bye`.
Prints `PORT <n>` once listening.
"""

import argparse
import asyncio
import json
import sys

from websockets.asyncio.server import serve


async def handler(ws):
    req = ws.request
    await ws.send(
        json.dumps(
            {
                "hello": "ws",
                "path": req.path,
                "x-forwarded-for": req.headers.get("X-Forwarded-For"),
            }
        )
    )
    async for msg in ws:
        if msg == "close-me":
            await ws.close(4001, "bye")
            return
        await ws.send(msg)


async def main(port):
    async with serve(handler, "127.0.0.1", port, max_size=8 << 20, compression=None) as server:
        sock = next(iter(server.sockets))
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    sys.exit(asyncio.run(main(ap.parse_args().port)))
