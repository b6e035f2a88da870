"""What the app answers, framed exactly as it wrote it: the sidecar's app-side HTTP/1.1 client
(src/proxy/h1) against a raw app that sends chosen bytes per path.

Responses a front-end proxy could read differently from the next hop (both Transfer-Encoding
and Content-Length, differing lengths, bare LF, an unknown coding) become a 502 with the
access-log error `app_invalid_response`, never a response passed on; a response cut short
ends the client's response early; well-formed but unusual framings (chunked with trailers,
close-delimited, interim 1xx, HEAD) come through whole. Other clients carry on throughout.
"""

import socket
import threading
import time

import pytest

from helpers import curl, free_port, http_request, make_config, wait_until
from raw_http1 import RawConn

ANSWERS = {
    "/ok": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "/chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n",
    "/interim": b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes",
    "/until-close": b"HTTP/1.1 200 OK\r\n\r\nread me until the end",
    "/cl-te": b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "/two-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 20\r\n\r\nok",
    "/bare-lf": b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok",
    "/gzip-te": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "/garbage": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "/cut-short": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part",
    "/bad-chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    # Ten of the hundred bytes promised, then nothing, on a connection kept open.
    "/stall": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
}
# Answers after which the app closes the connection (or the framing needs it).
CLOSES = {"/until-close", "/cut-short", "/cl-te", "/two-lengths", "/bare-lf", "/gzip-te", "/garbage", "/bad-chunk"}


class RawApp:
    """A keep-alive app that answers each request head with ANSWERS[path], byte for byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                method, path = head.split(b" ")[:2]
                path = path.decode()
                if path == "/healthz":
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                answer = ANSWERS.get(path, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                if method == b"HEAD":
                    answer = answer.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                conn.sendall(answer)
                if path in CLOSES:
                    return

    def stop(self):
        self.sock.close()


@pytest.fixture
def sc(start_sidecar):
    app = RawApp()
    yield start_sidecar(make_config(app.port, web_port=free_port()))
    app.stop()


@pytest.mark.parametrize(
    "path, body, header",
    [
        ("/ok", b"ok", None),
        ("/chunked", b"hello world", None),
        ("/interim", b"yes", None),
        ("/until-close", b"read me until the end", None),
    ],
)
def test_well_formed_framings_come_through_whole(sc, path, body, header):
    r = curl("-s", f"http://127.0.0.1:{sc.port()}{path}")
    assert (r.status, r.body) == (200, body), r
    # And over HTTP/2 to the client (the app's framing translated, trailers dropped for h1).
    r2 = curl("-s", "--http2-prior-knowledge", f"http://127.0.0.1:{sc.port()}{path}")
    assert (r2.status, r2.body) == (200, body), r2


def test_a_chunked_body_with_trailers_is_re_framed_for_an_http1_client(sc):
    c = RawConn(sc.port())
    c.send(b"GET /chunked HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n")
    resp = c.read_response()
    c.close()
    assert resp.status == 200 and resp.body == b"hello world", resp


def test_head_responses_have_no_body_and_keep_the_connection(sc):
    c = RawConn(sc.port())
    for _ in range(3):
        resp = c.request("/ok", method="HEAD")
        assert resp.status == 200 and resp.header("content-length") == "2" and resp.body == b""
    assert c.request("/ok").body == b"ok"
    c.close()


@pytest.mark.parametrize("path", ["/cl-te", "/two-lengths", "/bare-lf", "/gzip-te", "/garbage"])
def test_ambiguous_or_broken_heads_are_a_502_never_passed_on(sc, path):
    r = http_request(sc.port(), path)
    assert r.status == 502, (r.status, r.body)
    assert b"smuggled" not in r.body
    wait_until(lambda: any(rec.get("path", rec.get("uri", "")).endswith(path) for rec in sc.access_log()), 5, what="the record")
    rec = [rec for rec in sc.access_log() if rec.get("path", rec.get("uri", "")).endswith(path)][-1]
    assert (rec["status"], rec["error"]) == (502, "app_invalid_response"), rec
    # Other requests carry on, on a fresh app connection.
    assert http_request(sc.port(), "/ok").body == b"ok"


@pytest.mark.parametrize("path", ["/cut-short", "/bad-chunk"])
def test_a_body_that_breaks_off_ends_the_clients_response_early(sc, path):
    c = RawConn(sc.port())
    c.send(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    with pytest.raises(Exception):
        c.read_response()  # the head may arrive, the body never completes: the connection closes
    c.close()
    wait_until(lambda: any(rec.get("path", rec.get("uri", "")).endswith(path) for rec in sc.access_log()), 5, what="the record")
    rec = [rec for rec in sc.access_log() if rec.get("path", rec.get("uri", "")).endswith(path)][-1]
    assert rec["error"] == "response_incomplete", rec
    assert http_request(sc.port(), "/ok").body == b"ok"


@pytest.mark.parametrize("path", ["/cl-te", "/two-lengths", "/garbage"])
def test_an_outbound_upstream_answering_garbage_is_a_502_and_others_carry_on(start_sidecar, path):
    """The same client carries outbound calls: an upstream's broken answer is a 502 naming the
    upstream, never passed on, and not retried (it was not a reset)."""
    app = RawApp()
    try:
        port = free_port()
        sc = start_sidecar({
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "outbound": [{"name": "raw", "listen": f"127.0.0.1:{port}", "upstream": {"endpoints": [f"127.0.0.1:{app.port}"], "http": "http1"}}],
            "telemetry": {"access_log": {"enabled": True, "path": "stdout"}},
        })
        r = http_request(port, path)
        assert r.status == 502 and r.body.startswith(b"upstream raw: "), (r.status, r.body)
        assert b"smuggled" not in r.body
        rec = wait_until(lambda: [x for x in sc.access_log() if x.get("path", "").endswith(path)], 5, what="the record")[-1]
        assert (rec["direction"], rec["error"]) == ("outbound", "upstream_invalid_response"), rec
        assert sc.metrics().value("sidecar_outbound_retries_total", upstream="raw") == 0
        assert http_request(port, "/ok").body == b"ok"
    finally:
        app.stop()


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_body_that_stalls_is_cut_after_idle_timeout(start_sidecar, direction):
    """An app or upstream that sends part of a body and then nothing: after `idle_timeout`
    with no bytes either way the client's connection is closed (nginx's proxy_read_timeout),
    and the record says the response was incomplete."""
    app = RawApp()
    try:
        port = free_port()
        limits = {"idle_timeout": "1s", "header_read_timeout": "10s"}
        if direction == "inbound":
            cfg = make_config(app.port, web_port=port, limits=limits)
        else:
            cfg = {
                "admin": {"listen": f"127.0.0.1:{free_port()}"},
                "outbound": [{"name": "raw", "listen": f"127.0.0.1:{port}", "limits": limits,
                              "upstream": {"endpoints": [f"127.0.0.1:{app.port}"], "http": "http1"}}],
                "telemetry": {"access_log": {"enabled": True, "path": "stdout"}},
            }
        sc = start_sidecar(cfg)
        c = RawConn(port)
        c.send(b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n")
        started = time.monotonic()
        with pytest.raises(Exception):
            c.read_response()
        took = time.monotonic() - started
        c.close()
        assert 0.8 < took < 5, f"stalled response cut after {took:.1f}s with idle_timeout 1s"
        rec = wait_until(lambda: [x for x in sc.access_log() if x.get("path", "").endswith("/stall")], 5, what="the record")[-1]
        assert rec["error"] == "response_incomplete", rec
        assert http_request(port, "/ok").body == b"ok"
    finally:
        app.stop()
