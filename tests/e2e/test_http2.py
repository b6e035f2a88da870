"""Inbound HTTP/2 cleartext (prior knowledge) on the same port as HTTP/1.1, many streams on one
connection, and the `app.http: http2` path to an HTTP/2-only app. Clients: curl and h2."""

import json
import os
import time

from helpers import H2Client, curl, make_config, wait_until

MiB = 1 << 20


def test_prior_knowledge_on_the_http1_port(web):
    r2 = curl("--http2-prior-knowledge", web.url("/"))
    assert r2.returncode == 0, r2.stderr
    assert r2.status == 200
    assert r2.info.get("http_version") == "2"
    assert r2.body == b"hello from app\n"
    r1 = curl("--http1.1", web.url("/"))
    assert r1.status == 200 and r1.info.get("http_version") == "1.1"


def test_h2c_upgrade_request_is_answered(web):
    """curl --http2 asks for h2c with `Upgrade: h2c`; the sidecar may upgrade or answer in
    HTTP/1.1, but the request must succeed."""
    r = curl("--http2", web.url("/"))
    assert r.status == 200, r.stderr
    assert r.body == b"hello from app\n"


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
