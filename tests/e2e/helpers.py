"""Shared helpers for Sidecar's process-level tests: ports, configs, the sidecar process, the
test apps, and small clients (http.client, curl) with bounded waits. HTTP/1 over raw sockets is
in raw_http1.py, the HTTP/2 clients in h2_clients.py, TLS in tls_helpers.py.

Everything here talks to 127.0.0.0/8 only, and every wait has a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
REPO_ROOT = HERE.parents[1]
SIDECAR_BIN = Path(os.environ.get("SIDECAR_BIN", REPO_ROOT / "target" / "release" / "sidecar"))
LOCALHOST = "127.0.0.1"

# Proxies from the environment must never carry test traffic (curl, grpcio and websockets all
# honour them).
for _var in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"


# --------------------------------------------------------------------------------------------
# ports and waiting
# --------------------------------------------------------------------------------------------
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and not handed out before in this session."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOCALHOST, port))
            return True
        except OSError:
            return False


def wait_until(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls pred() until it returns a truthy value; returns that value or raises on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the predicate may fail until the condition holds
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes, float]:
    """Reads until the peer closes (EOF or reset; a TLS alert counts). Returns (closed, bytes
    read, seconds)."""
    t0 = time.monotonic()
    got = b""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < timeout:
        try:
            d = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:  # reset, or ssl.SSLError (a subclass)
            return True, got, time.monotonic() - t0
        if not d:
            return True, got, time.monotonic() - t0
        got += d
    return False, got, time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# plain HTTP client (stdlib http.client)
# --------------------------------------------------------------------------------------------
class HeaderLookup:
    """`header(name)` for a response whose `headers` is a list of (name, value) pairs as
    received: the first value under that name in any case, else default."""

    def header(self, name: str, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default


@dataclass
class Resp(HeaderLookup):
    status: int
    headers: list  # [(name, value)] as received
    body: bytes

    def json(self):
        return json.loads(self.body)


def http_request(port, path="/", method="GET", body=None, headers=None, timeout=10.0, host=LOCALHOST) -> Resp:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Resp(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# curl
# --------------------------------------------------------------------------------------------
@dataclass
class CurlResult:
    returncode: int
    status: int
    body: bytes
    headers: dict  # lower-case name -> last value, from the final response block
    raw_headers: str  # every header block curl saw (100 Continue included)
    info: dict  # curl's -w '%{json}'
    stderr: str


def curl(*args, timeout=30.0, input=None, stdin=None) -> CurlResult:
    """Runs curl for one URL; body and headers go to temp files, -w '%{json}' to stdout."""
    with tempfile.TemporaryDirectory() as d:
        body_f, head_f = Path(d) / "body", Path(d) / "head"
        cmd = ["curl", "-sS", "--noproxy", "*", "-o", str(body_f), "-D", str(head_f), "-w", "%{json}", *map(str, args)]
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input, stdin=stdin)
        raw = head_f.read_text(errors="replace") if head_f.exists() else ""
        body = body_f.read_bytes() if body_f.exists() else b""
    try:
        info = json.loads(p.stdout.decode() or "{}")
    except json.JSONDecodeError:
        info = {}
    blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    headers = {}
    if blocks:
        for line in blocks[-1].split("\n")[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
    return CurlResult(p.returncode, int(info.get("http_code") or 0), body, headers, raw, info, p.stderr.decode(errors="replace"))


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def json_lines(text: str, key: str | None = None) -> list[dict]:
    """The JSON objects in `text`, one a line (other lines skipped); with `key`, only those
    that have that field."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (key is None or key in rec):
            out.append(rec)
    return out


class Metrics:
    def __init__(self, text: str):
        self.text = text
        self.samples = []  # (name, labels, value)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    def value(self, name, **labels) -> float:
        """Sum of the samples called name whose labels include the given ones (0 if none)."""
        return sum(v for n, lab, v in self.samples if n == name and all(lab.get(k) == str(x) for k, x in labels.items()))

    def series(self, name):
        return [(lab, v) for n, lab, v in self.samples if n == name]

    def has(self, name) -> bool:
        return any(n == name for n, _, _ in self.samples)


# --------------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------------
def die_with_parent():
    """preexec_fn for children: SIGKILL them if the test process dies without its teardown
    (they run in their own session, so a Ctrl-C at the terminal does not reach them)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(proc: subprocess.Popen, timeout=5.0):
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


class AppProcess:
    """A test app started as a child process; it prints `PORT <n>` once it listens."""

    def __init__(self, script: str, *args, log_dir: Path, tag: str | None = None):
        self.name = Path(script).stem
        # `tag` names the log file when one test starts the same app several times.
        self.log = open(log_dir / f"{tag or self.name}.stderr", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(APPS / script), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        line = self._readline(15.0)
        if not line.startswith(b"PORT "):
            self.stop()
            raise RuntimeError(f"{script} did not start: {line!r}; see {self.log.name}")
        self.port = int(line.split()[1])

    def _readline(self, timeout):
        out = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        return out[0] if out else b""

    @property
    def address(self):
        return f"{LOCALHOST}:{self.port}"

    def stop(self):
        _stop(self.proc)
        self.log.close()


class HttpApp(AppProcess):
    """The HTTP/1.1 app (apps/http_app.py) and its control endpoints."""

    def __init__(self, log_dir: Path, unhealthy=False):
        super().__init__("http_app.py", *(["--unhealthy"] if unhealthy else []), log_dir=log_dir)

    def get(self, path):
        return http_request(self.port, path, timeout=5)

    def count(self) -> dict:
        return self.get("/count").json()

    def set_health(self, ok: bool):
        assert self.get(f"/toggle-health?ok={int(ok)}").status == 200

    def fail_next_health_checks(self, n: int):
        assert self.get(f"/toggle-health?fail_next={n}").status == 200


def read_rss_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples a process's VmRSS every interval seconds in a thread; .peak_kib is the maximum."""

    def __init__(self, pid, interval=0.05):
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, read_rss_kib(self.pid))
                self.samples += 1
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(2)


# --------------------------------------------------------------------------------------------
# configs and the sidecar process
# --------------------------------------------------------------------------------------------
def make_config(
    app_port,
    *,
    health_path="/healthz",
    app_http="http1",
    limits=None,
    request_timeout=None,
    extra_inbound=(),
    drain_timeout="5s",
    log_level="info",
    interval="200ms",
    web_port=None,
    admin_port=None,
):
    """The usual test config: admin + one `web` http inbound in front of the app on app_port."""
    web = {
        "name": "web",
        "listen": f"{LOCALHOST}:{web_port or free_port()}",
        "protocol": "http",
        "limits": {
            "max_header_bytes": "16KiB",
            "header_read_timeout": "2s",
            "idle_timeout": "60s",
            "max_connections": 200,
            **(limits or {}),
        },
    }
    if request_timeout:
        web["request_timeout"] = request_timeout
    app = {"address": f"{LOCALHOST}:{app_port}", "http": app_http}
    if health_path:
        app["health"] = {"path": health_path, "interval": interval, "timeout": "1s"}
    return {
        "admin": {"listen": f"{LOCALHOST}:{admin_port or free_port()}"},
        "app": app,
        "inbound": [web, *extra_inbound],
        "telemetry": {"log_level": log_level, "access_log": {"enabled": True, "format": "json", "path": "stdout"}},
        "shutdown": {"drain_timeout": drain_timeout},
        "runtime": {"worker_threads": 2},
    }


def write_config(path: Path, cfg) -> Path:
    text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
    path.write_text(text)
    return path


def reload_config(sc: "Sidecar", cfg: dict, timeout=10.0):
    """Replaces the running sidecar's config file (write + rename, as editors and Kubernetes
    ConfigMap volumes do) and waits until the reload is counted as a success."""
    before = sc.metrics().value("sidecar_config_reloads_total", result="success")
    tmp = sc.config_path.with_name(sc.config_path.name + ".tmp")
    write_config(tmp, cfg)
    os.replace(tmp, sc.config_path)
    wait_until(
        lambda: sc.metrics().value("sidecar_config_reloads_total", result="success") > before,
        timeout,
        what='sidecar_config_reloads_total{result="success"} to increase after rewriting the config',
    )
    sc.cfg = cfg


class Sidecar:
    """The real sidecar binary as a child process (`sidecar run -c FILE`), its logs in files."""

    def __init__(self, config_path: Path, cfg: dict | None, log_dir: Path, args=None, env=None):
        if not SIDECAR_BIN.exists():
            raise RuntimeError(f"sidecar binary not found at {SIDECAR_BIN} (set SIDECAR_BIN or build it)")
        self.config_path = config_path
        self.cfg = cfg or {}
        self.stdout_path = log_dir / f"sidecar-{id(self)}.stdout"
        self.stderr_path = log_dir / f"sidecar-{id(self)}.stderr"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        e = dict(os.environ)
        e.setdefault("RUST_BACKTRACE", "1")
        e.update(env or {})
        self.proc = subprocess.Popen(
            [str(SIDECAR_BIN), *(args or ["run", "-c", str(config_path)])],
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=e,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.pid = self.proc.pid
        self.stopped_by_test = False

    # --- addresses ---------------------------------------------------------------------
    @property
    def admin_port(self) -> int:
        listen = (self.cfg.get("admin") or {}).get("listen", "127.0.0.1:15000")
        return int(listen.rsplit(":", 1)[1])

    def port(self, listener="web") -> int:
        for ib in self.cfg.get("inbound", []):
            if ib["name"] == listener:
                return int(ib["listen"].rsplit(":", 1)[1])
        raise KeyError(listener)

    # --- admin -------------------------------------------------------------------------
    def admin(self, path, method="GET", body=None, headers=None, timeout=5.0) -> Resp:
        return http_request(self.admin_port, path, method=method, body=body, headers=headers, timeout=timeout)

    def metrics(self) -> Metrics:
        r = self.admin("/metrics")
        assert r.status == 200, f"/metrics answered {r.status}"
        return Metrics(r.body.decode())

    def _wait_admin(self, path, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode} while starting:\n{self.stderr_tail()}")
            try:
                if self.admin(path, timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"sidecar admin {path} not 200 after {timeout}s:\n{self.stderr_tail()}")

    def wait_live(self, timeout=10.0):
        self._wait_admin("/live", timeout)
        return self

    def wait_ready(self, timeout=10.0):
        self._wait_admin("/ready", timeout)
        return self

    def ready_status(self) -> int:
        return self.admin("/ready", timeout=2).status

    def rejected(self, listener="web") -> dict:
        """sidecar_inbound_rejected_total{listener} by reason: {reason: value}."""
        return {
            lab.get("reason"): v
            for lab, v in self.metrics().series("sidecar_inbound_rejected_total")
            if lab.get("listener") == listener
        }

    # --- logs --------------------------------------------------------------------------
    def stdout_text(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def stderr_tail(self, n=40) -> str:
        return "\n".join(self.stderr_text().splitlines()[-n:])

    def access_log(self) -> list[dict]:
        """Access-log records: the JSON objects on stdout that carry a `direction` field."""
        return json_lines(self.stdout_text(), key="direction")

    def wait_access_log(self, pred=lambda rec: True, n: int = 1, timeout: float = 5) -> list[dict]:
        """The access-log records that match pred, once there are at least n of them. Records are
        written by a background thread a few milliseconds after the response, so a test that reads
        the log right after a request must wait for them."""
        return wait_until(lambda: (recs := [r for r in self.access_log() if pred(r)]) and len(recs) >= n and recs,
                          timeout, what=f"{n} matching access-log record(s)")

    # --- process -----------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self):
        assert self.alive(), f"sidecar died with exit status {self.proc.returncode}:\n{self.stderr_tail()}"

    def signal(self, sig):
        self.stopped_by_test = True
        self.proc.send_signal(sig)

    def wait_exit(self, timeout) -> int:
        return self.proc.wait(timeout)

    def rss_kib(self) -> int:
        return read_rss_kib(self.pid)

    def stop(self):
        rc = _stop(self.proc)
        self._out.close()
        self._err.close()
        return rc


@dataclass
class Web:
    """An app behind a sidecar whose HTTP listener is called `web`."""

    app: HttpApp
    sc: Sidecar

    @property
    def port(self):
        return self.sc.port("web")

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"


def run_sidecar_cmd(*args, timeout=20.0, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([str(SIDECAR_BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e)
