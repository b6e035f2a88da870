"""TLS and mutual TLS on inbound listeners (issue 5), driven by clients nobody here wrote:
`openssl s_client`, curl, grpcio, the `h2` library and Python's ssl module (OpenSSL).

The PKI comes from the sidecar's own `certs init` / `certs issue` (the three-command dev CA),
plus certificates made with `cryptography` that `sidecar certs` cannot make: from another CA,
expired, not yet valid, DNS-only, server-auth-only. Listeners of the usual test sidecar:
  web       plain HTTP (from helpers.make_config)
  tls       server TLS, no client certificates
  mtls      client certificates from our CA, only spiffe://.../sa/frontend allowed
  mtls_any  client certificates from our CA, any verified identity
Every TLS listener has `handshake_timeout: 1s`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import LOCALHOST, curl, free_port, http_request, make_config, reload_config, run_sidecar_cmd, wait_closed, wait_until, write_config
from tls_helpers import (
    DNS_ONLY_NAMES,
    FRONTEND_ID,
    INTRUDER_ID,
    PKI,
    SERVER_ID,
    H2TLS,
    client_ctx,
    client_hello_bytes,
    flip_symlink,
    handshake_ok,
    header_values,
    issue,
    make_leaf,
    out_text,
    peer_serial,
    s_client,
    serial_via_openssl,
    serial_via_python,
    standard_listeners,
    tls_block,
    tls_connect,
    tls_listener,
)

HS = "sidecar_tls_handshakes_total"
GRPC_OPTS = [("grpc.enable_http_proxy", 0)]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_sc(http_app, start_sidecar, pki):
    """The HTTP app behind a ready sidecar with the web, tls, mtls and mtls_any listeners."""
    return start_sidecar(make_config(http_app.port, extra_inbound=standard_listeners(pki)))


def url(sc, listener, path="/headers"):
    return f"https://{LOCALHOST}:{sc.port(listener)}{path}"


def cert_args(cred):
    return ["--cert", cred.crt, "--key", cred.key] if cred else []


def hs(sc, listener, result) -> float:
    return sc.metrics().value(HS, listener=listener, result=result)


def wait_hs(sc, listener, result, at_least, timeout=5.0):
    """Waits until sidecar_tls_handshakes_total{listener,result} reaches at_least."""
    wait_until(
        lambda: hs(sc, listener, result) >= at_least,
        timeout,
        what=f'{HS}{{listener="{listener}",result="{result}"}} >= {at_least} '
        f"(series now: {sc.metrics().series(HS)})",
    )


def app_headers(r) -> dict:
    assert r.status == 200, f"status {r.status} rc={r.returncode} body={r.body[:300]!r} {r.stderr}"
    return json.loads(r.body)


# --------------------------------------------------------------------------------------------
# the dev CA: sidecar certs init / issue
# --------------------------------------------------------------------------------------------
def test_certs_init_and_issue_write_p256_spiffe_certs_with_0600_keys(pki):
    assert stat.S_IMODE(os.stat(pki.ca_dir / "ca.key").st_mode) == 0o600
    for cred in (pki.server, pki.frontend):
        assert stat.S_IMODE(os.stat(cred.key).st_mode) == 0o600, f"{cred.key} is not 0600"
        assert (cred.dir / "ca.crt").read_bytes() == pki.ca.read_bytes()
    cert = pki.server.cert()
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SERVER_ID]
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == [LOCALHOST], "--dns 127.0.0.1 must be an IP SAN"
    # openssl agrees the workload certificate chains to the CA
    v = subprocess.run(["openssl", "verify", "-CAfile", pki.ca, pki.frontend.crt], capture_output=True, text=True, timeout=10)
    assert v.returncode == 0, v.stdout + v.stderr


# --------------------------------------------------------------------------------------------
# openssl s_client: versions, ALPN, ciphers, resumption, client certs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_s_client_tls13_and_tls12_handshake_and_verify(tls_sc, pki, version):
    before = hs(tls_sc, "tls", "success")
    p = s_client(tls_sc.port("tls"), version, "-CAfile", pki.ca, "-verify_return_error")
    t = out_text(p)
    want = "TLSv1.3" if version == "-tls1_3" else "TLSv1.2"
    assert p.returncode == 0 and f"New, {want}, Cipher is" in t, t[-2000:]
    assert "Verify return code: 0 (ok)" in t, t[-2000:]
    assert "GCM" in t or "CHACHA20" in t, f"not an AEAD cipher suite:\n{t[-2000:]}"
    wait_hs(tls_sc, "tls", "success", before + 1)


@pytest.mark.parametrize("version", ["-tls1_1", "-tls1"])
def test_s_client_old_versions_refused_and_counted(tls_sc, pki, version):
    before = hs(tls_sc, "tls", "incompatible")
    # SECLEVEL=0: OpenSSL 3 would otherwise refuse to even offer TLS 1.0/1.1 itself.
    p = s_client(tls_sc.port("tls"), version, "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile", pki.ca)
    t = out_text(p)
    assert p.returncode != 0 and not handshake_ok(p), f"{version} was accepted:\n{t[-2000:]}"
    assert "alert" in t, f"no TLS alert from the sidecar:\n{t[-2000:]}"
    wait_hs(tls_sc, "tls", "incompatible", before + 1)


def test_s_client_weak_tls12_cipher_refused(tls_sc, pki):
    # CBC with SHA-1 is not a safe suite: a client offering only it gets no handshake.
    p = s_client(tls_sc.port("tls"), "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA", "-CAfile", pki.ca)
    assert p.returncode != 0 and not handshake_ok(p), out_text(p)[-2000:]
    wait_hs(tls_sc, "tls", "incompatible", 1)


@pytest.mark.parametrize(
    "version,flag,offer,expected",
    [
        ("-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"),
        ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    ],
    ids=["tls1_3", "tls1_2"],
)
def test_server_cipher_order_wins_over_the_clients(tls_sc, pki, version, flag, offer, expected):
    """Issue 9, bug 8: the client lists the weaker AES-128 suite first; the server picks from its
    own order, strongest first (rustls `ignore_client_order`), as TLS scanners expect. The dev CA
    issues ECDSA P-256 certificates, hence the ECDSA suites for TLS 1.2."""
    p = s_client(tls_sc.port("tls"), version, flag, offer, "-CAfile", pki.ca)
    t = out_text(p)
    assert handshake_ok(p), t[-2000:]
    proto = "TLSv1.3" if version == "-tls1_3" else "TLSv1.2"
    got = re.search(rf"New, {proto}, Cipher is (\S+)", t)
    assert got, t[-2000:]
    assert got.group(1) == expected, f"offered {offer} (client order): negotiated {got.group(1)}, the server's preference is {expected}"


@pytest.mark.parametrize("offer,expected", [("h2,http/1.1", "h2"), ("http/1.1", "http/1.1"), ("h2", "h2")])
def test_s_client_alpn(tls_sc, pki, offer, expected):
    p = s_client(tls_sc.port("tls"), "-alpn", offer, "-CAfile", pki.ca)
    t = out_text(p)
    assert handshake_ok(p), t[-2000:]
    assert f"ALPN protocol: {expected}\n" in t, t[-2000:]


def test_s_client_without_alpn_or_sni_speaks_http1(tls_sc, pki):
    req = b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    p = s_client(tls_sc.port("tls"), "-CAfile", pki.ca, "-ign_eof", "-quiet", input=req, servername=None)
    assert p.stdout.startswith(b"HTTP/1.1 200"), out_text(p)[-2000:]
    assert b'"path": "/headers"' in p.stdout


@pytest.mark.parametrize("version,proto", [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")])
def test_s_client_session_resumption(tls_sc, pki, tmp_path, version, proto):
    sess = tmp_path / f"sess{version}"
    req = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    # -ign_eof + a request the server answers and closes: the TLS 1.3 ticket arrives meanwhile.
    p1 = s_client(tls_sc.port("tls"), version, "-CAfile", pki.ca, "-ign_eof", "-sess_out", sess, input=req)
    assert handshake_ok(p1) and b"HTTP/1.1 200" in p1.stdout, out_text(p1)[-2000:]
    assert sess.exists() and sess.stat().st_size > 0, "no session saved"
    p2 = s_client(tls_sc.port("tls"), version, "-CAfile", pki.ca, "-ign_eof", "-sess_in", sess, input=req)
    t = out_text(p2)
    assert f"Reused, {proto}" in t, f"session not resumed:\n{t[-2500:]}"
    assert b"HTTP/1.1 200" in p2.stdout


def test_s_client_client_cert_presented_and_absent(tls_sc, pki):
    req = b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    port = tls_sc.port("mtls")
    ok = s_client(port, "-CAfile", pki.ca, "-cert", pki.frontend.crt, "-key", pki.frontend.key, "-ign_eof", input=req)
    t = out_text(ok)
    assert handshake_ok(ok) and b"HTTP/1.1 200" in ok.stdout, t[-2000:]
    assert "Acceptable client certificate CA names" in t, "the server did not ask for a client certificate"
    assert FRONTEND_ID.encode() in ok.stdout, "the app did not see the client identity"
    before = hs(tls_sc, "mtls", "no_client_cert")
    # TLS 1.2: the refusal is part of the handshake.
    no12 = s_client(port, "-tls1_2", "-CAfile", pki.ca, "-ign_eof", "-state", input=req)
    t12 = out_text(no12)
    assert no12.returncode != 0 and "SSL_connect:error" in t12 and b"HTTP/1.1" not in no12.stdout, t12[-2000:]
    # TLS 1.3: the client finishes first, then gets the alert instead of an answer.
    no13 = s_client(port, "-tls1_3", "-CAfile", pki.ca, "-ign_eof", input=req)
    assert b"HTTP/1.1" not in no13.stdout, out_text(no13)[-2000:]
    assert "alert" in out_text(no13), out_text(no13)[-2000:]
    wait_hs(tls_sc, "mtls", "no_client_cert", before + 2)


# --------------------------------------------------------------------------------------------
# curl: HTTP/1.1 and HTTP/2 over TLS, mTLS
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,version", [("--http1.1", "1.1"), ("--http2", "2")])
def test_curl_https(tls_sc, pki, flag, version):
    # --resolve: the name `localhost` goes in SNI and is checked against the DNS SAN.
    port = tls_sc.port("tls")
    r = curl("--cacert", pki.ca, flag, "--resolve", f"localhost:{port}:{LOCALHOST}", f"https://localhost:{port}/headers")
    h = app_headers(r)
    assert r.info.get("http_version") == version, r.info
    assert h["path"] == "/headers"
    assert header_values(h, "x-forwarded-proto") == ["https"]
    # by IP: checked against the IP SAN
    r = curl("--cacert", pki.ca, flag, url(tls_sc, "tls", "/big?bytes=3000000"))
    assert r.status == 200 and len(r.body) == 3_000_000, (r.status, len(r.body), r.stderr)
    # no client identity on a listener without client certificates
    assert header_values(h, "x-client-identity") == [] and header_values(h, "x-forwarded-client-cert") == []


def test_curl_rejects_sidecar_cert_without_the_ca(tls_sc):
    r = curl(url(tls_sc, "tls"))
    assert r.returncode == 60 and r.status == 0, (r.returncode, r.stderr)  # 60: peer certificate cannot be authenticated


@pytest.mark.parametrize("flag,proto", [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")])
def test_curl_mtls_identity_headers_and_access_log(tls_sc, pki, flag, proto):
    forged = [
        "-H", "x-client-identity: spiffe://cluster.local/ns/default/sa/admin",
        "-H", "X-Forwarded-Client-Cert: Hash=0000;URI=spiffe://cluster.local/ns/default/sa/admin",
    ]
    r = curl("--cacert", pki.ca, flag, *cert_args(pki.frontend), *forged, url(tls_sc, "mtls"))
    h = app_headers(r)
    assert header_values(h, "x-client-identity") == [FRONTEND_ID], h["headers"]
    xfcc = f"Hash={pki.frontend.der_sha256()};URI={FRONTEND_ID}"
    assert header_values(h, "x-forwarded-client-cert") == [xfcc], h["headers"]
    recs = wait_until(
        lambda: [x for x in tls_sc.access_log() if x.get("listener") == "mtls" and x.get("path") == "/headers"],
        5, what="an access-log record for the mtls request",
    )
    assert recs[-1]["peer_identity"] == FRONTEND_ID and recs[-1]["status"] == 200 and recs[-1]["protocol"] == proto, recs[-1]


def test_mtls_any_verified_identity_and_dns_san_identity(tls_sc, pki):
    r = curl("--cacert", pki.ca, *cert_args(pki.intruder), url(tls_sc, "mtls_any"))
    assert header_values(app_headers(r), "x-client-identity") == [INTRUDER_ID]
    # no URI SAN: the identity is the first DNS SAN
    r = curl("--cacert", pki.ca, "--http2", *cert_args(pki.dns_only), url(tls_sc, "mtls_any"))
    h = app_headers(r)
    assert header_values(h, "x-client-identity") == [DNS_ONLY_NAMES[0]], h["headers"]
    xfcc = header_values(h, "x-forwarded-client-cert")
    assert len(xfcc) == 1 and xfcc[0].startswith(f"Hash={pki.dns_only.der_sha256()};"), xfcc
    assert DNS_ONLY_NAMES[0] in xfcc[0], xfcc


@pytest.mark.parametrize("flag", ["--http1.1", "--http2"])
def test_disallowed_identity_gets_403_counted(tls_sc, pki, http_app, flag):
    http_app.get("/reset")
    before = tls_sc.metrics().value("sidecar_inbound_rejected_total", listener="mtls", reason="identity_not_allowed")
    r = curl("--cacert", pki.ca, flag, *cert_args(pki.intruder), url(tls_sc, "mtls"))
    assert r.status == 403, (r.status, r.returncode, r.stderr)
    assert r.body == b"client identity not allowed\n" or r.body.strip() == b"client identity not allowed", r.body
    wait_until(
        lambda: tls_sc.metrics().value("sidecar_inbound_rejected_total", listener="mtls", reason="identity_not_allowed") >= before + 1,
        5, what='sidecar_inbound_rejected_total{listener="mtls",reason="identity_not_allowed"} to grow',
    )
    assert http_app.count()["started"] == 0, "a request from a disallowed identity reached the app"
    rec = wait_until(lambda: [x for x in tls_sc.access_log() if x.get("status") == 403], 5, what="403 access-log record")[-1]
    assert rec["peer_identity"] == INTRUDER_ID, rec


@pytest.mark.parametrize(
    "client,result",
    [
        (None, "no_client_cert"),
        ("foreign", "unknown_ca"),
        ("expired", "client_cert_expired"),
        ("not_yet_valid", "client_cert_not_yet_valid"),
        ("server_auth_only", "bad_client_cert"),
    ],
)
@pytest.mark.parametrize("tls_version", ["--tlsv1.3", "--tlsv1.2"])
def test_bad_client_certs_refused_with_reason(tls_sc, pki, http_app, client, result, tls_version):
    http_app.get("/reset")
    cred = getattr(pki, client) if client else None
    before = hs(tls_sc, "mtls", result)
    maxv = ["--tls-max", "1.2"] if tls_version == "--tlsv1.2" else []
    r = curl("--cacert", pki.ca, tls_version, *maxv, *cert_args(cred), url(tls_sc, "mtls"))
    assert r.returncode != 0 and r.status == 0, f"{client}: curl rc={r.returncode} status={r.status} body={r.body[:200]!r}"
    wait_hs(tls_sc, "mtls", result, before + 1)
    assert hs(tls_sc, "mtls", "success") == 0
    assert http_app.count()["started"] == 0
    tls_sc.assert_alive()


def test_forged_identity_headers_removed_on_plain_and_tls_listeners(tls_sc, pki):
    forged = ["-H", "x-client-identity: spiffe://evil", "-H", "x-forwarded-client-cert: Hash=00;URI=spiffe://evil"]
    for listener, args in (("web", []), ("tls", ["--cacert", pki.ca])):
        for flag in ("--http1.1", "--http2-prior-knowledge" if listener == "web" else "--http2"):
            scheme = "http" if listener == "web" else "https"
            r = curl(*args, flag, *forged, f"{scheme}://{LOCALHOST}:{tls_sc.port(listener)}/headers")
            h = app_headers(r)
            assert header_values(h, "x-client-identity") == [], (listener, flag, h["headers"])
            assert header_values(h, "x-forwarded-client-cert") == [], (listener, flag, h["headers"])


# --------------------------------------------------------------------------------------------
# gRPC over TLS (grpcio)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def grpc_tls(grpc_app, grpc_stubs, start_sidecar, pki):
    _, pb2, pb2_grpc = grpc_stubs
    cfg = make_config(grpc_app.port, app_http="http2", health_path=None, extra_inbound=standard_listeners(pki))
    sc = start_sidecar(cfg)
    return sc, pb2, pb2_grpc


def _grpc_channel(port, pki, cred=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=cred.key.read_bytes() if cred else None,
        certificate_chain=cred.crt.read_bytes() if cred else None,
    )
    return grpc.secure_channel(f"{LOCALHOST}:{port}", creds, options=GRPC_OPTS)


@pytest.mark.parametrize("listener,cred", [("tls", None), ("mtls", "frontend")])
def test_grpc_over_tls_unary_streaming_and_status(grpc_tls, pki, listener, cred):
    sc, pb2, pb2_grpc = grpc_tls
    with _grpc_channel(sc.port(listener), pki, getattr(pki, cred) if cred else None) as ch:
        stub = pb2_grpc.EchoStub(ch)
        resp, call = stub.Unary.with_call(pb2.Msg(text="tls", payload=b"x" * 100), metadata=(("x-client", "c1"),), timeout=10)
        assert resp.text == "tls" and resp.count == 100
        tr = dict(call.trailing_metadata())
        assert tr.get("x-trailer") == "trail-tls" and tr.get("x-client-echo") == "c1"
        got = [(m.text, m.count) for m in stub.ServerStream(pb2.Msg(text="s", count=4, delay_ms=50), timeout=10)]
        assert got == [(f"s-{i}", i) for i in range(4)]
        answers = [m.text for m in stub.Bidi(iter([pb2.Msg(text=f"b{i}") for i in range(3)]), timeout=10)]
        assert answers == ["echo:b0", "echo:b1", "echo:b2"]
        with pytest.raises(grpc.RpcError) as e:
            stub.Fail(pb2.Msg(text="nope", code=grpc.StatusCode.NOT_FOUND.value[0]), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == "nope"
    recs = [r for r in sc.access_log() if r.get("listener") == listener and "/e2e.Echo/" in str(r.get("path"))]
    assert recs and all(r["protocol"] == "HTTP/2" for r in recs)
    if cred:
        assert all(r["peer_identity"] == FRONTEND_ID for r in recs), recs


def test_grpc_disallowed_identity_and_missing_cert(grpc_tls, pki):
    sc, pb2, pb2_grpc = grpc_tls
    with _grpc_channel(sc.port("mtls"), pki, pki.intruder) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb2_grpc.EchoStub(ch).Unary(pb2.Msg(text="x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (e.value.code(), e.value.details())
    with _grpc_channel(sc.port("mtls"), pki, None) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb2_grpc.EchoStub(ch).Unary(pb2.Msg(text="x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (e.value.code(), e.value.details())
    wait_hs(sc, "mtls", "no_client_cert", 1)


# --------------------------------------------------------------------------------------------
# protocol: tcp with TLS
# --------------------------------------------------------------------------------------------
@pytest.fixture
def tcp_tls(tcp_app, http_app, start_sidecar, pki):
    s = pki.server
    cfg = make_config(
        http_app.port,
        extra_inbound=[
            tls_listener("db", tls_block(s.crt, s.key, client_ca=pki.ca, allowed=[FRONTEND_ID]), protocol="tcp", target=tcp_app.address),
            tls_listener("db_tls", tls_block(s.crt, s.key), protocol="tcp", target=tcp_app.address),
        ],
    )
    return start_sidecar(cfg)


def _s_client_session(port, *args, send=b"ping-over-tls\n", expect=b"ping-over-tls\n", timeout=10.0):
    """Runs `openssl s_client -quiet` (application data only on stdout), writes `send`, reads
    until `expect` arrived (or EOF / deadline), then ends it. Returns the bytes read."""
    cmd = ["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}", "-servername", "localhost", "-quiet", *map(str, args)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = bytearray()

    def reader():
        while True:
            d = p.stdout.read1(65536)
            if not d:
                return
            got.extend(d)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        p.stdin.write(send)
        p.stdin.flush()
    except BrokenPipeError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and expect not in got and t.is_alive():
        time.sleep(0.02)
    p.kill()
    p.wait(5)
    t.join(2)
    return bytes(got)


def test_tcp_listener_tls_and_mtls_echo(tcp_tls, pki):
    got = _s_client_session(tcp_tls.port("db_tls"), "-CAfile", pki.ca)
    assert got.startswith(b"BANNER\n") and b"ping-over-tls\n" in got, got
    got = _s_client_session(tcp_tls.port("db"), "-CAfile", pki.ca, "-cert", pki.frontend.crt, "-key", pki.frontend.key)
    assert got.startswith(b"BANNER\n") and b"ping-over-tls\n" in got, got
    # no ALPN on a tcp listener, even when the client offers h2
    p = s_client(tcp_tls.port("db_tls"), "-CAfile", pki.ca, "-alpn", "h2,http/1.1")
    assert handshake_ok(p) and "No ALPN negotiated" in out_text(p), out_text(p)[-2000:]
    # a larger exchange with Python's ssl, half-close included
    s = tls_connect(tcp_tls.port("db"), client_ctx(pki.ca, pki.frontend))
    try:
        data = os.urandom(300_000)
        s.sendall(data)
        buf = b""
        s.settimeout(10)
        while len(buf) < 7 + len(data):
            d = s.recv(65536)
            assert d, f"EOF after {len(buf)} bytes"
            buf += d
        assert buf == b"BANNER\n" + data
    finally:
        s.close()
    wait_hs(tcp_tls, "db", "success", 2)


@pytest.mark.parametrize("client", ["intruder", None])
def test_tcp_listener_disallowed_identity_or_no_cert_is_closed(tcp_tls, pki, client):
    cred = getattr(pki, client) if client else None
    args = ["-cert", cred.crt, "-key", cred.key] if cred else []
    got = _s_client_session(tcp_tls.port("db"), "-CAfile", pki.ca, *args, timeout=5)
    assert b"BANNER" not in got and b"ping" not in got, f"{client}: the app was reached: {got!r}"
    # Python ssl: the connection ends (EOF, reset or alert) without any application bytes.
    try:
        s = tls_connect(tcp_tls.port("db"), client_ctx(pki.ca, cred))
    except (ssl.SSLError, OSError):
        return  # refused during the handshake (TLS 1.2 style)
    try:
        try:
            s.sendall(b"hello\n")
        except (ssl.SSLError, OSError):
            pass
        closed, data, _ = wait_closed(s, 5)
    finally:
        s.close()
    assert closed and data == b"", f"{client}: connection not closed (closed={closed}, got {data!r})"


# --------------------------------------------------------------------------------------------
# bad input on a TLS port
# --------------------------------------------------------------------------------------------
def test_plain_http_and_random_bytes_on_tls_port_closed_and_counted(tls_sc, pki):
    port = tls_sc.port("tls")
    for payload in (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x00\xffnot tls at all" + bytes(range(256)) * 4):
        s = socket.create_connection((LOCALHOST, port), timeout=5)
        try:
            s.sendall(payload)
            closed, data, took = wait_closed(s, 5)
        finally:
            s.close()
        assert closed, f"{payload[:20]!r}: connection still open after 5 s"
        assert not data.startswith(b"HTTP/"), f"plain-HTTP answer on a TLS port: {data[:100]!r}"
        assert len(data) < 64, f"unexpected bytes from the sidecar: {data[:100]!r}"
    wait_hs(tls_sc, "tls", "not_tls", 2)
    # the listener still serves TLS clients
    assert curl("--cacert", pki.ca, url(tls_sc, "tls")).status == 200
    tls_sc.assert_alive()


def test_unfinished_client_hello_cut_at_handshake_timeout(tls_sc, pki):
    port = tls_sc.port("tls")
    hello = client_hello_bytes()
    stalled = []
    for _ in range(4):
        s = socket.create_connection((LOCALHOST, port), timeout=5)
        s.sendall(hello[: len(hello) // 2])
        stalled.append(s)
    silent = socket.create_connection((LOCALHOST, port), timeout=5)  # connects, never says a word
    t0 = time.monotonic()
    closed_at = {}
    try:
        # meanwhile other clients are served, over HTTP/1.1 and HTTP/2
        for flag in ("--http1.1", "--http2", "--http1.1"):
            r = curl("--cacert", pki.ca, flag, url(tls_sc, "tls"), timeout=5)
            assert r.status == 200, (flag, r.returncode, r.stderr)
        assert time.monotonic() - t0 < 0.7, "serving the other clients took too long to prove anything"
        for i, s in enumerate(stalled + [silent]):
            closed, data, _ = wait_closed(s, max(0.1, t0 + 4.0 - time.monotonic()))
            if closed:
                closed_at[i] = time.monotonic() - t0  # an upper bound for all but the first
            assert not data.startswith(b"HTTP"), data[:50]
    finally:
        for s in stalled + [silent]:
            s.close()
    missing = [i for i in range(5) if i not in closed_at]
    assert not missing, f"connections {missing} (4 = the silent one) still open 4s after connecting (handshake_timeout 1s)"
    assert closed_at[0] > 0.7, f"closed after {closed_at[0]:.2f}s: too early for handshake_timeout 1s"
    assert max(closed_at.values()) < 3.0, f"closed after {closed_at}s with handshake_timeout 1s"
    wait_hs(tls_sc, "tls", "timeout", 5)
    tls_sc.assert_alive()


# --------------------------------------------------------------------------------------------
# metrics, /config, logs
# --------------------------------------------------------------------------------------------
def test_tls_listener_counters_exist_at_zero_before_any_traffic(http_app, start_sidecar, pki):
    """Issue 9, bug 6: the handshake and rejection counters of a listener are resolved once,
    when the listener starts (not by hashing a label set on every event), so their series are
    on /metrics at 0 before the first handshake or refusal."""
    s = pki.server
    sc = start_sidecar(make_config(http_app.port, extra_inbound=[tls_listener("tls", tls_block(s.crt, s.key))]))
    m = sc.metrics()  # no client has connected to any listener yet
    want = [
        (HS, {"listener": "tls", "result": "success"}),
        ("sidecar_inbound_rejected_total", {"listener": "tls", "reason": "max_connections"}),
    ]
    for name, labels in want:
        found = [v for lab, v in m.series(name) if all(lab.get(k) == x for k, x in labels.items())]
        assert found == [0], f"{name}{labels}: expected one series at 0 before any traffic, got {found}; series: {m.series(name)}"


def test_cert_expiry_metric(tls_sc, pki):
    want = pki.server.cert().not_valid_after_utc.timestamp()
    m = tls_sc.metrics()
    for listener in ("tls", "mtls", "mtls_any"):
        assert m.value("sidecar_tls_cert_expiry_timestamp_seconds", listener=listener) == pytest.approx(want, abs=1), m.series(
            "sidecar_tls_cert_expiry_timestamp_seconds"
        )
    assert not [lab for lab, _ in m.series("sidecar_tls_cert_expiry_timestamp_seconds") if lab.get("listener") == "web"]


def test_private_keys_never_in_config_or_logs(http_app, start_sidecar, pki):
    # log_level trace: the most the sidecar (and the TLS library under it) will ever say
    sc = start_sidecar(make_config(http_app.port, extra_inbound=standard_listeners(pki), log_level="trace"))
    for cred in (pki.frontend, pki.foreign, pki.expired, pki.intruder, None):
        curl("--cacert", pki.ca, *cert_args(cred), url(sc, "mtls"))
    s_client(sc.port("tls"), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    for ct in (None, "application/json"):
        r = sc.admin("/config", headers={"Accept": ct} if ct else None)
        assert r.status == 200
        body = r.body.decode()
        assert "PRIVATE KEY" not in body
        for line in pki.server.key_body_lines():
            assert line not in body, "/config shows private key bytes"
    logs = sc.stderr_text() + sc.stdout_text()
    assert len(sc.stderr_text().splitlines()) > 10, "trace logging produced nearly nothing: the check below proves little"
    assert "PRIVATE KEY" not in logs
    for cred in (pki.server, pki.frontend, pki.foreign, pki.expired, pki.intruder):
        for line in cred.key_body_lines():
            assert line not in logs, f"key bytes of {cred.key} in the sidecar's logs"


# --------------------------------------------------------------------------------------------
# rotation by symlink flip
# --------------------------------------------------------------------------------------------
@pytest.fixture
def rotating(tmp_path, http_app, start_sidecar, pki):
    """A sidecar whose `tls` listener reads certs/current/tls.{crt,key}, current -> v1."""
    certs = tmp_path / "certs"
    certs.mkdir()
    v1 = issue(pki.ca_dir, SERVER_ID, certs / "v1", dns=["localhost", LOCALHOST])
    os.symlink("v1", certs / "current")
    cur = certs / "current"
    cfg = make_config(http_app.port, extra_inbound=[tls_listener("tls", tls_block(cur / "tls.crt", cur / "tls.key"))])
    sc = start_sidecar(cfg)
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
