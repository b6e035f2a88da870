"""Load generators (wrk, h2load) and the workloads: what each runs, on CPU 1, and how one
measured run is taken (CPU of the proxy, CPU of other work on the machine, a CPU quota).

Not responsible for rounds or ordering (bench.py) nor for the report (report.py)."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import outbound
from procs import LOAD_CPU, LUA, children_cpu, cpu_busy, cpu_seconds, cpu_split, cpu_steal
from targets import Env, key

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


def h2load(url, clients, streams, secs, extra=(), logfile=None, n=None):
    """h2load for `secs` seconds, or for `n` requests in all when n is given."""
    cmd = ["h2load", "-t1", f"-c{clients}", f"-m{streams}"] + (["-n", str(n)] if n else ["-D", str(secs)]) + list(extra)
    if logfile:
        cmd += ["--log-file", logfile]
    out = run_cmd(cmd + [url], timeout=(120 if n else secs + 30))
    m = re.search(r"finished in ([\d.]+)(ms|s|us)", out)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    st = re.search(r"status codes: (\d+) 2xx", out)
    if not (m and r):
        raise RuntimeError(f"h2load output not understood:\n{out}")
    secs_taken = float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m.group(2)]
    ok = min(int(st.group(1)), int(r.group(4))) if st else int(r.group(4))
    res = {"requests": ok, "rps": ok / secs_taken, "secs": secs_taken,
           "errors": int(r.group(5)) + int(r.group(6)) + int(r.group(7)) + max(0, int(r.group(4)) - ok),
           "sent": int(r.group(1)), "done": int(r.group(3)), "failed": int(r.group(5)),
           "errored": int(r.group(6)), "timeout": int(r.group(7))}
    sc = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if sc:
        res["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, sc.groups())))
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
    # The same load through a TCP relay in each proxy (Sidecar `protocol: tcp`, HAProxy `mode tcp`,
    # nginx `stream`), same core: what the kernel and the relaying cost, without HTTP.
    ("floor", "L4 relay floor: small GETs as above through each proxy's TCP relay (Sidecar `protocol: tcp`, "
     "HAProxy `mode tcp`, nginx `stream`), wrk -t1 -c64", "wrk",
     dict(path="/", conns=64, secs=(8, 3), l4=True)),
    ("rate", "Fixed rate 2,000 req/s, 16 keep-alive connections (h2load --h1 --rps 125 -c16)", "rate",
     dict(path="/", clients=16, rps_each=125, secs=(10, 4))),
    # A rate no proxy saturates (each does 70-110k/s on its core): CPU per request where a
    # sidecar usually runs, not at a full core. 64 x 313 = 20,032 req/s.
    ("rate20k", "Fixed rate 20,000 req/s, 64 keep-alive connections (h2load --h1 --rps 313 -c64)", "rate",
     dict(path="/", clients=64, rps_each=313, secs=(10, 4))),
    # Every proxy reaches the app over the same Unix socket (a second process of each proxy, whose
    # config differs only in the upstream); wrk still speaks TCP to the proxy.
    ("unix", "Small GETs (12 B), 64 keep-alive connections, proxy to the app over a Unix socket "
     "(wrk -t1 -c64; the direct row is the app over TCP)", "wrk",
     dict(path="/", conns=64, secs=(8, 3), via="unix")),
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
    # Outbound ("ambassador") listeners: the app's calls to a service of three endpoints (the app
    # nginx on 127.0.0.21-23), through a forward-proxy process of each proxy (outbound.py). The
    # direct row is the app itself. Mid-run the driver counts the proxy's upstream connections.
    ("outbound", "Outbound: small GETs (12 B) through each proxy's forward-proxy listener to 3 endpoints, "
     "64 keep-alive connections (wrk -t1 -c64)", "wrk",
     dict(path="/", conns=64, secs=(8, 3), via="outbound", count_conns=True)),
    ("outbound-rate", "Outbound: fixed rate 2,000 req/s to 3 endpoints, 16 keep-alive connections "
     "(h2load --h1 --rps 125 -c16)", "rate",
     dict(path="/", clients=16, rps_each=125, secs=(10, 4), via="outbound")),
    # One endpoint of three answers 503 to everything: what the client sees and what the
    # endpoints see. Never warmed up nor redone: each run is a proxy's first meeting with the
    # failing endpoint (its process is fresh each round), which is what is measured.
    ("outbound-fail", "Outbound, one endpoint of three answering 503 to every request: 10,000 GETs over "
     "16 keep-alive connections (h2load --h1 -n10000 -c16)", "count",
     dict(path="/", clients=16, requests=(10000, 10000), via="outbound", fail=True, no_direct=True, once=True)),
]
TLS_WORKLOADS = [w[0] for w in WORKLOADS if w[3].get("tls")]
QUICK_TLS = ["tls-ka"]  # what --quick adds to the cleartext workloads
QUICK_SKIP = ["outbound-rate"]  # cleartext workloads --quick leaves out
OUTBOUND_WORKLOADS = [w[0] for w in WORKLOADS if w[3].get("via") == "outbound"]


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
        with CpuQuota(env.pids(target, wl[3].get("via")), wl[3]["quota"]):
            return measure_workload(env, target, wl, quick, tmp, warm)
    return measure_workload(env, target, wl, quick, tmp, warm)


def measure_workload(env: Env, target: str, wl, quick: bool, tmp: str, warm: bool = True):
    name, _title, kind, p = wl
    secs = p["secs"][1 if quick else 0] if "secs" in p else None
    scheme = "http"
    if p.get("fail"):
        port = h2port = env.ob_fail_ports[key(target, p["via"])]
    elif p.get("tls"):
        port, h2port = env.tls_ports[target]
        scheme = "https"
    elif p.get("l4"):
        port = h2port = env.l4_ports[target]
    else:
        port, h2port = env.ports[key(target, p.get("via"))]
    url = f"{scheme}://127.0.0.1:{port}{p['path']}"
    h2url = f"{scheme}://127.0.0.1:{h2port}{p['path']}"
    # wrk and h2load resume TLS sessions on reconnect; the shim makes every handshake a full one
    preload = env.tls["shim"] if p.get("full_handshakes") else None
    # short warm-up of the same kind, not measured (connections, pools, caches, allocator)
    if warm and kind != "count":  # outbound-fail: a proxy's first meeting with the failing endpoint
        if kind == "wrk":
            wrk(url, p["conns"], 1, p.get("headers", ()), preload)
        elif kind == "rate":
            h2load(url, p["clients"], 1, 1, extra=["--h1", f"--rps={p['rps_each']}"])
        elif kind == "h2":
            h2load(h2url, p["clients"], p["streams"], 1)
    pids = env.pids(target, p.get("via"))
    ours = pids + env.pids("app")
    sample, ob0, st0 = {}, None, None
    if p.get("count_conns"):
        st0 = outbound.app_status(env.app_port)
    if p.get("count_conns") and target != "direct":
        # the proxy's connections to the endpoints, halfway through the run
        timer = threading.Timer(secs / 2, lambda: sample.update(mid=env.ob_connections(target)))
        timer.start()
    if kind == "count":
        ob0 = (outbound.log_size(env.app_dir), env.ob_metrics(target))
    u0, s0 = cpu_split(pids)
    c0, b0, o0, l0, t0 = cpu_seconds(pids), cpu_busy(), cpu_seconds(ours), children_cpu(), time.monotonic()
    st0_ = cpu_steal()
    if kind == "wrk":
        r = wrk(url, p["conns"], secs, p.get("headers", ()), preload)
    elif kind == "count":
        r = h2load(url, p["clients"], 1, None, extra=["--h1"], n=p["requests"][1 if quick else 0],
                   logfile=os.path.join(tmp, "h2load-count.log"))
    elif kind == "rate":
        r = h2load(url, p["clients"], 1, secs, extra=["--h1", f"--rps={p['rps_each']}"],
                   logfile=os.path.join(tmp, "h2load-rate.log"))
    elif kind == "h2":
        r = h2load(h2url, p["clients"], p["streams"], secs, logfile=os.path.join(tmp, "h2load-h2.log"))
    else:
        raise ValueError(kind)
    u1, s1 = cpu_split(pids)
    c1, b1, o1, l1, t1 = cpu_seconds(pids), cpu_busy(), cpu_seconds(ours), children_cpu(), time.monotonic()
    r["steal"] = (cpu_steal() - st0_) / (t1 - t0)  # share of a core the hypervisor took (part of foreign)
    r["cpu_s"] = c1 - c0
    r["busy"] = (c1 - c0) / (t1 - t0) if pids else None  # share of its one core the proxy used
    # CPU used meanwhile by processes that are not part of this measurement (builds, tests...),
    # as a share of one core; a few % is kernel work on loopback (softirq) and this driver.
    r["foreign"] = max(0.0, ((b1 - b0) - (o1 - o0) - (l1 - l0)) / (t1 - t0))
    r["cpu_per_100k"] = (c1 - c0) / r["requests"] * 100000 if (pids and r["requests"]) else None
    if r["cpu_per_100k"] is not None:
        r["user_per_100k"] = (u1 - u0) / r["requests"] * 100000
        r["sys_per_100k"] = (s1 - s0) / r["requests"] * 100000
    if p.get("count_conns") and target != "direct":
        timer.join()
        time.sleep(0.5)  # what stays open once the clients are gone (pooled, idle)
        r["conns"] = {"mid": sample.get("mid"), "after": env.ob_connections(target)}
    st1 = outbound.app_status(env.app_port) if st0 else None
    if st0 and st1:  # less the status request itself and its connection
        r["app_accepts"], r["app_requests"] = st1["accepts"] - st0["accepts"] - 1, st1["requests"] - st0["requests"] - 1
    if kind == "count":
        time.sleep(0.3)  # the endpoints' log lines are written as they answer; let the last land
        r["endpoints"] = outbound.endpoint_counts(env.app_dir, ob0[0])
        if ob0[1] is not None:
            r["metrics"] = outbound.diff_metrics(ob0[1], env.ob_metrics(target))
    return r
