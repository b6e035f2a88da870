#!/usr/bin/env python3
"""An OTLP/HTTP sink for the telemetry benchmark (BENCH_SIDECAR_TELEMETRY=on): it reads each
export request whole and answers 200 with an empty ExportTraceServiceResponse (zero bytes of
protobuf), without decoding, so that what is measured is the sidecar's cost of exporting, not
the collector's. With BENCH_OTLP_SINK=hang it reads each request and never answers: the
collector that hangs, for the p99 with tracing on and the collector stuck (issue 12).
Prints `PORT <n>` once it listens; on SIGTERM prints `EXPORTS <n> BYTES <n>`."""
import os
import signal
import time
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNT = {"exports": 0, "bytes": 0}
LOCK = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        with LOCK:
            COUNT["exports"] += 1
            COUNT["bytes"] += n
        if os.environ.get("BENCH_OTLP_SINK") == "hang":
            time.sleep(3600)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    server.daemon_threads = True

    def stop(*_):
        print(f"EXPORTS {COUNT['exports']} BYTES {COUNT['bytes']}", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
