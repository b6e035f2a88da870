"""A small OTLP/HTTP trace receiver for the tracing tests: it decodes every POST to /v1/traces
with the published protobuf schema (the `opentelemetry-proto` package) and keeps the spans.

It can be made to fail: mode "ok" (200 and an empty ExportTraceServiceResponse), "fail" (500),
or "hang" (reads the request, then never answers until the mode changes or it stops).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from helpers import LOCALHOST, wait_until


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Span:
    """One decoded span with its resource, ids as lower-case hex."""

    def __init__(self, resource, scope, span):
        self.resource = {a.key: _value(a.value) for a in resource.attributes}
        self.scope = scope.name
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_span_id = span.parent_span_id.hex()
        self.name = span.name
        self.kind = span.kind  # 2 server, 3 client
        self.attrs = {a.key: _value(a.value) for a in span.attributes}
        self.status_code = span.status.code  # 0 unset, 2 error
        self.start_ns = span.start_time_unix_nano
        self.end_ns = span.end_time_unix_nano

    def __repr__(self):
        return f"Span({self.name} trace={self.trace_id} span={self.span_id} parent={self.parent_span_id} {self.attrs})"


class OtlpReceiver:
    def __init__(self, mode="ok"):
        self.mode = mode
        self.spans: list[Span] = []
        self.requests = 0
        self.content_types: set[str] = set()
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                with receiver._lock:
                    receiver.requests += 1
                    receiver.content_types.add(self.headers.get("Content-Type", ""))
                mode = receiver.mode
                if mode == "hang":
                    receiver._release.wait(120)
                    self.close_connection = True
                    return
                if self.path != "/v1/traces":
                    return self._reply(404, b"")
                if mode == "fail":
                    return self._reply(500, b"collector unhappy")
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                spans = [
                    Span(rs.resource, ss.scope, s)
                    for rs in req.resource_spans
                    for ss in rs.scope_spans
                    for s in ss.spans
                ]
                with receiver._lock:
                    receiver.spans.extend(spans)
                self._reply(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def _reply(self, status, body, ctype="text/plain"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{LOCALHOST}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set_mode(self, mode):
        self.mode = mode
        if mode != "hang":
            self._release.set()

    def wait_spans(self, n, timeout=10.0) -> list[Span]:
        wait_until(lambda: len(self.spans) >= n, timeout, what=f"{n} spans at the OTLP receiver (have {len(self.spans)})")
        time.sleep(0.2)
        with self._lock:
            return list(self.spans)

    def stop(self):
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
