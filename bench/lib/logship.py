"""The log-shipping mode (`--logship`): how fast Sidecar's shipper moves a file of 200-byte JSON
lines to an HTTP NDJSON sink on one core, at what CPU and peak RSS; and what shipping at full
speed on the proxy's core costs the proxy's p99 at a fixed 2,000 req/s.

Not responsible for the benchmark rounds (bench.py), the app or the proxy's own config
(targets.py, configs.py), nor the load generator (load.py)."""
from __future__ import annotations

import os
import re
import shutil
import statistics
import time
import urllib.request

from configs import nginx_head, sidecar_conf
from load import WORKLOADS, measure_workload
from procs import (LOAD_CPU, PROXY_CPU, children_tree, cpu_seconds, cpu_steal, free_port, log, machine_info,
                   mem_kib, tail, wait_http_200, wait_quiet, wait_tcp)
from targets import Env

LINE = 200  # bytes a line, newline included
BLOCK = 50_000  # lines generated once and written over and over (10 MB)
MIB = 1 << 20
BAR_MIBS, BAR_RSS_MIB, BAR_P99 = 150, 32, 0.10  # the bars
RATE = next(w for w in WORKLOADS if w[0] == "rate")  # h2load --h1 --rps 125 -c16: 2,000 req/s
OTHERS = ("vector", "fluent-bit", "td-agent-bit")


def make_file(path, mib):
    """`mib` MiB (whole lines) of 200-byte JSON lines. A block of distinct lines is repeated:
    the parse work per line is the same as with all lines distinct, and 1 GiB is written at disk
    speed instead of in a minute of Python formatting. Read back once so the page cache is warm
    (the shipper is measured, not the disk). Returns the line count."""
    block = []
    for n in range(BLOCK):
        head = (f'{{"ts":"2026-12-03T12:{n // 60000 % 60:02d}:{n // 1000 % 60:02d}.{n % 1000:03d}Z",'
                f'"level":"info","n":{n},"msg":"GET /api/v1/items/{n} 200 ')
        block.append(head + "x" * (LINE - len(head) - 3) + '"}\n')
    assert all(len(l) == LINE for l in block)
    data = "".join(block).encode()
    lines = mib * MIB // LINE
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(lines // BLOCK):
            f.write(data)
        f.write(data[:lines % BLOCK * LINE])
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass
    return lines


class Sink:
    """nginx on the load generator's CPU, answering 204 to every batch. `return 204` alone would
    discard the body without counting it in `$request_length`; proxying (body not forwarded) to
    a 204 location of its own makes nginx read each body in full, so the access log says how many
    bytes arrived."""

    def __init__(self, env: Env, d):
        os.makedirs(d, exist_ok=True)
        self.port, self.log_path, self.err = free_port(), os.path.join(d, "ingest.log"), os.path.join(d, "error.log")
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_head(d) + f"""  log_format ingest '$request_length $status';
  upstream drop {{ server 127.0.0.1:{self.port}; keepalive 4; }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location /ingest {{
      access_log {self.log_path} ingest;
      client_max_body_size 0; client_body_buffer_size 2m;
      proxy_pass http://drop/drop; proxy_pass_request_body off; proxy_set_header Content-Length "";
      proxy_http_version 1.1; proxy_set_header Connection "";
    }}
    location = /drop {{ return 204; }}
  }}
}}
""")
        open(self.log_path, "a").close()
        # At idle priority: the sink stands for a receiver on another machine, and on the load
        # CPU its work must not delay the app or the load generator the p99 part measures.
        self.proc = env.procs.start(["chrt", "-i", "0", "nginx", "-p", d, "-c", conf, "-e", self.err, "-g", "daemon off;"],
                                    os.path.join(d, "out.log"), cpu=LOAD_CPU)
        wait_tcp(self.port, proc=self.proc)

    def mark(self):
        return os.path.getsize(self.log_path)

    def since(self, mark):
        """Body and header bytes received, requests, and answers other than 204 since `mark`."""
        time.sleep(0.3)  # a request is logged once its answer is out
        got = reqs = bad = 0
        with open(self.log_path) as f:
            f.seek(mark)
            for line in f:
                n, st = line.split()
                got, reqs, bad = got + int(n), reqs + 1, bad + (st != "204")
        return got, reqs, bad

    def cpu(self):
        return cpu_seconds(children_tree(self.proc.pid))


def logship_yaml(d, glob, fmt, sink_port):
    """The `logship` section: a fresh checkpoint directory each start, so that every run ships
    the file from its beginning (a cold start, `read_from` beginning)."""
    ck = os.path.join(d, "ck")
    shutil.rmtree(ck, ignore_errors=True)
    return f"""logship:
  checkpoint_dir: {ck}
  scan_interval: 1s
  sources:
    - {{ name: app, paths: ["{glob}"], format: {fmt} }}
  sinks:
    - {{ name: out, type: http, endpoint: "http://127.0.0.1:{sink_port}/ingest" }}
"""


def metrics(admin):
    """Sidecar's `sidecar_logship_*` series, by name without the prefix (one source, one sink)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^sidecar_logship_(\w+)\{\w+="[^"]*"\} (\S+)$', text, re.M)}


def ship_once(env: Env, d, path, lines, fmt, sink: Sink, max_wait):
    """One cold start of a Sidecar that only ships `path`: wall time from its start until its
    metrics say every line was sent (polled every 100 ms), its CPU seconds and peak RSS."""
    os.makedirs(d, exist_ok=True)
    admin, conf = free_port(), os.path.join(d, "sidecar.yaml")
    with open(conf, "w") as f:
        f.write(f"admin: {{ listen: 127.0.0.1:{admin} }}\nruntime: {{ worker_threads: 1 }}\n"
                f"telemetry: {{ log_level: warn, access_log: {{ enabled: false }} }}\n"
                + logship_yaml(d, os.path.join(os.path.dirname(path), "*.log"), fmt, sink.port))
    wait_quiet(max_wait)
    mark, st0, t0 = sink.mark(), cpu_steal(), time.monotonic()
    p = env.procs.start([env.bin, "run", "-c", conf], os.path.join(d, "out.log"), cpu=PROXY_CPU)
    last, last_t, trace = -1.0, t0, []
    try:
        while True:
            time.sleep(0.1)
            if p.poll() is not None:
                raise RuntimeError(f"sidecar exited (status {p.returncode}): {tail(p)}")
            try:
                sent = metrics(admin).get("lines_sent_total", 0.0)
            except OSError:
                continue  # admin listener not up yet
            now = time.monotonic()
            if sent >= lines:
                break
            if sent != last:
                last, last_t = sent, now
                trace.append((now, sent))
            elif now - last_t > 30:
                raise RuntimeError(f"no progress for 30 s at {sent:.0f} of {lines} lines sent: {tail(p)}")
        wall = now - t0
        cpu, hwm, steal = cpu_seconds([p.pid]), mem_kib([p.pid], "VmHWM"), (cpu_steal() - st0) / wall
    finally:
        env.procs.stop(p)
    got, reqs, bad = sink.since(mark)
    mib = lines * LINE / MIB
    # the rate between 10 % and 90 % of the lines sent: the shipping itself, without the start
    # (first scan) and the end (the last, partial batch waits for its timeout)
    t10 = next((t for t, n in trace if n >= lines * 0.1), None)
    t90 = next((t for t, n in trace if n >= lines * 0.9), None)
    steady = mib * 0.8 / (t90 - t10) if t10 and t90 and t90 > t10 else None
    return {"fmt": fmt, "wall": wall, "mibs": mib / wall, "steady": steady, "cpu": cpu, "mib_per_cpu": mib / cpu if cpu else None,
            "rss_mib": hwm / 1024, "steal": steal, "sink_bytes": got, "requests": reqs, "non204": bad,
            "complete": got >= lines * LINE and not bad}


def throughput(args, env: Env, d, sink: Sink):
    mib, rounds = args.logship_mib, 1 if args.quick else args.rounds
    path = os.path.join(d, "logs", "big.log")
    t = time.monotonic()
    lines = make_file(path, mib)
    log(f"logship: {lines} lines ({lines * LINE / MIB:.0f} MiB) written and read back in {time.monotonic() - t:.0f} s")
    runs = {"json": [], "text": []}
    try:
        for rnd in range(rounds):
            for fmt in (("json", "text") if rnd % 2 == 0 else ("text", "json")):
                r = ship_once(env, os.path.join(d, f"ship-{fmt}-{rnd}"), path, lines, fmt, sink, args.max_wait)
                r["round"] = rnd + 1
                runs[fmt].append(r)
                log(f"  round {rnd+1} {fmt:4s} {r['mibs']:6.1f} MiB/s (10-90 %: {fmt_mibs(r['steady'])})  {r['mib_per_cpu']:6.1f} MiB/CPU-s  "
                    f"peak RSS {r['rss_mib']:.1f} MiB  sink got {r['sink_bytes'] / MIB:.1f} MiB in {r['requests']} "
                    f"requests ({r['non204']} not 204)  steal {r['steal'] * 100:.0f}%")
    finally:
        os.unlink(path)
    L = [f"## File → HTTP NDJSON sink, one core ({lines * LINE / MIB:.0f} MiB of {LINE}-byte lines)", "",
         f"Sidecar pinned to CPU {PROXY_CPU} (`worker_threads: 1`; the shipper has its own thread on the same core), "
         f"started after the file was written and read once (page cache warm), fresh checkpoint each run; the sink "
         f"is nginx on CPU {LOAD_CPU}. Wall time from Sidecar's start until `sidecar_logship_lines_sent_total` "
         f"equals the file's line count (polled every 100 ms); 10–90 %: the rate while the middle 80 % of the lines "
         f"went out (no start-up, no final partial batch). Bars, on the wall-time figure: ≥ {BAR_MIBS} MiB/s, peak RSS ≤ {BAR_RSS_MIB} MiB "
         f"(Vector's published file→TCP figure: 76.7 MiB/s at 188 MiB RSS).", "",
         "| format | round | MiB/s | MiB/s 10–90 % | MiB per CPU-s | CPU-s | peak RSS MiB | sink received MiB (requests) | steal | bars |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, rs in runs.items():
        for r in rs + [None]:
            if r is None:  # the median row
                r = {k: statistics.median(x[k] for x in rs) for k in ("mibs", "mib_per_cpu", "cpu", "rss_mib")}
                r["steady"] = statistics.median(x["steady"] or 0 for x in rs)
                r.update(round="**median**", sink_bytes=None, steal=None)
            ok = r["mibs"] >= BAR_MIBS and r["rss_mib"] <= BAR_RSS_MIB
            got = (f"{r['sink_bytes'] / MIB:.1f} ({r['requests']})" + ("" if r["complete"] else " **short**")
                   if r["sink_bytes"] is not None else "")
            steal = "" if r["steal"] is None else f"{r['steal'] * 100:.0f}%"
            L.append(f"| {fmt} | {r['round']} | {r['mibs']:.1f} | {fmt_mibs(r['steady'])} | {r['mib_per_cpu']:.1f} | {r['cpu']:.2f} | "
                     f"{r['rss_mib']:.1f} | {got} | {steal} | {'met' if ok else 'NOT met'} |")
    spill = sum("temporary file" in l for l in open(sink.err)) if os.path.exists(sink.err) else 0
    found = {n: shutil.which(n) for n in OTHERS}
    L += ["", "Sink received: header and body bytes nginx logged (`$request_length`); NDJSON documents carry "
          "more than the line, so a complete run shows more than the file's size."
          + (f" nginx spilled {spill} bodies to disk (over 2 MiB)." if spill else ""),
          "Vector / Fluent Bit: " + "; ".join(f"`{n}` at {p} (installed, but this mode does not drive it)" if p
                                              else f"`{n}` not installed" for n, p in found.items())
          + " — not packaged in Debian bookworm and not built here, so no side-by-side figure.", ""]
    return L, [r["steady"] or r["mibs"] for r in runs["json"]]


def fmt_mibs(v):
    return f"{v:.1f}" if v else "—"


def latency(args, env: Env, d, sink: Sink, mibs, tmp):
    """The `rate` workload through Sidecar's inbound listener, without and with the shipper
    busy on the same core (a file big enough to outlast the run at the rate part 1 measured)."""
    rounds, secs = 1 if args.quick else args.rounds, RATE[3]["secs"][1 if args.quick else 0]
    need = max(2048, int(max(mibs) * (secs + 4) * 1.25))  # warm-up, start and checks; margin
    path = os.path.join(d, "logs", "big.log")
    lines = make_file(path, need)
    admin, port = env.admin["sidecar"], env.ports["sidecar"][0]
    runs = {"off": [], "on": []}
    try:
        for rnd in range(rounds):
            for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
                rd = os.path.join(d, f"{mode}-{rnd}")
                os.makedirs(rd, exist_ok=True)
                conf = os.path.join(rd, "sidecar.yaml")
                with open(conf, "w") as f:
                    f.write(sidecar_conf(admin, port, env.upstream("sidecar"))
                            + (logship_yaml(rd, os.path.join(d, "logs", "*.log"), "json", sink.port) if mode == "on" else ""))
                wait_quiet(args.max_wait)
                p = env.procs.start([env.bin, "run", "-c", conf], os.path.join(rd, "out.log"), cpu=PROXY_CPU)
                env.proc["sidecar"] = p
                try:
                    wait_http_200(f"http://127.0.0.1:{admin}/ready", proc=p)
                    env.check("sidecar")
                    m0, end = {}, time.monotonic() + 15
                    while mode == "on" and m0.get("lines_sent_total", 0) == 0 and time.monotonic() < end:
                        time.sleep(0.1)  # the shipper has found the file and the sink answers
                        m0 = metrics(admin)
                    t0, c0 = time.monotonic(), sink.cpu()
                    r = measure_workload(env, "sidecar", RATE, args.quick, tmp)
                    if mode == "on":
                        m1, w = metrics(admin), time.monotonic() - t0
                        r["shipped_mibs"] = (m1["lines_sent_total"] - m0["lines_sent_total"]) * LINE / MIB / w
                        r["busy_to_end"] = m1["lines_sent_total"] < lines
                        r["sink_cpu"] = (sink.cpu() - c0) / w
                finally:
                    env.stop("sidecar")
                runs[mode].append(r)
                log(f"  round {rnd+1} shipping {mode:3s} p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
                    f"sidecar busy {r['busy'] * 100:.0f}%  err {r['errors']}"
                    + (f"  shipped {r['shipped_mibs']:.0f} MiB/s, still shipping at the end: {r['busy_to_end']}, "
                       f"sink {r['sink_cpu'] * 100:.0f}% of CPU {LOAD_CPU}" if mode == "on" else ""))
    finally:
        os.unlink(path)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("p50", "p99")} for m, rs in runs.items()}
    cost = med["on"]["p99"] / med["off"]["p99"] - 1
    L = [f"## Proxy p99 at 2,000 req/s while shipping on the same core", "",
         f"`rate` workload ({RATE[1]}, {secs} s after 1 s of warm-up) through Sidecar's inbound listener to the app, "
         f"Sidecar on CPU {PROXY_CPU} with `worker_threads: 1`; `on`: the same config plus `logship` shipping a "
         f"{lines * LINE / MIB:.0f} MiB file of {LINE}-byte JSON lines from its beginning to the nginx sink (CPU "
         f"{LOAD_CPU}, beside the app and h2load). Interleaved rounds; Sidecar busy = its share of its core.", "",
         "| round | shipping | p50 ms | p99 ms | Sidecar busy | errors | shipped MiB/s | still shipping at end | sink CPU |",
         "|---|---|---|---|---|---|---|---|---|"]
    for mode, rs in runs.items():
        for i, r in enumerate(rs):
            L.append(f"| {i + 1} | {mode} | {r['p50']:.3f} | {r['p99']:.3f} | {r['busy'] * 100:.0f}% | "
                     f"{r['errors']} | " + (f"{r['shipped_mibs']:.0f} | {'yes' if r['busy_to_end'] else '**no**'} | "
                                            f"{r['sink_cpu'] * 100:.0f}% |" if mode == "on" else "— | — | — |"))
    L += ["", f"Medians: p50 {med['off']['p50']:.3f} → {med['on']['p50']:.3f} ms, p99 {med['off']['p99']:.3f} → "
              f"{med['on']['p99']:.3f} ms: p99 {cost * 100:+.1f}% (bar: ≤ +{BAR_P99 * 100:.0f}%) — "
              f"{'met' if cost <= BAR_P99 else 'NOT met'}.", ""]
    return L


def run(args, env: Env, tmp):
    d = os.path.join(tmp, "logship")
    sink = Sink(env, os.path.join(d, "sink"))
    info = machine_info(env.bin)
    L = [f"# Sidecar log shipping — {info['date']}", "",
         f"{info['sidecar']} ({info['git_head']}), {info['nproc']} × {info['cpu']}, kernel {info['kernel']}, "
         f"{info['nginx']} as the sink.", ""]
    part, mibs = throughput(args, env, os.path.join(d, "ship"), sink)
    L += part
    L += latency(args, env, os.path.join(d, "rate"), sink, mibs, tmp)
    env.procs.stop(sink.proc)
    return "\n".join(L)
