"""Inbound HTTP/2 cleartext (prior knowledge) on the same port as HTTP/1.1, many streams on one
connection, and the `app.http: http2` path to an HTTP/2-only app. Clients: curl and h2."""

import json
import os
import re
import subprocess
import time

import pytest

from h2_clients import H2Client
from helpers import AppProcess, curl, make_config, wait_until

MiB = 1 << 20


def test_prior_knowledge_on_the_http1_port(web):
    r2 = curl("--http2-prior-knowledge", web.url("/"))
    assert r2.returncode == 0, r2.stderr
    assert r2.status == 200
    assert r2.info.get("http_version") == "2"
    assert r2.body == b"hello from app\n"
    r1 = curl("--http1.1", web.url("/"))
    assert r1.status == 200 and r1.info.get("http_version") == "1.1"


def test_h2c_upgrade_request_is_answered_in_http1_and_not_forwarded(web):
    """curl --http2 on http:// asks for h2c with `Upgrade: h2c`, `HTTP2-Settings` and
    `Connection: Upgrade, HTTP2-Settings`. The sidecar answers in HTTP/1.1 (no 101, no switch
    to h2: prior knowledge is how h2c reaches it), and none of it reaches the app: they are
    hop-by-hop headers for the sidecar, not for the app."""
    r = curl("-v", "--http2", web.url("/headers"))
    assert r.status == 200, r.stderr
    assert r.info.get("http_version") == "1.1", f"answered in HTTP/{r.info.get('http_version')}"
    assert " 101 " not in r.raw_headers and "HTTP/2" not in r.raw_headers, r.raw_headers
    assert "Upgrade: h2c" in r.stderr, f"curl did not ask for the upgrade; the test proves nothing:\n{r.stderr}"
    got = json.loads(r.body)
    assert got["version"] == "HTTP/1.1", got
    names = {k.lower(): v for k, v in got["headers"]}
    assert "upgrade" not in names, f"Upgrade reached the app: {got['headers']}"
    assert "http2-settings" not in names, f"HTTP2-Settings reached the app: {got['headers']}"
    for token in ("upgrade", "http2-settings"):
        assert token not in names.get("connection", "").lower(), f"Connection: {names['connection']} reached the app"


def test_h2_request_and_response_bodies(web, tmp_path):
    data = os.urandom(MiB + 123)
    f = tmp_path / "body"
    f.write_bytes(data)
    r = curl("--http2-prior-knowledge", "--data-binary", f"@{f}", web.url("/echo"))
    assert r.status == 200, r.stderr
    assert r.body == data
    r = curl("--http2-prior-knowledge", web.url("/big?bytes=5000000"))
    assert r.status == 200 and len(r.body) == 5_000_000


def test_many_concurrent_streams_on_one_connection(web):
    """50 streams of a 500 ms request on one connection finish together, not one after another."""
    c = H2Client(web.port)
    try:
        t0 = time.monotonic()
        sids = [c.request(f"/slow?ms=500&i={i}") for i in range(50)]
        res = c.wait(sids, timeout=20)
        took = time.monotonic() - t0
    finally:
        c.close()
    statuses = [res[s]["status"] for s in sids]
    assert statuses == [200] * 50, statuses
    assert all(res[s]["body"] == b"slow done 500\n" for s in sids)
    assert took < 5, f"50 concurrent 500 ms streams took {took:.1f}s"


def test_h2_access_log_says_http2(web):
    assert curl("--http2-prior-knowledge", web.url("/status/202?h2=1")).status == 202
    recs = wait_until(lambda: [r for r in web.sc.access_log() if str(r.get("path")).startswith("/status/202")], 5, what="h2 access-log record")
    assert recs[-1]["protocol"] == "HTTP/2", recs[-1]


def test_app_http2_serves_http1_and_http2_clients(h2_app, start_sidecar):
    sc = start_sidecar(make_config(h2_app.port, app_http="http2"))
    url = f"http://127.0.0.1:{sc.port('web')}"
    conn_ids = []
    for flag in ("--http1.1", "--http2-prior-knowledge") * 5:
        r = curl(flag, "-H", "X-Probe: 1", f"{url}/via?flag={flag}")
        assert r.status == 200, (flag, r.status, r.body)
        got = json.loads(r.body)
        assert got["proto"] == "h2"
        assert got["path"] == f"/via?flag={flag}"
        assert got["method"] == "GET"
        names = {k.lower() for k, _ in got["headers"]}
        assert "x-probe" in names
        assert "x-forwarded-for" in names
        conn_ids.append(got["conn_id"])
    assert len(set(conn_ids)) <= 2, f"10 requests used {len(set(conn_ids))} HTTP/2 connections to the app: {conn_ids}"


def test_app_http2_concurrent_streams(h2_app, start_sidecar):
    sc = start_sidecar(make_config(h2_app.port, app_http="http2"))
    c = H2Client(sc.port("web"))
    try:
        sids = [c.request(f"/s/{i}", method="POST", body=b"z" * (i + 1)) for i in range(30)]
        res = c.wait(sids, timeout=10)
    finally:
        c.close()
    for i, s in enumerate(sids):
        assert res[s]["status"] == 200, res[s]
        got = json.loads(res[s]["body"])
        assert got["path"] == f"/s/{i}" and got["body_bytes"] == i + 1


def test_auto_serves_http2_clients_in_front_of_an_http1_only_app(http_app, start_sidecar):
    """`app.http: auto` is the default and INTERFACE.md reads it as "what the app speaks":
    most apps speak only HTTP/1.1, and an HTTP/2 client must still reach them."""
    sc = start_sidecar(make_config(http_app.port, app_http="auto"))
    url = f"http://127.0.0.1:{sc.port('web')}/"
    assert curl("--http1.1", url).status == 200
    r = curl("--http2-prior-knowledge", url)
    assert r.status == 200, f"h2 client -> sidecar (app.http: auto) -> HTTP/1.1 app answered {r.status} {r.body!r}"
    assert r.body == b"hello from app\n"


def _h2load(url, *args, timeout=30.0) -> tuple[dict, str]:
    """Runs h2load (nghttp2-client) against url; returns ({"2xx": n, ...}, its output)."""
    p = subprocess.run(["h2load", *map(str, args), url], capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    assert m, f"h2load printed no status-code line (exit {p.returncode}):\n{out}"
    return dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()))), out


@pytest.mark.timeout(60)
def test_burst_of_streams_to_a_small_backlog_app_all_succeed(log_dir, start_sidecar):
    """Issue 9, bug 7. Python's plain HTTPServer (single-threaded, accept backlog 5, HTTP/1.0:
    one connection per request) behind the sidecar with the default connect_timeout of 1s. 20
    concurrent streams on one client connection make the sidecar need 20 app connections at
    once; the SYNs beyond the backlog are dropped and resent by the kernel only after 1 s. A
    connect that failed sent nothing, so it is safe to retry (and requests may wait for a
    connection another one returns): every request must succeed, as with nginx and HAProxy."""
    app = AppProcess("backlog_app.py", log_dir=log_dir)
    try:
        sc = start_sidecar(make_config(app.port, app_http="http1", health_path="/healthz", interval="1s"))
        assert "connect_timeout" not in sc.cfg["inbound"][0], "this test is about the default connect_timeout (1s)"
        url = f"http://127.0.0.1:{sc.port('web')}/"
        m0 = sc.metrics()
        codes, out = _h2load(url, "-c1", "-m20", "-n40")
        print("\n".join(line for line in out.splitlines() if not line.startswith("progress:")))
        m1 = sc.metrics()
        bad = {lab["status_code"]: v - m0.value("sidecar_inbound_requests_total", **lab)
               for lab, v in m1.series("sidecar_inbound_requests_total")
               if lab.get("listener") == "web" and lab.get("status_code") != "200"}
        errors = [r.get("error") for r in sc.access_log() if r.get("status") != 200]
        assert codes["2xx"] == 40, (
            f"{40 - codes['2xx']} of 40 concurrent requests to a backlog-5 app failed: {codes}; "
            f"sidecar statuses other than 200: {bad}; access-log errors: {sorted(set(map(str, errors)))}"
        )
        sc.assert_alive()
    finally:
        app.stop()
