#!/usr/bin/env python3
"""Raw TCP echo application for Sidecar's `protocol: tcp` tests.

On connect it sends `BANNER\n` first (server-speaks-first protocols such as MySQL and SMTP must
work through an opaque proxy). Then it echoes every byte. When it reads EOF (the client shut down
its write side) it waits 200 ms, sends `FINAL <bytes echoed>\n`, and shuts down its own write
side, so a test can check that half-close travels both ways. Prints `PORT <n>` once listening.
"""

import argparse
import socket
import sys
import threading
import time


def serve(conn):
    with conn:
        conn.settimeout(60)
        try:
            conn.sendall(b"BANNER\n")
            total = 0
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                total += len(data)
                conn.sendall(data)
            time.sleep(0.2)
            conn.sendall(f"FINAL {total}\n".encode())
            conn.shutdown(socket.SHUT_WR)
            # Wait for the peer to close so the final bytes are not lost to a reset.
            while conn.recv(65536):
                pass
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(128)
    print(f"PORT {srv.getsockname()[1]}", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
