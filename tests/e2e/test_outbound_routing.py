"""Routing by host on one outbound listener: an app that honours HTTP_PROXY (here curl -x,
and Python's urllib reading HTTP_PROXY) reaches `http://orders/` and `http://payments/` through
one sidecar port, and any other host is refused with 403 and a counted reason."""

import json
import os
import subprocess
import sys

import pytest

from helpers import HttpApp, curl, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def two_apps(log_dir):
    a, b = HttpApp(log_dir), HttpApp(log_dir)
    yield a, b
    a.stop()
    b.stop()


def shared_listener(a, b):
    listen = free_port()
    entry = lambda name, hosts, app: {  # noqa: E731
        "name": name, "listen": f"127.0.0.1:{listen}", "hosts": hosts,
        "upstream": {"endpoints": [f"127.0.0.1:{app.port}"], "http": "http1"},
    }
    cfg = {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "outbound": [entry("orders", ["orders", "orders.default.svc.cluster.local"], a), entry("payments", ["payments"], b)],
        "telemetry": {"access_log": {"enabled": True, "path": "stdout"}},
    }
    return cfg, f"http://127.0.0.1:{listen}"


def test_http_proxy_clients_reach_each_upstream_by_name(two_apps, start_sidecar):
    a, b = two_apps
    cfg, proxy = shared_listener(a, b)
    sc = start_sidecar(cfg)
    r = curl("--noproxy", "", "-x", proxy, "http://orders/headers?x=1")
    assert r.status == 200, (r.body, r.stderr)
    doc = json.loads(r.body)
    assert doc["path"] == "/headers?x=1"
    assert dict((k.lower(), v) for k, v in doc["headers"])["host"] == "orders"
    r = curl("--noproxy", "", "-x", proxy, "http://orders.default.svc.cluster.local:8080/headers")
    assert r.status == 200 and json.loads(r.body)["path"] == "/headers"
    r = curl("--noproxy", "", "-x", proxy, "http://payments/headers")
    assert r.status == 200
    assert a.count()["completed"] == 2 and b.count()["completed"] == 1
    # An app that sets Host itself, without a proxy, routes the same way.
    r = curl("-H", "Host: payments", f"{proxy}/headers")
    assert r.status == 200 and b.count()["completed"] == 2
    m = sc.metrics()
    assert m.value("sidecar_outbound_requests_total", upstream="orders", status_code="200") == 2
    assert m.value("sidecar_outbound_requests_total", upstream="payments", status_code="200") == 2


def test_python_urllib_with_http_proxy_env(two_apps, start_sidecar):
    a, b = two_apps
    cfg, proxy = shared_listener(a, b)
    start_sidecar(cfg)
    code = "import urllib.request; print(urllib.request.urlopen('http://payments/headers', timeout=5).status)"
    env = {**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "200", out.stderr
    assert b.count()["completed"] == 1 and a.count()["completed"] == 0


def test_other_hosts_are_refused_never_proxied(two_apps, start_sidecar):
    a, b = two_apps
    cfg, proxy = shared_listener(a, b)
    sc = start_sidecar(cfg)
    for target in ("http://example.com/", "http://127.0.0.1:1/", "http://orders.evil/"):
        r = curl("--noproxy", "", "-x", proxy, target)
        assert r.status == 403, (target, r.status, r.body)
        assert b"no upstream is configured for host" in r.body
    r = curl(f"{proxy}/")  # Host: the sidecar's own address
    assert r.status == 403
    assert a.count()["completed"] == 0 and b.count()["completed"] == 0
    rejected = sc.metrics().value("sidecar_outbound_rejected_total", upstream="orders", reason="unknown_host")
    assert rejected == 4
