"""Outbound ("ambassador") listeners: the app calls 127.0.0.1:PORT and the sidecar carries the
call to an upstream's endpoints, here real "pods" (apps/upstream_app.py) on their own loopback
addresses (127.0.0.11, .12, ... sharing one port) and names answered by a real DNS server
(apps/dns_server.py, dnslib on port 53 of a 127.53.x.y address, given to the sidecar through
`upstream.resolv_conf`). Checked: Host rewrite, balancing round slow / failing / killed pods,
ejection, the retry budget, body replay limits, DNS changes and drains, timeouts, and `check`.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import signal
import socket
import threading
import time
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import LOCALHOST, AppProcess, free_port, http_request, run_sidecar_cmd, wait_until


# --------------------------------------------------------------------------------------------
# the pods, the DNS server, configs and clients
# --------------------------------------------------------------------------------------------
class Pod(AppProcess):
    """One upstream pod on `host` (a 127.x address); port 0 picks one."""

    def __init__(self, log_dir, host, port=0, status=200, delay_ms=0):
        super().__init__(
            "upstream_app.py", "--host", host, "--port", port, "--status", status, "--delay-ms", delay_ms,
            log_dir=log_dir, tag=f"pod-{host}",
        )
        self.host = host
        self.final = None  # the counts it printed when killed

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    def stats(self) -> dict:
        if self.final is not None:
            return self.final
        return http_request(self.port, "/__stats", host=self.host, timeout=5).json()

    def total(self) -> int:
        return self.stats()["total"]

    def kill(self):
        """SIGTERM: the pod prints what it saw and exits at once, mid-request or not."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=5)
        stats = [line for line in out.decode().splitlines() if line.startswith("STATS ")]
        assert stats, f"killed pod {self.address} printed no STATS line: {out!r}"
        self.final = json.loads(stats[-1][6:])

    def stop(self):
        if self.final is None and self.proc.poll() is None:
            self.kill()
        super().stop()


@pytest.fixture
def pods(log_dir):
    """pods(hosts, **kw) -> [Pod] on one port, one per host (stopped at teardown)."""
    started = []

    def start(hosts, **kw):
        first = Pod(log_dir, hosts[0], **kw.get(hosts[0], {}))
        started.append(first)
        for h in hosts[1:]:
            started.append(Pod(log_dir, h, port=first.port, **kw.get(h, {})))
        return started[-len(hosts):]

    yield start
    for p in started:
        p.stop()


class Dns:
    def __init__(self, tmp_path, log_dir):
        self.zone_path = tmp_path / "zone.json"
        self.zone = {}
        self._write()
        for _ in range(5):  # a random address: no clash with other runs on this machine
            self.host = f"127.53.{random.randint(1, 254)}.{random.randint(2, 254)}"
            try:
                self.proc = AppProcess("dns_server.py", "--host", self.host, "--zone", self.zone_path, log_dir=log_dir, tag="dns")
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("the DNS server could not bind port 53 (root is needed)")
        self.resolv_conf = tmp_path / "resolv.conf"
        self.resolv_conf.write_text(f"nameserver {self.host}\noptions ndots:1 timeout:1 attempts:2\n")

    def _write(self):
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.zone))
        os.replace(tmp, self.zone_path)

    def set(self, name, ips, ttl=1):
        self.zone[name] = {"a": list(ips), "ttl": ttl}
        self._write()


@pytest.fixture
def dns(tmp_path, log_dir):
    d = Dns(tmp_path, log_dir)
    yield d
    d.proc.stop()


def outbound(name, endpoints, upstream=None, **kw):
    o = {
        "name": name,
        "listen": f"{LOCALHOST}:{free_port()}",
        "protocol": "http",
        "upstream": {"endpoints": list(endpoints), "http": "http1", **(upstream or {})},
        "connect_timeout": "1s",
        "request_timeout": "10s",
    }
    o.update(kw)
    return o


def config(*outbounds, **top):
    return {
        "admin": {"listen": f"{LOCALHOST}:{free_port()}"},
        "outbound": list(outbounds),
        "telemetry": {"log_level": "info", "access_log": {"enabled": True, "format": "json", "path": "stdout"}},
        "shutdown": {"drain_timeout": "2s"},
        "runtime": {"worker_threads": 2},
        **top,
    }


def oport(sc, name) -> int:
    return next(int(o["listen"].rsplit(":", 1)[1]) for o in sc.cfg["outbound"] if o["name"] == name)


def endpoints(sc, upstream) -> dict:
    return {
        lab["state"]: v
        for lab, v in sc.metrics().series("sidecar_outbound_endpoints")
        if lab.get("upstream") == upstream
    }


def timed(port, path="/", **kw):
    t0 = time.monotonic()
    r = http_request(port, path, **kw)
    return r, time.monotonic() - t0


_loads = []


@pytest.fixture(autouse=True)
def _stop_loads():
    """A test that fails mid-load leaves no client threads running into the next tests."""
    yield
    while _loads:
        _loads.pop()._stop.set()


class Load:
    """Keep-alive GETs from `threads` threads, each on its own connection, until `n` were sent
    (or stop()); results are (status, pod that answered, body) in order of completion."""

    def __init__(self, port, n=None, threads=4, path="/", method="GET"):
        _loads.append(self)
        self.port, self.n, self.path, self.method = port, n, path, method
        self.results = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued = itertools.count()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        conn = http.client.HTTPConnection(LOCALHOST, self.port, timeout=10)
        while not self._stop.is_set() and (self.n is None or next(self._issued) < self.n):
            try:
                conn.request(self.method, self.path)
                r = conn.getresponse()
                res = (r.status, r.getheader("X-Served-By"), r.read())
            except (OSError, http.client.HTTPException) as e:
                res = (0, None, repr(e).encode())
                conn.close()
                time.sleep(0.01)
                conn = http.client.HTTPConnection(LOCALHOST, self.port, timeout=10)
            with self._lock:
                self.results.append(res)
        conn.close()

    def done(self) -> int:
        with self._lock:
            return len(self.results)

    def join(self, timeout=30):
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), f"load still running after {timeout}s ({self.done()} done)"
        return self.results

    def stop(self):
        self._stop.set()
        return self.join()


def failures(results):
    bad = [(s, b[:200]) for s, _, b in results if s != 200]
    return bad, Counter(s for s, _, _ in results)


# --------------------------------------------------------------------------------------------
# 1. the basics
# --------------------------------------------------------------------------------------------
def test_get_post_host_rewrite_access_log_and_metrics(start_sidecar, pods):
    (pod,) = pods(["127.0.0.31"])
    sc = start_sidecar(config(outbound("orders", [pod.address])))
    port = oport(sc, "orders")

    r = http_request(port, "/hello?x=1")  # Host: 127.0.0.1:PORT, the sidecar itself
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["served_by"] == pod.address and seen["path"] == "/hello?x=1"
    assert seen["host"] == pod.address, "Host naming the sidecar becomes the first endpoint as written"
    assert http_request(port, "/h", headers={"Host": f"localhost:{port}"}).json()["host"] == pod.address
    assert http_request(port, "/h", headers={"Host": "api.example.com"}).json()["host"] == "api.example.com"

    payload = os.urandom(3000)
    r = http_request(port, "/echo", method="POST", body=payload, headers={"Content-Type": "application/octet-stream"})
    assert r.status == 200 and r.body == payload

    # HTTP_PROXY style: absolute-form target, origin-form upstream with Host = its authority.
    with socket.create_connection((LOCALHOST, port), timeout=5) as s:
        s.sendall(b"GET http://other.example:9999/abs?y=2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    seen = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert seen["path"] == "/abs?y=2" and seen["host"] == "other.example:9999", seen

    recent = pod.stats()["recent"]
    assert len(recent) == 5
    for rec in recent:
        names = {k.lower() for k, _ in rec["headers"]}
        assert "x-forwarded-for" not in names, f"outbound calls carry no X-Forwarded-For: {rec}"

    wait_until(lambda: len(sc.access_log()) >= 5, 5, what="5 access-log records")
    logs = [x for x in sc.access_log() if x.get("direction") == "outbound"]
    assert len(logs) == 5, sc.access_log()
    first = next(x for x in logs if x.get("path", "").startswith("/hello"))
    assert first["upstream"] == "orders" and first["method"] == "GET" and first["status"] == 200, first
    assert {x["upstream"] for x in logs} == {"orders"}

    m = sc.metrics()
    assert m.value("sidecar_outbound_requests_total", upstream="orders", status_code="200") == 5, m.series("sidecar_outbound_requests_total")
    assert m.value("sidecar_outbound_request_duration_seconds_count", upstream="orders") == 5
    assert any(lab.get("upstream") == "orders" for lab, _ in m.series("sidecar_outbound_retries_total"))
    assert m.value("sidecar_outbound_retries_total", upstream="orders") == 0
    assert endpoints(sc, "orders") == {"healthy": 1, "ejected": 0, "draining": 0, "unresolved": 0}
    families = {f.name for f in text_string_to_metric_families(m.text)}
    for family in ("sidecar_outbound_connections_open", "sidecar_outbound_rejected"):
        assert family in families, f"{family} not exported: {sorted(f for f in families if 'outbound' in f)}"
    assert any(lab.get("upstream") == "orders" for lab, _ in m.series("sidecar_outbound_connections_open"))


# --------------------------------------------------------------------------------------------
# 2. a slow pod, a 503 pod and a pod killed mid-test
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_ejected", ["67%", "50%"])
def test_slow_failing_and_killed_pods(start_sidecar, pods, max_ejected):
    """With 67% both broken pods may be ejected; with 50% (the default) only one may, so the
    killed pod stays in the set and the balancer and retries must keep the app from seeing
    its refused connects. The budget's floor is kept low (1/s) so that it cannot hide them."""
    # (In both cases the balancer moves traffic off the killed pod within a few tries.)
    slow, bad, doomed = pods(
        ["127.0.0.11", "127.0.0.12", "127.0.0.13"],
        **{"127.0.0.11": {"delay_ms": 50}, "127.0.0.12": {"status": 503}},
    )
    o = outbound(
        "pods",
        [p.address for p in (slow, bad, doomed)],
        balance="p2c-ewma",
        retry={"attempts": 2, "budget": "20%", "min_retries_per_second": 1, "on": ["connect-failure", "reset", 503], "backoff": "10ms"},
        outlier={"consecutive_failures": 5, "base_ejection": "30s", "max_ejection": "300s", "max_ejected": max_ejected},
    )
    sc = start_sidecar(config(o))
    sent = 300
    load = Load(oport(sc, "pods"), n=sent, threads=4, path="/work")
    wait_until(lambda: load.done() >= sent // 3, 30, interval=0.002, what="a third of the load")
    doomed.kill()
    assert endpoints(sc, "pods")["ejected"] >= 1, "the 503 pod should be ejected by now"
    bad_at_kill = bad.total()
    results = load.join(30)

    bad_results, statuses = failures(results)
    by_pod = Counter(who for _, who, _ in results)
    seen = {p.host: p.total() for p in (slow, bad, doomed)}
    retries = sc.metrics().value("sidecar_outbound_retries_total", upstream="pods")
    summary = f"statuses {dict(statuses)}, answered by {dict(by_pod)}, pods saw {seen}, retries {retries:.0f}"
    assert not bad_results, f"the app saw failures while a healthy endpoint existed: {summary}; first: {bad_results[:3]}"
    assert bad.total() <= 5 + 4, f"the 503 pod got {bad.total()} requests; ejected after 5 (4 in flight at most)"
    assert bad.total() == bad_at_kill, "the 503 pod got requests after its ejection"
    assert sum(seen.values()) <= 1.25 * sent, f"more tries than the budget allows: {summary}"
    assert by_pod[slow.address] > 0 and by_pod[doomed.address] > 0, summary
    e = endpoints(sc, "pods")
    assert e["ejected"] >= 1 and e["healthy"] + e["ejected"] == 3, e
    # The killed pod leaves rotation after a few refused connects: ejected when there is room,
    # or priced out by P2C-EWMA's failure penalty (a refused connect counts as a 1 s answer).
    refused = sc.metrics().value("sidecar_outbound_connect_errors_total", upstream="pods", reason="connection_refused")
    assert refused <= 12, f"{refused:.0f} tries on the killed pod: {summary}"
    assert retries >= 5
    assert sc.metrics().value("sidecar_outbound_requests_total", upstream="pods", status_code="200") == sent


# --------------------------------------------------------------------------------------------
# 3. the retry budget, and which methods are retried
# --------------------------------------------------------------------------------------------
def test_retry_budget_caps_retries_and_only_safe_requests_retry(start_sidecar, pods):
    a, b = pods(["127.0.0.16", "127.0.0.17"])
    budget, floor_per_s, attempts = 0.2, 2, 3
    o = outbound(
        "flaky",
        [a.address, b.address],
        retry={"attempts": attempts, "budget": "20%", "min_retries_per_second": floor_per_s, "on": [503], "backoff": "5ms"},
        outlier={"consecutive_failures": 0},  # no ejection: every try reaches a pod
    )
    sc = start_sidecar(config(o))
    port = oport(sc, "flaky")
    total = lambda: a.total() + b.total()  # noqa: E731

    before = total()
    r = http_request(port, "/status/503", method="POST", body=b"x")
    assert r.status == 503 and total() - before == 1, "a POST without x-sidecar-retryable must not be retried"

    before = total()
    r = http_request(port, "/status/503", method="POST", body=b"x", headers={"x-sidecar-retryable": "true"})
    assert r.status == 503
    assert total() - before == attempts, f"a POST marked retryable should be tried {attempts} times, was {total() - before}"
    recent = a.stats()["recent"] + b.stats()["recent"]
    marked = [x for x in recent if x["method"] == "POST"][-attempts:]
    assert all(x["body_bytes"] == 1 for x in marked), "each retry carries the whole body"
    for x in recent:
        assert "x-sidecar-retryable" not in {k.lower() for k, _ in x["headers"]}, f"the marker header was forwarded: {x}"

    before, sent = total(), 200
    results = Load(port, n=sent, threads=4, path="/status/503").join(30)
    assert Counter(s for s, _, _ in results) == {503: sent}
    upstream = total() - before
    limit = sent * (1 + budget) + floor_per_s * 10 + 2  # +2: the two POST tries above
    assert sent < upstream <= limit, f"{sent} GETs answered 503 everywhere reached the pods {upstream} times (limit {limit:.0f})"
    assert upstream >= sent + floor_per_s * 10, f"the budget's floor alone allows {floor_per_s * 10} retries; saw {upstream - sent}"
    m = sc.metrics()
    # Every try reached a pod (no connect failures): retries = tries - first tries.
    assert m.value("sidecar_outbound_retries_total", upstream="flaky") == total() - (sent + 2)
    assert m.value("sidecar_outbound_requests_total", upstream="flaky", status_code="503") == sent + 2


# --------------------------------------------------------------------------------------------
# 4. bodies that cannot be replayed
# --------------------------------------------------------------------------------------------
def test_large_and_chunked_bodies_are_sent_once(start_sidecar, pods):
    a, b = pods(["127.0.0.18", "127.0.0.19"])
    o = outbound(
        "bodies",
        [a.address, b.address],
        retry={"attempts": 2, "on": [503], "max_body": "1KiB", "backoff": "5ms"},
        outlier={"consecutive_failures": 0},
    )
    sc = start_sidecar(config(o))
    port = oport(sc, "bodies")

    def tries(method, body, headers=None):
        before_a, before_b = len(a.stats()["recent"]), len(b.stats()["recent"])
        r = http_request(port, "/status/503", method=method, body=body, headers=headers or {})
        assert r.status == 503, (r.status, r.body)
        return a.stats()["recent"][before_a:] + b.stats()["recent"][before_b:]

    small = tries("PUT", b"s" * 512)
    assert len(small) == 2 and all(x["body_bytes"] == 512 for x in small), f"a 512-byte PUT should be replayed whole: {small}"
    large = tries("PUT", b"L" * 4096)
    assert len(large) == 1 and large[0]["body_bytes"] == 4096, f"a body over max_body is sent once: {large}"
    marked = tries("POST", b"P" * 4096, {"x-sidecar-retryable": "true"})
    assert len(marked) == 1 and marked[0]["body_bytes"] == 4096, f"a marked POST over max_body is sent once: {marked}"
    chunked = tries("PUT", iter([b"c" * 60, b"d" * 40]))  # no length: http.client sends it chunked
    assert len(chunked) == 1 and chunked[0]["chunked"] and chunked[0]["body_bytes"] == 100, f"a chunked body is sent once: {chunked}"
    assert sc.metrics().value("sidecar_outbound_retries_total", upstream="bodies") == 1


# --------------------------------------------------------------------------------------------
# 5. endpoints from DNS
# --------------------------------------------------------------------------------------------
def test_dns_answer_change_moves_traffic_and_drains(start_sidecar, pods, dns):
    old1, old2, new = pods(["127.0.0.21", "127.0.0.22", "127.0.0.23"])
    name = f"svc.test:{new.port}"
    dns.set("svc.test", [old1.host, old2.host], ttl=1)
    upstream = {"dns_refresh": "1s", "resolv_conf": str(dns.resolv_conf)}
    sc = start_sidecar(
        config(
            outbound("svc", [name], upstream=upstream),
            outbound("ghost", [f"missing.test:{new.port}"], upstream=upstream),
        )
    )
    port = oport(sc, "svc")
    wait_until(lambda: endpoints(sc, "svc").get("healthy") == 2, 5, what="both addresses of svc.test healthy")
    r = http_request(port, "/first")
    assert r.status == 200 and r.json()["served_by"] in (old1.address, old2.address), r.body
    assert r.json()["host"] == name, "Host naming the sidecar becomes the first endpoint as written"

    # A name that does not resolve: 503 naming the upstream and the name.
    r = http_request(oport(sc, "ghost"), "/")
    body = r.body.decode(errors="replace")
    assert r.status == 503 and "upstream ghost" in body and f"missing.test:{new.port}" in body and "resolve" in body, (r.status, body)
    assert endpoints(sc, "ghost").get("unresolved") == 1, endpoints(sc, "ghost")

    load = Load(port, threads=2, path="/steady")
    slow_results = []
    slow = [
        threading.Thread(target=lambda: slow_results.append(http_request(port, "/slow?ms=4000", timeout=15)), daemon=True)
        for _ in range(2)
    ]
    for t in slow:
        t.start()
    wait_until(lambda: "/slow?ms=4000" in json.dumps(old1.stats()) + json.dumps(old2.stats()), 3, what="a slow call in flight")
    dns.set("svc.test", [new.host], ttl=1)
    changed_at = time.monotonic()

    def switched():
        e = endpoints(sc, "svc")
        return e if e.get("healthy") == 1 and e.get("draining", 0) >= 1 else None

    e = wait_until(switched, 3, what="svc: 1 healthy endpoint and the old ones draining")
    switch_seconds = time.monotonic() - changed_at
    wait_until(lambda: new.total() > 0, 3, what="traffic on the new address")
    time.sleep(0.3)
    mark, old_total = load.done(), old1.total() + old2.total()
    time.sleep(1.0)
    after = load.results[mark:load.done()]
    assert after and {who for _, who, _ in after} == {new.address}, Counter(who for _, who, _ in after)
    assert old1.total() + old2.total() == old_total, "an address that left the answer still got new requests"
    for t in slow:
        t.join(10)
    assert [r.status for r in slow_results] == [200, 200], "calls in flight on a drained address must finish"
    assert {r.json()["served_by"] for r in slow_results} <= {old1.address, old2.address}
    wait_until(lambda: endpoints(sc, "svc").get("draining") == 0, 4, what="draining back to 0 once the slow calls ended")
    results = load.stop()
    bad, statuses = failures(results)
    assert not bad, f"errors while the answer changed: {statuses}; first: {bad[:5]}"
    assert len(results) > 50, statuses
    assert switch_seconds < 2.5, f"the new answer took {switch_seconds:.1f}s to be used (TTL 1s, dns_refresh 1s): {e}"


# --------------------------------------------------------------------------------------------
# 6. timeouts and dead endpoints
# --------------------------------------------------------------------------------------------
def test_timeouts_and_connect_failures(start_sidecar, pods):
    p1, p2 = pods(["127.0.0.41", "127.0.0.42"])
    dead = f"{LOCALHOST}:{free_port()}"  # nothing listens there: connections are refused
    sc = start_sidecar(
        config(
            outbound("pertry", [p1.address, p2.address], per_try_timeout="300ms", retry={"attempts": 2, "on": ["reset"], "backoff": "5ms"}),
            outbound("whole", [p1.address], request_timeout="400ms", retry={"attempts": 1}),
            outbound("dead", [dead]),
            outbound("mixed", [dead, p1.address], balance="round-robin", outlier={"consecutive_failures": 0}),
        )
    )

    def seen():
        return p1.total() + p2.total()

    before = seen()
    r, took = timed(oport(sc, "pertry"), "/slow?ms=1500")
    body = r.body.decode(errors="replace")
    assert r.status == 504 and "upstream pertry: per_try_timeout" in body, (r.status, body)
    assert took < 1.4, f"two 300ms tries took {took:.2f}s"
    assert seen() - before == 2, "a GET whose try timed out is retried (once: attempts 2) when `reset` is in `on`"
    before = seen()
    r, took = timed(oport(sc, "pertry"), "/slow?ms=1500", method="POST", body=b"p")
    assert r.status == 504 and took < 1.0 and seen() - before == 1, "a POST that timed out is not retried"

    r, took = timed(oport(sc, "whole"), "/slow?ms=2000")
    body = r.body.decode(errors="replace")
    assert r.status == 504 and "upstream whole: request_timeout" in body, (r.status, body)
    assert 0.35 < took < 1.5, took

    r, took = timed(oport(sc, "dead"), "/")
    body = r.body.decode(errors="replace")
    assert r.status == 502 and body.startswith("upstream dead:"), (r.status, body)
    assert took < 1.0, f"a refused connect took {took:.2f}s to answer"
    rec = wait_until(lambda: [x for x in sc.access_log() if x.get("upstream") == "dead"], 5, what="the dead upstream's access log")
    assert rec[0]["status"] == 502 and rec[0]["direction"] == "outbound" and "refused" in rec[0].get("error", ""), rec[0]

    # Nothing was sent on a refused connect: any method may go to the next endpoint.
    before = p1.total()
    statuses = [http_request(oport(sc, "mixed"), "/post", method="POST", body=b"{}").status for _ in range(10)]
    assert statuses == [200] * 10, f"POSTs to [dead, live] (connect-failure is retried for any method): {statuses}"
    assert p1.total() - before == 10, "each POST reached the live pod exactly once"
    assert sc.metrics().value("sidecar_outbound_retries_total", upstream="mixed") >= 4


# --------------------------------------------------------------------------------------------
# 7. outbound-only configs and `sidecar check`
# --------------------------------------------------------------------------------------------
def test_outbound_only_config_is_ready_without_an_app(start_sidecar, pods):
    (pod,) = pods(["127.0.0.51"])
    absent = f"{LOCALHOST}:{free_port()}"
    sc = start_sidecar(config(outbound("solo", [pod.address]), app={"address": absent}), wait="ready", timeout=5)
    time.sleep(0.5)
    assert sc.ready_status() == 200, "with no inbound listener, /ready does not depend on the app"
    assert http_request(oport(sc, "solo"), "/").status == 200
    # Unless the app's health is configured: then it gates /ready as always.
    health = {"address": absent, "health": {"path": "/healthz", "interval": "100ms", "timeout": "200ms"}}
    sc2 = start_sidecar(config(outbound("solo2", [pod.address]), app=health), wait="live")
    time.sleep(1.0)
    r = sc2.admin("/ready")
    assert r.status == 503 and b"app" in r.body, (r.status, r.body)
    assert http_request(oport(sc2, "solo2"), "/").status == 200


def test_check_names_bad_outbound_fields(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "outbound:\n"
        "  - name: orders\n"
        "    listen: 127.0.0.1:15991\n"
        "    upstream: { endpoints: [\"bad name:80\", \"orders.test:http\"], dns_refresh: soon }\n"
        "    retry: { attempts: 0, budget: lots, on: [sometimes] }\n"
        "    outlier: { max_ejected: 150% }\n"
        "    balance: random\n"
        "  - name: empty\n"
        "    listen: 127.0.0.1:15992\n"
        "    upstream: { endpoints: [] }\n"
        "    retry: { attemps: 2 }\n"
    )
    p = run_sidecar_cmd("check", "-c", bad)
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.startswith(f"{bad}: ")]
    for field in (
        "outbound[0].upstream.endpoints[0]",
        "outbound[0].upstream.endpoints[1]",
        "outbound[0].upstream.dns_refresh",
        "outbound[0].retry.attempts",
        "outbound[0].retry.budget",
        "outbound[0].retry.on[0]",
        "outbound[0].outlier.max_ejected",
        "outbound[1].upstream.endpoints",
    ):
        assert any(line.startswith(f"{bad}: {field}: ") for line in lines), f"{field} not named:\n{p.stderr}"
    assert any("attemps" in line and "outbound[1]" in line for line in lines), f"the unknown field is not named:\n{p.stderr}"
    assert any("balance" in line and "outbound[0]" in line for line in lines), f"the bad balance is not named:\n{p.stderr}"

    none = tmp_path / "none.yaml"
    none.write_text(f"admin: {{ listen: 127.0.0.1:{free_port()} }}\n")
    p = run_sidecar_cmd("check", "-c", none)
    assert p.returncode == 1 and "at least one of `inbound`, `outbound`, `logship` or `notify` is needed" in p.stderr, p.stderr

    ok = tmp_path / "ok.yaml"
    ok.write_text("outbound: [{ name: orders, listen: 127.0.0.1:15993, upstream: { endpoints: [\"orders.test:8080\", \"127.0.0.7:8080\"] } }]\n")
    p = run_sidecar_cmd("check", "-c", ok)
    assert p.returncode == 0, p.stderr


def test_search_domains_and_ndots_as_kubernetes_writes_them(start_sidecar, pods, dns):
    """`orders` is found as `orders.default.svc.cluster.local`: the resolv.conf's search list
    and `ndots:5` apply to names with fewer dots, as in a pod."""
    (pod,) = pods(["127.0.0.31"])
    dns.set("orders.default.svc.cluster.local", [pod.host], ttl=5)
    dns.resolv_conf.write_text(
        f"nameserver {dns.host}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:1 attempts:2\n"
    )
    upstream = {"dns_refresh": "5s", "resolv_conf": str(dns.resolv_conf)}
    sc = start_sidecar(config(outbound("orders", [f"orders:{pod.port}"], upstream=upstream)))
    r = http_request(oport(sc, "orders"), "/x")
    assert r.status == 200 and r.json()["served_by"] == pod.address, r.body


def test_a_failed_lookup_keeps_the_last_good_addresses(start_sidecar, pods, dns):
    (pod,) = pods(["127.0.0.32"])
    dns.set("kept.test", [pod.host], ttl=1)
    upstream = {"dns_refresh": "1s", "resolv_conf": str(dns.resolv_conf)}
    sc = start_sidecar(config(outbound("kept", [f"kept.test:{pod.port}"], upstream=upstream)))
    assert http_request(oport(sc, "kept"), "/a").status == 200
    dns.proc.stop()  # the DNS server goes away: lookups time out
    wait_until(lambda: endpoints(sc, "kept").get("unresolved") == 1, 10, what="the failed lookup to show")
    assert endpoints(sc, "kept").get("healthy") == 1
    assert http_request(oport(sc, "kept"), "/b").status == 200
    assert "DNS lookup failed; keeping the last good addresses" in sc.stderr_text()
