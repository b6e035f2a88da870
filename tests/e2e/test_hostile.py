"""Bad and hostile input: refused with the right status, counted in
sidecar_inbound_rejected_total{listener,reason}, nothing smuggled to the app, the process alive
and other clients served. Raw sockets for HTTP/1, h2 and hand-built frames for HTTP/2."""

import select
import socket
import threading
import time

import hpack
import pytest
from h2.errors import ErrorCodes
from h2.exceptions import H2Error

from h2_clients import H2Client, RawH2, h2_frame
from helpers import RssSampler, Web, curl, make_config, wait_until
from raw_http1 import RawConn, status_or_close


@pytest.fixture
def target(http_app, start_sidecar):
    cfg = make_config(http_app.port, limits={"max_header_bytes": "16KiB", "header_read_timeout": "2s", "max_connections": 2000})
    return Web(http_app, start_sidecar(cfg))


def _assert_rejection_counted(sc, before: dict, reason: str, n=1, at_least=None):
    """sidecar_inbound_rejected_total{listener="web"} grew by n under `reason` (at least
    `at_least` and at most n, when given) and under no other reason. `before` is
    sc.rejected() read before the refused input was sent."""
    lo = n if at_least is None else at_least

    def delta():
        now = sc.rejected()
        return {r: now[r] - before.get(r, 0) for r in now if now[r] != before.get(r, 0)}

    try:
        wait_until(lambda: delta().get(reason, 0) >= lo, 3,
                   what=f'sidecar_inbound_rejected_total{{listener="web",reason="{reason}"}} to grow by {lo}')
        time.sleep(0.1)  # anything counted late, or twice, shows up too
    finally:
        print("rejected_total by reason:", sc.rejected(), "growth:", delta())
    d = delta()
    assert lo <= d.get(reason, 0) <= n, f'reason="{reason}" grew by {d.get(reason, 0)}, expected {n if at_least is None else f"{lo}..{n}"}: {d}'
    assert set(d) == {reason}, f"refusals counted under other reasons too: {d}"


def _assert_still_serving(t: Web):
    t.sc.assert_alive()
    r = curl("--max-time", "3", f"http://127.0.0.1:{t.port}/")
    assert r.status == 200, f"a normal client was not served afterwards: {r.status} {r.stderr}"


# --- header limits ---------------------------------------------------------------------------
def test_headers_over_max_header_bytes_get_431(target):
    c = RawConn(target.port)
    try:
        assert c.request("/", headers=[("X-Big", "a" * 10_000)]).status == 200, "a 10 KB header block is under the 16KiB limit"
    finally:
        c.close()
    rej0 = target.sc.rejected()
    big = b"GET / HTTP/1.1\r\nHost: e2e.test\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    status, _, raw = status_or_close(target.port, big, timeout=3)
    assert status == 431, f"expected 431 for 20 KB of headers, got {raw[:200]!r}"
    _assert_rejection_counted(target.sc, rej0, "headers_too_large")
    _assert_still_serving(target)


def test_too_many_headers_get_431(target):
    rej0 = target.sc.rejected()
    started0 = target.app.count()["started"]
    hdrs = b"".join(b"X-H-%d: v\r\n" % i for i in range(500))  # ~6 KB: under the byte limit
    status, _, raw = status_or_close(target.port, b"GET / HTTP/1.1\r\nHost: e2e.test\r\n" + hdrs + b"\r\n", timeout=3)
    assert status == 431, f"expected 431 for 500 headers, got {raw[:200]!r}"
    assert target.app.count()["started"] == started0
    _assert_rejection_counted(target.sc, rej0, "headers_too_large")
    _assert_still_serving(target)


def test_http2_headers_over_max_header_bytes_are_refused(target):
    started0 = target.app.count()["started"]
    ok = curl("--http2-prior-knowledge", "-H", "X-Big: " + "a" * 10_000, f"http://127.0.0.1:{target.port}/")
    assert ok.status == 200, "a 10 KB header block is under the 16KiB limit"
    r = curl("--http2-prior-knowledge", "-H", "X-Big: " + "a" * 20_000, f"http://127.0.0.1:{target.port}/?too-big")
    print(f"h2 with 20 KB of headers: curl exit {r.returncode}, status {r.status}, {r.stderr.strip()[:200]}")
    assert r.status == 431 or (r.status == 0 and r.returncode != 0), f"expected 431 or a refused stream, got {r.status}"
    assert not any("too-big" in x for x in target.app.count()["recent"]), "the oversized request reached the app"
    assert target.app.count()["started"] == started0 + 1
    _assert_still_serving(target)


# --- request smuggling -----------------------------------------------------------------------
SMUGGLING = {
    "content-length-and-transfer-encoding": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: e2e.test\r\n\r\n",
    "transfer-encoding-and-content-length": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 35\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: e2e.test\r\n\r\n",
    "two-differing-content-lengths": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "content-length-list-differing": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "obs-fold": b"GET /folded HTTP/1.1\r\nHost: e2e.test\r\nX-Folded: a\r\n b\r\n\r\n",
    "bare-lf-everywhere": b"GET /barelf HTTP/1.1\nHost: e2e.test\n\n",
    "bare-lf-in-one-header": b"GET /barelf HTTP/1.1\r\nHost: e2e.test\nX-A: b\r\n\r\n",
}


@pytest.mark.parametrize("payload", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_ambiguous_framing_gets_400_closed_and_never_reaches_the_app(target, payload):
    before = target.app.count()
    rej0 = target.sc.rejected()
    status, closed, raw = status_or_close(target.port, payload, timeout=3)
    assert status == 400, f"expected 400, got {raw[:300]!r}"
    assert raw.count(b"HTTP/1.1 ") == 1, f"more than one response came back: {raw[:500]!r}"
    assert closed, "the connection stayed open after a 400 for ambiguous framing"
    time.sleep(0.3)
    after = target.app.count()
    assert after["started"] == before["started"], f"the app received: {after['recent'][-5:]}"
    _assert_rejection_counted(target.sc, rej0, "smuggling")
    _assert_still_serving(target)


BAD_CHUNKS = {
    "non-hex-size": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "overflowing-size": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    "negative-size": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "bad-size-after-a-good-chunk": b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("payload", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_bad_chunk_size_is_refused_and_no_complete_request_reaches_the_app(target, payload):
    before = target.app.count()
    rej0 = target.sc.rejected()
    status, closed, raw = status_or_close(target.port, payload, timeout=3)
    assert status in (400, None), f"expected 400 or a closed connection, got {raw[:300]!r}"
    assert closed, "the connection stayed open after a bad chunk size"
    time.sleep(0.3)
    after = target.app.count()
    assert after["completed"] == before["completed"], f"the app completed a request from a bad chunked body: {after['recent'][-5:]}"
    print(f"bad chunk: status {status}, app saw {after['started'] - before['started']} request head(s)")
    _assert_rejection_counted(target.sc, rej0, "smuggling")
    _assert_still_serving(target)


# --- slowloris -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_slowloris_is_cut_at_header_read_timeout_and_others_are_served(target):
    n = 1000
    rej0 = target.sc.rejected()
    socks = []
    t_first = time.monotonic()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", target.port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: e2e.test\r\n")
        s.setblocking(False)
        socks.append(s)
    t_all = time.monotonic()
    print(f"{n} trickling connections opened in {t_all - t_first:.2f}s")
    cut = set()
    stop = threading.Event()
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def check_cut():
        for fd, _ in poller.poll(0):
            if fd in cut:
                continue
            cut.add(fd)  # EOF, reset, or an answer (408/400) to an unfinished request: all cut
            poller.unregister(fd)

    def trickle():
        while not stop.is_set():
            for fd, s in by_fd.items():
                if fd in cut:
                    continue
                try:
                    s.send(b"X-a: b\r\n")
                except OSError:
                    pass  # the poller sees the close
            stop.wait(0.3)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        times = []
        for _ in range(3):
            t0 = time.monotonic()
            r = curl("--max-time", "3", f"http://127.0.0.1:{target.port}/")
            times.append(time.monotonic() - t0)
            assert r.status == 200, f"normal client not served during slowloris: {r.status} {r.stderr}"
        print("normal client latencies under slowloris:", [f"{x:.3f}s" for x in times])
        assert max(times) < 2.0

        # Not cut before the timeout (connections opened at t_first..t_all; timeout 2s).
        while time.monotonic() < t_first + 1.2:
            time.sleep(0.05)
        check_cut()
        early = len(cut)
        # Cut by header_read_timeout (2s) plus a margin.
        deadline = t_all + 2.0 + 3.0
        while time.monotonic() < deadline and len(cut) < n:
            check_cut()
            time.sleep(0.05)
        took = time.monotonic() - t_first
        print(f"cut before 1.2s: {early}; cut by {took:.1f}s: {len(cut)} of {n}")
        assert early < n * 0.1, f"{early} of {n} connections cut well before header_read_timeout"
        assert len(cut) >= n * 0.99, f"only {len(cut)} of {n} trickling connections cut within header_read_timeout + 3s"
    finally:
        stop.set()
        t.join(2)
        for s in socks:
            s.close()
    _assert_rejection_counted(target.sc, rej0, "header_timeout", n=n, at_least=int(n * 0.9))
    _assert_still_serving(target)


# --- HTTP/2 ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_http2_rapid_reset_gets_goaway_and_the_process_lives(target):
    c = H2Client(target.port)
    sent = 0
    hdrs = [(":method", "GET"), (":path", "/?rapid-reset"), (":scheme", "http"), (":authority", "e2e.test")]
    t0 = time.monotonic()
    try:
        for _ in range(10):
            try:
                for _ in range(100):
                    sid = c.conn.get_next_available_stream_id()
                    c.conn.send_headers(sid, hdrs, end_stream=True)
                    c.conn.reset_stream(sid, ErrorCodes.CANCEL)
                    sent += 1
                c.flush()
            except (OSError, H2Error):
                break  # the sidecar closed the connection or sent GOAWAY (h2 refuses new streams)
            c.pump(0.01)
            if c.terminated or c.closed or time.monotonic() - t0 > 20:
                break
        deadline = time.monotonic() + 5
        while not (c.terminated or c.closed) and time.monotonic() < deadline:
            c.pump(0.2)
    finally:
        c.close()
    app_saw = sum(1 for x in target.app.count()["recent"] if "rapid-reset" in x)
    print(f"sent {sent} HEADERS+RST_STREAM pairs; GOAWAY: {[(e.error_code, e.last_stream_id) for e in c.terminated]}; "
          f"closed: {c.closed}; app saw >= {app_saw} of them (last 200 shown)")
    assert c.terminated or c.closed, f"no GOAWAY and no close after {sent} HEADERS+RST_STREAM pairs"
    _assert_still_serving(target)
    assert curl("--http2-prior-knowledge", "--max-time", "3", f"http://127.0.0.1:{target.port}/").status == 200


@pytest.mark.timeout(60)
def test_http2_continuation_flood_gets_goaway_with_bounded_memory(target):
    enc = hpack.Encoder()
    block = enc.encode([(":method", "GET"), (":path", "/?continuation"), (":scheme", "http"), (":authority", "e2e.test")])
    # Never-indexed literals leave the HPACK table untouched, so the same bytes stay valid in
    # every CONTINUATION frame.
    flood = enc.encode([("x-flood", "a" * 30, True)] * 100)
    c = RawH2(target.port, timeout=5)
    # The server's SETTINGS, ACKed from this thread; then only the flood writes the socket.
    deadline = time.monotonic() + 5
    while not c.settings_seen and time.monotonic() < deadline and c.pump(0.2):
        pass
    assert c.settings_seen, f"no SETTINGS from the sidecar (connection: {c.closed or 'open'})"
    c.answer = False
    stop = threading.Event()

    def reader():
        end = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < end and not c.goaways and c.pump(0.5):
            pass

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    sent_frames = 0
    with RssSampler(target.sc.pid) as rss:
        try:
            c.sock.sendall(h2_frame(1, 0x1, 1, block))  # HEADERS, END_STREAM, no END_HEADERS
            cont = h2_frame(9, 0, 1, flood) * 100
            t0 = time.monotonic()
            while sent_frames < 10_000 and time.monotonic() - t0 < 20:
                if c.goaways or c.closed:
                    break
                c.sock.sendall(cont)
                sent_frames += 100
        except OSError:
            pass  # closed by the sidecar mid-flood
        rt.join(8)
    stop.set()
    c.close()
    goaway = c.goaways[0][1] if c.goaways else None
    print(f"sent {sent_frames} CONTINUATION frames ({sent_frames * len(flood) / 1e6:.1f} MB of header block); "
          f"GOAWAY error code: {goaway}; closed: {c.closed}; sidecar peak RSS {rss.peak_kib / 1024:.1f} MiB")
    assert c.goaways or c.closed, "the sidecar neither sent GOAWAY nor closed during a CONTINUATION flood"
    assert rss.peak_kib < 128 * 1024, f"sidecar RSS reached {rss.peak_kib / 1024:.1f} MiB during the flood"
    assert not any("continuation" in x for x in target.app.count()["recent"])
    _assert_still_serving(target)


# --- max_connections -------------------------------------------------------------------------
def test_connections_over_max_connections_are_refused_and_counted(http_app, start_sidecar):
    sc = start_sidecar(make_config(http_app.port, limits={"max_connections": 20}))
    port = sc.port("web")
    held = []
    try:
        for i in range(20):
            c = RawConn(port, timeout=5)
            held.append(c)
            assert c.request(f"/?held={i}").status == 200
        rej0 = sc.rejected()
        results = [None] * 10

        def extra(i):
            results[i] = status_or_close(port, b"GET /?extra HTTP/1.1\r\nHost: e2e.test\r\n\r\n", timeout=3)

        threads = [threading.Thread(target=extra, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        summary = [(st, closed) for st, closed, _ in results]
        print("extra connections (status, closed):", summary)
        for st, closed, raw in results:
            assert st != 200, "a connection over max_connections was served"
            assert closed or st == 503, f"an extra connection was neither refused nor closed within 3s (it hangs): {raw[:100]!r}"
        _assert_rejection_counted(sc, rej0, "max_connections", n=10)
        open_now = sc.metrics().value("sidecar_inbound_connections_open", listener="web")
        print("sidecar_inbound_connections_open{listener=web}:", open_now)
        assert open_now <= 20
        # the held connections still work
        assert held[0].request("/?again").status == 200
    finally:
        for c in held:
            c.close()
    sc.assert_alive()
    wait_until(lambda: curl("--max-time", "2", f"http://127.0.0.1:{port}/").status == 200, 5, what="service after the held connections closed")
