"""Issue 12: the exposition is valid for parsers nobody here wrote — `promtool check metrics`
(Prometheus 0.0.4 text, with its lint rules) and prometheus_client's parsers for both formats —
with counters typed as counters, latency buckets from 0.5 ms to 10 s, and `process_*`."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from helpers import http_request, make_config

BUCKETS = ["0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"]


@pytest.fixture
def scraped(http_app, start_sidecar):
    sc = start_sidecar(make_config(http_app.port))
    for path in ("/", "/status/503", "/nope"):
        http_request(sc.port("web"), path)
    return sc


def test_promtool_finds_no_problem_and_no_lint_warning(scraped):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    r = scraped.admin("/metrics")
    assert r.header("Content-Type").startswith("text/plain; version=0.0.4")
    p = subprocess.run([promtool, "check", "metrics"], input=r.body, capture_output=True, timeout=30)
    assert p.returncode == 0, f"promtool exit {p.returncode}:\n{p.stdout.decode()}{p.stderr.decode()}"


def test_the_classic_parser_types_counters_as_counters(scraped):
    text = scraped.admin("/metrics").body.decode()
    assert "# EOF" not in text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name in ("sidecar_inbound_requests", "sidecar_inbound_rejected", "sidecar_config_reloads",
                 "sidecar_tracing_spans_dropped", "process_cpu_seconds"):
        assert types.get(name) == "counter", f"{name}: {types.get(name)}"
    assert types["sidecar_inbound_request_duration_seconds"] == "histogram"
    for name in ("process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds",
                 "process_max_fds", "process_start_time_seconds"):
        assert types.get(name) == "gauge", f"{name}: {types.get(name)}"


def test_openmetrics_is_strictly_valid_and_has_the_same_families(scraped):
    r = scraped.admin("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    families = {f.name: f for f in parse_openmetrics(r.body.decode())}
    assert families["sidecar_inbound_requests"].type == "counter"
    assert families["process_cpu_seconds"].type == "counter"
    classic = {f.name for f in text_string_to_metric_families(scraped.admin("/metrics").body.decode())}
    assert classic == set(families), classic ^ set(families)


def test_latency_buckets_suit_a_proxy_and_labels_stay_bounded(scraped):
    text = scraped.admin("/metrics").body.decode()
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "sidecar_inbound_request_duration_seconds")
    les = [s.labels["le"] for s in fam.samples if s.name.endswith("_bucket") and s.labels.get("listener") == "web"]
    assert les == BUCKETS
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            for k, v in s.labels.items():
                assert k not in ("path", "peer", "client", "url"), f"unbounded label {k} on {s.name}"
                assert not v.startswith("/"), f"a path in label {k}={v} of {s.name}"


def test_latency_buckets_carry_trace_exemplars_in_openmetrics(http_app, start_sidecar):
    """With tracing on, a sampled request is its bucket's exemplar (OpenMetrics only), so a slow
    bucket links to a trace; the strict parser reads it."""
    from otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver()
    try:
        cfg = make_config(http_app.port)
        cfg["telemetry"]["tracing"] = {"otlp_endpoint": receiver.endpoint, "batch_timeout": "200ms"}
        sc = start_sidecar(cfg)
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        assert http_request(sc.port("web"), "/slow?ms=30", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}).status == 200
        r = sc.admin("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        fam = next(f for f in parse_openmetrics(r.body.decode()) if f.name == "sidecar_inbound_request_duration_seconds")
        exemplars = [s for s in fam.samples if s.exemplar is not None]
        assert [e.exemplar.labels for e in exemplars] == [{"trace_id": trace}], exemplars
        (s,) = exemplars
        assert s.labels["le"] == "0.05" and 0.03 <= s.exemplar.value <= 0.05, s
        plain = sc.admin("/metrics").body.decode()
        assert "trace_id" not in plain, "exemplars are OpenMetrics only"
    finally:
        receiver.stop()
