"""Receivers for the log-shipping tests: one threaded HTTP server that speaks the wire format of
each sink kind and decodes every request fully, and the app side: files of numbered lines.

kind        what it accepts                                             success
http        POST NDJSON, one JSON document a line                       200
loki        POST /loki/api/v1/push: PushRequest protobuf (snappy block,  204
            classes generated from loki_push.proto) or JSON streams
elasticsearch  POST /_bulk (or /INDEX/_bulk): action + document pairs    200 + a bulk response
            answered item by item (201 created, 409 for an _id seen before)
otlp        POST /v1/logs: ExportLogsServiceRequest (opentelemetry-proto)  200 + ExportLogsServiceResponse

Every kind takes `Content-Encoding: gzip`. It is as strict as the real server where that is
cheap (Elasticsearch's trailing newline and content types, Loki's label syntax, duplicate JSON
keys); what a real server would refuse is answered so and noted in `.problems`, which a test
asserts is empty.

Failure modes, set from the test at any time: `fail(status, times, retry_after)`, `slow(s)`,
`hang()`, `down()`/`up()` (the port is closed, open connections reset, then listened on again),
`store_then_fail()` (the records are kept but the answer is an error, as when a response is
lost), and per item: `fail_items()` (Elasticsearch) and `reject()` (OTLP partial success).

As a script: `python3 logship_receivers.py --kind loki [--port N]` prints `PORT <n>`; GET
/__rx/records and /__rx/requests show what arrived, /__rx/control?action=fail&status=429&times=2
changes the mode.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import gzip
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cramjam
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

HERE = Path(__file__).resolve().parent
LOCALHOST = "127.0.0.1"
KINDS = ("http", "loki", "elasticsearch", "otlp")
LOKI_PATH = "/loki/api/v1/push"

_loki = None
_loki_lock = threading.Lock()


def loki_classes():
    """The loki_push_pb2 module, generated from loki_push.proto into a temp dir once a process."""
    global _loki
    with _loki_lock:
        if _loki is None:
            import grpc_tools

            out = tempfile.mkdtemp(prefix="loki_pb2_")
            atexit.register(shutil.rmtree, out, True)
            well_known = Path(grpc_tools.__file__).parent / "_proto"
            subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"-I{well_known}", f"--python_out={out}",
                            "loki_push.proto"], check=True, timeout=60)
            sys.path.insert(0, out)
            import loki_push_pb2

            _loki = loki_push_pb2
    return _loki


_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*')


def parse_labels(text: str) -> dict:
    """A Loki stream selector as PushRequest carries it, `{a="b", c="d"}`; ValueError if it is not
    one (Loki answers such a push 400)."""
    s = text.strip()
    if not (s.startswith("{") and s.endswith("}")):
        raise ValueError(f"labels not in braces: {text!r}")
    body, out, pos = s[1:-1], {}, 0
    while pos < len(body):
        m = _LABEL.match(body, pos)
        if not m:
            raise ValueError(f"bad label at {pos} in {text!r}")
        if m.group(1) in out:
            raise ValueError(f"duplicate label {m.group(1)} in {text!r}")
        out[m.group(1)] = json.loads(f'"{m.group(2)}"')
        pos = m.end()
        if pos < len(body):
            if body[pos] != ",":
                raise ValueError(f"expected ',' at {pos} in {text!r}")
            pos += 1
    return out


def _strict_json(text: str):
    """json.loads that refuses duplicate keys (Elasticsearch does: `Duplicate field`)."""
    def pairs(kv):
        keys = [k for k, _ in kv]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate keys {sorted(k for k, n in Counter(keys).items() if n > 1)}")
        return dict(kv)

    return json.loads(text, object_pairs_hook=pairs)


def _any_value(v):
    kind = v.WhichOneof("value")
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Record:
    """One log record as it arrived. `line` is the log line (http/elasticsearch: the document's
    `message`, None for a merged JSON line); `fields` the JSON document (http/elasticsearch), the
    stream labels (loki) or the record's attributes (otlp); `meta` the rest: Loki's structured
    metadata, OTLP's resource, severity and scope, Elasticsearch's _id and _index."""

    line: str | None
    fields: dict
    meta: dict
    ts_ns: int
    request: int


@dataclass
class Request:
    n: int
    t: float  # time.monotonic() at arrival
    method: str
    path: str
    headers: dict  # lower-case name -> value
    body_bytes: int
    status: int = 0  # 0 while unanswered (hang) or never answered
    records: int = 0
    note: str = ""

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)


class Reject(Exception):
    def __init__(self, status, message, problem=True):
        super().__init__(message)
        self.status, self.message, self.problem = status, message, problem


class LogReceiver:
    """A sink endpoint of one `kind`; `endpoint` is its base URL, `url` what the http sink
    posts to."""

    def __init__(self, kind="http", port=0, host=LOCALHOST):
        assert kind in KINDS, kind
        self.kind = kind
        self.host = host  # another address than loopback: a container's sidecar ships to it
        self.records: list[Record] = []
        self.requests: list[Request] = []
        self.problems: list[str] = []
        self.es_docs: dict[str, dict] = {}  # _id -> document (elasticsearch)
        self.es_conflicts = 0  # items answered 409
        self.otlp_rejected: list[str] = []  # bodies of records refused in a partial success (otlp)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._conns: set[socket.socket] = set()
        self._fail = None  # (status, remaining or None, retry_after, body)
        self._store_then_fail = None  # [status, remaining]
        self._item_fail: list = []  # [status, match, remaining or None] rules (elasticsearch)
        self._reject = None  # [match, message] (otlp partial success)
        self.delay = 0.0
        self.hanging = False
        self.server = None
        self.port = port
        if kind == "loki":
            loki_classes()
        self.up()

    # --- addresses ----------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.endpoint}/ingest" if self.kind == "http" else self.endpoint

    # --- modes --------------------------------------------------------------------------
    def ok(self):
        with self._lock:
            self._fail = self._store_then_fail = self._reject = None
            self._item_fail = []
            self.delay, self.hanging = 0.0, False
        self._release.set()

    def fail(self, status, times=None, retry_after=None, body=b""):
        """Answers `status` to the next `times` requests (None: until ok()), storing nothing.
        `retry_after` is sent as Retry-After: a number, a string, or a function called at the answer."""
        with self._lock:
            self._fail = [status, times, retry_after, body]

    def store_then_fail(self, status=500, times=1):
        """Keeps the next `times` requests' records, then answers `status`: a lost response."""
        with self._lock:
            self._store_then_fail = [status, times]

    def fail_items(self, status, match, times=None):
        """Elasticsearch: items whose document matches `match(doc)` get `status` (`times` items in
        all, None: every one) and are not indexed. Rules add up; ok() clears them."""
        with self._lock:
            self._item_fail.append([status, match, times])

    def reject(self, match, message="rejected by the test"):
        """OTLP: records whose body matches `match(line)` are dropped and reported in
        partial_success."""
        with self._lock:
            self._reject = [match, message]

    def slow(self, seconds):
        self.delay = seconds

    def hang(self):
        self._release.clear()
        self.hanging = True

    def down(self):
        """Stops listening and resets every open connection; `up()` listens on the same port."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def up(self):
        if self.server is not None:
            return
        for _ in range(100):  # a reset connection may hold the port for a moment
            try:
                self.server = ThreadingHTTPServer((self.host, self.port), self._handler())
                break
            except OSError:
                if not self.port:
                    raise
                time.sleep(0.1)
        else:
            raise RuntimeError(f"port {self.port} stays busy")
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self._release.set()
        self.down()

    # --- what arrived -------------------------------------------------------------------
    def lines(self) -> list[str]:
        with self._lock:
            return [r.line for r in self.records]

    def wait_records(self, n, timeout=30.0) -> list[Record]:
        deadline = time.monotonic() + timeout
        while len(self.records) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.records)} of {n} records at the {self.kind} receiver after {timeout}s; "
                                     f"{len(self.requests)} requests, statuses {Counter(r.status for r in self.requests)}")
            time.sleep(0.05)
        with self._lock:
            return list(self.records)

    def wait_requests(self, n, timeout=30.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} of {n} requests at the {self.kind} receiver after {timeout}s")
            time.sleep(0.05)
        with self._lock:
            return list(self.requests)

    # --- decoding -----------------------------------------------------------------------
    def _decode(self, req: Request, body: bytes) -> tuple[list[Record], bytes, str, dict]:
        """Records in the request, and the success answer: (records, body, content type, extra).
        Raises Reject for what the real server would refuse."""
        enc = req.header("content-encoding", "identity").lower()
        if enc == "gzip":
            try:
                body = gzip.decompress(body)
            except OSError as e:
                raise Reject(400, f"bad gzip body: {e}")
        elif enc not in ("identity", ""):
            raise Reject(415, f"unsupported Content-Encoding {enc}")
        ctype = req.header("content-type", "").split(";")[0].strip().lower()
        return getattr(self, "_decode_" + self.kind)(req, body, ctype)

    def _decode_http(self, req, body, ctype):
        if ctype != "application/x-ndjson":
            self.problems.append(f"http sink: Content-Type {ctype!r}, not application/x-ndjson")
        if body and not body.endswith(b"\n"):
            self.problems.append("http sink: body does not end with a newline")
        recs = []
        for i, raw in enumerate(body.decode("utf-8").split("\n")):
            if not raw.strip():
                continue
            try:
                doc = _strict_json(raw)
            except ValueError as e:
                raise Reject(400, f"line {i}: {e}: {raw[:200]!r}")
            if not isinstance(doc, dict):
                raise Reject(400, f"line {i} is not an object")
            recs.append(Record(doc.get("message"), doc, {}, 0, req.n))
        return recs, b"", "text/plain", {}

    def _decode_loki(self, req, body, ctype):
        if req.path != LOKI_PATH:
            raise Reject(404, f"no route {req.path}")
        recs = []
        if ctype == "application/x-protobuf":
            try:
                raw = bytes(cramjam.snappy.decompress_raw(body))
            except Exception as e:  # noqa: BLE001 - cramjam raises its own DecompressionError
                raise Reject(400, f"snappy block decode: {e}")
            pr = loki_classes().PushRequest()
            pr.ParseFromString(raw)
            for s in pr.streams:
                try:
                    labels = parse_labels(s.labels)
                except ValueError as e:
                    raise Reject(400, str(e))
                for e in s.entries:
                    ts = e.timestamp.seconds * 10**9 + e.timestamp.nanos
                    md = {p.name: p.value for p in e.structuredMetadata}
                    recs.append(Record(e.line, labels, md, ts, req.n))
        elif ctype == "application/json":
            try:
                doc = _strict_json(body.decode())
                for s in doc["streams"]:
                    labels = s["stream"]
                    if not all(isinstance(v, str) for v in labels.values()):
                        raise ValueError(f"label values must be strings: {labels}")
                    for v in s["values"]:
                        if not (isinstance(v[0], str) and v[0].isdigit() and isinstance(v[1], str)):
                            raise ValueError(f"bad value {v!r}: want [\"<ns>\", \"line\"]")
                        recs.append(Record(v[1], labels, v[2] if len(v) > 2 else {}, int(v[0]), req.n))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise Reject(400, f"bad JSON push: {e!r}")
        else:
            raise Reject(415, f"unsupported Content-Type {ctype!r}")
        for r in recs:
            if r.ts_ns <= 0:
                raise Reject(400, "entry without a timestamp")
            if not r.fields:
                raise Reject(400, "stream without labels")
        return recs, b"", "text/plain", {}

    def _decode_elasticsearch(self, req, body, ctype):
        m = re.fullmatch(r"/(?:([^/_][^/]*)/)?_bulk", req.path)
        if not m:
            raise Reject(404, f"no route {req.path}")
        if ctype not in ("application/json", "application/x-ndjson"):
            raise Reject(406, f"Content-Type header [{ctype}] is not supported")
        if not body.endswith(b"\n"):
            raise Reject(400, "The bulk request must be terminated by a newline [\\n]")
        lines = body.decode("utf-8").split("\n")[:-1]
        items, recs, errors = [], [], False
        i = 0
        while i < len(lines):
            try:
                action = _strict_json(lines[i])
                (op, meta), = action.items()
                doc_line = lines[i + 1]
            except (ValueError, IndexError) as e:
                raise Reject(400, f"malformed action/metadata line [{i + 1}]: {e}")
            i += 2
            if op != "create":
                self.problems.append(f"elasticsearch: action {op!r}, not create")
            index = meta.get("_index") or m.group(1)
            _id = meta.get("_id")
            if not _id:
                self.problems.append("elasticsearch: an action without _id (replays would duplicate)")
                _id = f"auto-{len(self.es_docs)}-{i}"
            result = {"_index": index, "_id": _id}
            try:
                doc = _strict_json(doc_line)
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                self.problems.append(f"elasticsearch: document {_id}: {e}")
                result.update(status=400, error={"type": "mapper_parsing_exception", "reason": f"failed to parse: {e}"})
                errors = True
                items.append({op: result})
                continue
            with self._lock:
                f = next((r for r in self._item_fail if r[1](doc) and (r[2] is None or r[2] > 0)), None)
                failing = f is not None
                if failing and f[2] is not None:
                    f[2] -= 1
                seen = _id in self.es_docs
                if not failing and not seen:
                    self.es_docs[_id] = doc
                elif not failing:
                    self.es_conflicts += 1
            if failing:
                status = f[0]
                etype = {429: "es_rejected_execution_exception", 400: "mapper_parsing_exception"}.get(status, "exception")
                result.update(status=status, error={"type": etype, "reason": f"failed by the test ({status})"})
                errors = True
            elif seen:
                result.update(status=409, error={
                    "type": "version_conflict_engine_exception",
                    "reason": f"[{_id}]: version conflict, document already exists (current version [1])",
                    "index": index})
                errors = True
            else:
                result.update(_version=1, result="created", _shards={"total": 1, "successful": 1, "failed": 0},
                              _seq_no=len(self.es_docs), _primary_term=1, status=201)
                recs.append(Record(doc.get("message"), doc, {"_id": _id, "_index": index}, 0, req.n))
            items.append({op: result})
        answer = json.dumps({"took": 1, "errors": errors, "items": items}).encode()
        return recs, answer, "application/json", {}

    def _decode_otlp(self, req, body, ctype):
        if req.path != "/v1/logs":
            raise Reject(404, f"no route {req.path}")
        er = ExportLogsServiceRequest()
        if ctype == "application/x-protobuf":
            er.ParseFromString(body)
        elif ctype == "application/json":
            json_format.Parse(body, er)
        else:
            raise Reject(415, f"unsupported Content-Type {ctype!r}")
        recs, rejected = [], 0
        with self._lock:
            rej = self._reject
        for rl in er.resource_logs:
            resource = {a.key: _any_value(a.value) for a in rl.resource.attributes}
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    line = _any_value(lr.body)
                    if rej and rej[0](line):
                        rejected += 1
                        with self._lock:
                            self.otlp_rejected.append(line)
                        continue
                    meta = {"resource": resource, "scope": sl.scope.name, "severity_number": lr.severity_number,
                            "severity_text": lr.severity_text, "observed_ns": lr.observed_time_unix_nano}
                    attrs = {a.key: _any_value(a.value) for a in lr.attributes}
                    recs.append(Record(line, attrs, meta, lr.time_unix_nano or lr.observed_time_unix_nano, req.n))
        resp = ExportLogsServiceResponse()
        if rejected:
            resp.partial_success.rejected_log_records = rejected
            resp.partial_success.error_message = rej[1]
        if ctype == "application/json":
            return recs, json_format.MessageToJson(resp).encode(), "application/json", {}
        return recs, resp.SerializeToString(), "application/x-protobuf", {}

    # --- the server ---------------------------------------------------------------------
    def _handler(self):
        rx = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                with rx._lock:
                    rx._conns.add(self.connection)

            def finish(self):
                with rx._lock:
                    rx._conns.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_GET(self):
                if self.path.startswith("/__rx/"):
                    return rx._control(self)
                self._reply(404, b"")

            def do_PUT(self):
                self.do_POST()

            def do_POST(self):
                if self.path.startswith("/__rx/"):
                    return rx._control(self)
                n = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                else:
                    body = self.rfile.read(n)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with rx._lock:
                    req = Request(len(rx.requests), time.monotonic(), self.command, urlsplit(self.path).path, headers, len(body))
                    rx.requests.append(req)
                rx._answer(self, req, body)

            def _read_chunked(self):
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def _reply(self, status, body, ctype="text/plain", extra=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if status != 204:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if status != 204:
                    self.wfile.write(body)

        return Handler

    def _answer(self, h, req: Request, body: bytes):
        if self.hanging:
            self._release.wait(300)
            req.note = "hung"
            h.close_connection = True
            return
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            f = self._fail
            if f is not None:
                if f[1] is not None:
                    f[1] -= 1
                    if f[1] <= 0:
                        self._fail = None
        if f is not None:
            status, _, retry_after, fbody = f
            req.status, req.note = status, "failed by the test"
            if callable(retry_after):  # computed as the answer is sent (an HTTP-date)
                retry_after = retry_after()
            return h._reply(status, fbody, extra={"Retry-After": str(retry_after)} if retry_after is not None else None)
        try:
            recs, answer, ctype, extra = self._decode(req, body)
        except Reject as e:
            if e.problem:
                self.problems.append(f"{self.kind} request {req.n} ({req.method} {req.path}) refused {e.status}: {e.message}")
            req.status, req.note = e.status, e.message
            return h._reply(e.status, e.message.encode())
        except Exception as e:  # noqa: BLE001 - an undecodable request is the sidecar's bug; say so
            self.problems.append(f"{self.kind} request {req.n}: cannot decode: {e!r}")
            req.status, req.note = 400, repr(e)
            return h._reply(400, repr(e).encode())
        with self._lock:
            self.records.extend(recs)
            req.records = len(recs)
            stf = self._store_then_fail
            if stf is not None:
                stf[1] -= 1
                if stf[1] <= 0:
                    self._store_then_fail = None
        if stf is not None:
            req.status, req.note = stf[0], "stored, then failed by the test"
            return h._reply(stf[0], b"lost response")
        status = {"loki": 204}.get(self.kind, 200)
        req.status = status
        h._reply(status, answer, ctype, extra)

    def _control(self, h):
        """The script's control API: /__rx/records, /__rx/requests, /__rx/control?action=..."""
        u = urlsplit(h.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/__rx/records":
            data = [r.__dict__ for r in self.records]
        elif u.path == "/__rx/requests":
            data = [r.__dict__ for r in self.requests]
        elif u.path == "/__rx/control":
            act = q.get("action", "ok")
            if act == "fail":
                self.fail(int(q["status"]), int(q["times"]) if "times" in q else None,
                          int(q["retry_after"]) if "retry_after" in q else None)
            elif act == "slow":
                self.slow(float(q["seconds"]))
            elif act == "hang":
                self.hang()
            elif act == "down":  # comes back by itself: nobody could reach the control API
                secs = float(q.get("seconds", 10))
                threading.Thread(target=lambda: (time.sleep(0.1), self.down(), time.sleep(secs), self.up()), daemon=True).start()
            else:
                self.ok()
            data = {"action": act}
        else:
            return h._reply(404, b"")
        h._reply(200, json.dumps(data, default=str).encode(), "application/json")


def basic_auth(user, password) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=KINDS, default="http")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    rx = LogReceiver(args.kind, args.port)
    print(f"PORT {rx.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        rx.stop()


if __name__ == "__main__":
    main()
