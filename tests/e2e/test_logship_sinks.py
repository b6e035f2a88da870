"""Log shipping: what the shipper does when a sink fails (down for 30 s, hung, 429 with
Retry-After, 5xx, 400 to the dead-letter file, drop_newest), and each sink kind on its real wire
format, decoded by logship_receivers.py the way the real server would (Loki's push protobuf with
snappy, Elasticsearch's _bulk with per-item results, OTLP's ExportLogsServiceRequest), with the
pod's identity from the downward API.
"""

from __future__ import annotations

import email.utils
import shutil
import signal
import time

import pytest

from helpers import RssSampler, wait_until
from logship_receivers import LOKI_PATH, basic_auth
from test_logship import (  # noqa: F401 - receiver is a fixture
    LogFile,
    assert_exactly_once,
    count_numbers,
    dead_letters,
    delivery_report,
    describe,
    ls_config,
    metric,
    receiver,
    sink,
    source,
    wait_delivered,
)

POD = {"POD_NAME": "checkout-7d9f", "POD_NAMESPACE": "shop", "NODE_NAME": "node-a", "CONTAINER_NAME": "app"}


# ------------------------------------------------------------------------------------------------
# when the sink fails
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_sink_down_for_30s_holds_memory_bounded_then_gets_everything(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, retry={"initial_backoff": "200ms", "max_backoff": "2s"})])
    sc = start_sidecar(cfg)
    app.write(100)
    wait_delivered(rx, {"a": 100}, quiet=0.2)
    time.sleep(1)
    baseline = sc.rss_kib()
    rx.down()
    t_down = time.monotonic()
    total_mib = 48
    with RssSampler(sc.pid) as outage:
        for _ in range(total_mib):  # 48 MiB of 100-byte lines, 1 MiB at a time
            app.write(10486)
            time.sleep(0.1)
        pending = 0.0  # the most seen: what waits in the file counts, not only what was read
        while time.monotonic() - t_down < 30:
            pending = max(pending, metric(sc, "sidecar_logship_pending_bytes", source="app"))
            time.sleep(0.5)
        assert metric(sc, "sidecar_logship_send_errors_total", sink="out") > 0
    with RssSampler(sc.pid) as catch_up:
        rx.up()
        missing, dups, extra = wait_delivered(rx, {"a": app.written}, timeout=120)
    grown = (outage.peak_kib - baseline) / 1024
    print(f"\nsink down 30 s: {total_mib} MiB written, pending_bytes {pending / 2**20:.1f} MiB, RSS {baseline // 1024} MiB "
          f"→ {outage.peak_kib // 1024} MiB in the outage, {catch_up.peak_kib // 1024} MiB catching up")
    assert grown < total_mib / 2, f"RSS grew {grown:.0f} MiB while {total_mib} MiB waited: lines held in memory"
    assert catch_up.peak_kib < 64 * 1024, f"{catch_up.peak_kib // 1024} MiB RSS while sending the backlog"
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert metric(sc, "sidecar_logship_pending_bytes", source="app") == 0
    assert metric(sc, "sidecar_logship_dead_letter_total", sink="out") == 0
    assert pending > 40 * 2**20, (f"sidecar_logship_pending_bytes was at most {pending / 2**20:.1f} MiB while "
                                  f"{total_mib} MiB waited in the file for the sink")


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_with_retry_after_is_honoured(tmp_path, start_sidecar, receiver, form):
    rx = receiver("http")
    # RFC 9110 §10.2.3: delay-seconds or an HTTP-date (whole seconds: 3 s ahead is at least 2)
    rx.fail(429, times=1, retry_after=2 if form == "seconds" else lambda: email.utils.formatdate(time.time() + 3, usegmt=True))
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)]))
    app.write(20)
    assert_exactly_once(rx, {"a": 20})
    reqs = rx.requests
    assert reqs[0].status == 429
    gaps = [r.t - reqs[0].t for r in reqs[1:]]
    assert min(gaps) >= 1.9, f"sent again {min(gaps):.2f}s after a 429 with Retry-After {form} (initial_backoff is 100ms)"
    assert min(gaps) < 10, "retried far later than asked"
    assert metric(sc, "sidecar_logship_send_errors_total", sink="out") >= 1


def test_5xx_and_408_are_retried_until_delivered(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    rx.fail(500, times=2)
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)]))
    app.write(20)
    assert_exactly_once(rx, {"a": 20})
    rx.fail(408, times=1)
    app.write(20)
    assert_exactly_once(rx, {"a": 40})
    assert [r.status for r in rx.requests].count(500) == 2
    assert metric(sc, "sidecar_logship_send_errors_total", sink="out") >= 3
    assert metric(sc, "sidecar_logship_dead_letter_total", sink="out") == 0


def test_a_400_goes_to_the_dead_letter_file_and_the_pipeline_goes_on(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    rx.fail(400, times=1, body=b'{"error":"bad batch"}')
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)])
    sc = start_sidecar(cfg)
    app.write(10)
    rx.wait_requests(1)
    wait_until(lambda: metric(sc, "sidecar_logship_dead_letter_total", sink="out") > 0, 10, what="dead-lettered lines counted")
    app.write(10)  # after the refused batch: must not be blocked behind it
    dl_path = tmp_path / "ckpt" / "dead-letter" / "out.ndjson"
    wait_until(lambda: dl_path.exists(), 10, what=f"the default dead-letter file {dl_path}")
    wait_until(lambda: len(rx.records) + len(dead_letters(dl_path)) >= 20, 20, what="20 lines delivered or dead-lettered")
    time.sleep(0.5)
    dl = dead_letters(dl_path)
    missing, dups, extra = delivery_report(rx.lines() + [d["line"] for d in dl], {"a": 20})
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert dl and len(dl) < 20, f"{len(dl)} lines dead-lettered: only the refused batch should be"
    assert metric(sc, "sidecar_logship_dead_letter_total", sink="out") == len(dl)
    for d in dl:
        assert {"ts", "sink", "reason", "source", "file", "offset", "line"} <= set(d), d
        assert d["sink"] == "out" and d["source"] == "app" and d["file"] == str(app.path)
        assert "400" in d["reason"], d["reason"]
        n = int(d["line"].split()[2])
        assert d["offset"] == n * app.line_bytes, f"line {n} is at byte {n * app.line_bytes}, not {d['offset']}"
    assert [r.status for r in rx.requests].count(400) == 1, "a 400 is not retried"


def test_a_hung_sink_is_timed_out_and_retried(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    rx.hang()  # reads the request, never answers
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, request_timeout="1s")]))
    app.write(20)
    rx.wait_requests(1)
    wait_until(lambda: metric(sc, "sidecar_logship_send_errors_total", sink="out") >= 1, 10,
               what="the hung request counted as a send error after request_timeout (1 s)")
    rx.ok()  # releases the hung handler (it closes without answering); the retry is answered
    assert_exactly_once(rx, {"a": 20})
    assert rx.requests[0].note == "hung"


def test_sigterm_with_a_hung_sink_exits_at_drain_timeout_and_the_restart_sends_again(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    rx.hang()
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, request_timeout="30s")], drain_timeout="2s")
    sc = start_sidecar(cfg)
    app.write(20)
    rx.wait_requests(1)
    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    sc.wait_exit(15)
    took = time.monotonic() - t0
    assert took < 2 + 3, f"exit took {took:.1f}s with drain_timeout 2s and a hung sink"
    rx.ok()
    start_sidecar(cfg)
    assert_exactly_once(rx, {"a": 20})  # nothing was acknowledged, so nothing was checkpointed


def test_a_drop_newest_sink_drops_and_counts_without_holding_up_the_others(tmp_path, start_sidecar, receiver):
    good, lossy = receiver("http"), receiver("http")
    lossy.down()
    app = LogFile(tmp_path / "app.log", "a")
    sinks = [sink(good, "good"), sink(lossy, "lossy", when_full="drop_newest", retry={"initial_backoff": "100ms", "max_backoff": "500ms"})]
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], sinks))
    for _ in range(20):  # 4 MiB in 20 writes: more than the lossy sink's queue holds
        app.write(2000)
        time.sleep(0.05)
    assert_exactly_once(good, {"a": app.written}, timeout=60)
    wait_until(lambda: metric(sc, "sidecar_logship_dropped_total", sink="lossy") > 0, 10, what="lines dropped for the lossy sink")
    lossy.up()

    def accounted():
        m = sc.metrics()
        return m.value("sidecar_logship_lines_sent_total", sink="lossy") + m.value("sidecar_logship_dropped_total", sink="lossy") == app.written

    wait_until(accounted, 30, what="every line sent to or dropped for the lossy sink")
    time.sleep(0.5)
    missing, dups, extra = delivery_report(lossy.lines(), {"a": app.written})
    assert not dups and not extra, describe(missing, dups, extra)
    assert len(missing) == metric(sc, "sidecar_logship_dropped_total", sink="lossy"), "dropped_total counts the lines missing"
    assert metric(sc, "sidecar_logship_dropped_total", sink="good") == 0


# ------------------------------------------------------------------------------------------------
# each sink's wire format
# ------------------------------------------------------------------------------------------------
def test_http_sink_with_gzip_and_headers(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    app.write(300)
    start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])],
                            [sink(rx, compression="gzip", headers={"x-tenant": "shop"})]), env=POD)
    assert_exactly_once(rx, {"a": 300})
    for r in rx.requests:
        assert r.header("content-encoding") == "gzip" and r.header("content-type", "").startswith("application/x-ndjson")
        assert r.header("x-tenant") == "shop"
    d = rx.records[0].fields
    assert (d["k8s.pod.name"], d["k8s.namespace.name"], d["k8s.node.name"], d["k8s.container.name"]) == \
        ("checkout-7d9f", "shop", "node-a", "app"), d
    assert list(d)[-1] == "message"


def test_loki_protobuf_with_snappy_and_stream_labels(tmp_path, start_sidecar, receiver):
    rx = receiver("loki")
    rx.fail(429, times=1)  # retried
    app = LogFile(tmp_path / "app.log", "a")
    worker = LogFile(tmp_path / "worker.txt", "w")
    app.write(50)
    worker.write(30)
    sources = [source([tmp_path / "*.log"]), source([tmp_path / "*.txt"], name="worker")]
    t0 = time.time_ns()
    sc = start_sidecar(ls_config(tmp_path, sources, [sink(rx, labels={"cluster": "test"})]), env=POD)
    assert_exactly_once(rx, {"a": 50, "w": 30})
    ok = [r for r in rx.requests if r.status == 204]
    assert ok and all(r.path == LOKI_PATH for r in rx.requests), "base URL + /loki/api/v1/push"
    for r in ok:
        assert r.header("content-type") == "application/x-protobuf"
        assert r.header("content-encoding") in (None, "", "identity"), "snappy is the body's framing, not an HTTP coding"
    pod_labels = {"namespace": "shop", "pod": "checkout-7d9f", "container": "app", "node": "node-a"}
    by_source = {}
    for rec in rx.records:
        by_source.setdefault(rec.fields["source"], []).append(rec)
        assert rec.fields == {"cluster": "test", "source": rec.fields["source"], **pod_labels}, rec.fields
        assert t0 - 60 * 10**9 < rec.ts_ns < time.time_ns() + 60 * 10**9, "a timestamp near now"
    assert {k: len(v) for k, v in by_source.items()} == {"app": 50, "worker": 30}
    assert [r.line for r in by_source["app"]] == [app.line(i).decode().rstrip("\n") for i in range(50)], "lines as written, in order"
    for recs in by_source.values():
        ts = [r.ts_ns for r in recs]
        assert ts == sorted(ts), "entries of a stream in time order (Loki refuses old out-of-order entries)"
    assert [r.status for r in rx.requests].count(429) == 1
    assert metric(sc, "sidecar_logship_lines_sent_total", sink="out") == 80


def test_loki_json_with_gzip_and_an_endpoint_path_used_as_written(tmp_path, start_sidecar, receiver):
    rx = receiver("loki")
    app = LogFile(tmp_path / "app.log", "a")
    app.write(40)
    s = sink(rx, encoding="json", compression="gzip", endpoint=rx.endpoint + LOKI_PATH)
    start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [s]))
    assert_exactly_once(rx, {"a": 40})
    for r in rx.requests:
        assert r.path == LOKI_PATH, "a path in the endpoint is not added to again"
        assert r.header("content-type", "").startswith("application/json") and r.header("content-encoding") == "gzip"
    assert rx.records[0].fields == {"source": "app"}, "no pod labels without the downward API env"


def test_a_loki_400_is_dead_lettered_not_retried(tmp_path, start_sidecar, receiver):
    rx = receiver("loki")
    rx.fail(400, times=1, body=b"entry too far behind")
    app = LogFile(tmp_path / "app.log", "a")
    dl_path = tmp_path / "loki-dead.ndjson"
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, dead_letter=str(dl_path))]))
    app.write(10)
    wait_until(lambda: dead_letters(dl_path), 15, what=f"lines in {dl_path}")
    app.write(10)
    wait_until(lambda: len(rx.records) + len(dead_letters(dl_path)) >= 20, 15, what="20 lines delivered or dead-lettered")
    time.sleep(0.5)
    dl = dead_letters(dl_path)
    missing, dups, extra = delivery_report(rx.lines() + [d["line"] for d in dl], {"a": 20})
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert len(dl) < 20, "only the refused batch is dead-lettered"
    assert metric(sc, "sidecar_logship_dead_letter_total", sink="out") == len(dl)
    assert [r.status for r in rx.requests].count(400) == 1
    assert all("400" in d["reason"] and d["sink"] == "out" for d in dl), dl[0]


def test_elasticsearch_bulk_replays_are_409s_treated_as_delivered(tmp_path, start_sidecar, receiver):
    rx = receiver("elasticsearch")
    rx.store_then_fail(500, times=1)  # indexed, but the answer is lost: the batch is sent again
    app = LogFile(tmp_path / "app.log", "a")
    app.write(10)
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"], fields={"team": "shop"})],
                    [sink(rx, user="elastic", password="changeme", index="logs")])
    sc = start_sidecar(cfg, env=POD)
    assert_exactly_once(rx, {"a": 10})
    wait_until(lambda: rx.es_conflicts >= rx.requests[0].records > 0, 10, what="the replayed batch answered 409 item by item")
    wait_until(lambda: metric(sc, "sidecar_logship_lines_sent_total", sink="out") == 10, 10, what="the 409s counted as sent")
    for r in rx.requests:
        assert r.path == "/_bulk" and r.header("content-type", "").split(";")[0] in ("application/x-ndjson", "application/json")
        assert r.header("authorization") == basic_auth("elastic", "changeme")
    rec = rx.records[0]
    assert rec.meta["_index"] == "logs"
    assert list(rec.fields)[:4] == ["timestamp", "source", "file", "team"] and rec.fields["k8s.pod.name"] == "checkout-7d9f"
    assert len(set(rx.es_docs)) == 10
    assert metric(sc, "sidecar_logship_dead_letter_total", sink="out") == 0
    assert not rx.problems, rx.problems

    # The _id is the same after a restart that forgot its checkpoint: a full replay is all 409s.
    app.write(5)
    assert_exactly_once(rx, {"a": 15})
    sc.signal(signal.SIGTERM)
    sc.wait_exit(15)
    shutil.rmtree(tmp_path / "ckpt")
    conflicts = rx.es_conflicts
    sc2 = start_sidecar(cfg, env=POD)
    wait_until(lambda: rx.es_conflicts >= conflicts + 15, 20, what="15 more 409s for the re-read file")
    time.sleep(0.5)
    missing, dups, extra = delivery_report(rx.lines(), {"a": 15})
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert metric(sc2, "sidecar_logship_dead_letter_total", sink="out") == 0
    assert metric(sc2, "sidecar_logship_lines_sent_total", sink="out") == 15


def test_elasticsearch_item_errors_retry_429_alone_and_dead_letter_400(tmp_path, start_sidecar, receiver):
    rx = receiver("elasticsearch")
    rx.fail_items(429, lambda d: d.get("message", "").startswith("a line 000003 "), times=2)
    rx.fail_items(400, lambda d: d.get("message", "").startswith("a line 000007 "))
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, index="logs", compression="gzip")]))
    app.write(10)
    dl_path = tmp_path / "ckpt" / "dead-letter" / "out.ndjson"
    wait_until(lambda: len(dead_letters(dl_path)) == 1, 20, what="line 7 in the dead-letter file")
    wait_until(lambda: ("a", 3) in count_numbers(rx.lines())[0], 20, what="line 3 after two 429s")
    time.sleep(1.0)
    missing, dups, extra = delivery_report(rx.lines(), {"a": 10})
    assert missing == [("a", 7)] and not dups and not extra, describe(missing, dups, extra)
    assert rx.es_conflicts == 0, "only the failed item is sent again, not its whole batch"
    assert all(r.header("content-encoding") == "gzip" for r in rx.requests)
    (d,) = dead_letters(dl_path)
    assert d["line"] == app.line(7).decode().rstrip("\n") and d["offset"] == 700 and d["sink"] == "out"
    assert "400" in d["reason"] or "mapper_parsing_exception" in d["reason"], d["reason"]
    assert metric(sc, "sidecar_logship_dead_letter_total", sink="out") == 1
    assert metric(sc, "sidecar_logship_lines_sent_total", sink="out") == 9


def test_otlp_records_carry_severity_file_attributes_and_the_pods_resource(tmp_path, start_sidecar, receiver):
    rx = receiver("otlp")
    text = ["ERROR db down", "WARN slow answer", "INFO fine", "debug details", "no level here"]
    js = ['{"level":"error","msg":"x"}', '{"level":"WARNING","msg":"y"}', '{"level":"info"}', '{"msg":"none"}']
    (tmp_path / "app.log").write_text("\n".join(text) + "\n")
    (tmp_path / "api.json").write_text("\n".join(js) + "\n")
    sources = [source([tmp_path / "*.log"]), source([tmp_path / "*.json"], name="api", format="json")]
    sc = start_sidecar(ls_config(tmp_path, sources, [sink(rx)]), env=POD)
    rx.wait_records(9, timeout=20)
    time.sleep(0.5)
    assert not rx.problems, rx.problems
    assert all(r.path == "/v1/logs" and r.header("content-type") == "application/x-protobuf" for r in rx.requests)
    got = {r.line: r for r in rx.records}
    assert sorted(got) == sorted(text + js), "bodies are the lines as written"
    sev = {line: got[line].meta["severity_number"] for line in got}
    assert [sev[t] for t in text] == [17, 13, 9, 5, 0], sev
    assert [sev[j] for j in js] == [17, 13, 9, 0], sev
    r = got["ERROR db down"]
    assert r.fields["log.file.path"] == str(tmp_path / "app.log") and r.fields["log.file.name"] == "app.log"
    assert r.fields["log.source"] == "app" and got[js[0]].fields["log.source"] == "api"
    res = r.meta["resource"]
    assert (res.get("k8s.pod.name"), res.get("k8s.namespace.name"), res.get("k8s.node.name"), res.get("k8s.container.name")) == \
        ("checkout-7d9f", "shop", "node-a", "app"), res
    assert all(x.ts_ns > 0 for x in rx.records), "time or observed time set"
    assert metric(sc, "sidecar_logship_lines_sent_total", sink="out") == 9


def test_otlp_partial_success_is_not_retried_and_is_counted(tmp_path, start_sidecar, receiver):
    rx = receiver("otlp")
    rx.reject(lambda line: line.split()[2] in ("000002", "000005"), "2 records over the attribute limit")
    app = LogFile(tmp_path / "app.log", "a")
    app.write(10)
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, compression="gzip")]))
    wait_until(lambda: len(rx.records) >= 8, 20, what="the 8 accepted records")
    assert rx.requests[0].header("content-encoding") == "gzip"
    time.sleep(2.0)  # a retry would come within max_backoff (1 s)
    missing, dups, extra = delivery_report(rx.lines(), {"a": 10})
    assert missing == [("a", 2), ("a", 5)] and not dups and not extra, describe(missing, dups, extra)
    assert sorted(rx.otlp_rejected) == [app.line(i).decode().rstrip("\n") for i in (2, 5)], \
        "a partial success is final (OTLP spec): the rejected records are not sent again"
    m = sc.metrics()
    assert m.value("sidecar_logship_dead_letter_total", sink="out") == 2, "the 2 rejected records are counted"
    assert m.value("sidecar_logship_lines_sent_total", sink="out") == 8
    assert "2 records over the attribute limit" in sc.stderr_text(), "the collector's error_message is logged"
    app.write(5)
    wait_until(lambda: len(rx.records) >= 13, 20, what="later lines still shipped")


def test_awkward_characters_arrive_unchanged_at_every_sink(tmp_path, start_sidecar, receiver):
    lines = ['quotes " and \\ backslash', "tab\there, ctl \x01\x1f del \x7f", "é☃𝄞 ünïcödé", "</script>{\"not\":\"json\"}",
             "  leading and trailing spaces  ", "ERROR " + "ß" * 300]
    (tmp_path / "app.log").write_text("\n".join(lines) + "\n")
    odd = 'a "quoted" \\ value'
    rxs = {kind: receiver(kind) for kind in ("http", "loki", "elasticsearch", "otlp")}
    sinks = [sink(rx, kind, labels={"team": odd}) if kind == "loki" else sink(rx, kind) for kind, rx in rxs.items()]
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"], fields={"team": odd})], sinks))
    for kind, rx in rxs.items():
        rx.wait_records(len(lines), timeout=20)
    time.sleep(0.5)
    spaced = lines[4]
    for kind, rx in rxs.items():
        assert not rx.problems, (kind, rx.problems)
        got = rx.lines()
        assert sorted(x for x in got if x.strip() != spaced.strip()) == sorted(x for x in lines if x != spaced), kind
    assert rxs["loki"].records[0].fields["team"] == odd, "label value escaped in the protobuf label string"
    assert rxs["http"].records[0].fields["team"] == odd and rxs["elasticsearch"].records[0].fields["team"] == odd
    assert metric(sc, "sidecar_logship_lines_sent_total", sink="otlp") == len(lines)
    for kind, rx in rxs.items():  # only the newline (and a CR before it) is not part of the line
        assert spaced in rx.lines(), f"{kind} got {[x for x in rx.lines() if x.strip() == spaced.strip()]}, not {spaced!r}"
