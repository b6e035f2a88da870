"""The targets: the app (its own nginx) and the proxies, each started from its config in its
own directory under the run's temp dir, pinned to its CPU, checked, and stopped by pid.

Not responsible for load (load.py) nor for config text (configs.py)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.request

from configs import BODY_SMALL, app_conf, haproxy_conf, nginx_proxy_conf, sidecar_conf
from procs import HERE, LOAD_CPU, PROXY_CPU, Procs, children_tree, free_port, http_get, wait_http_200, wait_tcp

TARGETS = ["direct", "sidecar", "nginx", "haproxy"]
PROXIES = ["sidecar", "nginx", "haproxy"]


class Env:
    """The app plus the proxies, each in its own directory under one temp dir."""

    def __init__(self, tmp, sidecar_bin, procs: Procs, tls=False):
        self.tmp, self.bin, self.procs = tmp, sidecar_bin, procs
        self.app_port, self.app_h2 = free_port(), free_port()
        self.ports = {"direct": (self.app_port, self.app_h2)}
        for t in PROXIES:
            self.ports[t] = (free_port(), free_port())
        self.sidecar_admin = free_port()
        self.ports["sidecar"] = (self.ports["sidecar"][0], self.ports["sidecar"][0])  # one port: h1 + h2c
        self.proc: dict[str, subprocess.Popen] = {}
        # TLS listeners (issue 5), only when TLS workloads run: same certificate in every proxy
        self.tls = self.make_tls() if tls else None
        self.tls_ports = {t: (free_port(), free_port()) for t in PROXIES} if tls else {}
        if tls:  # Sidecar and HAProxy: one TLS port, ALPN h2 and http/1.1; nginx: h2 on a second one
            for t in ("sidecar", "haproxy"):
                self.tls_ports[t] = (self.tls_ports[t][0], self.tls_ports[t][0])

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
            f.write(app_conf(d, self.app_port, self.app_h2))
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

    def start(self, name):
        d = self._dir(name)
        port, h2 = self.ports[name]
        if name == "nginx":
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(nginx_proxy_conf(d, port, h2, self.app_port, self.tls_of(name)))
            p = self.procs.start(["nginx", "-p", d, "-c", conf, "-e", f"{d}/error.log", "-g", "daemon off;"],
                                 os.path.join(d, "out.log"), cpu=PROXY_CPU)
            wait_tcp(port, proc=p)
            wait_tcp(h2, proc=p)
        elif name == "haproxy":
            conf = os.path.join(d, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(haproxy_conf(d, port, h2, self.app_port, self.tls_of(name)))
            p = self.procs.start(["haproxy", "-db", "-f", conf], os.path.join(d, "out.log"), cpu=PROXY_CPU)
            wait_tcp(port, proc=p)
            wait_tcp(h2, proc=p)
        elif name == "sidecar":
            conf = os.path.join(d, "sidecar.yaml")
            with open(conf, "w") as f:
                f.write(sidecar_conf(self.sidecar_admin, port, self.app_port, self.tls_of(name)))
            p = self.procs.start([self.bin, "run", "-c", conf], os.path.join(d, "out.log"), cpu=PROXY_CPU)
            wait_http_200(f"http://127.0.0.1:{self.sidecar_admin}/ready", proc=p)
        else:
            raise ValueError(name)
        if self.tls:
            for tp in set(self.tls_ports[name]):
                wait_tcp(tp, proc=p)
        self.proc[name] = p
        return p

    def pids(self, name):
        if name == "direct":
            return []
        if name == "app":
            return children_tree(self.proc["direct"].pid)
        return children_tree(self.proc[name].pid)

    def check(self, name):
        """One request per body through the proxy: right status and length (after idle RSS)."""
        port = self.ports[name][0]
        for path, n in (("/", 12), ("/1k", 1024), ("/1m", 1024 * 1024)):
            st, body = http_get(f"http://127.0.0.1:{port}{path}")
            if st != 200 or len(body) != n:
                raise RuntimeError(f"{name} {path}: status {st}, {len(body)} bytes, wanted {n}")
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

    def stop(self, name):
        p = self.proc.pop(name, None)
        if p is not None:
            self.procs.stop(p, signal.SIGQUIT if name == "nginx" else signal.SIGTERM)

