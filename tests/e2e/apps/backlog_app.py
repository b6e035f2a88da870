#!/usr/bin/env python3
"""A real small-backlog app: Python's plain `http.server.HTTPServer`, single-threaded, HTTP/1.0,
listening with the stdlib's accept backlog of 5 (`request_queue_size`). A burst of dials beyond
the backlog loses SYNs, which the kernel resends only after 1 s (what issue 9's bug 7 is about).

It prints `PORT <n>` on stdout once it listens, then answers every GET with 200 "ok\\n" and
closes the connection (HTTP/1.0, no keep-alive), until killed.
"""

import argparse
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "e2e-backlog-app/1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    srv = HTTPServer(("127.0.0.1", args.port), Handler)
    assert srv.request_queue_size == 5, srv.request_queue_size  # the point of this app
    print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    sys.exit(main())
