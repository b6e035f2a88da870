"""Outbound protocol translation and connect timeouts: an HTTP/1.1 app to an HTTP/2 upstream (the `h2` library's
server), an HTTP/2 app (curl --http2-prior-knowledge) to an HTTP/1.1 upstream, `http: auto`
finding out which one an endpoint speaks, and gRPC (grpcio both ends) through an outbound
listener, which needs HTTP/2 end to end."""

import json

import grpc
import pytest

from helpers import HttpApp, curl, free_port, http_request

pytestmark = pytest.mark.timeout(60)


def outbound(port, http, name="up"):
    listen = free_port()
    cfg = {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "outbound": [{"name": name, "listen": f"127.0.0.1:{listen}", "upstream": {"endpoints": [f"127.0.0.1:{port}"], "http": http}}],
    }
    return cfg, listen


@pytest.mark.parametrize("http", ["http2", "auto"])
def test_http1_app_to_http2_upstream(h2_app, start_sidecar, http):
    cfg, port = outbound(h2_app.port, http)
    start_sidecar(cfg)
    for i in range(5):
        r = http_request(port, f"/n/{i}", method="POST", body=b"x" * 100)
        assert r.status == 200, r.body
        doc = r.json()
        assert doc["proto"] == "h2" and doc["path"] == f"/n/{i}" and doc["body_bytes"] == 100
    # Five calls from five app connections, multiplexed on one upstream connection.
    assert doc["conn_streams"] == 5, doc


@pytest.mark.parametrize("http", ["http1", "auto"])
def test_http2_app_to_http1_upstream(log_dir, start_sidecar, http):
    app = HttpApp(log_dir)
    try:
        cfg, port = outbound(app.port, http)
        start_sidecar(cfg)
        r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/headers")
        assert r.status == 200 and r.info.get("http_version") == "2", (r.info, r.stderr)
        doc = json.loads(r.body)
        assert doc["method"] == "GET" and doc["path"] == "/headers", doc
    finally:
        app.stop()


def test_grpc_through_an_outbound_listener(grpc_app, grpc_stubs, start_sidecar):
    _, pb2, pb2_grpc = grpc_stubs
    cfg, port = outbound(grpc_app.port, "http2", name="echo")
    sc = start_sidecar(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        stub = pb2_grpc.EchoStub(channel)
        resp, call = stub.Unary.with_call(pb2.Msg(text="hi", payload=b"p" * 10), metadata=(("x-client", "abc"),), timeout=5)
        assert resp.text == "hi" and call.code() == grpc.StatusCode.OK
        assert dict(call.trailing_metadata()).get("x-trailer") == "trail-hi"
        got = [m.text for m in stub.ServerStream(pb2.Msg(text="s", count=3), timeout=5)]
        assert len(got) == 3
    finally:
        channel.close()
    assert sc.metrics().value("sidecar_outbound_requests_total", upstream="echo", status_code="200") >= 2


def test_tcp_outbound_balances_connections_and_skips_a_dead_endpoint(tcp_app, start_sidecar):
    import socket

    dead = free_port()
    listen = free_port()
    cfg = {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "outbound": [{
            "name": "db", "listen": f"127.0.0.1:{listen}", "protocol": "tcp", "balance": "round-robin",
            "upstream": {"endpoints": [f"127.0.0.1:{dead}", f"127.0.0.1:{tcp_app.port}"]},
        }],
    }
    sc = start_sidecar(cfg)
    for i in range(6):
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as s:
            s.settimeout(5)
            f = s.makefile("rb")
            assert f.readline() == b"BANNER\n"
            s.sendall(b"ping %d\n" % i)
            assert f.readline() == b"ping %d\n" % i
            s.shutdown(socket.SHUT_WR)
            assert f.readline().startswith(b"FINAL")
    m = sc.metrics()
    assert m.value("sidecar_outbound_connect_errors_total", upstream="db", reason="connection_refused") >= 1
    assert m.value("sidecar_outbound_retries_total", upstream="db") >= 1


def test_a_connect_timeout_is_a_504_that_says_so(start_sidecar):
    """An endpoint whose accept queue is full drops SYNs: the connect times out, and the app
    gets 504 naming `connect_timeout`, like the other timeouts."""
    import socket

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the queue; never accepted
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        cfg, listen = outbound(port, "http1", name="stuck")
        cfg["outbound"][0].update({"connect_timeout": "200ms", "retry": {"attempts": 1}})
        start_sidecar(cfg)
        r = http_request(listen, "/", timeout=10)
        assert r.status == 504 and b"upstream stuck" in r.body and b"connect_timeout" in r.body, (r.status, r.body)
    finally:
        for s in fillers:
            s.close()
        full.close()
