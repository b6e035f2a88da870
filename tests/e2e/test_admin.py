"""The admin server: /live, /ready gated on the app's health (3 failures in a row), /metrics,
/config, /log-level, and its default 127.0.0.1:15000 bind."""

import re
import time

import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from helpers import AppProcess, Metrics, free_port, http_request, make_config, port_is_free, wait_until
from raw_http1 import RawConn, status_or_close


def _ready_metric(sc):
    return sc.metrics().value("sidecar_app_ready")


def test_live_and_ready_with_healthy_app(web):
    assert web.sc.admin("/live").status == 200
    assert web.sc.admin("/ready").status == 200
    wait_until(lambda: _ready_metric(web.sc) == 1, 3, what="sidecar_app_ready 1")


def test_ready_follows_app_health(http_app_factory, start_sidecar):
    app = http_app_factory(unhealthy=True)
    sc = start_sidecar(make_config(app.port, interval="200ms"), wait="live")
    # Unhealthy app: live but not ready.
    for _ in range(10):
        assert sc.ready_status() == 503
        time.sleep(0.1)
    assert _ready_metric(sc) == 0
    assert app.count()["health_checks"] >= 2, "the sidecar never called the app's /healthz"

    app.set_health(True)
    wait_until(lambda: sc.ready_status() == 200, 3, what="/ready 200 after the app turned healthy")
    assert _ready_metric(sc) == 1

    # Two failures in a row are not enough to turn unready.
    checks0 = app.count()["health_checks"]
    app.fail_next_health_checks(2)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert sc.ready_status() == 200, "/ready dropped after fewer than 3 failed health checks"
        time.sleep(0.05)
    assert app.count()["health_checks"] - checks0 >= 4, "health checks are not running every 200ms"

    # Three (and more) in a row are.
    app.set_health(False)
    t0 = time.monotonic()
    wait_until(lambda: sc.ready_status() == 503, 3, what="/ready 503 after 3 failed health checks")
    took = time.monotonic() - t0
    assert took > 0.3, f"/ready dropped {took:.2f}s after the first failure: sooner than 3 checks 200ms apart"
    assert _ready_metric(sc) == 0
    assert sc.admin("/live").status == 200

    app.set_health(True)
    wait_until(lambda: sc.ready_status() == 200, 3, what="/ready 200 after recovery")
    assert _ready_metric(sc) == 1


def test_ready_without_health_path_is_a_tcp_connect(http_app_factory, start_sidecar):
    app = http_app_factory()
    sc = start_sidecar(make_config(app.port, health_path=None))
    assert sc.ready_status() == 200
    app.stop()
    wait_until(lambda: sc.ready_status() == 503, 6, what="/ready 503 once the app stopped listening")
    assert sc.admin("/live").status == 200


def _not_ready_names(sc):
    """(status, names) from /ready: `not ready: NAMES` lists what is not ready by name."""
    r = sc.admin("/ready", timeout=2)
    body = r.body.decode().strip()
    if r.status == 200:
        return r.status, body
    m = re.fullmatch(r"not ready: (.+)", body)
    assert m, f"/ready answered {r.status} with {body!r}, not `not ready: NAMES`"
    return r.status, sorted(n for n in re.split(r"[,\s]+", m.group(1)) if n)


def test_ready_names_what_is_not_ready(log_dir, start_sidecar):
    """Issue 9: readiness is a set of named tasks; /ready names the ones not ready yet. With
    the app not started, the only one is `app`; once it listens, 200 `ready`."""
    port = free_port()
    sc = start_sidecar(make_config(port, health_path=None, interval="200ms"), wait="live")
    try:
        wait_until(lambda: _not_ready_names(sc) == (503, ["app"]), 5, what="/ready 503 `not ready: app` while the app is down")
    finally:
        print("/ready:", sc.admin("/ready").status, sc.admin("/ready").body)
    app = AppProcess("http_app.py", "--port", port, log_dir=log_dir)
    try:
        wait_until(lambda: _not_ready_names(sc) == (200, "ready"), 5, what="/ready 200 `ready` once the app listens")
    finally:
        app.stop()


def test_metrics_parse_and_name_the_contract_families(web):
    for _ in range(2):
        http_request(web.port, "/")
    r = web.sc.admin("/metrics")
    assert r.status == 200
    ctype = r.header("Content-Type") or ""
    assert ctype.startswith("text/plain") or ctype.startswith("application/openmetrics-text"), ctype
    m = Metrics(r.body.decode())
    for name in ("sidecar_app_ready", "sidecar_inbound_requests_total", "sidecar_inbound_request_duration_seconds_bucket", "sidecar_inbound_connections_open"):
        assert m.has(name), f"/metrics lacks {name}"
    assert any(lab.get("listener") == "web" for lab, _ in m.series("sidecar_inbound_connections_open"))


def test_connections_open_gauge_follows_connections(web):
    def gauge():
        return web.sc.metrics().value("sidecar_inbound_connections_open", listener="web")

    base = gauge()
    conns = [RawConn(web.port) for _ in range(5)]
    try:
        for c in conns:
            assert c.request("/").status == 200
        wait_until(lambda: gauge() >= base + 5, 3, what="connections_open to count 5 more")
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: gauge() <= base, 3, what="connections_open back down after the clients closed")


def test_metrics_openmetrics_when_asked(web):
    http_request(web.port, "/")
    r = web.sc.admin("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status == 200
    assert (r.header("Content-Type") or "").startswith("application/openmetrics-text")
    names = {s.name for fam in parse_openmetrics(r.body.decode()) for s in fam.samples}  # strict parser: needs # EOF
    assert "sidecar_inbound_requests_total" in names


def test_config_endpoint_returns_the_running_config(web):
    r = web.sc.admin("/config")
    assert r.status == 200
    doc = yaml.safe_load(r.body)  # YAML or JSON
    assert isinstance(doc, dict), doc
    text = r.body.decode()
    assert f"127.0.0.1:{web.port}" in text
    assert f"127.0.0.1:{web.app.port}" in text
    assert doc["inbound"][0]["name"] == "web"


def test_log_level_read_and_change(web):
    r = web.sc.admin("/log-level")
    assert r.status == 200
    assert "info" in r.body.decode().lower()

    r = web.sc.admin("/log-level", method="PUT", body=b"debug")
    assert 200 <= r.status < 300, (r.status, r.body)
    assert "debug" in web.sc.admin("/log-level").body.decode().lower()

    r = web.sc.admin("/log-level", method="PUT", body=b"sidecar=trace,warn")
    assert 200 <= r.status < 300, (r.status, r.body)
    now = web.sc.admin("/log-level").body.decode().lower()
    assert "sidecar=trace" in now, now

    r = web.sc.admin("/log-level", method="PUT", body=b"sidecar=[[notalevel")
    assert 400 <= r.status < 500, f"a bad filter must be refused, got {r.status}"
    assert web.sc.admin("/log-level").body.decode().lower() == now, "a refused filter changed the level"
    assert http_request(web.port, "/").status == 200


def _debug_lines(sc) -> int:
    return sum(1 for line in sc.stderr_text().splitlines() if " DEBUG " in line or '"level":"DEBUG"' in line.replace(" ", ""))


def test_log_level_change_takes_effect(web):
    """Traffic that has something to say at debug level (a failing health check, a refused
    request) logs nothing at DEBUG under `info`, and does after PUT /log-level debug."""

    def noisy_traffic():
        web.app.fail_next_health_checks(1)
        status_or_close(web.port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", timeout=1)
        http_request(web.port, "/status/500")
        time.sleep(0.6)  # a few health-check intervals

    noisy_traffic()
    assert _debug_lines(web.sc) == 0, "DEBUG lines logged at level info"
    assert 200 <= web.sc.admin("/log-level", method="PUT", body=b"debug").status < 300
    noisy_traffic()
    wait_until(lambda: _debug_lines(web.sc) > 0, 3, what="DEBUG lines on stderr after PUT /log-level debug")
    assert 200 <= web.sc.admin("/log-level", method="PUT", body=b"info").status < 300
    n = _debug_lines(web.sc)
    noisy_traffic()
    assert _debug_lines(web.sc) == n, "DEBUG lines still logged after PUT /log-level info"


def _listening(port):
    """Local addresses (hex, as in /proc/net/tcp*) listening on port."""
    out = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, p = parts[1].rsplit(":", 1)
            if int(p, 16) == port and parts[3] == "0A":  # 0A = LISTEN
                out.append(addr)
    return out


def test_admin_defaults_to_loopback_15000(http_app, start_sidecar):
    if not port_is_free(15000):
        pytest.skip("port 15000 is in use on this machine")
    cfg = make_config(http_app.port)
    del cfg["admin"]
    sc = start_sidecar(cfg, wait="live")
    assert sc.admin_port == 15000
    assert http_request(15000, "/live").status == 200
    addrs = _listening(15000)
    assert addrs == ["0100007F"], f"admin listens on {addrs} (hex); expected only 127.0.0.1"
