#!/usr/bin/env python3
"""HTTP/1.1 application that Sidecar's end-to-end tests put behind the sidecar.

Python's stdlib server with keep-alive (protocol_version HTTP/1.1, every response framed). It
prints `PORT <n>` on stdout once it listens (`PORT 0` on a Unix socket, `--unix PATH`), then
serves until killed.

Endpoints (everything the tests need to see what reached the app):
  /                    hello text
  /healthz             200 "ok", or 503 while unhealthy (see /toggle-health)
  /toggle-health       ?ok=0|1 sets health; ?fail_next=N fails only the next N health checks
  /echo                returns the request body; request headers as JSON in X-Echo-Headers
  /headers             JSON {method, path, headers: [[name, value], ...], body_bytes}
  /slow?ms=N           sleeps N ms, then answers "slow done N"
  /status/N            answers with status N
  /stream?chunks=N&delay_ms=D   chunked response of N chunks, D ms apart
  /big?bytes=N         N bytes of "x" with Content-Length
  /upload              counts and discards the request body; JSON {bytes, chunked}
  /hop-response        a response carrying hop-by-hop headers (Connection: X-Secret-Hop, ...)
  /count               JSON counters: started, completed, recent requests, distinct peers
  /reset               zeroes the counters
/count, /healthz, /toggle-health and /reset are not counted themselves.
"""

import argparse
import json
import os
import socketserver
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {
    "started": 0,  # request lines parsed (counted paths only)
    "completed": 0,  # requests whose body was read completely and answered
    "recent": [],  # "METHOD path" of the last 200 counted requests
    "peers": set(),  # distinct (ip, port) of connections that carried counted requests
    "healthy": True,
    "fail_next": 0,
    "health_checks": 0,
    "inflight": 0,
}
UNCOUNTED = {"/count", "/healthz", "/toggle-health", "/reset"}
BLOCK = 1 << 20


class BadBody(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "e2e-app/1"
    timeout = 120  # seconds a connection may sit idle; bounds leaked threads

    def log_message(self, fmt, *args):  # quiet: the tests read /count instead
        pass

    # --- bookkeeping -------------------------------------------------------------------
    def parse_request(self):
        ok = super().parse_request()
        path = getattr(self, "path", "") or ""
        self._counted = urllib.parse.urlsplit(path).path not in UNCOUNTED and bool(path)
        if self._counted:
            with LOCK:
                STATE["started"] += 1
                STATE["recent"].append(f"{self.command} {path}")
                del STATE["recent"][:-200]
                STATE["peers"].add(f"{self.client_address[0]}:{self.client_address[1]}")
        return ok

    def _completed(self):
        if getattr(self, "_counted", False):
            with LOCK:
                STATE["completed"] += 1

    # --- body handling -----------------------------------------------------------------
    def read_body(self, sink):
        """Reads the whole request body (Content-Length or chunked), passing pieces to sink.
        Raises BadBody on malformed framing or a short body."""
        te = self.headers.get("Transfer-Encoding")
        if te is not None and "chunked" in te.lower():
            total = 0
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise BadBody("eof in chunk size")
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise BadBody(f"bad chunk size {line!r}")
                if size == 0:
                    while True:  # trailers, then the final empty line
                        t = self.rfile.readline(65537)
                        if not t.endswith(b"\n"):
                            raise BadBody("eof in trailers")
                        if t in (b"\r\n", b"\n"):
                            return total
                remaining = size
                while remaining:
                    piece = self.rfile.read(min(remaining, BLOCK))
                    if not piece:
                        raise BadBody("eof in chunk")
                    sink(piece)
                    remaining -= len(piece)
                    total += len(piece)
                if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise BadBody("missing CRLF after chunk")
        n = int(self.headers.get("Content-Length") or 0)
        remaining = n
        while remaining:
            piece = self.rfile.read(min(remaining, BLOCK))
            if not piece:
                raise BadBody("eof in body")
            sink(piece)
            remaining -= len(piece)
        return n

    def reply(self, status, body=b"", ctype="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and not no_body:
            self.wfile.write(body)
        self._completed()

    # --- routing -----------------------------------------------------------------------
    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        path = url.path
        try:
            if path == "/echo":
                buf = bytearray()
                self.read_body(buf.extend)
                hdrs = json.dumps([[k, v] for k, v in self.headers.items()])
                return self.reply(
                    200,
                    bytes(buf),
                    ctype=self.headers.get("Content-Type", "application/octet-stream"),
                    headers=[("X-Echo-Headers", hdrs), ("X-Body-Bytes", str(len(buf)))],
                )
            count = [0]

            def discard(piece):
                count[0] += len(piece)

            self.read_body(discard)
        except BadBody as e:
            self.close_connection = True
            return self.send_error(400, str(e))

        if path == "/":
            return self.reply(200, "hello from app\n")
        if path == "/healthz":
            with LOCK:
                STATE["health_checks"] += 1
                if STATE["fail_next"] > 0:
                    STATE["fail_next"] -= 1
                    ok = False
                else:
                    ok = STATE["healthy"]
            return self.reply(200 if ok else 503, "ok\n" if ok else "unhealthy\n")
        if path == "/toggle-health":
            with LOCK:
                if "ok" in q:
                    STATE["healthy"] = q["ok"] == "1"
                if "fail_next" in q:
                    STATE["fail_next"] = int(q["fail_next"])
            return self.reply(200, "toggled\n")
        if path == "/headers":
            out = {
                "method": self.command,
                "path": self.path,
                "version": self.request_version,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_bytes": count[0],
            }
            return self.reply(200, json.dumps(out), ctype="application/json")
        if path == "/slow":
            ms = int(q.get("ms", "1000"))
            with LOCK:
                STATE["inflight"] += 1
            try:
                time.sleep(ms / 1000)
            finally:
                with LOCK:
                    STATE["inflight"] -= 1
            return self.reply(200, f"slow done {ms}\n")
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            return self.reply(code, f"status {code}\n")
        if path == "/stream":
            chunks = int(q.get("chunks", "5"))
            delay = int(q.get("delay_ms", "0")) / 1000
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(chunks):
                data = f"chunk {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                if delay:
                    time.sleep(delay)
            self.wfile.write(b"0\r\n\r\n")
            self._completed()
            return
        if path == "/big":
            n = int(q.get("bytes", "1048576"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * BLOCK
            left = n
            while left:
                k = min(left, BLOCK)
                self.wfile.write(block[:k])
                left -= k
            self._completed()
            return
        if path == "/upload":
            te = self.headers.get("Transfer-Encoding") or ""
            body = json.dumps({"bytes": count[0], "chunked": "chunked" in te.lower()})
            return self.reply(200, body, ctype="application/json")
        if path == "/hop-response":
            return self.reply(
                200,
                "hop\n",
                headers=[
                    ("Connection", "X-Secret-Hop"),
                    ("X-Secret-Hop", "1"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Connection", "keep-alive"),
                    ("X-Normal", "yes"),
                ],
            )
        if path == "/count":
            with LOCK:
                out = {
                    "started": STATE["started"],
                    "completed": STATE["completed"],
                    "recent": list(STATE["recent"]),
                    "peers": len(STATE["peers"]),
                    "health_checks": STATE["health_checks"],
                    "inflight": STATE["inflight"],
                }
            return self.reply(200, json.dumps(out), ctype="application/json")
        if path == "/reset":
            with LOCK:
                STATE.update(started=0, completed=0, recent=[], peers=set())
            return self.reply(200, "reset\n")
        return self.reply(404, "not found\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The same app on a Unix domain socket (`--unix PATH`)."""

    daemon_threads = True
    request_queue_size = 512

    def get_request(self):
        # A Unix peer has no address; each connection gets a distinct stand-in so /count's
        # `peers` still counts connections.
        sock, _ = self.socket.accept()
        return sock, ("unix", sock.fileno())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--unix", help="listen on this Unix socket path instead of a TCP port")
    ap.add_argument("--unhealthy", action="store_true", help="start with /healthz failing")
    args = ap.parse_args()
    STATE["healthy"] = not args.unhealthy
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        srv = UnixServer(args.unix, Handler)
        print("PORT 0", flush=True)
    else:
        srv = Server(("127.0.0.1", args.port), Handler)
        print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    sys.exit(main())
