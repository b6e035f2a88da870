#!/usr/bin/env python3
"""Cleartext HTTP/2 (prior knowledge) application built on the `h2` library, for testing
Sidecar's `app.http: http2` path with plain HTTP requests.

Every request gets a JSON answer: {"proto": "h2", "method", "path", "headers": [[n, v], ...],
"body_bytes", "conn_id", "conn_streams"} where conn_streams counts the requests seen on that
connection so far (shows multiplexing/reuse). /healthz answers "ok". Prints `PORT <n>`.
"""

import argparse
import itertools
import json
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions

CONN_IDS = itertools.count(1)


def serve(sock):
    conn_id = next(CONN_IDS)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    streams = {}
    seen = 0
    sock.settimeout(120)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    seen += 1
                    streams[ev.stream_id] = {"headers": ev.headers, "body": 0}
                elif isinstance(ev, h2.events.DataReceived):
                    if ev.stream_id in streams:
                        streams[ev.stream_id]["body"] += len(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    st = streams.pop(ev.stream_id, None)
                    if st is None:
                        continue
                    hdrs = dict(st["headers"])
                    if hdrs.get(":path") == "/healthz":
                        body = b"ok\n"
                        ctype = "text/plain"
                    else:
                        body = json.dumps(
                            {
                                "proto": "h2",
                                "method": hdrs.get(":method"),
                                "path": hdrs.get(":path"),
                                "headers": [list(h) for h in st["headers"]],
                                "body_bytes": st["body"],
                                "conn_id": conn_id,
                                "conn_streams": seen,
                            }
                        ).encode()
                        ctype = "application/json"
                    conn.send_headers(
                        ev.stream_id,
                        [(":status", "200"), ("content-type", ctype), ("content-length", str(len(body)))],
                    )
                    conn.send_data(ev.stream_id, body, end_stream=True)  # bodies stay < 16 KiB
                elif isinstance(ev, h2.events.StreamReset):
                    streams.pop(ev.stream_id, None)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    sock.sendall(conn.data_to_send())
                    return
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
    except (OSError, h2.exceptions.H2Error):
        pass
    finally:
        sock.close()


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
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
