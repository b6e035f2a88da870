#!/usr/bin/env python3
"""An HTTPS upstream for the outbound TLS-origination tests: Python's stdlib server behind
Python's ssl module (OpenSSL), so the TLS peer is not Sidecar's own code.

Usage: tls_upstream.py CERT KEY [CLIENT_CA]. With CLIENT_CA, clients must present a
certificate from it (mTLS). Prints `PORT <n>` once it listens on 127.0.0.1.

Every request is answered 200 with JSON: {"path", "client_identity"}, where client_identity
is the URI SAN (else the first DNS SAN) of the client's certificate, or null. GET /count
answers {"requests": N}: the requests that reached the handler (the count itself excluded).
"""

import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
COUNT = {"requests": 0}


def identity(cert):
    if not cert:
        return None
    sans = cert.get("subjectAltName", ())
    for kind, value in sans:
        if kind == "URI":
            return value
    for kind, value in sans:
        if kind == "DNS":
            return value
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/count":
            with LOCK:
                body = json.dumps(COUNT).encode()
        else:
            with LOCK:
                COUNT["requests"] += 1
            doc = {"path": self.path, "client_identity": identity(self.connection.getpeercert())}
            body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    cert, key = sys.argv[1], sys.argv[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if len(sys.argv) > 3:
        ctx.load_verify_locations(sys.argv[3])
        ctx.verify_mode = ssl.CERT_REQUIRED
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
