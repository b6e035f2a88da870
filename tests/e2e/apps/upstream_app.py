#!/usr/bin/env python3
"""An upstream "pod" for the outbound (ambassador) tests: an HTTP/1.1 server on any loopback
address (`--host 127.0.0.11`), so that several of them can share one port as pods of a
service do. Prints `PORT <n>` once it listens.

Every request outside /__* is counted and answered with JSON naming the pod
({served_by, method, path, host, body_bytes}) and header X-Served-By; the request body is read
whole first (Content-Length or chunked).
  /slow?ms=N      sleeps N ms first
  /status/N       answers N
  /echo           answers with the request body itself
  anything else   --status (default 200) after --delay-ms
  /__stats        JSON {total, recent: [{method, path, host, headers, body_bytes, chunked}]}
  /__set?status=N&delay_ms=N   changes the defaults
On SIGTERM it prints `STATS <json>` and exits at once (connections in flight just break),
so a pod killed mid-test still reports what it saw.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"total": 0, "recent": [], "status": 200, "delay_ms": 0}
NAME = ""


def snapshot(locked=False):
    if not locked:
        with LOCK:
            return snapshot(locked=True)
    return {"total": STATE["total"], "recent": list(STATE["recent"])}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "e2e-upstream/1"
    timeout = 60

    def log_message(self, fmt, *args):
        pass

    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out), True
                out += self.rfile.read(size)
                self.rfile.readline(3)
        n = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(n) if n else b""), False

    def reply(self, status, body, ctype="application/json"):
        """The whole response in one write: a pod killed mid-test has sent all of a response
        or none of it (a head without its body would be a failure no proxy can hide)."""
        if isinstance(body, str):
            body = body.encode()
        self.send_response_only(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", NAME)
        head = b"".join(self._headers_buffer) + b"\r\n"
        self._headers_buffer = []
        self.wfile.write(head + (body if self.command != "HEAD" else b""))

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        body, chunked = self.read_body()
        if url.path == "/__stats":
            return self.reply(200, json.dumps(snapshot()))
        if url.path == "/__set":
            with LOCK:
                for k in ("status", "delay_ms"):
                    if k in q:
                        STATE[k] = int(q[k])
            return self.reply(200, "{}")
        host = self.headers.get("Host")
        with LOCK:
            STATE["total"] += 1
            STATE["recent"].append(
                {
                    "method": self.command,
                    "path": self.path,
                    "host": host,
                    "headers": [[k, v] for k, v in self.headers.items()],
                    "body_bytes": len(body),
                    "chunked": chunked,
                }
            )
            del STATE["recent"][:-200]
            status, delay = STATE["status"], STATE["delay_ms"]
        if url.path == "/slow":
            delay = int(q.get("ms", "1000"))
        if url.path.startswith("/status/"):
            status = int(url.path.rsplit("/", 1)[1])
        if delay:
            time.sleep(delay / 1000)
        if url.path == "/echo":
            return self.reply(status, body, ctype="application/octet-stream")
        out = {"served_by": NAME, "method": self.command, "path": self.path, "host": host, "body_bytes": len(body)}
        return self.reply(status, json.dumps(out))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True


def main():
    global NAME
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--status", type=int, default=200)
    ap.add_argument("--delay-ms", type=int, default=0)
    args = ap.parse_args()
    STATE["status"], STATE["delay_ms"] = args.status, args.delay_ms
    srv = Server((args.host, args.port), Handler)
    NAME = f"{args.host}:{srv.server_address[1]}"

    def on_term(*_):
        LOCK.acquire()  # held to the end: no request is counted after the snapshot
        sys.stdout.write("STATS " + json.dumps(snapshot(locked=True)) + "\n")
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    sys.exit(main())
