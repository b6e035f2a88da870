"""The files behind a TLS listener over a running sidecar's life, driven by `openssl s_client`,
curl and the `h2` library: certificates rotated by a symlink flip (what Kubernetes Secret volumes
and cert-manager do) with a connection open, broken rotations that keep the old certificate and
name the file, a rotated client CA, a reload that switches `protocol` and so ALPN, a watcher
stuck on a FIFO that must not stall the data plane, and `sidecar check` / `run` naming a bad
TLS file without printing key bytes. The TLS handshakes, clients and mTLS are in test_tls.py.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from helpers import LOCALHOST, curl, free_port, http_request, make_config, reload_config, run_sidecar_cmd, wait_until, write_config
from tls_helpers import (
    FRONTEND_ID,
    SERVER_ID,
    H2TLS,
    cert_args,
    flip_symlink,
    handshake_ok,
    issue,
    make_leaf,
    out_text,
    peer_serial,
    s_client,
    serial_via_openssl,
    serial_via_python,
    symlinked_tls_listener,
    tls_block,
    tls_listener,
    url,
    wait_hs,
)

# --------------------------------------------------------------------------------------------
# rotation by symlink flip
# --------------------------------------------------------------------------------------------
@pytest.fixture
def rotating(tmp_path, http_app, start_sidecar, pki):
    """A sidecar whose `tls` listener reads certs/current/tls.{crt,key}, current -> v1."""
    certs = tmp_path / "certs"
    v1, listener = symlinked_tls_listener(pki, certs)
    sc = start_sidecar(make_config(http_app.port, extra_inbound=[listener]))
    return sc, certs, v1


def test_rotation_keeps_h2_connection_and_new_connections_get_new_serial(rotating, pki):
    sc, certs, v1 = rotating
    port = sc.port("tls")
    assert serial_via_openssl(port, pki.ca) == v1.serial
    h2c = H2TLS(port, pki.ca)
    try:
        assert peer_serial(h2c.sock) == v1.serial
        assert h2c.get("/")[0] == 200
        v2 = issue(pki.ca_dir, SERVER_ID, certs / "v2", dns=["localhost", LOCALHOST])
        assert v2.serial != v1.serial
        flip_symlink(certs / "current", "v2")
        t0 = time.monotonic()
        seen = None
        n = 0
        while time.monotonic() - t0 < 6:
            status, _, _ = h2c.get(f"/headers?n={n}")  # the old connection keeps working throughout
            assert status == 200
            n += 1
            seen = serial_via_python(port, pki.ca)
            if seen == v2.serial:
                break
            time.sleep(0.2)
        assert seen == v2.serial, f"new connections still get serial {seen:x} (v1 {v1.serial:x}, v2 {v2.serial:x}) 6 s after the flip"
        assert serial_via_openssl(port, pki.ca) == v2.serial
        for i in range(5):
            assert h2c.get(f"/?after={i}")[0] == 200
        assert h2c.terminated is None, f"the established connection got GOAWAY: {h2c.terminated}"
        assert peer_serial(h2c.sock) == v1.serial
    finally:
        h2c.close()
    r = curl("--cacert", pki.ca, "--http2", url(sc, "tls", "/"))
    assert r.status == 200
    want = v2.cert().not_valid_after_utc.timestamp()
    wait_until(
        lambda: sc.metrics().value("sidecar_tls_cert_expiry_timestamp_seconds", listener="tls") == pytest.approx(want, abs=1),
        3, what="the expiry metric to follow the new certificate",
    )


def test_broken_rotations_keep_old_cert_and_name_the_file(rotating, pki):
    sc, certs, v1 = rotating
    port = sc.port("tls")
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    good2 = issue(pki.ca_dir, SERVER_ID, certs / "good2", dns=["localhost", LOCALHOST])
    # bad PEM: a certificate block whose body is not base64 DER
    bad_pem = certs / "bad-pem"
    bad_pem.mkdir()
    (bad_pem / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\nthis is not!! base64 der\n-----END CERTIFICATE-----\n")
    (bad_pem / "tls.key").write_bytes(good2.key.read_bytes())
    # a key that does not match the certificate
    mism = certs / "mismatch"
    mism.mkdir()
    (mism / "tls.crt").write_bytes(good2.crt.read_bytes())
    (mism / "tls.key").write_bytes(v1.key.read_bytes())
    # an expired certificate (with its own matching key)
    expired = make_leaf(
        certs / "expired", pki.ca_dir, uri=SERVER_ID, dns=["localhost"], ips=[LOCALHOST],
        not_before=now - dt.timedelta(days=20), not_after=now - dt.timedelta(days=1),
    )
    steps = (("bad-pem", "tls.crt", ("pem", "base64", "parse", "invalid")), ("mismatch", "tls.key", ("match",)), ("expired", "tls.crt", ("expired",)))
    for name, which, words in steps:
        mark = len(sc.stderr_text())
        flip_symlink(certs / "current", name)
        cands = (str(certs / "current" / which), str(certs / name / which))

        def logged():
            return [
                l for l in sc.stderr_text()[mark:].splitlines()
                if any(c in l for c in cands) and any(w in l.lower() for w in words)
            ]

        wait_until(logged, 5, what=f"a log line naming {which} and the problem {words} after flipping to {name} (stderr tail: {sc.stderr_tail(5)})")
        for _ in range(3):
            assert serial_via_python(port, pki.ca) == v1.serial, f"after flipping to {name}, new connections do not get the old cert"
            time.sleep(0.2)
        r = curl("--cacert", pki.ca, url(sc, "tls", "/"))
        assert r.status == 200, (name, r.returncode, r.stderr)
    logs = sc.stderr_text() + sc.stdout_text()
    assert "PRIVATE KEY" not in logs
    for cred in (v1, good2, expired):
        assert not any(line in logs for line in cred.key_body_lines()), "key bytes logged"
    # a good file afterwards is still picked up
    flip_symlink(certs / "current", "good2")
    wait_until(lambda: serial_via_python(port, pki.ca) == good2.serial, 6, what="the good certificate after broken ones")
    sc.assert_alive()


def test_client_ca_rotation(tmp_path, http_app, start_sidecar, pki):
    """Replacing the client CA file (write + rename) changes which clients new handshakes accept."""
    ca_file = tmp_path / "client-ca.crt"
    ca_file.write_bytes(pki.ca.read_bytes())
    s = pki.server
    cfg = make_config(http_app.port, extra_inbound=[tls_listener("mtls", tls_block(s.crt, s.key, client_ca=ca_file))])
    sc = start_sidecar(cfg)
    u = url(sc, "mtls")
    assert curl("--cacert", pki.ca, *cert_args(pki.frontend), u).status == 200
    assert curl("--cacert", pki.ca, *cert_args(pki.foreign), u).status == 0
    tmp = tmp_path / "client-ca.crt.new"
    tmp.write_bytes(pki.other_ca.read_bytes())
    os.replace(tmp, ca_file)
    wait_until(lambda: curl("--cacert", pki.ca, *cert_args(pki.foreign), u).status == 200, 6, interval=0.2, what="the new client CA to be used")
    r = curl("--cacert", pki.ca, *cert_args(pki.frontend), u)
    assert r.status == 0 and r.returncode != 0, "a client of the old CA is still accepted"
    wait_hs(sc, "mtls", "unknown_ca", 2)


def _alpn(port, pki) -> str:
    p = s_client(port, "-alpn", "h2,http/1.1", "-CAfile", pki.ca)
    t = out_text(p)
    assert handshake_ok(p), t[-2000:]
    if "No ALPN negotiated" in t:
        return "none"
    m = re.search(r"ALPN protocol: (\S+)", t)
    assert m, t[-2000:]
    return m.group(1)


def test_reload_from_http_to_tcp_and_back_changes_alpn(http_app, start_sidecar, pki):
    """Issue 9, bug 2: the same cert files, but `protocol: http` -> `tcp` -> `http`. What the
    TLS config is built from includes the protocol (ALPN h2 + http/1.1, or none), so a reload
    that keeps the files must still rebuild it."""
    s = pki.server

    def cfg(protocol, web_port=None, admin_port=None, tls_port=None):
        return make_config(
            http_app.port, web_port=web_port, admin_port=admin_port,
            extra_inbound=[tls_listener("tls", tls_block(s.crt, s.key), protocol=protocol, port=tls_port)],
        )

    sc = start_sidecar(cfg("http"))
    port = sc.port("tls")
    ports = dict(web_port=sc.port("web"), admin_port=sc.admin_port, tls_port=port)
    assert _alpn(port, pki) == "h2"
    reload_config(sc, cfg("tcp", **ports))
    assert _alpn(port, pki) == "none", "a listener switched to protocol: tcp still offers ALPN h2 after the reload"
    reload_config(sc, cfg("http", **ports))
    assert _alpn(port, pki) == "h2", "a listener switched back to protocol: http does not offer ALPN h2"
    r = curl("--cacert", pki.ca, "--http2", url(sc, "tls", "/"))
    assert r.status == 200 and r.info.get("http_version") == "2", (r.status, r.info.get("http_version"), r.stderr)


@pytest.mark.timeout(40)
def test_tls_file_watcher_does_not_block_the_data_plane(tmp_path, http_app, start_sidecar, pki):
    """Issue 9, bug 3: one worker thread, and the TLS listener's cert path (a symlink) now
    points at a FIFO, so any read of it blocks, like a hung network volume. File polling runs
    off the data plane: the plain listener keeps answering, each request within 1 s."""
    d = tmp_path / "watched"
    d.mkdir()
    link = d / "tls.crt"
    os.symlink(pki.server.crt, link)
    cfg = make_config(http_app.port, extra_inbound=[tls_listener("tls", tls_block(link, pki.server.key))])
    cfg["runtime"] = {"worker_threads": 1}
    sc = start_sidecar(cfg)
    port = sc.port("web")
    assert http_request(port, "/", timeout=2).status == 200
    fifo = d / "stuck.fifo"
    os.mkfifo(fifo)
    flip_symlink(link, fifo.name)
    slowest, n, failure = 0.0, 0, None
    try:
        end = time.monotonic() + 5  # the watcher polls about once a second
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = http_request(port, f"/?n={n}", timeout=1)
                if r.status != 200:
                    failure = f"request {n} answered {r.status}"
            except OSError as e:
                failure = f"request {n} got no answer within 1 s ({e!r}) after the cert path became a FIFO"
            if failure:
                break
            slowest = max(slowest, time.monotonic() - t0)
            n += 1
            time.sleep(0.1)
    finally:
        # Point the link back at the real file, then open the FIFO for writing and close it:
        # a reader blocked in open() or read() gets EOF.
        flip_symlink(link, str(pki.server.crt))
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # ENXIO: nobody is reading it
            time.sleep(0.05)
    print(f"{n} requests answered while the cert path was a FIFO; slowest {slowest * 1000:.0f} ms")
    assert failure is None, failure
    assert n >= 20, f"only {n} requests in 5 s"
    assert curl("--cacert", pki.ca, url(sc, "tls", "/")).status == 200, "the TLS listener stopped serving"
    sc.assert_alive()


# --------------------------------------------------------------------------------------------
# sidecar check / run with bad TLS files
# --------------------------------------------------------------------------------------------
def _tls_only_config(tmp_path, cert, key, **kw) -> Path:
    cfg = {
        "admin": {"listen": f"{LOCALHOST}:{free_port()}"},
        "app": {"address": f"{LOCALHOST}:{free_port()}"},
        "inbound": [tls_listener("tls", tls_block(cert, key, **kw))],
    }
    return write_config(tmp_path / "tls.yaml", cfg)


def _no_key_bytes(text, *creds):
    assert "PRIVATE KEY" not in text
    for c in creds:
        assert not any(line in text for line in c.key_body_lines()), "private key bytes in an error message"


def _bad_tls_file_case(tmp_path, pki, case):
    """(config path, the file to be named, the problem's words, the line `check` prints)."""
    if case == "missing_cert":
        missing = tmp_path / "nowhere" / "tls.crt"
        path = _tls_only_config(tmp_path, missing, pki.server.key)
        return path, missing, "No such file", None
    path = _tls_only_config(tmp_path, pki.server.crt, pki.frontend.key)
    want = f"{path}: inbound[0].tls: {pki.frontend.key}: the private key does not match the certificate in {pki.server.crt}"
    return path, pki.frontend.key, "does not match", want


@pytest.mark.parametrize("case", ["missing_cert", "mismatched_key"])
def test_check_names_bad_tls_file(tmp_path, pki, case):
    path, named, problem, want = _bad_tls_file_case(tmp_path, pki, case)
    p = run_sidecar_cmd("check", "-c", path, timeout=15)
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.startswith(f"{path}: inbound[0].tls") and str(named) in l and problem in l]
    assert lines, f"no line `{path}: inbound[0].tls...{named}...{problem}` in stderr:\n{p.stderr}"
    if want:
        assert want in p.stderr.splitlines(), f"expected the line\n  {want}\nin stderr:\n{p.stderr}"
    _no_key_bytes(p.stderr + p.stdout, pki.server, pki.frontend)


@pytest.mark.parametrize("case", ["missing_cert", "mismatched_key"])
def test_run_refuses_bad_tls_file_and_names_it(tmp_path, pki, case):
    path, named, problem, _ = _bad_tls_file_case(tmp_path, pki, case)
    p = run_sidecar_cmd("run", "-c", path, timeout=15)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert any(str(named) in l and problem in l for l in p.stderr.splitlines()), p.stderr
    _no_key_bytes(p.stderr + p.stdout, pki.server, pki.frontend)


@pytest.mark.parametrize("case", ["missing_cert", "mismatched_key"])
def test_run_reports_bad_tls_file_with_the_same_message_as_check(tmp_path, pki, case):
    """`run` prints what `check` prints (`FILE: inbound[0].tls: ...`), like other config errors."""
    path, named, problem, _ = _bad_tls_file_case(tmp_path, pki, case)
    check = run_sidecar_cmd("check", "-c", path, timeout=15)
    check_lines = [l for l in check.stderr.splitlines() if l.startswith(f"{path}: inbound[0].tls")]
    assert check_lines, check.stderr
    p = run_sidecar_cmd("run", "-c", path, timeout=15)
    assert p.returncode == 1
    for line in check_lines:
        assert line in p.stderr, f"`check` says\n  {line}\nbut `run` says:\n{p.stderr}"


@pytest.mark.parametrize("what", ["cert_not_pem", "key_not_pem", "client_ca_missing"])
def test_check_other_bad_tls_files(tmp_path, pki, what):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello, I am not PEM\n")
    cert, key, kw, named = pki.server.crt, pki.server.key, {}, None
    if what == "cert_not_pem":
        cert = named = junk
    elif what == "key_not_pem":
        key = named = junk
    else:
        named = tmp_path / "no-ca.crt"
        kw = {"client_ca": named}
    path = _tls_only_config(tmp_path, cert, key, **kw)
    p = run_sidecar_cmd("check", "-c", path, timeout=15)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert any(str(named) in l and l.startswith(f"{path}: inbound[0].tls") for l in p.stderr.splitlines()), p.stderr
    _no_key_bytes(p.stderr + p.stdout, pki.server)


def test_check_accepts_a_good_tls_config(tmp_path, pki):
    path = _tls_only_config(tmp_path, pki.server.crt, pki.server.key, client_ca=pki.ca, allowed=[FRONTEND_ID])
    p = run_sidecar_cmd("check", "-c", path, timeout=15)
    assert p.returncode == 0, p.stderr
