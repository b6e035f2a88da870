"""Log shipping (`logship`): the sidecar tails the app's files and delivers every line, at least
once and normally exactly once, to HTTP, Loki, Elasticsearch or OTLP receivers.

This file: what the three logship test files share (the numbered-line writer, configs, waits),
the config (`check`, a logship-only sidecar, secrets) and the shipper's life (reload, SIGTERM
drain, kill -9, files lost while stopped). Rotation and file shapes are in
test_logship_files.py; sink failures and each sink's wire format in test_logship_sinks.py; the
receivers in logship_receivers.py.

Every correctness case writes numbered lines and checks at the receiver that each number
arrived exactly once (after kill -9: at least once).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import LOCALHOST, free_port, reload_config, run_sidecar_cmd, wait_until, write_config
from logship_receivers import LogReceiver, basic_auth

# The pod's identity comes only from the env a test gives the sidecar (the machine running the
# tests may set CONTAINER_NAME itself).
for _var in ("POD_NAME", "POD_NAMESPACE", "NODE_NAME", "CONTAINER_NAME"):
    os.environ.pop(_var, None)

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


# ------------------------------------------------------------------------------------------------
# The app's side, shared by the three logship test files: files of numbered lines, and
# checking that each number arrived once
# ------------------------------------------------------------------------------------------------
NUMBERED = re.compile(r"^(\S+) line (\d{6}) ")


class LogFile:
    """An app writing numbered lines (`TAG line 000123 xxx…`, `line_bytes` long with the
    newline) to `path` through an O_APPEND handle, one write() a call, as apps and their logging
    libraries do. `lock` is held while writing, so a rotation from the test never splits a line."""

    def __init__(self, path: Path, tag: str, line_bytes=100):
        self.path, self.tag, self.line_bytes = Path(path), tag, line_bytes
        self.written = 0
        self.lock = threading.Lock()
        self.f = open(self.path, "ab", buffering=0)
        self._stop = threading.Event()
        self._thread = None

    def line(self, i: int) -> bytes:
        head = f"{self.tag} line {i:06d} "
        return (head + "x" * max(0, self.line_bytes - len(head) - 1) + "\n").encode()

    def write(self, n: int) -> range:
        """Appends lines written..written+n-1 in one write()."""
        with self.lock:
            first = self.written
            self.f.write(b"".join(self.line(i) for i in range(first, first + n)))
            self.written += n
            return range(first, self.written)

    def start(self, per_second=200):
        """Keeps writing in a thread, in bursts of per_second/20 lines every 50 ms."""
        def run():
            while not self._stop.wait(0.05):
                self.write(max(1, per_second // 20))

        self._stop.clear()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread:
            self._stop.set()
            self._thread.join(5)
            self._thread = None

    def rotate_rename(self, keep=3, tail_lines=0):
        """logrotate's default: app.log.N-1 → app.log.N ..., app.log → app.log.1; the app writes
        `tail_lines` more lines to the renamed file through its open handle, then reopens."""
        with self.lock:
            for i in range(keep - 1, 0, -1):
                old = self.path.with_name(f"{self.path.name}.{i}")
                if old.exists():
                    os.rename(old, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.rename(self.path, self.path.with_name(self.path.name + ".1"))
        self.write(tail_lines)
        with self.lock:
            self.f.close()
            self.f = open(self.path, "ab", buffering=0)

    def copytruncate(self):
        """logrotate's copytruncate: app.log.1 → app.log.2, copy app.log → app.log.1, then
        truncate app.log (no line is written between the two)."""
        with self.lock:
            one, two = self.path.with_name(self.path.name + ".1"), self.path.with_name(self.path.name + ".2")
            if one.exists():
                os.rename(one, two)
            shutil.copyfile(self.path, one)
            os.truncate(self.path, 0)

    def truncate(self):
        with self.lock:
            os.truncate(self.path, 0)

    def delete_and_recreate(self):
        with self.lock:
            self.f.close()
            os.unlink(self.path)
            self.f = open(self.path, "ab", buffering=0)

    def close(self):
        self.stop()
        self.f.close()


def count_numbers(lines) -> tuple[Counter, list[str]]:
    """{(tag, n): times seen} over the numbered lines, and the lines that are not numbered."""
    seen, other = Counter(), []
    for line in lines:
        m = NUMBERED.match(line or "")
        if m:
            seen[(m.group(1), int(m.group(2)))] += 1
        else:
            other.append(line)
    return seen, other


def delivery_report(lines, expected: dict) -> tuple[list, list, list]:
    """(missing, duplicated, unexpected) for `expected` = {tag: count written}."""
    seen, _ = count_numbers(lines)
    want = {(t, i) for t, n in expected.items() for i in range(n)}
    missing = sorted(want - set(seen))
    dups = sorted((k, c) for k, c in seen.items() if c > 1)
    extra = sorted(set(seen) - want)
    return missing, dups, extra


def describe(missing, dups, extra) -> str:
    def fmt(ks):
        return ", ".join(f"{k[0]}#{k[1]}" if isinstance(k[0], str) else f"{k[0][0]}#{k[0][1]}x{k[1]}" for k in ks[:8])

    return (f"{len(missing)} missing ({fmt(missing)}), {len(dups)} duplicated ({fmt(dups)}), "
            f"{len(extra)} never written ({fmt(extra)})")


# ------------------------------------------------------------------------------------------------
# shared by the three logship test files
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def receiver():
    """Factory: receiver(kind="http") -> a LogReceiver, stopped at teardown."""
    made = []

    def make(kind="http"):
        r = LogReceiver(kind)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def source(paths, name="app", **kw) -> dict:
    return {"name": name, "paths": [str(p) for p in paths], **kw}


def sink(rx: LogReceiver, name="out", **kw) -> dict:
    """A sink for receiver rx with short batches and retries, so tests do not wait."""
    s = {
        "name": name,
        "type": rx.kind,
        "endpoint": rx.url,
        "batch": {"max_events": 1000, "max_bytes": "1MiB", "timeout": "200ms"},
        "retry": {"initial_backoff": "100ms", "max_backoff": "1s"},
        "request_timeout": "5s",
    }
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(s.get(k), dict):
            s[k] = {**s[k], **v}
        else:
            s[k] = v
    return s


def ls_config(tmp_path: Path, sources, sinks, drain_timeout="5s", log_level="info", **logship) -> dict:
    """A sidecar that only ships logs: admin + logship, checkpoints under tmp_path/ckpt."""
    return {
        "admin": {"listen": f"{LOCALHOST}:{free_port()}"},
        "logship": {
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "read_from": "beginning",
            "scan_interval": "200ms",
            "rotate_wait": "5s",
            "sources": sources,
            "sinks": sinks,
            **logship,
        },
        "telemetry": {"log_level": log_level},
        "shutdown": {"drain_timeout": drain_timeout},
    }


def metric(sc, name, **labels) -> float:
    return sc.metrics().value(name, **labels)


def wait_delivered(rx: LogReceiver, expected: dict, timeout=30.0, quiet=1.0):
    """Waits until every numbered line in expected ({tag: lines written}) has arrived, then
    `quiet` seconds more for late duplicates; returns (missing, duplicated, unexpected)."""
    total = sum(expected.values())

    def all_there():
        if len(rx.records) < total:
            return False
        missing, _, _ = delivery_report(rx.lines(), expected)
        return not missing

    try:
        wait_until(all_there, timeout, interval=0.2, what="every numbered line at the receiver")
    except AssertionError:
        raise AssertionError(f"after {timeout}s: {describe(*delivery_report(rx.lines(), expected))}; "
                             f"{len(rx.requests)} requests, problems {rx.problems[:3]}") from None
    time.sleep(quiet)
    return delivery_report(rx.lines(), expected)


def wait_delivered_union(receivers, expected: dict, timeout=30.0):
    """wait_delivered over the lines of several receivers together."""
    class Union:
        records = property(lambda self: [r for rx in receivers for r in rx.records])
        requests = property(lambda self: [r for rx in receivers for r in rx.requests])
        problems = property(lambda self: [p for rx in receivers for p in rx.problems])

        def lines(self):
            return [x for rx in receivers for x in rx.lines()]

    return wait_delivered(Union(), expected, timeout)


def assert_exactly_once(rx: LogReceiver, expected: dict, timeout=30.0):
    missing, dups, extra = wait_delivered(rx, expected, timeout)
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert not rx.problems, rx.problems


def dead_letters(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_a_logship_only_config_is_accepted_runs_and_ships_documents(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    app.write(3)
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"], fields={"team": "shop"})], [sink(rx)])
    f = write_config(tmp_path / "only-logship.yaml", cfg)
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 0, p.stderr

    sc = start_sidecar(cfg)  # waits for /ready 200
    assert_exactly_once(rx, {"a": 3})
    docs = [r.fields for r in rx.records]
    for d in docs:
        assert list(d)[:5] == ["timestamp", "source", "file", "team", "message"], d
        assert RFC3339.match(d["timestamp"]), d["timestamp"]
        assert d["source"] == "app" and d["file"] == str(tmp_path / "app.log") and d["team"] == "shop"
        assert "truncated" not in d
    assert [d["message"] for d in docs] == [app.line(i).decode().rstrip("\n") for i in range(3)], "in file order"
    assert rx.requests[0].method == "POST" and rx.requests[0].path == "/ingest"

    m = sc.metrics()
    assert m.value("sidecar_logship_lines_read_total", source="app") == 3
    assert m.value("sidecar_logship_lines_sent_total", sink="out") == 3
    assert m.value("sidecar_logship_files", source="app") == 1
    assert m.value("sidecar_logship_send_errors_total", sink="out") == 0
    for name in ("sidecar_logship_pending_bytes", "sidecar_logship_dead_letter_total", "sidecar_logship_lost_bytes_total",
                 "sidecar_logship_truncated_total", "sidecar_logship_dropped_total"):
        assert m.has(name), f"{name} missing from /metrics"
    assert sc.ready_status() == 200


def test_check_accepts_every_documented_field(tmp_path):
    (tmp_path / "token").write_text("t0ken\n")
    (tmp_path / "password").write_text("pw\n")
    common = {"batch": {"max_events": 10000, "max_bytes": "1MiB", "timeout": "1s"},
              "retry": {"initial_backoff": "200ms", "max_backoff": "10s"}, "request_timeout": "10s", "compression": "gzip"}
    cfg = {
        "admin": {"listen": f"{LOCALHOST}:{free_port()}"},
        "logship": {
            "checkpoint_dir": str(tmp_path / "ckpt"), "read_from": "end", "scan_interval": "1s", "rotate_wait": "5s",
            "sources": [
                {"name": "app", "paths": [str(tmp_path / "*.log")], "exclude": [str(tmp_path / "*.gz")], "format": "text",
                 "multiline": {"start_pattern": r"^\S", "timeout": "1s"}, "max_line_bytes": "1MiB", "fields": {"team": "shop"}},
                {"name": "api", "paths": [str(tmp_path / "api/*.json")], "format": "json"},
            ],
            "sinks": [
                {"name": "h", "type": "http", "endpoint": "http://127.0.0.1:9/ingest", "headers": {"x-token": "s3cret"},
                 "token": "abc", "when_full": "block", "dead_letter": str(tmp_path / "dl.ndjson"), **common},
                {"name": "l", "type": "loki", "endpoint": "http://127.0.0.1:9", "encoding": "protobuf",
                 "labels": {"cluster": "test"}, "token_file": str(tmp_path / "token"), "when_full": "drop_newest", **common},
                {"name": "e", "type": "elasticsearch", "endpoint": "http://127.0.0.1:9", "index": "logs", "user": "elastic",
                 "password_file": str(tmp_path / "password"), **common},
                {"name": "o", "type": "otlp", "endpoint": "http://127.0.0.1:9", "user": "u", "password": "p"},
            ],
        },
        "shutdown": {"drain_timeout": "5s"},
    }
    f = write_config(tmp_path / "full.yaml", cfg)
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 0, p.stderr


def _check_errors(tmp_path, name, cfg) -> str:
    f = write_config(tmp_path / f"{name}.yaml", cfg)
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 1, (p.returncode, p.stderr)
    return p.stderr


def _named(stderr: str, field: str) -> bool:
    """The error names `field` (written `a.b[0].c`; `a.b.0.c` also accepted) after the file name."""
    alt = re.escape(field).replace(r"\[", r"(?:\[|\.)").replace(r"\]", r"\]?")
    return re.search(rf": {alt}: \S", stderr) is not None


def test_check_rejects_bad_logship_configs_naming_the_field(tmp_path, receiver):
    rx = receiver("http")
    good = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)])

    bad = json.loads(json.dumps(good))
    bad["logship"]["sinks"][0]["type"] = "kafka"
    err = _check_errors(tmp_path, "type", bad)
    assert _named(err, "logship.sinks[0].type"), err

    bad = json.loads(json.dumps(good))
    del bad["logship"]["checkpoint_dir"]
    err = _check_errors(tmp_path, "ckpt", bad)
    assert _named(err, "logship.checkpoint_dir"), err

    bad = json.loads(json.dumps(good))
    bad["logship"]["sources"][0]["multiline"] = {"start_pattern": "^(unclosed", "timeout": "1s"}
    err = _check_errors(tmp_path, "regex", bad)
    assert _named(err, "logship.sources[0].multiline.start_pattern"), err

    # All at once, as `check` does for the rest of the file.
    bad = json.loads(json.dumps(good))
    del bad["logship"]["checkpoint_dir"]
    bad["logship"]["sinks"][0]["type"] = "kafka"
    bad["logship"]["sources"][0]["multiline"] = {"start_pattern": "^(unclosed", "timeout": "1s"}
    bad["logship"]["sinks"][0]["when_full"] = "explode"
    err = _check_errors(tmp_path, "all", bad)
    for field in ("logship.checkpoint_dir", "logship.sinks[0].type", "logship.sources[0].multiline.start_pattern"):
        assert _named(err, field), f"{field} not reported:\n{err}"


def test_check_refuses_what_run_would_refuse(tmp_path, receiver):
    """`check` is the dry run of `run`: a credentials file that cannot be read and a header
    value that cannot be sent (both refused by `run` at start) are errors here too."""
    rx = receiver("http")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])],
                    [sink(rx, token_file=str(tmp_path / "missing-token"), headers={"x-a": "two\nlines"})])
    f = write_config(tmp_path / "run-refuses.yaml", cfg)
    assert run_sidecar_cmd("run", "-c", f, timeout=15).returncode != 0, "run is expected to refuse this file"
    err = _check_errors(tmp_path, "check-too", cfg)
    assert _named(err, "logship.sinks[0].token_file"), err
    assert re.search(r": logship\.sinks(\[0\]|\.0)\.headers", err), err


def test_secrets_are_sent_but_never_shown_in_config_or_logs(tmp_path, start_sidecar, receiver):
    secrets = {"hdr": "hdr-s3cret-1", "tok": "tok-s3cret-2", "pw": "pw-s3cret-3", "tokfile": "tok-s3cret-4",
               "pwfile": "pw-s3cret-5"}
    (tmp_path / "token").write_text(secrets["tokfile"] + "\n")
    (tmp_path / "password").write_text(secrets["pwfile"] + "\n")
    h, es, loki, otlp = receiver("http"), receiver("elasticsearch"), receiver("loki"), receiver("otlp")
    sinks = [
        sink(h, "h", headers={"x-token": secrets["hdr"]}, token=secrets["tok"]),
        sink(es, "es", user="elastic", password=secrets["pw"], index="logs"),
        sink(loki, "loki", token_file=str(tmp_path / "token")),
        sink(otlp, "otlp", user="collector", password_file=str(tmp_path / "password")),
    ]
    app = LogFile(tmp_path / "app.log", "a")
    app.write(5)
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], sinks, log_level="debug"))
    for rx in (h, es, loki, otlp):
        assert_exactly_once(rx, {"a": 5})

    assert h.requests[0].header("x-token") == secrets["hdr"]
    assert h.requests[0].header("authorization") == f"Bearer {secrets['tok']}"
    assert es.requests[0].header("authorization") == basic_auth("elastic", secrets["pw"])
    assert loki.requests[0].header("authorization") == f"Bearer {secrets['tokfile']}", "token_file: trailing newline trimmed"
    assert otlp.requests[0].header("authorization") == basic_auth("collector", secrets["pwfile"])

    r = sc.admin("/config")
    assert r.status == 200
    shown = r.body.decode()
    assert "x-token" in shown, "the header's name is shown, only its value hidden"
    errs = sc.stderr_text() + sc.stdout_text()
    for name, value in secrets.items():
        assert value not in shown, f"{name} shown in /config"
        assert value not in errs, f"{name} in the sidecar's logs"
    assert basic_auth("elastic", secrets["pw"]).split()[1] not in shown + errs


# ------------------------------------------------------------------------------------------------
# the shipper's life
# ------------------------------------------------------------------------------------------------
def test_a_config_change_mid_stream_loses_and_repeats_nothing(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"], fields={"team": "shop"})], [sink(rx)])
    sc = start_sidecar(cfg)
    app.start(per_second=300)
    try:
        wait_until(lambda: len(rx.records) > 200, 20, what="records flowing before the reload")
        cfg2 = json.loads(json.dumps(cfg))
        cfg2["logship"]["sources"][0]["fields"]["env"] = "prod"
        reload_config(sc, cfg2)  # the file edited (write + rename)
        time.sleep(0.5)  # the shipper restarts just after the reload is counted
        reloaded_at = app.written
        time.sleep(1.0)
        cfg3 = json.loads(json.dumps(cfg2))
        cfg3["logship"]["sources"][0]["fields"]["tier"] = "gold"
        before = metric(sc, "sidecar_config_reloads_total", result="success")
        write_config(sc.config_path, cfg3)
        os.kill(sc.pid, signal.SIGHUP)
        wait_until(lambda: metric(sc, "sidecar_config_reloads_total", result="success") > before, 10,
                   what="a successful reload after SIGHUP")
        time.sleep(0.5)
        sighup_at = app.written
        time.sleep(1.0)
    finally:
        app.stop()
    assert_exactly_once(rx, {"a": app.written})
    by_n = {int(r.line.split()[2]): r.fields for r in rx.records}
    assert all("env" not in by_n[i] for i in range(50)), "the first lines were shipped before the change"
    assert all(by_n[i].get("env") == "prod" for i in range(reloaded_at, app.written)), "lines read after the reload carry the new field"
    assert all(by_n[i].get("tier") == "gold" for i in range(sighup_at, app.written))
    sc.assert_alive()


def test_a_config_change_during_a_backlog_repeats_nothing(tmp_path, start_sidecar, receiver):
    """As above with a slow sink: at the reload most of what was read is delivered but the
    sidecar is still sending; the new shipper starts from the checkpoint, which must cover
    every line already acknowledged."""
    rx = receiver("http")
    rx.slow(0.05)
    app = LogFile(tmp_path / "app.log", "a")
    app.write(30000)
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, batch={"max_events": 100})])
    sc = start_sidecar(cfg)
    wait_until(lambda: len(rx.records) >= 3000, 30, what="3,000 lines delivered before the reload")
    cfg2 = json.loads(json.dumps(cfg))
    cfg2["logship"]["sources"][0]["fields"] = {"env": "prod"}
    reload_config(sc, cfg2)
    rx.slow(0)
    missing, dups, extra = wait_delivered(rx, {"a": 30000}, timeout=60)
    assert not (missing or dups or extra), describe(missing, dups, extra)


def test_a_reload_that_moves_the_sink_resumes_from_the_checkpoint(tmp_path, start_sidecar, receiver):
    old, new = receiver("http"), receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(old)])
    sc = start_sidecar(cfg)
    app.start(per_second=300)
    try:
        wait_until(lambda: len(old.records) > 200, 20, what="records flowing to the old sink")
        cfg2 = json.loads(json.dumps(cfg))
        cfg2["logship"]["sinks"][0]["endpoint"] = new.url
        reload_config(sc, cfg2)
        wait_until(lambda: len(new.records) > 200, 20, what="records flowing to the new sink")
    finally:
        app.stop()
    missing, dups, extra = wait_delivered_union([old, new], {"a": app.written})
    assert not (missing or dups or extra), describe(missing, dups, extra)
    time.sleep(0.5)
    n_old = len(old.records)
    app.write(10)
    wait_until(lambda: len(old.records) + len(new.records) >= app.written, 20, what="the last 10 lines")
    assert len(old.records) == n_old, "nothing goes to the old sink after the reload"


def test_a_bad_logship_change_is_refused_on_reload_and_shipping_goes_on(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)])
    sc = start_sidecar(cfg)
    app.write(50)
    wait_delivered(rx, {"a": 50}, quiet=0.2)
    bad = json.loads(json.dumps(cfg))
    bad["logship"]["sources"][0]["multiline"] = {"start_pattern": "^(unclosed", "timeout": "1s"}
    before = metric(sc, "sidecar_config_reloads_total", result="error")
    write_config(sc.config_path, bad)
    os.kill(sc.pid, signal.SIGHUP)
    wait_until(lambda: metric(sc, "sidecar_config_reloads_total", result="error") > before, 10,
               what='sidecar_config_reloads_total{result="error"} after a bad logship change')
    assert "start_pattern" in sc.stderr_text(), "the refused field is named in the log"
    app.write(50)
    assert_exactly_once(rx, {"a": 100})
    sc.assert_alive()


def test_kill_9_mid_stream_then_restart_delivers_every_line_at_least_once(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)])
    sc = start_sidecar(cfg)
    app.start(per_second=400)
    try:
        wait_until(lambda: len(rx.records) > 500, 20, what="records flowing")
        sc.signal(signal.SIGKILL)
        sc.wait_exit(5)
        time.sleep(1.0)  # the app goes on writing while nobody reads
        sc2 = start_sidecar(cfg)
        time.sleep(1.0)
    finally:
        app.stop()
    missing, dups, extra = wait_delivered(rx, {"a": app.written}, timeout=40)
    print(f"\nkill -9: {app.written} lines, {len(dups)} delivered twice or more "
          f"({sum(c - 1 for _, c in dups)} extra copies)")
    assert not missing and not extra, describe(missing, dups, extra)
    assert not rx.problems, rx.problems
    # Duplicates may only be lines in flight at the kill: at most a few batches' worth.
    assert sum(c - 1 for _, c in dups) <= 3 * 1000, describe(missing, dups, extra)
    sc2.assert_alive()


def test_sigterm_ships_pending_lines_within_drain_timeout_and_checkpoints_them(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    # A 60 s batch timeout: lines read are held in the batch until shutdown flushes it.
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])],
                    [sink(rx, batch={"max_events": 10000, "max_bytes": "1MiB", "timeout": "60s"})], drain_timeout="5s")
    sc = start_sidecar(cfg)
    app.write(500)
    wait_until(lambda: metric(sc, "sidecar_logship_lines_read_total", source="app") == 500, 20, what="500 lines read")
    time.sleep(0.3)
    assert len(rx.records) == 0, "nothing should be sent before the 60 s batch timeout"
    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    rc = sc.wait_exit(15)
    took = time.monotonic() - t0
    assert rc == 0, sc.stderr_tail()
    assert took < 5 + 3, f"exit took {took:.1f}s with a 5 s drain_timeout"
    assert_exactly_once(rx, {"a": 500}, timeout=5)
    ckpts = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file() and "dead-letter" not in p.parts]
    assert ckpts, "no checkpoint file written"
    for p in ckpts:
        if not p.name.endswith(".tmp"):
            json.loads(p.read_text())  # written whole (tmp + fsync + rename), never half

    sent = len(rx.requests)
    cfg["logship"]["sinks"][0]["batch"]["timeout"] = "200ms"
    sc2 = start_sidecar(cfg)
    wait_until(lambda: metric(sc2, "sidecar_logship_files", source="app") == 1, 10, what="the file open again")
    app.write(20)
    assert_exactly_once(rx, {"a": 520})
    assert metric(sc2, "sidecar_logship_lines_read_total", source="app") == 20, "the restart resumed at the checkpoint"
    assert len(rx.requests) > sent


def test_sigterm_in_the_middle_of_a_backlog_then_restart_is_exactly_once(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    rx.slow(0.3)  # 100 lines a request, 0.3 s each: 50,000 lines take far longer than the drain
    app = LogFile(tmp_path / "app.log", "a")
    app.write(50000)
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx, batch={"max_events": 100})], drain_timeout="5s")
    sc = start_sidecar(cfg)
    wait_until(lambda: len(rx.records) >= 500, 20, what="the backlog being shipped")
    t0 = time.monotonic()
    sc.signal(signal.SIGTERM)
    assert sc.wait_exit(15) == 0
    assert time.monotonic() - t0 < 5 + 3
    shipped = len(rx.records)
    assert shipped < 50000, "the test needs lines left over at the stop"
    rx.ok()
    cfg["logship"]["sinks"][0]["batch"]["max_events"] = 10000
    start_sidecar(cfg)
    assert_exactly_once(rx, {"a": 50000}, timeout=60)


def test_a_file_deleted_unshipped_while_stopped_is_counted_as_lost_bytes(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    app.write(10)
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)], drain_timeout="1s")
    sc = start_sidecar(cfg)
    assert_exactly_once(rx, {"a": 10})
    rx.fail(503)  # the sink fails from now on: what follows is read, never delivered
    app.write(50)
    wait_until(lambda: metric(sc, "sidecar_logship_lines_read_total", source="app") >= 60, 20, what="the new lines read")
    wait_until(lambda: metric(sc, "sidecar_logship_send_errors_total", sink="out") > 0, 20, what="a failed send")
    sc.signal(signal.SIGTERM)
    sc.wait_exit(15)
    app.close()
    os.unlink(app.path)
    rx.ok()
    sc2 = start_sidecar(cfg)
    lost = wait_until(lambda: metric(sc2, "sidecar_logship_lost_bytes_total", source="app"), 15,
                      what="sidecar_logship_lost_bytes_total > 0 after a file vanished unshipped")
    assert 0 < lost <= 50 * 100, lost
    assert delivery_report(rx.lines(), {"a": 10})[1] == [], "no line shipped twice"
