"""The outbound ("ambassador") workloads: what the app adds for them (three loopback endpoints,
and a second set of three of which one answers 503 to everything, with a per-endpoint request
log), the forward-proxy config of each proxy (one process per proxy, besides the inbound one),
and the readings only these workloads take: the upstream connections a proxy holds, the
requests each endpoint saw, Sidecar's outbound metrics.

- `outbound` / `outbound-rate` go through listener `orders` to the healthy set: the app's main
  server, also listening on 127.0.0.21-23 at the app's port (same content as 127.0.0.1).
- `outbound-fail` goes through listener `orders-fail` to the failing set at a port of its own:
  127.0.0.21 and .22 answer `hello world` at `/`, 127.0.0.23 answers 503 to every request;
  all three log `$server_addr $status` per request into `TMP/app/endpoints.log` (the only
  access log of the run: nothing else logs).

Not responsible for starting processes (targets.py), load (load.py) or the report (report.py)."""
from __future__ import annotations

import os
import re
import socket
import struct
import urllib.request

from configs import haproxy_head, nginx_head

ENDPOINT_IPS = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
FAILING_IP = ENDPOINT_IPS[2]
RETRY = "{ attempts: 2, budget: 20%, min_retries_per_second: 10, on: [connect-failure, reset, 503] }"
OUTLIER = "{ consecutive_failures: 5, base_ejection: 30s, max_ejected: 50% }"


def balance():
    """Sidecar's `balance` (BENCH_OUTBOUND_BALANCE=round-robin to compare; default p2c-ewma)."""
    return os.environ.get("BENCH_OUTBOUND_BALANCE", "p2c-ewma")


# ---------------------------------------------------------------- the app's side
def app_listens(app_port):
    """Extra lines of the app's main server: `listen` on the healthy endpoints, and nginx's
    counters (connections accepted, requests) at /bench-status."""
    return ("".join(f"    listen {ip}:{app_port} backlog=4096;\n" for ip in ENDPOINT_IPS)
            + "    location = /bench-status { stub_status; }\n")


def app_status(app_port):
    """The app's totals since it started: connections accepted and requests (nginx stub_status),
    this request and its connection included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{app_port}/bench-status", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.M)
    return {"accepts": int(m.group(1)), "requests": int(m.group(3))} if m else None


def app_servers(d, fail_port):
    """The failing set: two healthy endpoints and one that answers 503, each request logged."""
    log = f"access_log {d}/endpoints.log endpoint;"
    ok = "".join(f"    listen {ip}:{fail_port} backlog=4096;\n" for ip in ENDPOINT_IPS[:2])
    return f"""  log_format endpoint '$server_addr $status';
  server {{
{ok}    {log}
    location = / {{ default_type text/plain; return 200 'hello world\\n'; }}
    location / {{ return 404; }}
  }}
  server {{
    listen {FAILING_IP}:{fail_port} backlog=4096;
    {log}
    location / {{ return 503; }}
  }}
"""


def endpoint_log(app_dir):
    return os.path.join(app_dir, "endpoints.log")


def log_size(app_dir):
    try:
        return os.path.getsize(endpoint_log(app_dir))
    except OSError:
        return 0


def endpoint_counts(app_dir, since):
    """Requests per endpoint (`ip status` -> count) logged after byte offset `since`."""
    counts: dict[str, int] = {}
    try:
        with open(endpoint_log(app_dir), "rb") as f:
            f.seek(since)
            for line in f.read().decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2:
                    counts[f"{parts[0]} {parts[1]}"] = counts.get(f"{parts[0]} {parts[1]}", 0) + 1
    except OSError:
        pass
    return counts


# ---------------------------------------------------------------- the proxies' configs
def sidecar_conf(admin, port, fail_port, app_port, ep_fail_port):
    def listener(name, listen, ep_port):
        eps = ", ".join(f'"{ip}:{ep_port}"' for ip in ENDPOINT_IPS)
        return f"""  - name: {name}
    listen: 127.0.0.1:{listen}
    upstream: {{ endpoints: [{eps}], http: http1 }}
    balance: {balance()}
    retry: {RETRY}
    outlier: {OUTLIER}
"""
    return (f"admin: {{ listen: 127.0.0.1:{admin} }}\noutbound:\n"
            + listener("orders", port, app_port) + listener("orders-fail", fail_port, ep_fail_port)
            + f"""runtime: {{ worker_threads: 1 }}
telemetry: {{ log_level: {os.environ.get("BENCH_SIDECAR_LOG_LEVEL", "warn")}, access_log: {{ enabled: false }} }}
""")


def nginx_conf(d, port, fail_port, app_port, ep_fail_port):
    """nginx as the same forward proxy: round-robin over the three endpoints, upstream keep-alive,
    a 503 or a connection error tried once more on the next endpoint (its passive health check,
    `max_fails=1 fail_timeout=10s` by default, takes an endpoint out after one such failure)."""
    def upstream(name, ep_port):
        servers = "".join(f"    server {ip}:{ep_port};\n" for ip in ENDPOINT_IPS)
        return f"""  upstream {name} {{
{servers}    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }}
"""

    def server(listen, name):
        return f"""  server {{
    listen 127.0.0.1:{listen} backlog=4096;
    location / {{
      proxy_pass http://{name};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout http_503;
      proxy_next_upstream_tries 2;
      proxy_buffer_size 16k;
      proxy_buffers 8 16k;
      proxy_max_temp_file_size 0;
    }}
  }}
"""
    return (nginx_head(d) + upstream("orders", app_port) + upstream("orders_fail", ep_fail_port)
            + server(port, "orders") + server(fail_port, "orders_fail") + "}\n")


def haproxy_conf(d, port, fail_port, app_port, ep_fail_port):
    """HAProxy as the same forward proxy: round-robin, one retry on another server (redispatch)
    on a connect failure, an empty response or a 503. No health checks: HAProxy has no passive
    ejection without them, so it keeps sending a third of the requests to a failing server."""
    def pair(name, listen, ep_port):
        servers = "".join(f"  server e{i + 1} {ip}:{ep_port}\n" for i, ip in enumerate(ENDPOINT_IPS))
        return f"""frontend {name}
  bind 127.0.0.1:{listen}
  default_backend {name}
backend {name}
  balance roundrobin
  retries 1
  option redispatch
  retry-on conn-failure empty-response 503
{servers}"""
    return haproxy_head(d) + f"""{pair("orders", port, app_port)}{pair("orders_fail", fail_port, ep_fail_port)}"""


# ---------------------------------------------------------------- readings
def _tcp_table(pid):
    """(local ip, local port, remote ip, remote port, inode) of the ESTABLISHED IPv4 sockets in
    the network namespace of `pid`."""
    out = []
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) < 10 or parts[3] != "01":
                    continue
                (lip, lport), (rip, rport) = (x.split(":") for x in parts[1:3])
                ip = lambda h: socket.inet_ntoa(struct.pack("<I", int(h, 16)))  # noqa: E731
                out.append((ip(lip), int(lport, 16), ip(rip), int(rport, 16), int(parts[9])))
    except OSError:
        pass
    return out


def _socket_inodes(pids):
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.match(r"socket:\[(\d+)\]", link)
            if m:
                inodes.add(int(m.group(1)))
    return inodes


def connections(pids, listen_port, ep_port):
    """ESTABLISHED sockets owned by `pids`: how many clients are connected to `listen_port`,
    and how many connections go to each endpoint (`ip:ep_port`)."""
    if not pids:
        return None
    mine = _socket_inodes(pids)
    clients, per_ep = 0, {ip: 0 for ip in ENDPOINT_IPS}
    for lip, lport, rip, rport, inode in _tcp_table(pids[0]):
        if inode not in mine:
            continue
        if lport == listen_port:
            clients += 1
        elif rport == ep_port and rip in per_ep:
            per_ep[rip] += 1
    return {"clients": clients, "upstream": sum(per_ep.values()), "per_endpoint": per_ep}


def sidecar_metrics(admin_port, upstream):
    """Sidecar's outbound counters for `upstream` from its admin /metrics: requests by status,
    retries, endpoints by state."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        return {"error": str(e)}
    out = {"requests": {}, "retries": 0.0, "endpoints": {}}
    for line in text.splitlines():
        if line.startswith("#") or f'upstream="{upstream}"' not in line:
            continue
        m = re.match(r"(\w+)\{([^}]*)\}\s+(\S+)", line)
        if not m:
            continue
        name, labels, v = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))), float(m.group(3))
        if name == "sidecar_outbound_requests_total":
            out["requests"][labels.get("status_code", "?")] = v
        elif name == "sidecar_outbound_retries_total":
            out["retries"] = v
        elif name == "sidecar_outbound_endpoints":
            out["endpoints"][labels.get("state", "?")] = v
    return out


def diff_metrics(before, after):
    """after - before of the counters (the endpoint gauge as it is after)."""
    if "error" in before or "error" in after:
        return after
    req = {k: v - before["requests"].get(k, 0.0) for k, v in after["requests"].items()}
    return {"requests": {k: v for k, v in req.items() if v}, "retries": after["retries"] - before["retries"],
            "endpoints": after["endpoints"]}
