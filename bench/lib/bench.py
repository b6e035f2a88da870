#!/usr/bin/env python3
"""Sidecar benchmark driver (called by bench/run, which installs the tools first).

One run measures the same workloads through: the app direct (the floor), Sidecar, nginx and
HAProxy. Every proxy is pinned to CPU 0 with one worker; the app (its own nginx) and the load
generators run on CPU 1. Rounds are interleaved (A B C D, then the next round in a rotated
order); medians and min-max spread are reported. All traffic stays on 127.0.0.1 and every loop
and every child process is bounded in time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
LUA = os.path.join(HERE, "summary.lua")
CLK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "0"
LOAD_CPU = "1"

TARGETS = ["direct", "sidecar", "nginx", "haproxy"]
PROXIES = ["sidecar", "nginx", "haproxy"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- /proc helpers
def children_tree(root: int) -> list[int]:
    """root and all its descendants (nginx: master + worker)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                parent[int(d)] = int(rest[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in parent or p == root:
            out.append(p)
            todo.extend(c for c, pp in parent.items() if pp == p)
    return [p for p in out if os.path.exists(f"/proc/{p}")]


def cpu_split(pids: list[int]) -> tuple[float, float]:
    u = s = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            u += int(rest[11])  # utime (field 14)
            s += int(rest[12])  # stime (field 15)
        except (OSError, IndexError):
            pass
    return u / CLK, s / CLK


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_split(pids))


def cpu_busy() -> float:
    """Busy seconds of all CPUs together since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user + nice + system + steal: irq/softirq time is left out (loopback packet work of our own
    # processes lands there without being charged to any process)
    return (v[0] + v[1] + v[2] + v[7]) / CLK


def children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def background_cpu(seconds=1.0) -> float:
    """Share of one core used by everything else, measured while this run is idle."""
    b0 = cpu_busy()
    time.sleep(seconds)
    return (cpu_busy() - b0) / seconds


def wait_quiet(max_wait, threshold=0.15):
    """Wait (bounded) until other processes use less than `threshold` of a core. Returns seconds waited."""
    t0 = time.monotonic()
    while True:
        bg = background_cpu(1.0)
        waited = time.monotonic() - t0
        if bg < threshold or waited >= max_wait:
            if waited > 1.5:
                log(f"  waited {waited:.0f} s for other work to quiet down (now {bg*100:.0f}% of a core)")
            return waited, bg
        time.sleep(2.0)


def mem_kib(pids: list[int], key: str) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- processes
class Procs:
    """Every process this run starts, so that cleanup ends exactly those (by pid)."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, cmd, logfile, cpu=None):
        if cpu is not None:
            cmd = ["taskset", "-c", cpu] + cmd
        f = open(logfile, "ab")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        f.close()
        p.logfile = logfile
        self.started.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)  # its own session: the proxy and its workers only
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        if p in self.started:
            self.started.remove(p)

    def stop_all(self):
        for p in list(reversed(self.started)):
            self.stop(p)


def tail(proc, n=1500):
    try:
        with open(proc.logfile, errors="replace") as f:
            return f.read()[-n:]
    except (OSError, AttributeError):
        return ""


def wait_tcp(port, timeout=15.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early (status {proc.returncode}): {tail(proc)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open in {timeout}s")


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def wait_http_200(url, timeout=20.0, proc=None):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early (status {proc.returncode}): {tail(proc)}")
        try:
            st, _ = http_get(url, timeout=1.0)
            if st == 200:
                return
        except Exception as e:  # noqa: BLE001 - any failure means not ready yet
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url} not 200 within {timeout}s ({last})")


# ---------------------------------------------------------------- configs
BODY_SMALL = b"hello world\n"


def nginx_head(d):
    """What the app nginx and the proxy nginx share: one worker, no access log, unlimited keep-alive."""
    return f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fcgi; uwsgi_temp_path {d}/tmp-uwsgi; scgi_temp_path {d}/tmp-scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
"""


def app_conf(d, port, h2port):
    return nginx_head(d) + f"""  sendfile on; tcp_nopush on;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{h2port} http2 backlog=4096;
    root {d}/www;
    location = / {{ default_type text/plain; return 200 'hello world\\n'; }}
    location / {{ }}
  }}
}}
"""


# The proxying both nginx servers (plain and TLS) do: upstream keep-alive, 1 MiB responses
# streamed through memory instead of nginx's default temp file on disk, and the forwarding
# headers Sidecar always adds (X-Forwarded-For appended, X-Forwarded-Proto, Forwarded), so that
# every proxy does the same work on every request.
NGINX_PROXY_LOCATION = """    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header Forwarded "for=$remote_addr;proto=$scheme";
      proxy_buffer_size 16k;
      proxy_buffers 8 16k;
      proxy_max_temp_file_size 0;
    }
"""


def nginx_tls_servers(tls):
    """The TLS listeners of the nginx proxy: HTTP/1.1 on one port, h2 (ALPN) on a second one."""
    if not tls:
        return ""
    return f"""
  ssl_certificate {tls['cert']};
  ssl_certificate_key {tls['key']};
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_conf_command NumTickets 1;
  server {{
    listen 127.0.0.1:{tls['port']} ssl backlog=4096;
    listen 127.0.0.1:{tls['h2port']} ssl http2 backlog=4096;
{NGINX_PROXY_LOCATION}  }}"""


def nginx_proxy_conf(d, port, h2port, app_port, tls=None):
    return nginx_head(d) + f"""  upstream app {{
    server 127.0.0.1:{app_port};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{h2port} http2 backlog=4096;
{NGINX_PROXY_LOCATION}  }}{nginx_tls_servers(tls)}
}}
"""


def haproxy_conf(d, port, h2port, app_port, tls=None):
    bind_tls = (f"\n  bind 127.0.0.1:{tls['port']} ssl crt {tls['pem']} alpn h2,http/1.1" if tls else "")
    return f"""
global
  nbthread 1
  maxconn 8000
  pidfile {d}/haproxy.pid
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
frontend web
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{h2port} proto h2{bind_tls}
  # the forwarding headers Sidecar adds (HAProxy 2.6 has no `option forwarded` yet)
  option forwardfor
  http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
  http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
  http-request add-header Forwarded "for=%[src];proto=%[ssl_fc,iif(https,http)]"
  default_backend app
backend app
  server app 127.0.0.1:{app_port}
"""


def sidecar_conf(admin, port, app_port, tls=None):
    tls_in = (f"  - {{ name: web-tls, listen: 127.0.0.1:{tls['port']}, protocol: http, "
              f"tls: {{ cert: {tls['cert']}, key: {tls['key']} }} }}\n" if tls else "")
    return f"""admin: {{ listen: 127.0.0.1:{admin} }}
app: {{ address: 127.0.0.1:{app_port}, http: http1 }}
inbound:
  - {{ name: web, listen: 127.0.0.1:{port}, protocol: http }}
{tls_in}telemetry: {{ log_level: warn, access_log: {{ enabled: false }} }}
runtime: {{ worker_threads: 1 }}
"""


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


# ---------------------------------------------------------------- load generators
def run_cmd(cmd, timeout, preload=None):
    env = dict(os.environ, LD_PRELOAD=preload) if preload else None
    r = subprocess.run(["taskset", "-c", LOAD_CPU] + cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]} {r.stdout.strip()[-500:]}")
    return r.stdout


def wrk(url, conns, secs, headers=(), preload=None):
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "5s", "-s", LUA]
    for h in headers:
        cmd += ["-H", h]
    out = run_cmd(cmd + [url], timeout=secs + 30, preload=preload)
    m = re.search(r"^BENCH (.*)$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    v = {k: float(x) for k, x in (kv.split("=") for kv in m.group(1).split())}
    errors = v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"]
    return {
        "requests": int(v["requests"]),
        "rps": v["requests"] / (v["duration_us"] / 1e6),
        "p50": v["p50"] / 1000, "p99": v["p99"] / 1000, "p999": v["p999"] / 1000,
        "errors": int(errors),
    }


def pct(sorted_vals, q):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(q / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def h2load(url, clients, streams, secs, extra=(), logfile=None):
    cmd = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", str(secs)] + list(extra)
    if logfile:
        cmd += ["--log-file", logfile]
    out = run_cmd(cmd + [url], timeout=secs + 30)
    m = re.search(r"finished in ([\d.]+)(ms|s|us)", out)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    st = re.search(r"status codes: (\d+) 2xx", out)
    if not (m and r):
        raise RuntimeError(f"h2load output not understood:\n{out}")
    secs_taken = float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m.group(2)]
    ok = min(int(st.group(1)), int(r.group(4))) if st else int(r.group(4))
    res = {"requests": ok, "rps": ok / secs_taken,
           "errors": int(r.group(5)) + int(r.group(6)) + int(r.group(7)) + max(0, int(r.group(4)) - ok)}
    tls = re.search(r"TLS Protocol: (\S+)\s+Cipher: (\S+)\s+Server Temp Key: ([^\n]+)\s+Application protocol: (\S+)", out)
    if tls:
        res["tls"] = " ".join(tls.groups())
    if logfile:
        lat = []
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == "200":
                    lat.append(int(parts[2]) / 1000.0)
        os.unlink(logfile)
        lat.sort()
        res.update(p50=pct(lat, 50), p99=pct(lat, 99), p999=pct(lat, 99.9))
    else:
        tm = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
        res.update(p50=float("nan"), p99=float("nan"), p999=float("nan"))
        if tm:
            res["mean"] = to_ms(tm.group(3))
    return res


def to_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]


# ---------------------------------------------------------------- workloads
# name, title, kind, parameters. Durations (full, quick) in seconds.
WORKLOADS = [
    ("small", "Small GETs (12 B), 64 keep-alive connections, wrk -t1 -c64", "wrk",
     dict(path="/", conns=64, secs=(8, 3))),
    ("rate", "Fixed rate 2,000 req/s, 16 keep-alive connections (h2load --h1 --rps 125 -c16)", "rate",
     dict(path="/", clients=16, rps_each=125, secs=(10, 4))),
    ("1k", "1 KiB bodies, 64 keep-alive connections (wrk)", "wrk",
     dict(path="/1k", conns=64, secs=(5, 2))),
    ("1m", "1 MiB bodies, 16 keep-alive connections (wrk)", "wrk",
     dict(path="/1m", conns=16, secs=(5, 2))),
    ("close", "New connection per request, 64 connections (wrk -H 'Connection: close')", "wrk",
     dict(path="/", conns=64, secs=(5, 2), headers=("Connection: close",))),
    ("h2", "HTTP/2 cleartext (prior knowledge), 4 connections x 100 streams (h2load -c4 -m100)", "h2",
     dict(path="/", clients=4, streams=100, secs=(5, 3))),
    # TLS (issue 5): proxies only (the app has no TLS), same certificate (ECDSA P-256) in all
    ("tls-hs", "TLS: new connection and full handshake per request, 64 connections "
     "(wrk -c64 -H 'Connection: close' https, no resumption)", "wrk",
     dict(path="/", conns=64, secs=(8, 3), headers=("Connection: close",), tls=True, full_handshakes=True)),
    # The one-core handshake run is bound by the client (wrk spends ~3x a proxy's CPU per
    # handshake): with each proxy held to a quarter of a core, the proxy is the limit, and the
    # rate compares the proxies at the CPU a sidecar typically gets (`limits.cpu: 250m`).
    ("tls-hs-250m", "TLS: full handshake per request as above, each proxy limited to a quarter core "
     "(CFS quota 25 ms per 100 ms, like a pod's `limits.cpu: 250m`)", "wrk",
     dict(path="/", conns=64, secs=(8, 3), headers=("Connection: close",), tls=True, full_handshakes=True,
          quota=0.25)),
    ("tls-ka", "TLS: small GETs (12 B), 64 keep-alive connections (wrk -c64 https)", "wrk",
     dict(path="/", conns=64, secs=(8, 3), tls=True)),
    ("tls-h2", "TLS: HTTP/2 (ALPN h2), 4 connections x 100 streams (h2load -c4 -m100 https)", "h2",
     dict(path="/", clients=4, streams=100, secs=(5, 3), tls=True)),
]
TLS_WORKLOADS = [w[0] for w in WORKLOADS if w[3].get("tls")]
QUICK_TLS = ["tls-ka"]  # what --quick adds to the cleartext workloads


class CpuQuota:
    """Holds a proxy's processes to `share` of one core with a CFS quota (a cgroup of their
    own, cgroup v1 `cpu` or v2 `cpu.max`), like a Kubernetes CPU limit; moved back after."""

    PERIOD_US = 100_000

    def __init__(self, pids, share):
        self.pids, self.share, self.dir, self.back = pids, share, None, None

    @staticmethod
    def available():
        """Where quota cgroups can be made here, or None with the reason."""
        v1 = "/sys/fs/cgroup/cpu"
        if os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")) and os.access(v1, os.W_OK):
            return ("v1", v1), None
        v2 = "/sys/fs/cgroup"
        try:
            with open(os.path.join(v2, "cgroup.subtree_control")) as f:
                if "cpu" in f.read().split() and os.access(v2, os.W_OK):
                    return ("v2", v2), None
        except OSError:
            pass
        return None, "no writable cgroup cpu controller (needs root and cgroup v1 `cpu` or v2 with `cpu` enabled)"

    def __enter__(self):
        where, why = self.available()
        if where is None:
            raise RuntimeError(why)
        kind, root = self.kind, self.root = where
        self.dir = os.path.join(root, f"sidecar-bench-{os.getpid()}")
        os.makedirs(self.dir, exist_ok=True)
        quota = int(self.share * self.PERIOD_US)
        if kind == "v1":
            with open(os.path.join(self.dir, "cpu.cfs_period_us"), "w") as f:
                f.write(str(self.PERIOD_US))
            with open(os.path.join(self.dir, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(quota))
        else:
            with open(os.path.join(self.dir, "cpu.max"), "w") as f:
                f.write(f"{quota} {self.PERIOD_US}")
        for pid in self.pids:
            with open(os.path.join(self.dir, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        return self

    def __exit__(self, *exc):
        for pid in self.pids:  # back to the root group (no quota); gone processes are fine
            try:
                with open(os.path.join(self.root, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
        return False


def run_workload(env: Env, target: str, wl, quick: bool, tmp: str, warm: bool = True):
    if wl[3].get("quota"):
        with CpuQuota(env.pids(target), wl[3]["quota"]):
            return measure_workload(env, target, wl, quick, tmp, warm)
    return measure_workload(env, target, wl, quick, tmp, warm)


def measure_workload(env: Env, target: str, wl, quick: bool, tmp: str, warm: bool = True):
    name, _title, kind, p = wl
    secs = p["secs"][1 if quick else 0]
    if p.get("tls"):
        port, h2port = env.tls_ports[target]
        scheme = "https"
    else:
        port, h2port = env.ports[target]
        scheme = "http"
    url = f"{scheme}://127.0.0.1:{port}{p['path']}"
    h2url = f"{scheme}://127.0.0.1:{h2port}{p['path']}"
    # wrk and h2load resume TLS sessions on reconnect; the shim makes every handshake a full one
    preload = env.tls["shim"] if p.get("full_handshakes") else None
    # short warm-up of the same kind, not measured (connections, pools, caches, allocator)
    if warm:
        if kind == "wrk":
            wrk(url, p["conns"], 1, p.get("headers", ()), preload)
        elif kind == "rate":
            h2load(url, p["clients"], 1, 1, extra=["--h1", f"--rps={p['rps_each']}"])
        elif kind == "h2":
            h2load(h2url, p["clients"], p["streams"], 1)
    pids = env.pids(target)
    ours = pids + env.pids("app")
    u0, s0 = cpu_split(pids)
    c0, b0, o0, l0, t0 = cpu_seconds(pids), cpu_busy(), cpu_seconds(ours), children_cpu(), time.monotonic()
    if kind == "wrk":
        r = wrk(url, p["conns"], secs, p.get("headers", ()), preload)
    elif kind == "rate":
        r = h2load(url, p["clients"], 1, secs, extra=["--h1", f"--rps={p['rps_each']}"],
                   logfile=os.path.join(tmp, "h2load-rate.log"))
    elif kind == "h2":
        r = h2load(h2url, p["clients"], p["streams"], secs, logfile=os.path.join(tmp, "h2load-h2.log"))
    else:
        raise ValueError(kind)
    u1, s1 = cpu_split(pids)
    c1, b1, o1, l1, t1 = cpu_seconds(pids), cpu_busy(), cpu_seconds(ours), children_cpu(), time.monotonic()
    r["cpu_s"] = c1 - c0
    r["busy"] = (c1 - c0) / (t1 - t0) if pids else None  # share of its one core the proxy used
    # CPU used meanwhile by processes that are not part of this measurement (builds, tests...),
    # as a share of one core; a few % is kernel work on loopback (softirq) and this driver.
    r["foreign"] = max(0.0, ((b1 - b0) - (o1 - o0) - (l1 - l0)) / (t1 - t0))
    r["cpu_per_100k"] = (c1 - c0) / r["requests"] * 100000 if (pids and r["requests"]) else None
    if r["cpu_per_100k"] is not None:
        r["user_per_100k"] = (u1 - u0) / r["requests"] * 100000
        r["sys_per_100k"] = (s1 - s0) / r["requests"] * 100000
    return r


# ---------------------------------------------------------------- machine
def sh(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip()
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def machine_info(sidecar_bin):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    ver = sh([sidecar_bin, "version"]).splitlines()
    head = sh(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"])
    dirty = sh(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "nginx": sh(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": sh(["haproxy", "-v"]).splitlines()[0],
        "wrk": sh(["wrk", "-v"]).splitlines()[0].split(" [")[0],
        "h2load": sh(["h2load", "--version"]),
        "sidecar": ver[0] if ver else "?",
        "git_head": head + (" (src modified in the work tree)" if dirty else ""),
    }


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------- statistics and report
def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None and x == x]
    return (min(xs), max(xs)) if xs else (None, None)


def fmt_rps(x):
    return "—" if x is None else (f"{x/1000:.1f}k" if x >= 10000 else f"{x:.0f}")


def fmt_ms(x, signed=False):
    if x is None:
        return "—"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def fmt_f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def cell(xs, f, rounds):
    m = med(xs)
    if m is None:
        return "—"
    if rounds <= 1:
        return f(m)
    lo, hi = spread(xs)
    return f"{f(m)} ({f(lo)}–{f(hi)})"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a/b:.2f}×"


def build_report(data):
    info, runs, mem = data["machine"], data["runs"], data["mem"]
    targets, rounds, quick = data["targets"], data["rounds"], data["quick"]
    L = []
    L.append(f"# Sidecar benchmark — {'quick' if quick else 'full'} run, {info['date']}")
    L.append("")
    L.append(f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, Linux {info['kernel']}. "
             f"{info['sidecar']}; work tree HEAD {info['git_head']}. {info['nginx']}; {info['haproxy']}; "
             f"{info['wrk']}; {info['h2load']}.")
    L.append(f"Each proxy pinned to CPU {PROXY_CPU} with one worker; app (nginx) and load generator on CPU {LOAD_CPU}. "
             f"Access logs off everywhere. {rounds} interleaved round(s); "
             + ("cells are the median (min–max) of the rounds." if rounds > 1 else "single values (one round).")
             + f" Load average before/after: {data['load_before']} / {data['load_after']}.")
    L.append("")

    def vals(t, w, k):
        return [r[k] if r.get(k) is not None else None for r in runs.get(t, {}).get(w, [])]

    def added(t, w, k):
        a, d = runs.get(t, {}).get(w, []), runs.get("direct", {}).get(w, [])
        return [x[k] - y[k] for x, y in zip(a, d) if x.get(k) == x.get(k) and y.get(k) == y.get(k)]

    for wl in WORKLOADS:
        w = wl[0]
        if w in TLS_WORKLOADS or not any(runs.get(t, {}).get(w) for t in targets):
            continue
        L.append(f"## {wl[1]}")
        L.append("")
        L.append("| target | req/s | ×nginx | p50 ms | p99 ms | p99.9 ms | p50 added | p99 added | p99.9 added | CPU-s/100k req | ×nginx | errors |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in targets:
            rs = runs.get(t, {}).get(w)
            if not rs:
                continue
            nr = len(rs)
            rps, cpu = vals(t, w, "rps"), vals(t, w, "cpu_per_100k")
            row = [t if t != "direct" else "app direct",
                   cell(rps, fmt_rps, nr),
                   ratio(med(rps), med(vals("nginx", w, "rps"))) if t != "direct" else "—",
                   cell(vals(t, w, "p50"), fmt_ms, nr), cell(vals(t, w, "p99"), fmt_ms, nr),
                   cell(vals(t, w, "p999"), fmt_ms, nr)]
            if t == "direct":
                row += ["—", "—", "—"]
            else:
                row += [cell(added(t, w, k), lambda x: fmt_ms(x, True), nr) for k in ("p50", "p99", "p999")]
            row += [cell(cpu, fmt_f, nr),
                    ratio(med(cpu), med(vals("nginx", w, "cpu_per_100k"))) if t != "direct" else "—",
                    str(sum(r["errors"] for r in rs))]
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    if runs.get("nginx", {}).get("small") or runs.get("sidecar", {}).get("small"):
        L.append("## CPU split, small GETs at 64 connections (CPU-s per 100k requests)")
        L.append("")
        L.append("| proxy | user | system (kernel: TCP on loopback, syscalls) | total |")
        L.append("|---|---|---|---|")
        for t in targets:
            rs = runs.get(t, {}).get("small")
            if t == "direct" or not rs:
                continue
            L.append(f"| {t} | {cell(vals(t, 'small', 'user_per_100k'), fmt_f, len(rs))} | "
                     f"{cell(vals(t, 'small', 'sys_per_100k'), fmt_f, len(rs))} | "
                     f"{cell(vals(t, 'small', 'cpu_per_100k'), fmt_f, len(rs))} |")
        L.append("")

    L.append("## Memory (sum over the proxy's processes)")
    L.append("")
    L.append("| proxy | idle RSS MiB | ×nginx | peak RSS, 64-conn small GETs, MiB | ×nginx | peak RSS, all workloads, MiB | ×nginx |")
    L.append("|---|---|---|---|---|---|---|")
    for t in targets:
        if t == "direct" or t not in mem:
            continue
        m = mem[t]
        row = [t]
        for k in ("idle", "peak_small", "peak_all"):
            xs = [x / 1024 for x in m.get(k, [])]
            ng = [x / 1024 for x in mem.get("nginx", {}).get(k, [])]
            row += [cell(xs, lambda x: f"{x:.1f}", len(xs)), ratio(med(xs), med(ng))]
        L.append("| " + " | ".join(row) + " |")
    L.append("")

    tls_report(L, data, vals)

    # the issue-4 bars
    if "sidecar" in targets and any(runs.get("sidecar", {}).get(w) for w in ("small", "rate")):
        L.append("## Issue-4 bars (Sidecar)")
        L.append("")
        L.append("| bar | measured | met |")
        L.append("|---|---|---|")

        def bar(label, value, ok):
            L.append(f"| {label} | {value} | {'yes' if ok else ('no' if ok is not None else '—')} |")

        s_rps, n_rps, h_rps = (med(vals(t, "small", "rps")) for t in ("sidecar", "nginx", "haproxy"))
        if s_rps and n_rps:
            bar("throughput, 64 conns ≥ 1.10× nginx", f"{s_rps/n_rps:.2f}×", s_rps / n_rps >= 1.10)
        if s_rps and h_rps:
            bar("throughput, 64 conns ≥ 1.10× HAProxy", f"{s_rps/h_rps:.2f}×", s_rps / h_rps >= 1.10)
        s_cpu, n_cpu = med(vals("sidecar", "small", "cpu_per_100k")), med(vals("nginx", "small", "cpu_per_100k"))
        if s_cpu and n_cpu:
            bar("CPU-s per 100k, 64 conns ≤ 0.85× nginx", f"{s_cpu:.2f} vs {n_cpu:.2f} = {s_cpu/n_cpu:.2f}×",
                s_cpu / n_cpu <= 0.85)
        s_add, n_add = med(added("sidecar", "rate", "p99")), med(added("nginx", "rate", "p99"))
        if s_add is not None and n_add is not None:
            bar("p99 added at 2,000 req/s ≤ nginx's", f"{s_add:+.3f} ms vs nginx {n_add:+.3f} ms", s_add <= n_add)
        idle = med(mem.get("sidecar", {}).get("idle", []))
        peak = med(mem.get("sidecar", {}).get("peak_small", []))
        if idle is not None:
            bar("idle RSS ≤ 8 MiB", f"{idle/1024:.1f} MiB", idle / 1024 <= 8)
        if peak is not None:
            bar("peak RSS under 64-conn load ≤ 24 MiB", f"{peak/1024:.1f} MiB", peak / 1024 <= 24)
        bar("RSS flat over a 5-minute soak (≤ 10% growth after warm-up)", "see `bench/run --soak`", None)
        L.append("")
    errs = data.get("notes", [])
    if errs:
        L.append("Notes: " + "; ".join(errs))
        L.append("")
    return "\n".join(L)


def tls_report(L, data, vals):
    """The TLS tables (issue 5): proxies only, ratios to nginx, and the issue-5 bars."""
    runs, targets = data["runs"], data["targets"]
    done = [wl for wl in WORKLOADS if wl[0] in TLS_WORKLOADS and any(runs.get(t, {}).get(wl[0]) for t in targets)]
    if not done:
        return
    L.append("## TLS (issue 5)")
    L.append("")
    L.append("Same certificate in every proxy: ECDSA P-256, made by `sidecar certs issue`. TLS 1.2 and 1.3 enabled "
             "everywhere; nginx sends one TLS 1.3 session ticket per handshake like Sidecar "
             "(`ssl_conf_command NumTickets 1`), HAProxy its default. The handshake workload runs wrk with "
             "`LD_PRELOAD=lib/noresume.so` so that every connection is a full handshake (no PSK offered). "
             "No direct row: the app has no TLS listener.")
    L.append("")
    if data.get("tls"):
        L.append("Negotiated (`openssl s_client`, OpenSSL 3 client defaults as in wrk):")
        L.append("")
        L.append("| proxy | protocol | cipher | key exchange | server signature | certificate verify |")
        L.append("|---|---|---|---|---|---|")
        for t, v in data["tls"].items():
            L.append(f"| {t} | {v['protocol']} | {v['cipher']} | {v['group']} | {v['sig']} | {v['verify']} |")
        L.append("")
    for wl in done:
        w = wl[0]
        unit = "handshakes/s (= req/s)" if w.startswith("tls-hs") else "req/s"
        L.append(f"### {wl[1]}")
        L.append("")
        L.append(f"| proxy | {unit} | ×nginx | p50 ms | p99 ms | p99.9 ms | CPU-s/100k req | ×nginx | user | system "
                 "| proxy core busy | errors |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in targets:
            rs = runs.get(t, {}).get(w)
            if t == "direct" or not rs:
                continue
            nr = len(rs)
            rps, cpu = vals(t, w, "rps"), vals(t, w, "cpu_per_100k")
            row = [t, cell(rps, fmt_rps, nr), ratio(med(rps), med(vals("nginx", w, "rps"))),
                   cell(vals(t, w, "p50"), fmt_ms, nr), cell(vals(t, w, "p99"), fmt_ms, nr),
                   cell(vals(t, w, "p999"), fmt_ms, nr), cell(cpu, fmt_f, nr),
                   ratio(med(cpu), med(vals("nginx", w, "cpu_per_100k"))),
                   cell(vals(t, w, "user_per_100k"), fmt_f, nr), cell(vals(t, w, "sys_per_100k"), fmt_f, nr),
                   cell([x * 100 if x is not None else None for x in vals(t, w, "busy")],
                        lambda x: f"{x:.0f}%", nr),
                   str(sum(r["errors"] for r in rs))]
            L.append("| " + " | ".join(row) + " |")
        neg = {t: runs[t][w][0].get("tls") for t in targets if runs.get(t, {}).get(w) and runs[t][w][0].get("tls")}
        if neg:
            L.append("")
            L.append("h2load negotiated: " + "; ".join(f"{t} `{v}`" for t, v in neg.items()) + ".")
        L.append("")
    if "sidecar" in targets and "nginx" in targets:
        L.append("### Issue-5 bars (Sidecar against nginx)")
        L.append("")
        L.append("| bar | measured | met |")
        L.append("|---|---|---|")
        for w, label, need in (("tls-hs", "new TLS handshakes/s ≥ 1.0× nginx, one core each (client-bound)", 1.0),
                               ("tls-hs-250m", "new TLS handshakes/s ≥ 1.0× nginx, a quarter core each", 1.0),
                               ("tls-ka", "keep-alive TLS req/s ≥ 1.10× nginx", 1.10)):
            s_r, n_r = med(vals("sidecar", w, "rps")), med(vals("nginx", w, "rps"))
            s_c, n_c = med(vals("sidecar", w, "cpu_per_100k")), med(vals("nginx", w, "cpu_per_100k"))
            if s_r and n_r:
                cpu = f"; CPU-s/100k {s_c:.2f} vs {n_c:.2f} = {s_c/n_c:.2f}×" if s_c and n_c else ""
                L.append(f"| {label} | {fmt_rps(s_r)} vs {fmt_rps(n_r)} = {s_r/n_r:.3f}×{cpu} | "
                         f"{'yes' if s_r / n_r >= need else 'no'} |")
        L.append("")


# ---------------------------------------------------------------- main modes
def bench(args, env: Env, tmp):
    quick = args.quick
    rounds = 1 if quick else args.rounds
    targets = [t for t in TARGETS if t in args.targets]
    proxies = [t for t in targets if t != "direct"]
    workloads = [w for w in WORKLOADS if w[0] in args.workloads]
    notes = []
    _, why = CpuQuota.available()
    if why and any(w[3].get("quota") for w in workloads):
        notes.append(f"{', '.join(w[0] for w in workloads if w[3].get('quota'))} not run: {why}")
        workloads = [w for w in workloads if not w[3].get("quota")]
    runs = {t: {w[0]: [] for w in workloads} for t in targets}
    mem = {t: {"idle": [], "peak_small": [], "peak_all": []} for t in proxies}
    data = {"machine": machine_info(env.bin), "targets": targets, "rounds": rounds, "quick": quick,
            "runs": runs, "mem": mem, "load_before": loadavg(), "notes": notes}
    log(f"bench: {rounds} round(s), targets {targets}, load {data['load_before']}")
    t_start = time.monotonic()
    for rnd in range(rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for t in proxies:
            env.start(t)
        time.sleep(1.0)
        for t in proxies:
            mem[t]["idle"].append(mem_kib(env.pids(t), "VmRSS"))
        for t in proxies:
            env.check(t)
            if env.tls and rnd == 0:
                data.setdefault("tls", {})[t] = env.tls_negotiated(t)
                log(f"  TLS {t}: {data['tls'][t]}")
        for wl in workloads:
            wait_quiet(args.max_wait)
            for t in order:
                if wl[3].get("tls") and t == "direct":
                    continue  # the app has no TLS listener: proxies only
                # quick: only the first workload gets a warm-up run (it warms the proxy for the rest)
                warm = not quick or wl is workloads[0]
                r = run_workload(env, t, wl, quick, tmp, warm)
                if r["foreign"] > args.disturbed:
                    # other work on the machine took CPU during this run: wait, then redo it once
                    log(f"  round {rnd+1} {wl[0]} {t}: disturbed ({r['foreign']*100:.0f}% of a core "
                        f"used by other processes), redoing once")
                    wait_quiet(args.max_wait)
                    r2 = run_workload(env, t, wl, quick, tmp, warm)
                    r = r2 if r2["foreign"] < r["foreign"] else r
                    if r["foreign"] > args.disturbed:
                        data["notes"].append(f"round {rnd+1} {wl[0]} {t}: other processes took "
                                             f"{r['foreign']*100:.0f}% of a core during the run")
                runs[t][wl[0]].append(r)
                log(f"  round {rnd+1} {wl[0]:6s} {t:8s} {fmt_rps(r['rps']):>7s} req/s  p99 {fmt_ms(r['p99'])} ms"
                    f"  cpu/100k {fmt_f(r['cpu_per_100k'])}  busy {fmt_f(r.get('busy'))}  err {r['errors']}"
                    f"  other CPU {r['foreign']*100:.0f}%" + (f"  [{r['tls']}]" if r.get("tls") else ""))
                if r["errors"]:
                    data["notes"].append(f"round {rnd+1} {wl[0]} {t}: {r['errors']} errors")
            if wl[0] == "small":
                for t in proxies:
                    mem[t]["peak_small"].append(mem_kib(env.pids(t), "VmHWM"))
        for t in proxies:
            mem[t]["peak_all"].append(mem_kib(env.pids(t), "VmHWM"))
            env.stop(t)
    data["load_after"] = loadavg()
    data["elapsed_s"] = round(time.monotonic() - t_start)
    log(f"bench: done in {data['elapsed_s']} s")
    return data


def soak(args, env: Env):
    secs, warm = args.soak_seconds, min(60, args.soak_seconds // 5)
    p = env.start("sidecar")
    time.sleep(1.0)
    idle = mem_kib(env.pids("sidecar"), "VmRSS")
    port = env.ports["sidecar"][0]
    cpu0 = cpu_seconds(env.pids("sidecar"))
    w = subprocess.Popen(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c64", f"-d{secs}s", "-s", LUA,
                          f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples = []
    t0 = time.monotonic()
    try:
        while w.poll() is None and time.monotonic() - t0 < secs + 30:
            time.sleep(max(0.0, 10 - (time.monotonic() - t0) % 10))
            if p.poll() is not None:
                raise RuntimeError("sidecar exited during the soak")
            el = time.monotonic() - t0
            if el > secs + 0.5:
                break
            samples.append((round(el), mem_kib(env.pids("sidecar"), "VmRSS"), mem_kib(env.pids("sidecar"), "VmHWM")))
            log(f"  soak t={samples[-1][0]:4d}s RSS {samples[-1][1]/1024:.1f} MiB  HWM {samples[-1][2]/1024:.1f} MiB")
        out, _ = w.communicate(timeout=secs + 60)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    cpu1 = cpu_seconds(env.pids("sidecar"))
    m = re.search(r"^BENCH (.*)$", out, re.M)
    reqs = int(dict(kv.split("=") for kv in m.group(1).split())["requests"]) if m else 0
    env.stop("sidecar")
    after = [s for s in samples if s[0] >= warm]
    base = after[0][1] if after else None
    last = samples[-1][1] if samples else None
    mx = max(s[1] for s in after) if after else None
    growth = (mx - base) / base if base else None
    info = machine_info(env.bin)
    L = [f"# Sidecar memory soak — {info['date']}", "",
         f"Sidecar ({info['sidecar']}) pinned to CPU {PROXY_CPU}, one worker thread, access log off, under "
         f"wrk -t1 -c64 for {secs} s on CPU {LOAD_CPU} ({reqs} requests, {reqs/secs/1000:.1f}k req/s, "
         f"{(cpu1-cpu0)/max(reqs,1)*1e5:.2f} CPU-s/100k). RSS sampled every 10 s; warm-up = first {warm} s.", "",
         "| t (s) | RSS MiB | VmHWM MiB |", "|---|---|---|"]
    L += [f"| {t} | {r/1024:.2f} | {h/1024:.2f} |" for t, r, h in samples]
    L += ["", f"Idle before load: {idle/1024:.2f} MiB. RSS at end of warm-up: "
              f"{(base or 0)/1024:.2f} MiB; max after: {(mx or 0)/1024:.2f} MiB; last: {(last or 0)/1024:.2f} MiB.",
          f"Growth after warm-up: {growth*100:+.1f}% (bar: ≤ 10%) — {'met' if growth is not None and growth <= 0.10 else 'NOT met'}."
          if growth is not None else "Growth: not enough samples.", ""]
    return "\n".join(L)


def profile(args, env: Env):
    """perf record of Sidecar under a 64-connection load (small GETs; with --tls over TLS, keep-alive
    or a full handshake per request); reports written to args.out."""
    secs = args.profile
    load = args.profile_load
    p = env.start("sidecar")
    if load.startswith("tls"):
        url = f"https://127.0.0.1:{env.tls_ports['sidecar'][0]}/"
    else:
        url = f"http://127.0.0.1:{env.ports['sidecar'][0]}/"
    extra = ["-H", "Connection: close"] if load == "tls-hs" else []
    wenv = dict(os.environ, LD_PRELOAD=env.tls["shim"]) if load == "tls-hs" else None
    wait_quiet(args.max_wait)
    w = subprocess.Popen(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c64", f"-d{secs + 4}s", "-s", LUA] + extra + [url],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=wenv)
    try:
        time.sleep(2)
        data = os.path.join(args.out, "perf.data")
        c0 = cpu_seconds([p.pid])
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384",
                        "-p", str(p.pid), "-o", data, "--", "sleep", str(secs)], check=True, timeout=secs + 60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c1 = cpu_seconds([p.pid])
        out, _ = w.communicate(timeout=secs + 60)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    env.stop("sidecar")
    m = re.search(r"^BENCH (.*)$", out, re.M)
    v = dict(kv.split("=") for kv in m.group(1).split()) if m else {}
    log(f"profile ({load}): wrk {v.get('requests')} requests in {secs + 4} s; sidecar used {c1 - c0:.1f} CPU-s "
        f"while recorded")
    for name, extra in (("self", ["--no-children", "--sort", "symbol"]),
                        ("children", ["--children", "--sort", "symbol"]),
                        ("dso", ["--no-children", "--sort", "dso"])):
        path = os.path.join(args.out, f"perf-{name}.txt")
        with open(path, "w") as f:
            subprocess.run(["perf", "report", "-i", data, "--stdio", "-g", "none", "--percent-limit", "0.3"] + extra,
                           stdout=f, stderr=subprocess.DEVNULL, timeout=600)
        log(f"written: {os.path.relpath(path, ROOT)}")
    if load == "small":
        for t in PROXIES:
            syscall_counts(args, env, t)
    return f"perf data: {os.path.relpath(data, ROOT)}; reports: bench/results/perf-{{self,children,dso}}.txt"


SYSCALLS = [("read", 0), ("write", 1), ("readv", 19), ("writev", 20), ("sendto", 44), ("recvfrom", 45),
            ("sendmsg", 46), ("recvmsg", 47), ("epoll_wait", 232), ("epoll_ctl", 233), ("epoll_pwait", 281),
            ("futex", 202), ("accept4", 288), ("close", 3)]


def syscall_counts(args, env: Env, target: str, secs: int = 3):
    """Syscalls per request of a proxy under the 64-connection load (perf stat on raw_syscalls
    tracepoints: counting only, little overhead), against wrk's request rate."""
    env.start(target)
    port = env.ports[target][0]
    w = subprocess.Popen(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c64", f"-d{secs + 3}s", "-s", LUA,
                          f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_path = os.path.join(args.out, f"syscalls-{target}.txt")
    try:
        time.sleep(1.5)
        pids = env.pids(target)
        cmd = ["perf", "stat", "-x", ",", "-o", out_path, "-p", ",".join(map(str, pids))]
        cmd += ["-e", "raw_syscalls:sys_enter"]  # all of them
        for name, nr in SYSCALLS:
            cmd += ["-e", "raw_syscalls:sys_enter", "--filter", f"id == {nr}"]
        subprocess.run(cmd + ["--", "sleep", str(secs)], timeout=secs + 60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = w.communicate(timeout=secs + 60)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    env.stop(target)
    m = re.search(r"^BENCH (.*)$", out, re.M)
    v = dict(kv.split("=") for kv in m.group(1).split())
    reqs = int(v["requests"]) / (int(v["duration_us"]) / 1e6) * secs  # wrk's steady rate x window
    vals = []
    with open(out_path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and "raw_syscalls" in line and parts[0].isdigit():
                vals.append(int(parts[0]))
    names = ["all"] + [n for n, _ in SYSCALLS]
    counts = {n: c for n, c in zip(names, vals) if c}
    with open(out_path, "a") as f:
        f.write(f"\n# requests in window (wrk's rate x {secs} s): {reqs:.0f}\n")
        for k, c in counts.items():
            f.write(f"# {k}: {c} = {c / reqs:.2f} per request\n")
    log(f"syscalls per request, {target}: " + ", ".join(f"{k} {c / reqs:.2f}" for k, c in counts.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sidecar", required=True)
    ap.add_argument("--quick", action="store_true", help="one round of short runs (< 2 min)")
    ap.add_argument("--tls", action="store_true",
                    help="only the TLS workloads (" + ",".join(TLS_WORKLOADS) + "); with --profile: profile under TLS")
    ap.add_argument("--profile-load", choices=["small", "tls-ka", "tls-hs"], default=None,
                    help="the load --profile records under (default small; tls-ka with --tls)")
    ap.add_argument("--soak", action="store_true", help="only the memory soak of Sidecar")
    ap.add_argument("--soak-seconds", type=int, default=300)
    ap.add_argument("--syscalls", action="store_true", help="only count syscalls per request of each proxy")
    ap.add_argument("--profile", type=int, metavar="SECONDS",
                    help="only perf-record Sidecar under the 64-connection load for SECONDS")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma list of " + ",".join(TARGETS))
    ap.add_argument("--workloads", default=None,
                    help="comma list of " + ",".join(w[0] for w in WORKLOADS)
                    + " (default: all; --quick: the cleartext ones and tls-ka; --tls: the TLS ones)")
    ap.add_argument("--max-wait", type=float, default=None,
                    help="seconds to wait at most for other CPU work to quiet down before a workload")
    ap.add_argument("--disturbed", type=float, default=0.10,
                    help="a run during which other processes used more than this share of a core is redone once")
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    args = ap.parse_args()
    if args.max_wait is None:
        args.max_wait = 30 if args.quick else 90
    args.targets = args.targets.split(",")
    if args.workloads is None:
        if args.tls:
            args.workloads = TLS_WORKLOADS
        elif args.quick:
            args.workloads = [w[0] for w in WORKLOADS if w[0] not in TLS_WORKLOADS] + QUICK_TLS
        else:
            args.workloads = [w[0] for w in WORKLOADS]
    else:
        args.workloads = args.workloads.split(",")
    if args.profile_load is None:
        args.profile_load = "tls-ka" if args.tls else "small"
    for t in args.targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t}")
    for w in args.workloads:
        if w not in [x[0] for x in WORKLOADS]:
            ap.error(f"unknown workload {w}")
    os.makedirs(args.out, exist_ok=True)

    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="sidecar-bench-")
    os.chmod(tmp, 0o755)  # nginx workers run as nobody and read the app's files

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        want_tls = (any(w in TLS_WORKLOADS for w in args.workloads) and not (args.soak or args.syscalls)
                    and not (args.profile and not args.profile_load.startswith("tls")))
        env = Env(tmp, args.sidecar, procs, tls=want_tls)
        env.start_app()
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        if args.syscalls:
            for t in PROXIES:
                syscall_counts(args, env, t)
            return
        if args.profile:
            print(profile(args, env))
            return
        if args.soak:
            text = soak(args, env)
            path = os.path.join(args.out, "soak.md")
        else:
            data = bench(args, env, tmp)
            text = build_report(data)
            kind = ("tls-" if args.tls else "") + ("quick" if args.quick else "full")
            path = os.path.join(args.out, "latest.md")
            with open(os.path.join(args.out, f"latest-{kind}.md"), "w") as f:
                f.write(text + "\n")
            with open(os.path.join(args.out, f"raw-{stamp}-{kind}.json"), "w") as f:
                json.dump(data, f, indent=1)
        with open(path, "w") as f:
            f.write(text + "\n")
        print(text)
        log(f"written: {os.path.relpath(path, ROOT)}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
