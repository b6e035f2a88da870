"""Outbound TLS origination: the app speaks plain HTTP to the sidecar on localhost, the
sidecar speaks TLS (and mTLS) to the upstream, which is Python's ssl module (OpenSSL).
Certificates come from `sidecar certs` (the dev CA) and `cryptography` (tls_helpers.PKI)."""

import subprocess

import pytest

from helpers import SIDECAR_BIN, AppProcess, free_port, http_request, wait_until, write_config
from tls_helpers import FRONTEND_ID, SERVER_ID

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def upstream(pki, tmp_path):
    """factory: upstream(mtls=False) -> a running HTTPS upstream with the PKI's server cert."""
    started = []

    def start(mtls=False):
        args = [pki.server.crt, pki.server.key] + ([pki.ca] if mtls else [])
        app = AppProcess("tls_upstream.py", *args, log_dir=tmp_path)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def outbound(port, tls, name="secure"):
    return {
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "outbound": [{
            "name": name,
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": {"endpoints": [f"127.0.0.1:{port}"], "tls": tls},
            "retry": {"attempts": 1},
            "outlier": {"consecutive_failures": 0},
        }],
        "telemetry": {"access_log": {"enabled": True, "path": "stdout"}},
    }


def call(sc, path="/hello"):
    return http_request(int(sc.cfg["outbound"][0]["listen"].rsplit(":", 1)[1]), path, timeout=5)


def last_record(sc):
    """The last outbound access-log record, once written (the log is written off the request path)."""
    recs = wait_until(lambda: [x for x in sc.access_log() if x.get("direction") == "outbound"], 5, what="an outbound access-log record")
    return recs[-1]


def connect_errors(sc, reason):
    return sc.metrics().value("sidecar_outbound_connect_errors_total", upstream="secure", reason=reason)


def test_tls_to_the_upstream_verified_by_the_ca_and_the_server_name(pki, upstream, start_sidecar):
    up = upstream()
    # The endpoint is an IP: the server name defaults to it, and the cert has it as an IP SAN.
    sc = start_sidecar(outbound(up.port, {"ca": str(pki.ca)}))
    r = call(sc)
    assert r.status == 200, r.body
    assert r.json() == {"path": "/hello", "client_identity": None}
    rec = last_record(sc)
    assert rec["upstream"] == "secure" and rec["status"] == 200


def test_identity_replaces_the_host_name_check(pki, upstream, start_sidecar):
    up = upstream()
    # A server name the certificate does not carry: only the SPIFFE ID is checked.
    tls = {"ca": str(pki.ca), "identity": SERVER_ID, "server_name": "orders.internal"}
    sc = start_sidecar(outbound(up.port, tls))
    assert call(sc).status == 200


def test_mtls_presents_the_workload_certificate(pki, upstream, start_sidecar):
    up = upstream(mtls=True)
    tls = {"ca": str(pki.ca), "cert": str(pki.frontend.crt), "key": str(pki.frontend.key), "identity": SERVER_ID}
    sc = start_sidecar(outbound(up.port, tls))
    r = call(sc)
    assert r.status == 200, r.body
    assert r.json()["client_identity"] == FRONTEND_ID


def test_without_a_client_cert_an_mtls_upstream_refuses_and_the_app_gets_502(pki, upstream, start_sidecar):
    up = upstream(mtls=True)
    sc = start_sidecar(outbound(up.port, {"ca": str(pki.ca)}))
    r = call(sc)
    assert r.status == 502, r.body
    assert b"upstream secure" in r.body
    rec = last_record(sc)
    assert rec["error"] in ("upstream_tls_error", "upstream_reset"), rec


def test_a_server_from_another_ca_is_refused_and_counted(pki, upstream, start_sidecar):
    up = upstream()
    sc = start_sidecar(outbound(up.port, {"ca": str(pki.other_ca)}))
    r = call(sc)
    assert r.status == 502 and b"upstream secure" in r.body, r.body
    assert connect_errors(sc, "tls_error") >= 1


def test_a_wrong_identity_is_a_failed_connection_and_nothing_is_sent(pki, upstream, start_sidecar, tmp_path):
    up = upstream()
    sc = start_sidecar(outbound(up.port, {"ca": str(pki.ca), "identity": FRONTEND_ID}))
    for _ in range(3):
        r = call(sc)
        assert r.status == 502, r.body
    assert connect_errors(sc, "identity_mismatch") >= 3
    rec = last_record(sc)
    assert rec["error"] == "upstream_identity_mismatch", rec
    # The upstream never saw a request: ask it directly, over TLS, with the right CA.
    ok = outbound(up.port, {"ca": str(pki.ca)}, name="check")
    checker = start_sidecar(ok)
    assert call(checker, "/count").json() == {"requests": 0}


def test_check_names_bad_upstream_tls_settings(pki, tmp_path):
    cfg = outbound(1, {"ca": str(pki.ca), "cert": str(pki.frontend.crt)})
    path = write_config(tmp_path / "bad.yaml", cfg)
    r = subprocess.run([str(SIDECAR_BIN), "check", "-c", str(path)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1
    assert "outbound[0].upstream.tls: `cert` and `key` go together" in r.stderr, r.stderr
    cfg = outbound(1, {"ca": str(tmp_path / "missing.crt")})
    path = write_config(tmp_path / "missing.yaml", cfg)
    r = subprocess.run([str(SIDECAR_BIN), "check", "-c", str(path)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1
    assert "outbound[0].upstream.tls" in r.stderr and "missing.crt" in r.stderr, r.stderr
