"""Graceful drain on SIGTERM, SIGINT and POST /shutdown: /ready 503 at once, listeners closed,
in-flight requests and streams completed, `Connection: close` for HTTP/1, GOAWAY for HTTP/2,
exit 0; bounded by drain_timeout; a second signal exits at once. With `shutdown.drain_delay`,
everything is served as usual (only /ready says 503) for that long first. `sidecar drain`
(the preStop hook) asks for a drain and returns once the process has gone."""

import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from h2_clients import RawH2
from helpers import free_port, http_request, make_config, run_sidecar_cmd, wait_until
from raw_http1 import ConnectionClosed, RawConn


def _in_background(fn, *args, **kw):
    out = {}

    def run():
        try:
            out["result"] = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - reported by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _wait_inflight(app, n=1):
    wait_until(lambda: app.count()["inflight"] >= n, 5, what=f"{n} request(s) in flight at the app")


def _new_connection_refused(port) -> bool:
    """True when a new client cannot get a request served: connect refused, or the connection
    closed/reset without an answer. A hang (accepted by the kernel, never served) is not refused."""
    try:
        c = RawConn(port, timeout=1.5)
    except ConnectionRefusedError:
        return True
    try:
        c.request("/")
        return False
    except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    finally:
        c.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_request_and_exits_0(http_app, start_sidecar, sig):
    sc = start_sidecar(make_config(http_app.port, drain_timeout="10s", request_timeout="30s"))
    port = sc.port("web")
    t, out = _in_background(http_request, port, "/slow?ms=2500", timeout=15)
    _wait_inflight(http_app)
    sc.signal(sig)
    t0 = time.monotonic()
    wait_until(lambda: sc.ready_status() == 503, 0.5, interval=0.02, what="/ready 503 right after the signal")
    body = sc.admin("/ready").body.decode().strip()
    assert body.startswith("not ready: ") and "draining" in re.split(r"[,\s]+", body[len("not ready: "):]), (
        f"/ready during a drain should name `draining`: {body!r}"
    )
    wait_until(lambda: _new_connection_refused(port), 2, what="new connections to be refused during drain")
    assert sc.alive(), "the sidecar exited before its in-flight request finished"
    t.join(10)
    assert "error" not in out, f"in-flight request failed during drain: {out.get('error')!r}"
    r = out["result"]
    assert r.status == 200 and r.body == b"slow done 2500\n"
    rc = sc.wait_exit(5)
    assert rc == 0, f"exit status {rc} after a clean drain"
    assert time.monotonic() - t0 < 5


def test_idle_sidecar_exits_quickly_on_sigterm(web):
    t0 = time.monotonic()
    web.sc.signal(signal.SIGTERM)
    assert web.sc.wait_exit(5) == 0
    assert time.monotonic() - t0 < 2, "an idle sidecar should not wait for drain_timeout"


def test_http1_keep_alive_gets_connection_close_during_drain(http_app, start_sidecar):
    sc = start_sidecar(make_config(http_app.port, drain_timeout="10s"))
    port = sc.port("web")
    busy, idle = RawConn(port), RawConn(port)
    try:
        r = busy.request("/")
        assert r.status == 200 and (r.header("Connection") or "").lower() != "close"
        assert idle.request("/").status == 200
        busy.send(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: e2e.test\r\n\r\n")
        _wait_inflight(http_app)
        sc.signal(signal.SIGTERM)
        r = busy.read_response()
        assert r.status == 200 and r.body == b"slow done 1500\n"
        assert (r.header("Connection") or "").lower() == "close", f"response during drain lacks Connection: close: {r.headers}"
        assert busy.closed_within(3), "the sidecar kept the connection open after Connection: close"
        # The idle keep-alive connection is closed, or its next response says close.
        try:
            r2 = idle.request("/")
            assert (r2.header("Connection") or "").lower() == "close"
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            pass
    finally:
        busy.close()
        idle.close()
    assert sc.wait_exit(5) == 0


def test_http2_gets_goaway_and_in_flight_stream_completes(http_app, start_sidecar):
    sc = start_sidecar(make_config(http_app.port, drain_timeout="10s"))
    c = RawH2(sc.port("web"))
    try:
        c.request(1, "/slow?ms=1500")
        _wait_inflight(http_app)
        sc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not (c.streams[1]["ended"] and c.goaways) and c.pump(0.2):
            pass
    finally:
        c.close()
    res = c.streams[1]
    assert c.goaways, f"no GOAWAY received during drain (connection: {c.closed or 'open'}; stream: {res})"
    assert res["status"] == 200 and res["body"] == b"slow done 1500\n" and res["ended"], (
        f"in-flight HTTP/2 stream did not complete during drain: {res}; GOAWAYs (last_stream_id, code): "
        f"{c.goaways}; connection: {c.closed or 'open'}"
    )
    assert res["reset"] is None
    assert c.goaways[-1][0] >= 1, f"final GOAWAY's last_stream_id {c.goaways[-1][0]} excludes the in-flight stream"
    assert sc.wait_exit(5) == 0


def test_drain_timeout_bounds_the_drain(http_app, start_sidecar):
    sc = start_sidecar(make_config(http_app.port, drain_timeout="1s", request_timeout="120s"))
    _in_background(http_request, sc.port("web"), "/slow?ms=60000", timeout=30)
    _wait_inflight(http_app)
    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    rc = sc.wait_exit(10)
    took = time.monotonic() - t0
    assert took < 4, f"drain_timeout 1s but exit took {took:.1f}s"
    assert took > 0.8, f"exited after {took:.2f}s, before drain_timeout, with a request in flight"
    assert rc == 0


def test_second_signal_exits_at_once(http_app, start_sidecar):
    sc = start_sidecar(make_config(http_app.port, drain_timeout="30s", request_timeout="120s"))
    _in_background(http_request, sc.port("web"), "/slow?ms=60000", timeout=60)
    _wait_inflight(http_app)
    sc.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert sc.alive(), "exited on the first signal despite a request in flight"
    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    rc = sc.wait_exit(5)
    took = time.monotonic() - t0
    assert took < 1.5, f"the second signal took {took:.2f}s to end the process"
    assert rc == 1, f"exit status {rc} after a second signal cut the drain short (INTERFACE: 1)"


def test_post_shutdown_drains_and_exits_0(http_app, start_sidecar):
    sc = start_sidecar(make_config(http_app.port, drain_timeout="10s"))
    t, out = _in_background(http_request, sc.port("web"), "/slow?ms=1500", timeout=15)
    _wait_inflight(http_app)
    r = sc.admin("/shutdown", method="POST")
    sc.stopped_by_test = True
    assert 200 <= r.status < 300, r.status
    wait_until(lambda: sc.ready_status() == 503, 0.5, interval=0.02, what="/ready 503 after POST /shutdown")
    t.join(10)
    assert out.get("result") is not None and out["result"].status == 200, out
    assert sc.wait_exit(5) == 0


def test_get_shutdown_is_not_allowed(web):
    r = web.sc.admin("/shutdown")
    assert r.status in (404, 405), r.status
    time.sleep(0.3)
    web.sc.assert_alive()
    assert web.sc.ready_status() == 200


def _with_delay(cfg, delay):
    cfg["shutdown"]["drain_delay"] = delay
    return cfg


def test_drain_delay_serves_new_connections_while_ready_says_503(http_app, start_sidecar):
    sc = start_sidecar(_with_delay(make_config(http_app.port, drain_timeout="10s"), "2s"))
    port = sc.port("web")
    kept = RawConn(port)
    try:
        assert kept.request("/").status == 200
        t0 = time.monotonic()
        sc.signal(signal.SIGTERM)
        wait_until(lambda: sc.ready_status() == 503, 0.5, interval=0.02, what="/ready 503 right after the signal")
        assert "draining" in sc.admin("/ready").body.decode()
        # Served as if nothing happened: new connections, and keep-alive without `close`.
        served = 0
        while time.monotonic() - t0 < 1.6:
            r = http_request(port, "/", timeout=2)
            assert r.status == 200, f"a new connection during drain_delay got {r.status}"
            k = kept.request("/")
            assert k.status == 200 and (k.header("Connection") or "").lower() != "close", (
                f"keep-alive response during drain_delay: {k.status} {k.headers}"
            )
            assert sc.ready_status() == 503
            served += 1
            time.sleep(0.1)
        assert served >= 5
        # Then the usual drain: new connections refused, the idle keep-alive one closed.
        wait_until(lambda: _new_connection_refused(port), 3, interval=0.05, what="new connections refused after the delay")
        refused_after = time.monotonic() - t0
        assert refused_after > 1.9, f"the listener closed {refused_after:.2f}s after SIGTERM, before drain_delay 2s"
        rc = sc.wait_exit(5)
    finally:
        kept.close()
    assert rc == 0
    took = time.monotonic() - t0
    assert 1.9 < took < 4, f"an idle sidecar with drain_delay 2s exited after {took:.2f}s"


def test_drain_timeout_counts_from_the_end_of_the_delay(http_app, start_sidecar):
    cfg = _with_delay(make_config(http_app.port, drain_timeout="1s", request_timeout="120s"), "1500ms")
    sc = start_sidecar(cfg)
    _in_background(http_request, sc.port("web"), "/slow?ms=60000", timeout=30)
    _wait_inflight(http_app)
    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    rc = sc.wait_exit(10)
    took = time.monotonic() - t0
    assert 2.4 < took < 5, f"drain_delay 1.5s + drain_timeout 1s, but the exit took {took:.2f}s"
    assert rc == 0


def test_second_signal_during_drain_delay_exits_at_once(http_app, start_sidecar):
    sc = start_sidecar(_with_delay(make_config(http_app.port, drain_timeout="10s"), "30s"))
    sc.signal(signal.SIGTERM)
    wait_until(lambda: sc.ready_status() == 503, 0.5, interval=0.02, what="/ready 503 right after the signal")
    assert http_request(sc.port("web"), "/", timeout=2).status == 200
    t0 = time.monotonic()
    sc.signal(signal.SIGINT)
    rc = sc.wait_exit(5)
    assert time.monotonic() - t0 < 1.5
    assert rc == 1, f"exit status {rc} after a second signal cut the delay short (INTERFACE: 1)"


def test_drain_command_asks_for_a_drain_and_returns_once_the_process_is_gone(http_app, start_sidecar):
    sc = start_sidecar(_with_delay(make_config(http_app.port, drain_timeout="10s"), "1s"))
    t, out = _in_background(http_request, sc.port("web"), "/slow?ms=2000", timeout=15)
    _wait_inflight(http_app)
    sc.stopped_by_test = True
    t0 = time.monotonic()
    p = run_sidecar_cmd("drain", "--admin", f"127.0.0.1:{sc.admin_port}", "--timeout", "10s")
    took = time.monotonic() - t0
    assert p.returncode == 0, f"sidecar drain: {p.returncode}\n{p.stderr}"
    # Gone: its admin port refuses connections only once the process exits.
    assert sc.wait_exit(1) == 0
    assert took > 1.5, f"sidecar drain returned after {took:.2f}s, with a 2 s request in flight"
    t.join(5)
    assert out.get("result") is not None and out["result"].status == 200, out
    assert "drained and exited" in p.stderr, p.stderr


def test_drain_command_names_what_is_wrong(http_app, start_sidecar):
    nobody = free_port()
    p = run_sidecar_cmd("drain", "--admin", f"127.0.0.1:{nobody}", "--timeout", "2s")
    assert p.returncode == 1
    assert f"nothing answers at 127.0.0.1:{nobody}" in p.stderr and "admin.listen" in p.stderr, p.stderr

    sc = start_sidecar(make_config(http_app.port, drain_timeout="30s", request_timeout="120s"))
    _in_background(http_request, sc.port("web"), "/slow?ms=60000", timeout=60)
    _wait_inflight(http_app)
    t0 = time.monotonic()
    p = run_sidecar_cmd("drain", "--admin", f"127.0.0.1:{sc.admin_port}", "--timeout", "1s")
    sc.stopped_by_test = True
    assert p.returncode == 1, p.stderr
    assert "still running 1s after it was asked to drain" in p.stderr, p.stderr
    assert 0.9 < time.monotonic() - t0 < 4
    assert sc.alive() and sc.ready_status() == 503


def test_announce_is_the_native_sidecars_prestop_not_ready_but_serving_until_sigterm(http_app, start_sidecar):
    # Kubernetes runs a native sidecar's preStop beside the app's, at deletion, and sends its
    # SIGTERM only after the app has exited: the hook must not stop the sidecar.
    sc = start_sidecar(make_config(http_app.port, drain_timeout="5s"))
    keep = RawConn(sc.port("web"), timeout=3)
    assert keep.request("/").status == 200
    p = run_sidecar_cmd("drain", "--announce", "--admin", f"127.0.0.1:{sc.admin_port}")
    assert p.returncode == 0, p.stderr
    assert sc.ready_status() == 503
    assert "draining" in http_request(sc.admin_port, "/ready").body.decode()
    time.sleep(1.0)
    # New connections and the kept-alive one are served as before, without Connection: close.
    assert http_request(sc.port("web"), "/", timeout=2).status == 200
    r = keep.request("/")
    assert r.status == 200 and (r.header("connection") or "").lower() != "close"
    assert sc.proc.poll() is None, "the announcement alone never stops the sidecar"
    keep.close()
    sc.signal(signal.SIGTERM)
    assert sc.wait_exit(10) == 0


def test_admin_controls_answer_only_loopback_peers_unless_allowed(http_app, start_sidecar):
    # A pod exposes the admin port on 0.0.0.0 for the kubelet and Prometheus; the network
    # must not be able to stop the sidecar or read its config.
    addrs = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    outside = next((a for a in addrs if "." in a and not a.startswith("127.")), None)
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    for remote_control in (False, True):
        cfg = make_config(http_app.port)
        admin = free_port()
        cfg["admin"] = {"listen": f"0.0.0.0:{admin}", "remote_control": remote_control}
        sc = start_sidecar(cfg)
        assert http_request(admin, "/metrics", host=outside).status == 200
        assert http_request(admin, "/ready", host=outside).status == 200
        want = 200 if remote_control else 403
        assert http_request(admin, "/config", host=outside).status == want
        assert http_request(admin, "/log-level", method="PUT", body=b"debug", host=outside).status in ((200,) if remote_control else (403,))
        assert http_request(admin, "/config").status == 200, "loopback peers always may"
        r = http_request(admin, "/prestop", method="POST", host=outside)
        assert r.status == want, r.body
        if not remote_control:
            assert b"admin.remote_control" in r.body
            assert http_request(admin, "/shutdown", method="POST", host=outside).status == 403
            assert sc.proc.poll() is None
        sc.signal(signal.SIGTERM)
        assert sc.wait_exit(10) == 0
