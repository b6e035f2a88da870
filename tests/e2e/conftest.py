"""Fixtures for Sidecar's process-level tests: the test apps and the real sidecar binary.

Every process a fixture starts is stopped in its teardown (SIGTERM, then SIGKILL after 5 s).
When a test fails, the tail of each sidecar's stderr is printed with the failure report.
"""

from __future__ import annotations

import itertools
import resource
import subprocess
import sys

import pytest

from helpers import SIDECAR_BIN, APPS, HttpApp, AppProcess, Sidecar, Web, make_config, write_config
from tls_helpers import PKI

# The slowloris and max_connections tests hold 1,000+ sockets open; the sidecar, started from
# this process, inherits the raised limit too.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_want = 16384 if _hard == resource.RLIM_INFINITY else min(_hard, 16384)
if _soft != resource.RLIM_INFINITY and _soft < _want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_want, _hard))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture
def log_dir(tmp_path):
    return tmp_path


@pytest.fixture
def start_sidecar(tmp_path, request):
    """Factory: start_sidecar(cfg_dict, wait="ready"|"live"|None) -> Sidecar (stopped at teardown)."""
    started: list[Sidecar] = []
    counter = itertools.count()

    def start(cfg, wait="ready", timeout=10.0, args=None, env=None, config_path=None):
        path = config_path or tmp_path / f"sidecar-{next(counter)}.yaml"
        write_config(path, cfg)
        sc = Sidecar(path, cfg if isinstance(cfg, dict) else None, tmp_path, args=args, env=env)
        started.append(sc)
        if wait == "ready":
            sc.wait_ready(timeout)
        elif wait == "live":
            sc.wait_live(timeout)
        return sc

    yield start
    for sc in started:
        crashed = sc.proc.poll() is not None and not sc.stopped_by_test
        rc = sc.stop()
        if crashed:
            print(f"\n--- sidecar pid {sc.pid} had exited by itself with status {rc}")
        if _failed(request) or crashed:
            print(f"\n--- sidecar pid {sc.pid} stderr tail ({sc.stderr_path}):\n{sc.stderr_tail(60)}")


@pytest.fixture
def http_app_factory(log_dir):
    apps = []

    def start(unhealthy=False):
        a = HttpApp(log_dir, unhealthy=unhealthy)
        apps.append(a)
        return a

    yield start
    for a in apps:
        a.stop()


@pytest.fixture
def http_app(http_app_factory):
    return http_app_factory()


@pytest.fixture
def tcp_app(log_dir):
    a = AppProcess("tcp_echo.py", log_dir=log_dir)
    yield a
    a.stop()


@pytest.fixture
def ws_app(log_dir):
    a = AppProcess("ws_app.py", log_dir=log_dir)
    yield a
    a.stop()


@pytest.fixture
def h2_app(log_dir):
    a = AppProcess("h2_app.py", log_dir=log_dir)
    yield a
    a.stop()


@pytest.fixture(scope="session")
def grpc_stubs(tmp_path_factory):
    """Generates echo_pb2 / echo_pb2_grpc from apps/echo.proto with grpcio-tools; returns the
    directory (also put on sys.path) and the two modules."""
    out = tmp_path_factory.mktemp("grpc_stubs")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{APPS}", f"--python_out={out}", f"--grpc_python_out={out}", "echo.proto"],
        check=True,
        timeout=60,
    )
    sys.path.insert(0, str(out))
    import echo_pb2
    import echo_pb2_grpc

    return out, echo_pb2, echo_pb2_grpc


@pytest.fixture
def grpc_app(grpc_stubs, log_dir):
    a = AppProcess("grpc_app.py", "--stubs", grpc_stubs[0], log_dir=log_dir)
    yield a
    a.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The TLS tests' certificates (tls_helpers.PKI), made once per test module."""
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def web(http_app, start_sidecar):
    """The HTTP app behind a ready sidecar with the usual config (listener `web`)."""
    sc = start_sidecar(make_config(http_app.port, request_timeout="5s"))
    return Web(http_app, sc)


def pytest_report_header(config):
    return f"sidecar binary: {SIDECAR_BIN} ({'present' if SIDECAR_BIN.exists() else 'MISSING'})"
