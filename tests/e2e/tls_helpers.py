"""TLS helpers for test_tls.py, test_tls_files.py and test_memory.py: a test PKI (the sidecar's
own `certs` commands, plus certificates made with the `cryptography` package that `sidecar certs`
cannot make: expired, not yet valid, from another CA, wrong key usage), TLS listener configs, the
handshake counters, and thin wrappers around clients nobody here wrote: `openssl s_client`,
Python's ssl module (OpenSSL) and the `h2` library.

Everything talks to 127.0.0.1 only, and every wait has a deadline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from helpers import LOCALHOST, free_port, run_sidecar_cmd, wait_until

TD = "spiffe://cluster.local/ns/default/sa"
SERVER_ID = f"{TD}/web"
FRONTEND_ID = f"{TD}/frontend"  # the identity the `mtls` listeners allow
INTRUDER_ID = f"{TD}/intruder"  # a valid client of the same CA that is not allowed
DNS_ONLY_NAMES = ["client.example.test", "second.example.test"]
HS = "sidecar_tls_handshakes_total"


# --------------------------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------------------------
@dataclass
class Cred:
    """A directory holding tls.crt and tls.key (and, from `sidecar certs issue`, ca.crt)."""

    dir: Path

    @property
    def crt(self) -> Path:
        return self.dir / "tls.crt"

    @property
    def key(self) -> Path:
        return self.dir / "tls.key"

    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.crt.read_bytes())

    @property
    def serial(self) -> int:
        return self.cert().serial_number

    def der_sha256(self) -> str:
        return hashlib.sha256(self.cert().public_bytes(serialization.Encoding.DER)).hexdigest()

    def key_body_lines(self) -> list[str]:
        """The base64 lines of the private key PEM (what must never show up in logs)."""
        return [l for l in self.key.read_text().splitlines() if l and not l.startswith("-----")]


def _now():
    return dt.datetime.now(dt.timezone.utc)


def _write_key(path: Path, key):
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(path, 0o600)


def make_ca(out: Path, cn: str) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 CA made with `cryptography` (not by the sidecar)."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(days=1))
        .not_valid_after(_now() + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", key)
    return out / "ca.crt", out / "ca.key"


def make_leaf(
    out: Path,
    ca_dir: Path,
    *,
    uri: str | None = None,
    dns=(),
    ips=(),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    eku=(ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
    key=None,
) -> Cred:
    """An ECDSA P-256 leaf signed by the CA in ca_dir (ca.crt + ca.key), made with
    `cryptography`, with any validity window and extended key usage."""
    import ipaddress

    out.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = key or ec.generate_private_key(ec.SECP256R1())
    sans = []
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cn = (list(dns) or [uri or "leaf"])[0][:64]
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - dt.timedelta(hours=1))
        .not_valid_after(not_after or _now() + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digitalSignature
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "tls.key", key)
    (out / "ca.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
    return Cred(out)


def sidecar_certs(*args) -> subprocess.CompletedProcess:
    p = run_sidecar_cmd("certs", *args, timeout=30)
    assert p.returncode == 0, f"sidecar certs {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def issue(ca_dir: Path, spiffe: str, out: Path, dns=()) -> Cred:
    """A workload certificate from the sidecar's own `certs issue`."""
    args = ["issue", "--ca", ca_dir, "--spiffe", spiffe]
    for d in dns:
        args += ["--dns", d]
    sidecar_certs(*args, out)
    return Cred(out)


class PKI:
    """Everything the TLS tests need, written under root:
    ca/ (sidecar certs init), server (sidecar certs issue, DNS localhost + IP 127.0.0.1),
    frontend and intruder clients (sidecar certs issue), and from `cryptography`: a client from
    another CA, expired / not-yet-valid clients, a client with only DNS SANs, and a client whose
    certificate is for server auth only."""

    def __init__(self, root: Path):
        self.root = root
        self.ca_dir = root / "ca"
        sidecar_certs("init", self.ca_dir)
        self.ca = self.ca_dir / "ca.crt"
        self.server = issue(self.ca_dir, SERVER_ID, root / "server", dns=["localhost", LOCALHOST])
        self.frontend = issue(self.ca_dir, FRONTEND_ID, root / "frontend")
        self.intruder = issue(self.ca_dir, INTRUDER_ID, root / "intruder")
        self.other_ca_dir = root / "other-ca"
        make_ca(self.other_ca_dir, "Some other CA")
        self.other_ca = self.other_ca_dir / "ca.crt"
        self.foreign = make_leaf(root / "foreign", self.other_ca_dir, uri=FRONTEND_ID)
        self.expired = make_leaf(
            root / "expired", self.ca_dir, uri=FRONTEND_ID,
            not_before=_now() - dt.timedelta(days=30), not_after=_now() - dt.timedelta(days=1),
        )
        self.not_yet_valid = make_leaf(
            root / "not-yet-valid", self.ca_dir, uri=FRONTEND_ID,
            not_before=_now() + dt.timedelta(days=1), not_after=_now() + dt.timedelta(days=30),
        )
        self.dns_only = make_leaf(root / "dns-only", self.ca_dir, dns=DNS_ONLY_NAMES)
        self.server_auth_only = make_leaf(
            root / "server-auth-only", self.ca_dir, uri=FRONTEND_ID, eku=(ExtendedKeyUsageOID.SERVER_AUTH,)
        )


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def tls_block(cert: Path, key: Path, client_ca: Path | None = None, allowed=(), handshake_timeout="1s") -> dict:
    t = {"cert": str(cert), "key": str(key), "handshake_timeout": handshake_timeout}
    if client_ca:
        t["client_ca"] = str(client_ca)
    if allowed:
        t["allowed_identities"] = list(allowed)
    return t


def tls_listener(name, tls: dict, protocol="http", target=None, port=None) -> dict:
    ib = {"name": name, "listen": f"{LOCALHOST}:{port or free_port()}", "protocol": protocol, "tls": tls}
    if target:
        ib["target"] = target
    return ib


def standard_listeners(pki: PKI) -> list[dict]:
    """`tls` (server TLS only), `mtls` (client certs required, only FRONTEND_ID allowed) and
    `mtls_any` (client certs required, any verified identity)."""
    s = pki.server
    return [
        tls_listener("tls", tls_block(s.crt, s.key)),
        tls_listener("mtls", tls_block(s.crt, s.key, client_ca=pki.ca, allowed=[FRONTEND_ID])),
        tls_listener("mtls_any", tls_block(s.crt, s.key, client_ca=pki.ca)),
    ]


# --------------------------------------------------------------------------------------------
# the sidecar's TLS listeners seen from a test: URLs, curl's client-cert arguments, handshakes
# counted by result
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# openssl s_client
# --------------------------------------------------------------------------------------------
def s_client(port, *args, input: bytes = b"", timeout=15.0, servername="localhost") -> subprocess.CompletedProcess:
    """`openssl s_client` to 127.0.0.1:port; stdout and stderr as text (stdin = input, then EOF)."""
    cmd = ["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}"]
    if servername:
        cmd += ["-servername", servername]
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)


def out_text(p: subprocess.CompletedProcess) -> str:
    return p.stdout.decode(errors="replace") + "\n" + p.stderr.decode(errors="replace")


def handshake_ok(p: subprocess.CompletedProcess) -> bool:
    t = out_text(p)
    return "Cipher is (NONE)" not in t and ("New, TLSv1." in t or "Reused, TLSv1." in t)


def serial_via_openssl(port, ca: Path) -> int:
    """The serial of the leaf the sidecar serves on a new connection, read with
    `openssl s_client -showcerts | openssl x509 -serial`."""
    p = s_client(port, "-showcerts", "-CAfile", ca)
    assert handshake_ok(p), out_text(p)
    x = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=p.stdout, capture_output=True, timeout=10)
    line = x.stdout.decode().strip()
    assert x.returncode == 0 and line.startswith("serial="), f"openssl x509: {line} {x.stderr!r}"
    return int(line.split("=", 1)[1], 16)


# --------------------------------------------------------------------------------------------
# Python ssl (OpenSSL underneath)
# --------------------------------------------------------------------------------------------
def client_ctx(ca: Path | None, cred: Cred | None = None, alpn=None, min_version=None, max_version=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cred:
        ctx.load_cert_chain(str(cred.crt), str(cred.key))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if min_version:
        ctx.minimum_version = min_version
    if max_version:
        ctx.maximum_version = max_version
    return ctx


def tls_connect(port, ctx: ssl.SSLContext, server_hostname="localhost", timeout=10.0) -> ssl.SSLSocket:
    raw = socket.create_connection((LOCALHOST, port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def peer_serial(sock: ssl.SSLSocket) -> int:
    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number


def serial_via_python(port, ca: Path) -> int:
    s = tls_connect(port, client_ctx(ca), timeout=5)
    try:
        return peer_serial(s)
    finally:
        s.close()


def client_hello_bytes(server_hostname="localhost") -> bytes:
    """A real ClientHello from OpenSSL, produced in memory (never sent by ssl itself)."""
    ctx = client_ctx(None, alpn=["h2", "http/1.1"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert hello[:1] == b"\x16" and len(hello) > 100, hello[:20]
    return hello


# --------------------------------------------------------------------------------------------
# HTTP/2 over TLS with the h2 library
# --------------------------------------------------------------------------------------------
class H2TLS:
    """One long-lived HTTP/2 connection over TLS (ALPN h2), driven by the `h2` library."""

    def __init__(self, port, ca: Path, cred: Cred | None = None, timeout=10.0):
        import h2.config
        import h2.connection

        self.sock = tls_connect(port, client_ctx(ca, cred, alpn=["h2"]), timeout=timeout)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.terminated = None
        self.lock = threading.Lock()

    def get(self, path, headers=(), timeout=10.0) -> tuple[int, dict, bytes]:
        import h2.events

        with self.lock:
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                sid,
                [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "localhost"), *headers],
                end_stream=True,
            )
            self.sock.sendall(self.conn.data_to_send())
            status, hdrs, body = None, {}, b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.05, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the HTTP/2 connection")
                for ev in self.conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        hdrs = dict(ev.headers)
                        status = int(hdrs[":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        if ev.stream_id == sid:
                            body += ev.data
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        self.terminated = ev
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        raise ConnectionError(f"stream {sid} reset: {ev.error_code}")
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        self.sock.sendall(self.conn.data_to_send())
                        return status, hdrs, body
                self.sock.sendall(self.conn.data_to_send())
            raise TimeoutError(f"no complete response to {path} within {timeout}s")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# symlink-flipped certificate directories (what Kubernetes Secret volumes and cert-manager do)
# --------------------------------------------------------------------------------------------
def flip_symlink(link: Path, target_name: str):
    """Atomically points link at target_name (a sibling directory): new symlink + rename."""
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def symlinked_tls_listener(pki: PKI, certs: Path) -> tuple[Cred, dict]:
    """certs/v1 (a server certificate from `sidecar certs issue`) and certs/current -> v1, laid
    out as a Kubernetes Secret volume is. Returns v1 and a `tls` listener that reads
    current/tls.{crt,key}: flip_symlink(certs / "current", NAME) rotates what it serves."""
    certs.mkdir()
    v1 = issue(pki.ca_dir, SERVER_ID, certs / "v1", dns=["localhost", LOCALHOST])
    os.symlink("v1", certs / "current")
    cur = certs / "current"
    return v1, tls_listener("tls", tls_block(cur / "tls.crt", cur / "tls.key"))


def header_values(headers_json: dict, name: str) -> list[str]:
    """Values of header `name` (case-insensitive) in the test app's /headers JSON."""
    return [v for k, v in headers_json["headers"] if k.lower() == name.lower()]
