"""Issue 12: W3C trace context and spans exported over OTLP/HTTP, checked end to end with a
receiver that decodes the published protobuf schema and an app that shows the headers it got.

The sidecar's span is the parent of what the app sees; a caller's trace is continued, a
missing or malformed `traceparent` starts a new one; a collector that is down, failing or hung
costs spans (counted), never requests."""

from __future__ import annotations

import re
import threading
import time

import pytest

from helpers import LOCALHOST, free_port, http_request, make_config, wait_until
from otlp_receiver import OtlpReceiver

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")
SERVER, CLIENT = 2, 3


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.stop()


def traced(cfg, receiver, **tracing):
    cfg["telemetry"]["tracing"] = {
        "otlp_endpoint": receiver.endpoint,
        "service_name": "checkout",
        "batch_timeout": "200ms",
        "resource": {"deployment.environment": "test"},
        **tracing,
    }
    return cfg


def app_headers(port, headers=None) -> dict:
    """What the app received, as {lower-case name: [values]}."""
    r = http_request(port, "/headers", headers=headers or {})
    assert r.status == 200, r.body
    got: dict[str, list[str]] = {}
    for k, v in r.json()["headers"]:
        got.setdefault(k.lower(), []).append(v)
    return got


def test_a_callers_trace_is_continued_and_the_sidecars_span_is_the_apps_parent(http_app, start_sidecar, receiver):
    cfg = traced(make_config(http_app.port), receiver)
    sc = start_sidecar(cfg, env={"POD_NAME": "checkout-7d9f", "POD_NAMESPACE": "shop"})
    sent = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            "User-Agent": "trace-test/1"}
    got = app_headers(sc.port("web"), sent)

    assert len(got["traceparent"]) == 1
    m = TRACEPARENT.match(got["traceparent"][0])
    assert m, got["traceparent"]
    trace_id, parent_seen_by_app = m.groups()
    assert trace_id == CALLER_TRACE
    assert parent_seen_by_app != CALLER_SPAN, "the app must see the sidecar's span as its parent"
    assert got["traceparent"][0].endswith("-01"), "a sampled caller stays sampled"
    assert got["tracestate"] == ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"], "tracestate passes on unchanged"

    (span,) = [s for s in receiver.wait_spans(1) if s.attrs.get("url.path") == "/headers"]
    assert span.trace_id == CALLER_TRACE
    assert span.span_id == parent_seen_by_app
    assert span.parent_span_id == CALLER_SPAN
    assert span.kind == SERVER
    assert span.name == "GET"
    assert span.scope == "sidecar"
    a = span.attrs
    assert a["http.request.method"] == "GET"
    assert a["http.response.status_code"] == 200
    assert a["network.protocol.version"] == "1.1"
    assert a["url.scheme"] == "http"
    assert a["client.address"] == "127.0.0.1"
    assert a["server.address"] == LOCALHOST and a["server.port"] == sc.port("web")
    assert a["user_agent.original"] == "trace-test/1"
    assert a["http.response.body.size"] > 0
    assert a["sidecar.listener"] == "web"
    assert "error.type" not in a and span.status_code == 0
    assert span.end_ns > span.start_ns
    r = span.resource
    assert r["service.name"] == "checkout"
    assert r["k8s.pod.name"] == "checkout-7d9f" and r["k8s.namespace.name"] == "shop"
    assert r["deployment.environment"] == "test"
    assert receiver.content_types == {"application/x-protobuf"}

    log = sc.wait_access_log(lambda x: x.get("path") == "/headers")
    assert log[-1]["trace_id"] == CALLER_TRACE


@pytest.mark.parametrize("traceparent", [None, "00-zz-00f067aa0ba902b7-01", f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",
                                         f"00-{'0' * 32}-{CALLER_SPAN}-01"])
def test_a_missing_or_malformed_traceparent_starts_a_new_trace(http_app, start_sidecar, receiver, traceparent):
    sc = start_sidecar(traced(make_config(http_app.port), receiver))
    sent = {"tracestate": "congo=t61rcWkgMzE"}
    if traceparent:
        sent["traceparent"] = traceparent
    got = app_headers(sc.port("web"), sent)
    m = TRACEPARENT.match(got["traceparent"][0])
    assert m, f"the app got {got['traceparent']} for {traceparent!r}"
    assert m.group(1) != CALLER_TRACE.lower()
    if traceparent:
        assert "tracestate" not in got, "a tracestate beside an invalid traceparent is dropped with it"
    (span,) = [s for s in receiver.wait_spans(1) if s.attrs.get("url.path") == "/headers"]
    assert (span.trace_id, span.span_id) == m.groups()
    assert span.parent_span_id == "", "a new trace's first span has no parent"


def test_sampling_is_parent_based(http_app, start_sidecar, receiver):
    sc = start_sidecar(traced(make_config(http_app.port), receiver, sample_ratio=0.0))
    port = sc.port("web")
    got = app_headers(port)
    assert TRACEPARENT.match(got["traceparent"][0]) and got["traceparent"][0].endswith("-00"), got
    unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
    assert app_headers(port, {"traceparent": unsampled})["traceparent"][0].endswith("-00")
    got = app_headers(port, {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    spans = receiver.wait_spans(1)
    time.sleep(0.5)
    assert [s.trace_id for s in receiver.spans] == [CALLER_TRACE], "only the sampled caller's request is recorded"
    assert spans[0].span_id == got["traceparent"][0].split("-")[2]


def test_errors_are_marked_on_the_span(http_app, start_sidecar, receiver):
    sc = start_sidecar(traced(make_config(http_app.port), receiver))
    assert http_request(sc.port("web"), "/status/503").status == 503
    assert http_request(sc.port("web"), "/status/404").status == 404
    spans = {s.attrs["url.path"]: s for s in receiver.wait_spans(2)}
    assert spans["/status/503"].attrs["error.type"] == "503" and spans["/status/503"].status_code == 2
    assert "error.type" not in spans["/status/404"].attrs, "a 4xx is the client's error, not the server span's"
    http_app.stop()
    assert http_request(sc.port("web"), "/gone").status == 502
    (span,) = [s for s in receiver.wait_spans(3) if s.attrs.get("url.path") == "/gone"]
    assert span.attrs["error.type"] == "app_connection_refused", span.attrs


def test_outbound_calls_get_a_client_span(start_sidecar, receiver, log_dir):
    from test_outbound import Pod, config, oport, outbound

    pod = Pod(log_dir, "127.0.0.61")
    try:
        cfg = config(outbound("orders", [pod.address]))
        sc = start_sidecar(traced(cfg, receiver))
        r = http_request(oport(sc, "orders"), "/items?x=1", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        assert r.status == 200
        seen = pod.stats()["recent"][-1]["headers"]
        tp = {k.lower(): v for k, v in seen}["traceparent"]
        (span,) = receiver.wait_spans(1)
        assert span.kind == CLIENT
        assert span.trace_id == CALLER_TRACE and span.parent_span_id == CALLER_SPAN
        assert tp == f"00-{CALLER_TRACE}-{span.span_id}-01", "the upstream's parent is the sidecar's client span"
        assert span.attrs["sidecar.upstream"] == "orders"
        assert span.attrs["url.full"].endswith("/items?x=1")
        assert span.attrs["http.response.status_code"] == 200
    finally:
        pod.stop()


def _load(port, n, results, stop):
    for i in range(n):
        if stop.is_set():
            return
        t = time.monotonic()
        try:
            status = http_request(port, f"/?i={i}", timeout=5).status
        except Exception as e:  # noqa: BLE001 - any failure is what the test looks for
            status = repr(e)
        results.append((status, time.monotonic() - t))


@pytest.mark.parametrize("mode", ["down", "fail", "hang"])
def test_a_collector_down_failing_or_hung_costs_spans_never_requests(http_app, start_sidecar, receiver, mode):
    if mode == "down":
        endpoint = f"http://{LOCALHOST}:{free_port()}"
    else:
        receiver.set_mode(mode)
        endpoint = receiver.endpoint
    cfg = traced(make_config(http_app.port), receiver, queue_size=64, batch_size=16, export_timeout="1s")
    cfg["telemetry"]["tracing"]["otlp_endpoint"] = endpoint
    sc = start_sidecar(cfg)
    results: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(sc.port("web"), 150, results, stop)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed with the collector {mode}: {failed[:5]}"
    slowest = max(d for _, d in results)
    assert slowest < 1.0, f"a request took {slowest:.2f}s: the request path waited on the collector ({mode})"

    def dropped():
        m = sc.metrics()
        return sum(v for _, v in m.series("sidecar_tracing_spans_dropped_total"))

    wait_until(lambda: dropped() > 0, 10, what=f"spans dropped with the collector {mode}")
    m = sc.metrics()
    assert m.value("sidecar_tracing_spans_exported_total") == 0
    reasons = {lab["reason"] for lab, v in m.series("sidecar_tracing_spans_dropped_total") if v > 0}
    assert reasons <= {"queue_full", "export_failed"}, reasons
    warn = [l for l in sc.stderr_text().splitlines() if "span export failed" in l]
    assert len(warn) == 1, f"one warning for the outage, then counting: {warn}"

    if mode != "down":
        receiver.set_mode("ok")
        # The exporter recovers: new spans arrive once the collector answers again.
        def arrived():
            http_request(sc.port("web"), "/after")
            return any(s.attrs.get("url.path") == "/after" for s in receiver.spans)
        wait_until(arrived, 20, interval=0.5, what="spans exported again after the collector recovered")
        assert sc.metrics().value("sidecar_tracing_spans_exported_total") > 0
