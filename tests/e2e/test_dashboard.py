"""The Grafana dashboard (deploy/grafana/sidecar-dashboard.json): importable as written (one
`DS_PROMETHEUS` input used by every panel, no datasource uid of its own), every query filtered
by namespace and pod, and every metric it queries a family that the real sidecar exposes on its
admin /metrics, with plain and TLS inbound listeners and outbound listeners serving requests."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import LOCALHOST, REPO_ROOT, AppProcess, curl, free_port, http_request, make_config, wait_until
from tls_helpers import tls_block, tls_listener, url

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "sidecar-dashboard.json"
DS = "${DS_PROMETHEUS}"
METRIC = re.compile(r"\b(?:sidecar|process)_[a-z0-9_]+")
# A metric name, then its label matchers (if any).
SELECTOR = re.compile(r"\b((?:sidecar|process)_[a-z0-9_]+)\s*(\{[^}]*\})?")

# Metric families the dashboard may query although this test's sidecar does not expose them.
NOT_EXPOSED_HERE = (
    # Log shipping (`logship:` in the contract) is not built yet; its panels are there for when
    # it lands. Remove this entry then.
    "sidecar_logship_",
)


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(dash):
    """Every panel, rows' nested panels (collapsed rows) included."""
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def exprs(dash):
    """(where, expr) for every panel target and every query variable."""
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr")))
    for v in dash["templating"]["list"]:
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def datasource_uids(node):
    """Every datasource uid anywhere in the JSON."""
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and "uid" in ds:
            yield ds["uid"]
        elif isinstance(ds, str):
            yield ds
        for v in node.values():
            yield from datasource_uids(v)
    elif isinstance(node, list):
        for v in node:
            yield from datasource_uids(v)


# --------------------------------------------------------------------------------------------
# the file itself
# --------------------------------------------------------------------------------------------
def test_dashboard_is_importable(dashboard):
    assert dashboard["schemaVersion"] == 39
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert dashboard.get("id") is None, "an exported dashboard carries no database id"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"namespace", "pod", "listener", "upstream"} <= set(variables)
    assert "label_values(sidecar_app_ready" in json.dumps(variables["pod"]["query"])

    panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 25
    assert {p["title"] for p in all_panels(dashboard) if p["type"] == "row"} >= {"Inbound", "Outbound", "Health", "Log shipping", "Process"}
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": DS}, f"panel {p['title']!r}: {p.get('datasource')}"
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r} target {t.get('refId')} has no expr"
            assert t["datasource"] == {"type": "prometheus", "uid": DS}, f"panel {p['title']!r}: {t.get('datasource')}"
    uids = set(datasource_uids(dashboard))
    assert uids == {DS}, f"datasources other than {DS}: {uids - {DS}}"


def test_every_query_filters_by_namespace_and_pod(dashboard):
    for where, expr in exprs(dashboard):
        for m in SELECTOR.finditer(expr):
            name, matchers = m.group(1), m.group(2) or ""
            # The variables list the values of what the panels filter by: the namespace list
            # is not filtered, the pod list by namespace only, the others by both.
            if where != "variable namespace":
                assert 'namespace=~"$namespace"' in matchers, f"{where}: {name} not filtered by namespace: {expr}"
            if where not in ("variable namespace", "variable pod"):
                assert 'pod=~"$pod"' in matchers, f"{where}: {name} not filtered by pod: {expr}"
            if where.startswith("variable"):
                continue
            if name.startswith(("sidecar_inbound_", "sidecar_tls_")):
                assert 'listener=~"$listener"' in matchers, f"{where}: {name} not filtered by listener: {expr}"
            if name.startswith("sidecar_outbound_"):
                assert 'upstream=~"$upstream"' in matchers, f"{where}: {name} not filtered by upstream: {expr}"


# --------------------------------------------------------------------------------------------
# the names against a real sidecar
# --------------------------------------------------------------------------------------------
def exposed_families(text: str) -> dict:
    """{family name: type} as the 0.0.4 text parser reads them. A counter's family loses
    `_total`; and as the sidecar's TYPE lines name counters without it (OpenMetrics style),
    their `_total` samples come out as untyped families of their own."""
    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}


def is_exposed(name: str, families: dict) -> bool:
    """Whether the name a query uses is (a series of) an exposed family."""
    if name in families:
        return True
    if name.endswith("_total") and families.get(name[: -len("_total")]) == "counter":
        return True
    for suffix, types in (("_bucket", {"histogram"}), ("_sum", {"histogram", "summary"}), ("_count", {"histogram", "summary"})):
        if name.endswith(suffix) and families.get(name[: -len(suffix)]) in types:
            return True
    return False


def test_every_metric_the_dashboard_queries_is_exposed(dashboard, http_app, pki, log_dir, start_sidecar):
    """An empty family is not exposed at all, so the sidecar here has every kind of listener
    and has seen every kind of event the dashboard counts without a series made up front: a
    TLS listener (handshakes, certificate expiry) and an upstream that refuses connections
    (connect errors)."""
    upstream = AppProcess("upstream_app.py", "--host", LOCALHOST, log_dir=log_dir, tag="upstream")
    try:
        cfg = make_config(http_app.port, extra_inbound=[tls_listener("tls", tls_block(pki.server.crt, pki.server.key))])

        def outbound(name, endpoint):
            return {
                "name": name,
                "listen": f"{LOCALHOST}:{free_port()}",
                "protocol": "http",
                "upstream": {"endpoints": [endpoint], "http": "http1"},
                "connect_timeout": "1s",
                "request_timeout": "10s",
            }

        cfg["outbound"] = [outbound("orders", upstream.address), outbound("gone", f"{LOCALHOST}:{free_port()}")]  # nothing listens there
        sc = start_sidecar(cfg)
        oport = {o["name"]: int(o["listen"].rsplit(":", 1)[1]) for o in cfg["outbound"]}

        for _ in range(2):
            assert http_request(sc.port("web"), "/").status == 200
            assert http_request(oport["orders"], "/").status == 200
        assert http_request(oport["orders"], "/status/404").status == 404
        assert http_request(oport["gone"], "/").status in (502, 503)
        r = curl("--cacert", pki.ca, url(sc, "tls", "/"))
        assert r.status == 200, (r.returncode, r.stderr)

        def all_counted():
            m = sc.metrics()
            return (
                m.value("sidecar_inbound_requests_total", listener="web") >= 2
                and m.value("sidecar_inbound_requests_total", listener="tls") >= 1
                and m.value("sidecar_outbound_requests_total", upstream="orders") >= 3
                and m.value("sidecar_outbound_connect_errors_total", upstream="gone") >= 1
            )

        wait_until(all_counted, 5, what="the requests and the refused connect to be counted")
        r = sc.admin("/metrics")
        assert r.status == 200
        families = exposed_families(r.body.decode())
    finally:
        upstream.stop()

    names = {}
    for where, expr in exprs(dashboard):
        for name in METRIC.findall(expr):
            names.setdefault(name, where)
    assert names, "no metric names found in the dashboard's queries"

    missing = {
        name: where
        for name, where in sorted(names.items())
        if not is_exposed(name, families) and not name.startswith(NOT_EXPOSED_HERE)
    }
    assert not missing, (
        "the dashboard queries metrics the sidecar does not expose:\n"
        + "\n".join(f"  {n} (in {w})" for n, w in missing.items())
        + "\nexposed families: " + ", ".join(sorted(families))
    )
