"""The targets: the app (its own nginx) and the proxies, each started from its config in its
own directory under the run's temp dir, pinned to its CPU, checked, and stopped by pid. A
workload may ask for a variant of the proxies (`via`): a second process of each, whose only
difference is the upstream (the `unix` workload: the app's Unix socket), or a forward proxy of
its own (`outbound`: listeners to three endpoints of the app, configs in outbound.py).

Not responsible for load (load.py) nor for config text (configs.py)."""
from __future__ import annotations
import time

import os
import re
import signal
import subprocess
import urllib.error
import urllib.request

import outbound as ob_conf  # (Env's `outbound` argument is a flag)
from configs import BODY_SMALL, app_conf, haproxy_conf, nginx_proxy_conf, nginx_stream, sidecar_conf
from procs import HERE, LOAD_CPU, PROXY_CPU, Procs, children_tree, free_port, http_get, wait_http_200, wait_tcp

TARGETS = ["direct", "sidecar", "nginx", "haproxy"]
PROXIES = ["sidecar", "nginx", "haproxy"]


def key(target, via=None):
    """The process (and directory, and ports) of `target` in variant `via`; the app direct has none."""
    return target if not via or target == "direct" else f"{target}-{via}"


class Env:
    """The app plus the proxies, each in its own directory under one temp dir.

    tls: the TLS listeners (issue 5); l4: a TCP relay listener in each proxy (the `floor`
    workload); unix: the app also on a Unix socket, and a variant `unix` of each proxy that
    reaches it there (the `unix` workload). `skip[workload][target]` says why a target cannot
    run a workload here (no nginx `stream` module; a Sidecar that refuses `unix:` addresses).
    outbound: the app also on 127.0.0.21-23 (and a failing set, outbound.py), and a variant
    `outbound` of each proxy with two forward-proxy listeners (ports[k][0] to the healthy set,
    ob_fail_ports[k] to the failing one)."""

    def __init__(self, tmp, sidecar_bin, procs: Procs, tls=False, l4=False, unix=False, outbound=False):
        self.tmp, self.bin, self.procs = tmp, sidecar_bin, procs
        self.app_port, self.app_h2 = free_port(), free_port()
        self.ports = {"direct": (self.app_port, self.app_h2)}
        self.admin = {}  # Sidecar's admin port, per process
        self.skip: dict[str, dict[str, str]] = {}
        variants = [None] + (["unix"] if unix else []) + (["outbound"] if outbound else [])
        for via in variants:
            for t in PROXIES:
                self.ports[key(t, via)] = (free_port(), free_port())
            k = key("sidecar", via)
            self.ports[k] = (self.ports[k][0], self.ports[k][0])  # one port: h1 + h2c
            self.admin[k] = free_port()
        self.outbound = outbound
        self.ob_fail_ports = {}  # the listener to the failing set, per outbound process
        self.ep_fail_port = free_port() if outbound else None  # the failing set's port at the app
        if outbound:
            for t in PROXIES:
                k = key(t, "outbound")
                self.ports[k] = (self.ports[k][0], self.ports[k][0])
                self.ob_fail_ports[k] = free_port()
        self.proc: dict[str, subprocess.Popen] = {}
        # TLS listeners (issue 5), only when TLS workloads run: same certificate in every proxy
        self.tls = self.make_tls() if tls else None
        self.tls_ports = {t: (free_port(), free_port()) for t in PROXIES} if tls else {}
        if tls:  # Sidecar and HAProxy: one TLS port, ALPN h2 and http/1.1; nginx: h2 on a second one
            for t in ("sidecar", "haproxy"):
                self.tls_ports[t] = (self.tls_ports[t][0], self.tls_ports[t][0])
        # L4 relay listeners (the floor), only when that workload runs; the direct row is the app
        self.l4_ports, self.stream_module = {}, None
        if l4:
            self.l4_ports = {"direct": self.app_port, **{t: free_port() for t in PROXIES}}
            self.stream_module, why = nginx_stream()
            if why:
                self.skip.setdefault("floor", {})["nginx"] = why
                del self.l4_ports["nginx"]
        self.app_sock = os.path.join(tmp, "app", "app.sock") if unix else None
        self.app_dir = os.path.join(tmp, "app")

    def make_tls(self):
        """A dev CA and an ECDSA P-256 server certificate, made by Sidecar itself; a no-resumption
        shim for the load generators (lib/noresume.c)."""
        d = self._dir("tls")
        for cmd in ([self.bin, "certs", "init", os.path.join(d, "ca")],
                    [self.bin, "certs", "issue", "--ca", os.path.join(d, "ca"), "--spiffe", "spiffe://bench/ns/b/sa/b",
                     "--dns", "localhost", "--dns", "127.0.0.1", os.path.join(d, "out")]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        out = os.path.join(d, "out")
        tls = {"cert": os.path.join(out, "tls.crt"), "key": os.path.join(out, "tls.key"),
               "ca": os.path.join(out, "ca.crt"), "pem": os.path.join(out, "haproxy.pem"),
               "shim": os.path.join(d, "noresume.so")}
        with open(tls["pem"], "w") as f:  # HAProxy wants certificate and key in one file
            f.write(open(tls["cert"]).read() + open(tls["key"]).read())
        os.chmod(tls["pem"], 0o600)
        r = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", tls["shim"], os.path.join(HERE, "noresume.c"), "-ldl"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"building lib/noresume.c failed: {r.stderr.strip()}")
        return tls

    def tls_of(self, name):
        if not self.tls or name not in self.tls_ports:
            return None
        return dict(self.tls, port=self.tls_ports[name][0], h2port=self.tls_ports[name][1])

    def l4_of(self, name):
        if name not in self.l4_ports:
            return None
        return {"port": self.l4_ports[name], "target": f"127.0.0.1:{self.app_port}"}

    def upstream(self, name, via=None):
        """The app's address in `name`'s config syntax."""
        if via == "unix":
            return self.app_sock if name == "haproxy" else f"unix:{self.app_sock}"
        return f"127.0.0.1:{self.app_port}"

    def _dir(self, name):
        d = os.path.join(self.tmp, name)
        os.makedirs(d, exist_ok=True)
        return d

    def start_app(self):
        d = self._dir("app")
        www = os.path.join(d, "www")
        os.makedirs(www, exist_ok=True)
        with open(os.path.join(www, "1k"), "wb") as f:
            f.write(b"a" * 1023 + b"\n")
        with open(os.path.join(www, "1m"), "wb") as f:
            f.write(b"b" * (1024 * 1024 - 1) + b"\n")
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(app_conf(d, self.app_port, self.app_h2, self.app_sock,
                             ob_conf.app_listens(self.app_port) if self.outbound else "",
                             ob_conf.app_servers(d, self.ep_fail_port) if self.outbound else ""))
        p = self.procs.start(["nginx", "-p", d, "-c", conf, "-e", f"{d}/error.log", "-g", "daemon off;"],
                             os.path.join(d, "out.log"), cpu=LOAD_CPU)
        wait_tcp(self.app_port, proc=p)
        self.proc["direct"] = p
        base = f"http://127.0.0.1:{self.app_port}"
        for path, n in (("/", 12), ("/1k", 1024), ("/1m", 1024 * 1024)):
            st, body = http_get(base + path)
            if st != 200 or len(body) != n:
                raise RuntimeError(f"app {path}: status {st}, {len(body)} bytes, wanted {n}")
        st, body = http_get(base + "/")
        assert body == BODY_SMALL, body
        if self.app_sock:
            self.check_sidecar_unix()
        if self.outbound:
            self.check_endpoints()

    def check_endpoints(self):
        """The outbound endpoints: the healthy set answers `hello world`, the failing set's last
        endpoint 503 (`http_get` raises on it), the others `hello world`."""
        for ip in ob_conf.ENDPOINT_IPS:
            for port in (self.app_port, self.ep_fail_port):
                url = f"http://{ip}:{port}/"
                try:
                    st, body = http_get(url)
                except urllib.error.HTTPError as e:
                    st, body = e.code, b""
                want = 503 if (ip == ob_conf.FAILING_IP and port == self.ep_fail_port) else 200
                if st != want or (want == 200 and body != BODY_SMALL):
                    raise RuntimeError(f"app endpoint {url}: status {st}, body {body[:40]!r}, wanted {want}")

    def check_sidecar_unix(self):
        """`sidecar check` on the unix variant's config: a Sidecar without `unix:` app addresses
        refuses it, and the `unix` workload then runs without Sidecar (noted in the report)."""
        conf = self.write_conf("sidecar", "unix")
        r = subprocess.run([self.bin, "check", "-c", conf], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            why = " ".join((r.stderr + r.stdout).replace(conf + ":", "").split())[:300]
            self.skip.setdefault("unix", {})["sidecar"] = (
                f"`sidecar check` refuses its config with `app.address: unix:{self.app_sock}`: {why}")

    def write_conf(self, name, via=None):
        """Writes the config of `name` (variant `via`) into its directory; returns its path."""
        k = key(name, via)
        d = self._dir(k)
        port, h2 = self.ports[k]
        tls = None if via else self.tls_of(name)
        l4 = None if via else self.l4_of(name)
        app = self.upstream(name, via)
        if via == "outbound":
            ob = (port, self.ob_fail_ports[k], self.app_port, self.ep_fail_port)
            if name == "nginx":
                conf, text = "nginx.conf", ob_conf.nginx_conf(d, *ob)
            elif name == "haproxy":
                conf, text = "haproxy.cfg", ob_conf.haproxy_conf(d, *ob)
            else:
                conf, text = "sidecar.yaml", ob_conf.sidecar_conf(self.admin[k], *ob)
        elif name == "nginx":
            conf, text = "nginx.conf", nginx_proxy_conf(d, port, h2, app, tls, l4, self.stream_module if l4 else "")
        elif name == "haproxy":
            conf, text = "haproxy.cfg", haproxy_conf(d, port, h2, app, tls, l4)
        elif name == "sidecar":
            conf, text = "sidecar.yaml", sidecar_conf(self.admin[k], port, app, tls, l4)
        else:
            raise ValueError(name)
        conf = os.path.join(d, conf)
        with open(conf, "w") as f:
            f.write(text)
        return conf

    def start(self, name, via=None):
        k = key(name, via)
        d = self._dir(k)
        conf = self.write_conf(name, via)
        port, h2 = self.ports[k]
        if name == "nginx":
            p = self.procs.start(["nginx", "-p", d, "-c", conf, "-e", f"{d}/error.log", "-g", "daemon off;"],
                                 os.path.join(d, "out.log"), cpu=PROXY_CPU)
            self.proc[k] = p  # stopped by stop() even if it never opens its ports
            wait_tcp(port, proc=p)
            wait_tcp(h2, proc=p)
        elif name == "haproxy":
            p = self.procs.start(["haproxy", "-db", "-f", conf], os.path.join(d, "out.log"), cpu=PROXY_CPU)
            self.proc[k] = p
            wait_tcp(port, proc=p)
            wait_tcp(h2, proc=p)
        else:
            p = self.procs.start([self.bin, "run", "-c", conf], os.path.join(d, "out.log"), cpu=PROXY_CPU)
            self.proc[k] = p
            wait_http_200(f"http://127.0.0.1:{self.admin[k]}/ready", proc=p)
        if k in self.ob_fail_ports:
            wait_tcp(self.ob_fail_ports[k], proc=p)
        if self.tls and not via:
            for tp in set(self.tls_ports[name]):
                wait_tcp(tp, proc=p)
        if self.l4_of(name) and not via:
            wait_tcp(self.l4_ports[name], proc=p)
        return p

    def pids(self, name, via=None):
        if name == "direct":
            return []
        if name == "app":
            return children_tree(self.proc["direct"].pid)
        return children_tree(self.proc[key(name, via)].pid)

    def check(self, name, via=None):
        """One request per body through the proxy: right status and length (after idle RSS); one
        through its TLS and L4 listeners."""
        port = self.ports[key(name, via)][0]
        for path, n in (("/", 12), ("/1k", 1024), ("/1m", 1024 * 1024)):
            st, body = http_get(f"http://127.0.0.1:{port}{path}")
            if st != 200 or len(body) != n:
                raise RuntimeError(f"{key(name, via)} {path}: status {st}, {len(body)} bytes, wanted {n}")
        if via:
            return
        if self.l4_of(name):
            # Retried: right after a `close` workload the machine may briefly lack ephemeral
            # ports for the relay's own dial (seen once as a reset here).
            for attempt in range(3):
                try:
                    st, body = http_get(f"http://127.0.0.1:{self.l4_ports[name]}/")
                    break
                except OSError:
                    if attempt == 2:
                        raise
                    time.sleep(0.5)
            if st != 200 or body != BODY_SMALL:
                raise RuntimeError(f"{name} L4 port: status {st}, body {body[:40]!r}")
        if self.tls:
            import ssl
            ctx = ssl.create_default_context(cafile=self.tls["ca"])
            for tp in sorted(set(self.tls_ports[name])):
                with urllib.request.urlopen(f"https://127.0.0.1:{tp}/", timeout=5, context=ctx) as r:
                    body = r.read()
                if r.status != 200 or body != BODY_SMALL:
                    raise RuntimeError(f"{name} https port {tp}: status {r.status}, body {body[:40]!r}")

    def tls_negotiated(self, name):
        """What `openssl s_client` (OpenSSL defaults, like wrk) negotiates with the proxy's TLS port."""
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{self.tls_ports[name][0]}",
                            "-servername", "localhost", "-CAfile", self.tls["ca"], "-alpn", "http/1.1"],
                           input="", capture_output=True, text=True, timeout=15)
        out = r.stdout + r.stderr

        def grab(rx):
            m = re.search(rx, out, re.M)
            return m.group(1).strip() if m else "?"
        return {"protocol": grab(r"^New, (TLSv[\d.]+)"), "cipher": grab(r"Cipher is (\S+)"),
                "group": grab(r"Server Temp Key: ([^\n]+)"),
                "sig": grab(r"Peer signature type: (\S+)") + "+" + grab(r"Peer signing digest: (\S+)"),
                "verify": grab(r"Verify return code: ([^\n]+)")}

    def ob_connections(self, name, fail=False):
        """The client and upstream connections of `name`'s outbound process (outbound.py)."""
        if name == "direct":
            return None
        k = key(name, "outbound")
        listen = self.ob_fail_ports[k] if fail else self.ports[k][0]
        return ob_conf.connections(self.pids(name, "outbound"), listen,
                                    self.ep_fail_port if fail else self.app_port)

    def ob_metrics(self, name, upstream="orders-fail"):
        """Sidecar's outbound counters for `upstream`; None for the other targets."""
        if name != "sidecar":
            return None
        return ob_conf.sidecar_metrics(self.admin[key(name, "outbound")], upstream)

    def stop(self, name, via=None):
        p = self.proc.pop(key(name, via), None)
        if p is not None:
            self.procs.stop(p, signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
