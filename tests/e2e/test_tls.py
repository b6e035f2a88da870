"""TLS and mutual TLS on inbound listeners (issue 5), driven by clients nobody here wrote:
`openssl s_client`, curl, grpcio, the `h2` library and Python's ssl module (OpenSSL).

The PKI comes from the sidecar's own `certs init` / `certs issue` (the three-command dev CA),
plus certificates made with `cryptography` that `sidecar certs` cannot make: from another CA,
expired, not yet valid, DNS-only, server-auth-only. Listeners of the usual test sidecar:
  web       plain HTTP (from helpers.make_config)
  tls       server TLS, no client certificates
  mtls      client certificates from our CA, only spiffe://.../sa/frontend allowed
  mtls_any  client certificates from our CA, any verified identity
Every TLS listener has `handshake_timeout: 1s`. The certificate files over a sidecar's life
(rotation, reloads, a stuck watcher, `check`/`run` naming a bad file) are in test_tls_files.py.
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

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import LOCALHOST, curl, make_config, wait_closed, wait_until
from tls_helpers import (
    DNS_ONLY_NAMES,
    FRONTEND_ID,
    HS,
    INTRUDER_ID,
    SERVER_ID,
    cert_args,
    client_ctx,
    client_hello_bytes,
    handshake_ok,
    header_values,
    hs,
    out_text,
    s_client,
    standard_listeners,
    tls_block,
    tls_connect,
    tls_listener,
    url,
    wait_hs,
)

GRPC_OPTS = [("grpc.enable_http_proxy", 0)]


# --------------------------------------------------------------------------------------------
# fixtures (`pki` is in conftest.py)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def tls_sc(http_app, start_sidecar, pki):
    """The HTTP app behind a ready sidecar with the web, tls, mtls and mtls_any listeners."""
    return start_sidecar(make_config(http_app.port, extra_inbound=standard_listeners(pki)))


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
    # Four calls above: Unary, ServerStream, Bidi, Fail.
    recs = sc.wait_access_log(lambda r: r.get("listener") == listener and "/e2e.Echo/" in str(r.get("path")), n=4)
    assert all(r["protocol"] == "HTTP/2" for r in recs)
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

