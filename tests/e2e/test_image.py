"""The container image and a pod on one machine, with the Docker engine (issue 14).

The image is built once per session by scripts/build-image: a statically linked binary in an
image FROM scratch. A "pod" is two containers from it sharing one network namespace
(`--network container:APP`) and a log volume, both non-root with read-only root filesystems and
no capabilities: the demo app (`sidecar demo-app` on 127.0.0.1:8080) and Sidecar in front of it.
Ports are published on the app's container, whose network namespace it is, to 127.0.0.1 only;
the log receiver runs here, on the gateway address of a Docker network the test creates (the
host's side of it), so no traffic leaves loopback and that network.

Skipped when no Docker engine answers, unless SIDECAR_REQUIRE_DOCKER=1 (CI sets it where an
engine runs), which makes that a failure. SIDECAR_IMAGE_NO_BUILD=1 makes the image from the
static binary already built (`scripts/build-image --no-build`), for quick runs while editing tests.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO_ROOT, Metrics, curl, free_port, http_request, wait_until
from logship_receivers import LogReceiver

REQUIRE_DOCKER = os.environ.get("SIDECAR_REQUIRE_DOCKER") == "1"
VERSION = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["package"]["version"]
IMAGE = f"sidecar:{VERSION}"
# The aim for the image: a sidecar's image is pulled onto every node that runs a pod.
MAX_IMAGE_BYTES = 15 * 1000 * 1000
UID = "65532"


def _docker_problem() -> str | None:
    try:
        p = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker info`: {e}"
    if p.returncode != 0:
        return f"`docker info` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
    return None


DOCKER_PROBLEM = _docker_problem()

pytestmark = [
    pytest.mark.skipif(
        DOCKER_PROBLEM is not None and not REQUIRE_DOCKER,
        reason=f"no Docker engine ({DOCKER_PROBLEM}); SIDECAR_REQUIRE_DOCKER=1 makes this a failure",
    ),
    # The first test builds the image: a cold static build of the release binary is minutes.
    pytest.mark.timeout(1800),
]


def docker(*args, timeout=60.0, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(["docker", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"docker {' '.join(map(str, args))}: exit {p.returncode}\n{p.stderr.strip()}")
    return p


def inspect(kind: str, name: str) -> dict:
    return json.loads(docker(kind, "inspect", name).stdout)[0]


@pytest.fixture(scope="session")
def image() -> str:
    if DOCKER_PROBLEM is not None:
        pytest.fail(f"SIDECAR_REQUIRE_DOCKER=1 but no Docker engine: {DOCKER_PROBLEM}")
    args = ["--no-build"] if os.environ.get("SIDECAR_IMAGE_NO_BUILD") == "1" else []
    p = subprocess.run([str(REPO_ROOT / "scripts" / "build-image"), *args], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=1700)
    assert p.returncode == 0, f"scripts/build-image exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    print(p.stdout.strip().splitlines()[-1])
    return IMAGE


# ------------------------------------------------------------------------------------------------
# the image
# ------------------------------------------------------------------------------------------------
def test_image_is_one_static_binary_from_scratch_and_runs_non_root_read_only(image):
    info = inspect("image", image)
    cfg = info["Config"]
    assert cfg["User"] == f"{UID}:{UID}", cfg["User"]
    assert cfg["Entrypoint"] == ["/sidecar"], cfg["Entrypoint"]
    assert cfg["Healthcheck"]["Test"] == ["CMD", "/sidecar", "version"], cfg["Healthcheck"]
    assert len(info["RootFS"]["Layers"]) == 1, f"FROM scratch and one COPY make one layer: {info['RootFS']['Layers']}"
    assert info["Size"] < MAX_IMAGE_BYTES, f"image is {info['Size'] / 1e6:.1f} MB, over {MAX_IMAGE_BYTES / 1e6:.0f} MB"
    assert inspect("image", "sidecar:latest")["Id"] == info["Id"]

    p = docker("run", "--rm", "--read-only", "--user", f"{UID}:{UID}", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--network", "none", image, "version")
    assert p.stdout.startswith(f"sidecar {VERSION} (commit "), p.stdout
    # No shell, nothing else: only the binary is there to run.
    p = docker("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", image, "-c", "true", check=False)
    assert p.returncode != 0 and "no such file" in p.stderr.lower(), (p.returncode, p.stderr)
    # The config check runs in it too, and names what is missing.
    p = docker("run", "--rm", "--read-only", "--network", "none", image, check=False)
    assert p.returncode == 1 and "/etc/sidecar/config/sidecar.yaml" in p.stderr, (p.returncode, p.stderr)


def test_image_carries_the_ca_bundle_for_outbound_tls_without_a_ca(image, tmp_path):
    """Outbound TLS without `upstream.tls.ca` verifies against the system roots: the image
    carries Debian's bundle (Mozilla's roots) where rustls-native-certs looks, so `check`,
    which loads them as `run` does, accepts the config instead of asking for `ca`."""
    conf = tmp_path / "config"
    conf.mkdir()
    conf.chmod(0o755)
    path = conf / "sidecar.yaml"
    path.write_text("outbound:\n"
                    "  - name: public\n"
                    "    listen: 127.0.0.1:9001\n"
                    "    upstream: { endpoints: [\"api.example.com:443\"], tls: { server_name: api.example.com } }\n")
    path.chmod(0o644)
    p = docker("run", "--rm", "--read-only", "--network", "none", "-v", f"{conf}:/etc/sidecar/config:ro", image,
               "check", "-c", "/etc/sidecar/config/sidecar.yaml", check=False)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)


# ------------------------------------------------------------------------------------------------
# a pod
# ------------------------------------------------------------------------------------------------
@dataclass
class PodNet:
    name: str
    gateway: str
    receiver: LogReceiver


@pytest.fixture(scope="module")
def pod_net(image):
    """A Docker network of the test's own, and the log receiver on its gateway address."""
    name = f"sidecar-e2e-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    rx = None
    try:
        gateway = inspect("network", name)["IPAM"]["Config"][0]["Gateway"]
        rx = LogReceiver("http", host=gateway)
        yield PodNet(name, gateway, rx)
    finally:
        if rx is not None:
            rx.stop()
        docker("network", "rm", name, check=False)


class Pod:
    """The app and its sidecar, as Kubernetes would run them: a shared network namespace and an
    emptyDir for the app's logs (here a tmpfs volume owned by the non-root UID)."""

    def __init__(self, image: str, net: PodNet, tmp: Path, drain_delay: str):
        self.id = uuid.uuid4().hex[:8]
        self.app, self.sidecar = f"sidecar-e2e-app-{self.id}", f"sidecar-e2e-sidecar-{self.id}"
        self.logs_vol, self.state_vol = f"sidecar-e2e-logs-{self.id}", f"sidecar-e2e-state-{self.id}"
        self.web_port, self.admin_port = free_port(), free_port()
        self.image, self.net = image, net
        self.config_dir = tmp / f"config-{self.id}"
        self.config_dir.mkdir()
        self.config_dir.chmod(0o755)  # the container's UID reads it; pytest's tmp dirs are 0700
        config = f"""\
admin: {{ listen: 0.0.0.0:15000 }}
app:
  address: 127.0.0.1:8080
  health: {{ path: /healthz, interval: 200ms, timeout: 500ms }}
inbound:
  - {{ name: web, listen: 0.0.0.0:15006, protocol: http, request_timeout: 15s }}
logship:
  checkpoint_dir: /var/lib/sidecar
  scan_interval: 200ms
  sources:
    - {{ name: app, paths: ["/var/log/app/*.log"], format: json, fields: {{ pod: "{self.id}" }} }}
  sinks:
    - {{ name: receiver, type: http, endpoint: "{net.receiver.url}", batch: {{ timeout: 200ms }} }}
telemetry: {{ log_level: info }}
shutdown: {{ drain_delay: {drain_delay}, drain_timeout: 10s }}
"""
        (self.config_dir / "sidecar.yaml").write_text(config)
        (self.config_dir / "sidecar.yaml").chmod(0o644)

    def start(self):
        for vol in (self.logs_vol, self.state_vol):
            docker("volume", "create", "--driver", "local", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
                   "--opt", f"o=uid={UID},gid={UID},mode=0755,size=16m", vol)
        restricted = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        docker("run", "-d", "--name", self.app, "--network", self.net.name, *restricted,
               "-p", f"127.0.0.1:{self.web_port}:15006", "-p", f"127.0.0.1:{self.admin_port}:15000",
               "-v", f"{self.logs_vol}:/var/log/app",
               self.image, "demo-app", "--listen", "127.0.0.1:8080", "--log-file", "/var/log/app/app.log")
        docker("run", "-d", "--name", self.sidecar, "--network", f"container:{self.app}", *restricted,
               "--health-interval", "1s", "--health-start-period", "1s",
               "-v", f"{self.config_dir}:/etc/sidecar/config:ro", "-v", f"{self.logs_vol}:/var/log/app:ro",
               "-v", f"{self.state_vol}:/var/lib/sidecar", self.image)
        wait_until(lambda: self.ready_status() == 200, 30, what=f"the pod's /ready to be 200\n{self.logs()}")
        return self

    def ready_status(self) -> int:
        return http_request(self.admin_port, "/ready", timeout=2).status

    def url(self, path="/") -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def logs(self) -> str:
        out = []
        for c in (self.app, self.sidecar):
            p = docker("logs", "--tail", "40", c, check=False)
            out.append(f"--- docker logs {c}:\n{p.stdout}{p.stderr}")
        return "\n".join(out)

    def state(self, container) -> dict:
        return inspect("container", container)["State"]

    def remove(self):
        docker("rm", "-f", self.sidecar, self.app, check=False)
        docker("volume", "rm", self.logs_vol, self.state_vol, check=False)


@pytest.fixture(scope="module")
def start_pod(image, pod_net, tmp_path_factory):
    pods = []

    def start(drain_delay="2s") -> Pod:
        pod = Pod(image, pod_net, tmp_path_factory.mktemp("pod"), drain_delay)
        pods.append(pod)
        return pod.start()

    yield start
    for pod in pods:
        pod.remove()


@pytest.fixture(scope="module")
def pod(start_pod) -> Pod:
    return start_pod()


def test_pod_serves_through_the_sidecar_and_ships_the_app_log(pod, pod_net):
    r = curl(pod.url("/"))
    assert r.status == 200, f"{r.status} {r.stderr}\n{pod.logs()}"
    doc = json.loads(r.body)
    assert doc["message"] == "hello from the demo app"
    assert doc["forwarded_for"], f"the request did not pass through the sidecar: {doc}"
    r = curl("--http2-prior-knowledge", pod.url("/status/418"))
    assert r.status == 418 and r.info.get("http_version") == "2", (r.status, r.info.get("http_version"))
    m = Metrics(http_request(pod.admin_port, "/metrics").body.decode())
    assert m.value("sidecar_inbound_requests_total", listener="web", status_code="200") >= 1
    assert m.value("sidecar_inbound_requests_total", listener="web", status_code="418") == 1

    # The app's own log line for that request, from its file on the shared volume.
    def shipped():
        return [rec.fields for rec in pod_net.receiver.records
                if rec.fields.get("pod") == pod.id and "/status/418" in json.dumps(rec.fields)]

    docs = wait_until(shipped, 15, what=f"the app's log line for /status/418 at the receiver\n{pod.logs()}")
    assert docs[0]["source"] == "app" and docs[0]["file"] == "/var/log/app/app.log", docs[0]
    assert pod_net.receiver.problems == []

    # Both containers run as the non-root UID; Docker runs the image's HEALTHCHECK in the
    # sidecar's read-only container.
    for c in (pod.app, pod.sidecar):
        # `docker top` needs the pid column to pick the container's processes out of ps's.
        uids = [line.split()[1] for line in docker("top", c, "-eo", "pid,uid").stdout.splitlines()[1:]]
        assert uids and set(uids) == {UID}, f"{c} runs as {uids}"
    wait_until(lambda: pod.state(pod.sidecar)["Health"]["Status"] == "healthy", 15, what="Docker's health check")


def test_ready_follows_the_app_health(pod):
    assert pod.ready_status() == 200
    # A hung app: its processes frozen. The sidecar's health checks time out.
    docker("pause", pod.app)
    try:
        wait_until(lambda: pod.ready_status() == 503, 10, interval=0.1, what="/ready 503 with the app frozen")
        assert "app" in http_request(pod.admin_port, "/ready").body.decode()
    finally:
        docker("unpause", pod.app)
    wait_until(lambda: pod.ready_status() == 200, 10, interval=0.1, what="/ready 200 once the app answers again")
    assert curl(pod.url("/")).status == 200


def test_docker_stop_under_load_drains_with_zero_failed_requests(start_pod):
    """`docker stop` (SIGTERM) on the sidecar while clients send: with drain_delay 2s, a client
    that acts as an endpoints controller would (polls /ready every 100 ms, starts nothing new once
    it is 503) sees every request it started succeed, and the sidecar exits 0 by itself."""
    pod = start_pod(drain_delay="2s")
    lock = threading.Lock()
    results = []  # (started at, ok, what)
    no_new_requests = threading.Event()
    marks = {}

    def client(i):
        conn = None
        while not no_new_requests.is_set():
            t = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", pod.web_port, timeout=15)
                conn.request("GET", f"/?client={i}")
                r = conn.getresponse()
                r.read()
                ok, what = r.status == 200, r.status
                if (r.getheader("Connection") or "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                ok, what = False, repr(e)
                if conn is not None:
                    conn.close()
                conn = None
            with lock:
                results.append((t, ok, what))
        if conn is not None:
            conn.close()

    def endpoints_controller():
        while True:
            try:
                status = pod.ready_status()
            except OSError:
                status = 0
            if status != 200:
                marks["not_ready"] = time.monotonic()
                no_new_requests.set()
                return
            time.sleep(0.1)

    slow = {}

    def slow_request():
        # In flight when the drain begins: answered after it started.
        slow["r"] = http_request(pod.web_port, "/slow?ms=3000", timeout=20)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    threads.append(threading.Thread(target=endpoints_controller, daemon=True))
    for t in threads:
        t.start()
    time.sleep(1.0)
    slow_t = threading.Thread(target=slow_request, daemon=True)
    slow_t.start()
    time.sleep(0.2)
    t_stop = time.monotonic()
    docker("stop", "-t", "20", pod.sidecar, timeout=40)
    stop_took = time.monotonic() - t_stop
    no_new_requests.set()
    for t in threads:
        t.join(20)
    slow_t.join(20)

    failed = [r for r in results if not r[1]]
    during_delay = [r for r in results if r[0] > t_stop]
    state = pod.state(pod.sidecar)
    print(f"\ndocker stop under load: {len(results)} requests, {len(failed)} failed, {len(during_delay)} started "
          f"after SIGTERM (before /ready 503 was seen), /ready 503 seen {marks.get('not_ready', 0) - t_stop:.2f}s "
          f"after `docker stop`, which returned after {stop_took:.2f}s, exit code {state['ExitCode']}")
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}\n{pod.logs()}"
    assert len(results) > 100, f"only {len(results)} requests: not much of a load"
    assert "r" in slow and slow["r"].status == 200 and slow["r"].body == b"slept 3000 ms\n", slow
    assert marks["not_ready"] - t_stop < 0.6, "/ready did not turn 503 at once"
    assert state["ExitCode"] == 0 and not state["OOMKilled"], f"{state}\n{pod.logs()}"
    assert 2.0 < stop_took < 8, f"docker stop took {stop_took:.2f}s (drain_delay 2s, the slow request ends at ~3s)"
    assert "drained" in docker("logs", pod.sidecar).stderr

    # The app container stops by itself on SIGTERM too, with status 0 (not killed at 10 s).
    t0 = time.monotonic()
    docker("stop", pod.app, timeout=30)
    assert time.monotonic() - t0 < 5
    assert pod.state(pod.app)["ExitCode"] == 0
