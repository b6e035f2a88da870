"""Config-change notifications (`notify`): the sidecar watches a mounted ConfigMap/Secret
directory and tells the app when its content changes, by an HTTP request (with retries) and/or
a signal to the app's process.

The volumes here are written exactly as the kubelet's atomic writer writes them
(pkg/volume/util/atomic_writer.go): the content in a new timestamped `..YYYY_MM_DD_…` directory,
a `..data_tmp` symlink to it renamed over `..data`, user-visible `key -> ..data/key` links made
for new keys and removed for gone ones, then the old directory deleted. One such update must be
one notification; an update that changes no content, none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import APPS, LOCALHOST, _stop, die_with_parent, free_port, reload_config, run_sidecar_cmd, wait_until, write_config

# The watcher reads files every second (app::FILE_POLL) and a watch here settles for 300 ms, so a
# notification comes within about 1.5 s of an update; 3 s more without one means there is none.
DEBOUNCE = "300ms"
ARRIVES = 8.0
QUIET = 3.0


# ------------------------------------------------------------------------------------------------
# the volume, the app's reload endpoint, an app that counts SIGHUPs
# ------------------------------------------------------------------------------------------------
class Volume:
    """A ConfigMap volume at `root`, written as the kubelet writes one."""

    def __init__(self, root: Path, files: dict[str, str]):
        self.root = Path(root)
        self.root.mkdir()
        self.generation = 0
        self.update(files)

    def path(self, key: str) -> str:
        return str(self.root / key)

    def update(self, files: dict[str, str], pause: float = 0.05):
        """One kubelet update to exactly `files` (key -> content), `pause` seconds between its
        steps (a poll may land between any two)."""
        self.generation += 1
        ts = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{self.generation:09d}"
        os.mkdir(self.root / ts)
        for key, content in files.items():
            (self.root / ts / key).write_text(content)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        os.symlink(ts, self.root / "..data_tmp")
        time.sleep(pause)
        os.rename(self.root / "..data_tmp", data)
        time.sleep(pause)
        for key in files:
            if not (self.root / key).is_symlink():
                os.symlink(f"..data/{key}", self.root / key)
        for entry in os.listdir(self.root):
            if not entry.startswith("..") and entry not in files:
                os.unlink(self.root / entry)
        time.sleep(pause)
        if old:
            shutil.rmtree(self.root / old)


class ReloadApp:
    """The app's reload endpoint: records every request and answers each with the next status
    of `statuses`, then 200."""

    def __init__(self, statuses=()):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        self.lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with app.lock:
                    app.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body, "at": time.time()}
                    )
                    status = app.statuses.pop(0) if app.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_GET = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://{LOCALHOST}:{self.port}/-/reload"

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def wait_count(self, n: int, timeout=ARRIVES) -> list[dict]:
        wait_until(lambda: self.count() >= n, timeout, what=f"{n} request(s) at the app's reload endpoint")
        with self.lock:
            return list(self.requests)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class HupCounter:
    """apps/hup_counter.py: a process named `name` (its /proc/PID/comm) that counts SIGHUPs."""

    def __init__(self, tmp_path: Path, name: str):
        self.count_file = tmp_path / f"{name}.count"
        self.pid_file = tmp_path / f"{name}.pid"
        self.proc = subprocess.Popen(
            [sys.executable, str(APPS / "hup_counter.py"), name, str(self.count_file), str(self.pid_file)],
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        assert self.proc.stdout.readline().strip() == b"READY"
        assert Path(f"/proc/{self.proc.pid}/comm").read_text().strip() == name[:15]

    def count(self) -> int:
        return int(self.count_file.read_text()) if self.count_file.exists() else 0

    def stop(self):
        _stop(self.proc)


@pytest.fixture
def reload_app():
    apps = []

    def start(statuses=()):
        a = ReloadApp(statuses)
        apps.append(a)
        return a

    yield start
    for a in apps:
        a.stop()


@pytest.fixture
def hup_counter(tmp_path):
    started = []

    def start(name):
        c = HupCounter(tmp_path, name)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def watch(name, vol: Volume, **how):
    return {"name": name, "paths": [str(vol.root)], "debounce": DEBOUNCE, **how}


def notify_config(*watches):
    """A sidecar that does nothing but watch and tell (as configmap-reload does)."""
    return {"admin": {"listen": f"{LOCALHOST}:{free_port()}"}, "notify": list(watches)}


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------
def test_a_kubelet_update_is_one_post_naming_the_watch_and_a_rewrite_of_the_same_content_none(tmp_path, start_sidecar, reload_app):
    vol = Volume(tmp_path / "config", {"app.yaml": "level: info\n", "old.yaml": "x\n"})
    app = reload_app()
    cfg = notify_config(watch("app-config", vol, http={"url": app.url}))
    f = write_config(tmp_path / "only-notify.yaml", cfg)
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 0, p.stderr

    sc = start_sidecar(cfg)  # a notify-only sidecar is ready without an app to front
    time.sleep(1.5)
    assert app.count() == 0, "told of a change at start"

    t0 = time.time()
    vol.update({"app.yaml": "level: debug\n", "new.yaml": "n\n"})
    [req] = app.wait_count(1)
    time.sleep(QUIET)
    assert app.count() == 1, f"one kubelet update gave {app.count()} notifications"
    assert req["at"] - t0 < ARRIVES
    assert (req["method"], req["path"]) == ("POST", "/-/reload")
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("sidecar/")
    assert json.loads(req["body"]) == {
        "watch": "app-config",
        "changed": [vol.path("app.yaml"), vol.path("new.yaml"), vol.path("old.yaml")],
    }

    # The same content again as a new generation (new directory, new `..data`, new inodes and
    # mtimes), then a touch: no content changed, nothing to tell.
    vol.update({"app.yaml": "level: debug\n", "new.yaml": "n\n"})
    os.utime(vol.path("app.yaml"))
    time.sleep(QUIET)
    assert app.count() == 1, "told of an update that changed no content"

    m = sc.metrics()
    assert m.value("sidecar_notify_total", watch="app-config", result="success") == 1
    assert m.value("sidecar_notify_total", watch="app-config", result="error") == 0
    assert m.value("sidecar_notify_retries_total", watch="app-config") == 0
    last = m.value("sidecar_notify_last_success_timestamp_seconds", watch="app-config")
    assert t0 - 1 <= last <= time.time() + 1, last
    sc.assert_alive()


def test_an_app_answering_503_twice_is_retried_and_told_once(tmp_path, start_sidecar, reload_app):
    vol = Volume(tmp_path / "config", {"app.yaml": "a: 1\n"})
    app = reload_app(statuses=[503, 503])
    sc = start_sidecar(
        notify_config(watch("app", vol, http={"url": app.url, "timeout": "2s"}, retry={"attempts": 5, "backoff": "200ms"}))
    )
    time.sleep(1.5)
    vol.update({"app.yaml": "a: 2\n"})
    reqs = app.wait_count(3)
    time.sleep(QUIET)
    assert app.count() == 3, "retried past the success, or again after it"
    assert all(json.loads(r["body"])["watch"] == "app" for r in reqs)
    # Jittered exponential backoff: 100–200 ms, then 200–400 ms.
    gaps = [b["at"] - a["at"] for a, b in zip(reqs, reqs[1:])]
    assert 0.09 <= gaps[0] <= 1.0 and 0.19 <= gaps[1] <= 1.5, gaps

    m = sc.metrics()
    assert m.value("sidecar_notify_total", watch="app", result="success") == 1
    assert m.value("sidecar_notify_total", watch="app", result="error") == 0
    assert m.value("sidecar_notify_retries_total", watch="app") == 2
    assert m.value("sidecar_notify_last_success_timestamp_seconds", watch="app") > time.time() - 60
    assert "will retry" in sc.stderr_text()


def test_an_app_that_keeps_failing_is_counted_as_an_error_after_its_attempts(tmp_path, start_sidecar, reload_app):
    vol = Volume(tmp_path / "config", {"app.yaml": "a: 1\n"})
    app = reload_app(statuses=[500] * 10)
    sc = start_sidecar(notify_config(watch("app", vol, http={"url": app.url}, retry={"attempts": 2, "backoff": "100ms"})))
    time.sleep(1.5)
    vol.update({"app.yaml": "a: 2\n"})
    app.wait_count(2)
    wait_until(lambda: sc.metrics().value("sidecar_notify_total", watch="app", result="error") == 1, 5, what="the error counted")
    time.sleep(1.0)
    assert app.count() == 2
    m = sc.metrics()
    assert m.value("sidecar_notify_total", watch="app", result="success") == 0
    assert m.value("sidecar_notify_retries_total", watch="app") == 1
    assert not m.series("sidecar_notify_last_success_timestamp_seconds"), "a success time before any success"
    assert "could not be told of a config change" in sc.stderr_text()


# ------------------------------------------------------------------------------------------------
# signals
# ------------------------------------------------------------------------------------------------
def test_a_signal_reaches_the_apps_process_once_found_by_name_or_pid_file(tmp_path, start_sidecar, hup_counter):
    # Unique names: the test machine's other processes must not match.
    name = f"hupc{os.getpid() % 100000}a"
    by_name = hup_counter(name)
    by_pid = hup_counter(f"hupc{os.getpid() % 100000}b")
    a = Volume(tmp_path / "a", {"app.conf": "1\n"})
    b = Volume(tmp_path / "b", {"app.conf": "1\n"})
    sc = start_sidecar(
        notify_config(
            watch("by-name", a, signal={"signal": "SIGHUP", "process": name}),
            watch("by-pid-file", b, signal={"pid_file": str(by_pid.pid_file)}),
        )
    )
    time.sleep(1.5)
    a.update({"app.conf": "2\n"})
    wait_until(lambda: by_name.count() >= 1, ARRIVES, what="the SIGHUP, by process name")
    time.sleep(QUIET)
    assert (by_name.count(), by_pid.count()) == (1, 0)

    b.update({"app.conf": "2\n", "extra.conf": "x\n"})
    wait_until(lambda: by_pid.count() >= 1, ARRIVES, what="the SIGHUP, by pid file")
    time.sleep(QUIET)
    assert (by_name.count(), by_pid.count()) == (1, 1)
    m = sc.metrics()
    for w in ("by-name", "by-pid-file"):
        assert m.value("sidecar_notify_total", watch=w, result="success") == 1, w


def test_a_missing_process_is_retried_until_it_appears(tmp_path, start_sidecar, hup_counter):
    """The app restarting as its config changes: not found is retried, then signalled once."""
    name = f"hupc{os.getpid() % 100000}c"
    vol = Volume(tmp_path / "config", {"app.conf": "1\n"})
    sc = start_sidecar(notify_config(watch("late", vol, signal={"process": name}, retry={"attempts": 20, "backoff": "500ms", "max_backoff": "500ms"})))
    time.sleep(1.5)
    vol.update({"app.conf": "2\n"})
    wait_until(lambda: sc.metrics().value("sidecar_notify_retries_total", watch="late") >= 1, ARRIVES, what="a retry")
    app = hup_counter(name)
    wait_until(lambda: app.count() == 1, 5, what="the SIGHUP once the process is there")
    time.sleep(1.0)
    assert app.count() == 1
    assert sc.metrics().value("sidecar_notify_total", watch="late", result="success") == 1
    assert "shareProcessNamespace" in sc.stderr_text()


# ------------------------------------------------------------------------------------------------
# config: check, reload
# ------------------------------------------------------------------------------------------------
def test_check_names_every_bad_notify_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        """\
notify:
  - name: app
    paths: [etc/app/config]
    http: { url: "ftp://127.0.0.1/reload", method: "BAD METHOD" }
    signal: { signal: SIGBOGUS, process: myapp }
    retry: { attempts: 0 }
  - { name: app, paths: [/etc/x] }
"""
    )
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 1, p.stderr
    for field, words in [
        ("notify[0].paths[0]", "is not an absolute path"),
        ("notify[0].http.url", "is not an http:// URL"),
        ("notify[0].http.method", "is not an HTTP method"),
        ("notify[0].signal.signal", "`SIGBOGUS` is not a signal"),
        ("notify[0].retry.attempts", "must be at least 1"),
        ("notify[1].http", "`http`"),
        ("notify[1].name", "`app` is used twice"),
    ]:
        assert any(line.startswith(f"{f}: {field}: ") and words in line for line in p.stderr.splitlines()), f"{field} not named:\n{p.stderr}"
    # `run` refuses it the same way, before starting anything.
    r = run_sidecar_cmd("run", "-c", f)
    assert r.returncode != 0 and "notify[0].http.url" in r.stderr, r.stderr


def test_a_reload_adds_a_watch_keeps_the_running_one_and_removes_one(tmp_path, start_sidecar, reload_app):
    app = reload_app()
    a = Volume(tmp_path / "a", {"k": "1\n"})
    b = Volume(tmp_path / "b", {"k": "1\n"})
    wa = watch("a", a, http={"url": app.url})
    cfg = notify_config(wa)
    sc = start_sidecar(cfg)
    time.sleep(1.5)

    reload_config(sc, {**cfg, "notify": [wa, watch("b", b, http={"url": app.url})]})
    wait_until(
        lambda: any(lab.get("watch") == "b" for lab, _ in sc.metrics().series("sidecar_notify_total")),
        5,
        what="the new watch's series",
    )
    time.sleep(1.5)
    b.update({"k": "2\n"})
    [req] = app.wait_count(1)
    assert json.loads(req["body"])["watch"] == "b"
    a.update({"k": "2\n"})
    reqs = app.wait_count(2)
    assert json.loads(reqs[1]["body"])["watch"] == "a", "the watch kept through the reload stopped working"
    time.sleep(QUIET)
    assert app.count() == 2

    # `a` removed: its series go, and its changes are no one's business any more.
    reload_config(sc, {**cfg, "notify": [watch("b", b, http={"url": app.url})]})
    assert not [lab for lab, _ in sc.metrics().series("sidecar_notify_total") if lab.get("watch") == "a"]
    a.update({"k": "3\n"})
    time.sleep(QUIET)
    assert app.count() == 2
    sc.assert_alive()
