"""The Markdown report of a run: medians and spread of the rounds, ratios to nginx, the bars.

Not responsible for measuring anything."""
from __future__ import annotations

import statistics

from load import TLS_WORKLOADS, WORKLOADS
from procs import LOAD_CPU, PROXY_CPU

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

    def paired(ta, wa, tb, wb, k, op):
        """op(a, b) of the figure k of (ta, wa) and (tb, wb) measured in the same round."""
        b = {r.get("round", i): r.get(k) for i, r in enumerate(runs.get(tb, {}).get(wb, []))}
        out = []
        for i, r in enumerate(runs.get(ta, {}).get(wa, [])):
            x, y = r.get(k), b.get(r.get("round", i))
            if x is not None and y is not None and x == x and y == y:
                out.append(op(x, y))
        return out

    def added(t, w, k):
        return paired(t, w, "direct", w, k, lambda x, y: x - y)

    extra = {"floor": floor_report, "rate20k": rate20k_report, "unix": unix_report, "outbound": conns_report}
    untabled = []  # targets left out of a workload that has no table

    for wl in WORKLOADS:
        w = wl[0]
        if w in TLS_WORKLOADS or not any(runs.get(t, {}).get(w) for t in targets):
            for t, why in data.get("skipped", {}).get(w, {}).items():  # no table to put it under
                untabled.append(f"{w}: {t} not run: {why}")
            continue
        if wl[2] == "count":  # outbound-fail: what the client and the endpoints saw
            fail_report(L, data, wl)
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
        for t, why in data.get("skipped", {}).get(w, {}).items():
            L.append(f"Not run: **{t}**: {why}.")
            L.append("")
        if w in extra:
            extra[w](L, data, vals, paired, added)

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
    errs = data.get("notes", []) + untabled
    if errs:
        L.append("Notes: " + "; ".join(errs))
        L.append("")
    return "\n".join(L)


def floor_report(L, data, vals, paired, _added):
    """Each proxy's CPU per small GET over HTTP against an L4 relay on the same load: the part
    of its cost that is HTTP work rather than the kernel's TCP and the relaying."""
    runs, targets = data["runs"], data["targets"]
    rows = [t for t in targets if t != "direct" and runs.get(t, {}).get("small")]
    if not rows:
        return
    L.append("### HTTP work over the L4 floor (CPU-s per 100k requests, small GETs at 64 connections)")
    L.append("")
    L.append("HTTP: the small-GET workload. Own floor: the proxy's own TCP relay (Sidecar `protocol: tcp`, "
             "nginx `stream`, HAProxy `mode tcp`) on the same load and core; HAProxy's is also set beside every "
             "proxy as the leanest relay here. Ratios and differences are taken within each round, then the median.")
    L.append("")
    L.append("| proxy | HTTP | own L4 floor | HTTP ÷ own floor | HTTP − own floor | HAProxy L4 floor | HTTP ÷ HAProxy floor |")
    L.append("|---|---|---|---|---|---|---|")
    k = "cpu_per_100k"
    for t in rows:
        nr = len(runs[t]["small"])
        own = vals(t, "floor", k)
        row = [t, cell(vals(t, "small", k), fmt_f, nr), cell(own, fmt_f, len(own))]
        row += [cell(paired(t, "small", t, "floor", k, lambda a, b: a / b), lambda x: f"{x:.2f}×", nr),
                cell(paired(t, "small", t, "floor", k, lambda a, b: a - b), lambda x: f"{x:+.2f}", nr)]
        hf = vals("haproxy", "floor", k)
        row += [cell(hf, fmt_f, len(hf)),
                cell(paired(t, "small", "haproxy", "floor", k, lambda a, b: a / b), lambda x: f"{x:.2f}×", nr)]
        L.append("| " + " | ".join(row) + " |")
    L.append("")


def rate20k_report(L, data, vals, paired, added):
    """CPU per request at a rate no proxy saturates, beside the saturated small-GET figure."""
    runs, targets = data["runs"], data["targets"]
    rows = [t for t in targets if t != "direct" and runs.get(t, {}).get("rate20k")]
    if not rows:
        return
    L.append("### CPU at 20,000 req/s against a saturated core (CPU-s per 100k requests)")
    L.append("")
    L.append("Saturated: the small-GET workload (64 connections, as fast as the proxy goes). "
             "Core busy: the proxy's CPU-seconds over the run's wall time.")
    L.append("")
    L.append("| proxy | at 20k req/s | ×nginx | core busy at 20k | saturated | 20k ÷ saturated | p50 added at 20k ms "
             "| p99 added at 20k ms |")
    L.append("|---|---|---|---|---|---|---|---|")
    k = "cpu_per_100k"
    for t in rows:
        nr = len(runs[t]["rate20k"])
        cpu = vals(t, "rate20k", k)
        row = [t, cell(cpu, fmt_f, nr), ratio(med(cpu), med(vals("nginx", "rate20k", k))),
               cell([x * 100 if x is not None else None for x in vals(t, "rate20k", "busy")], lambda x: f"{x:.0f}%", nr),
               cell(vals(t, "small", k), fmt_f, len(vals(t, "small", k))),
               cell(paired(t, "rate20k", t, "small", k, lambda a, b: a / b), lambda x: f"{x:.2f}×", nr)]
        row += [cell(added(t, "rate20k", q), lambda x: fmt_ms(x, True), nr) for q in ("p50", "p99")]
        L.append("| " + " | ".join(row) + " |")
    L.append("")


def unix_report(L, data, vals, paired, _added):
    """The same small GETs with the proxy reaching the app over a Unix socket instead of TCP."""
    runs, targets = data["runs"], data["targets"]
    rows = [t for t in targets if t != "direct" and runs.get(t, {}).get("unix") and runs[t].get("small")]
    if not rows:
        return
    L.append("### Unix socket against TCP to the app (small GETs at 64 connections, same rounds)")
    L.append("")
    L.append("| proxy | CPU-s/100k, TCP to app | CPU-s/100k, Unix socket | Unix ÷ TCP, CPU | Unix ÷ TCP, req/s |")
    L.append("|---|---|---|---|---|")
    k = "cpu_per_100k"
    for t in rows:
        nr = len(runs[t]["unix"])
        row = [t, cell(vals(t, "small", k), fmt_f, len(vals(t, "small", k))), cell(vals(t, "unix", k), fmt_f, nr),
               cell(paired(t, "unix", t, "small", k, lambda a, b: a / b), lambda x: f"{x:.2f}×", nr),
               cell(paired(t, "unix", t, "small", "rps", lambda a, b: a / b), lambda x: f"{x:.2f}×", nr)]
        L.append("| " + " | ".join(row) + " |")
    L.append("")


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


def conns_report(L, data, vals, _paired, _added):
    """How many upstream connections each proxy's 64 client connections turned into."""
    runs, targets = data["runs"], data["targets"]
    rows = [t for t in targets if runs.get(t, {}).get("outbound")]
    if not [t for t in rows if t != "direct"]:
        return
    L.append("### Upstream connections of the 64 client connections (outbound)")
    L.append("")
    L.append("ESTABLISHED TCP sockets of the proxy's processes (`/proc/PID/net/tcp` matched to the inodes of "
             "`/proc/PID/fd`): from clients to its listener, and to each endpoint (127.0.0.21 / .22 / .23 at the "
             "app's port), halfway through the run and 0.5 s after it (what stays pooled); Sidecar's `balance: "
             f"{data.get('outbound_balance', 'p2c-ewma')}`, nginx and HAProxy round-robin. Opened during the run: "
             "connections the app accepted from the start of the measured run to 0.5 s after it (nginx "
             "`stub_status`, the warm-up's connections not included; ≈ 1 a second of them are the inbound Sidecar's "
             "TCP health checks of the app, in every row); requests at the app ÷ requests wrk counted "
             "(> 1: retries, or requests still in flight when wrk stopped).")
    L.append("")
    L.append("| target | client conns mid-run | upstream conns mid-run | per endpoint mid-run (.21 / .22 / .23), "
             "each round | upstream conns after the run | opened during the run | requests at the app ÷ client's |")
    L.append("|---|---|---|---|---|---|---|")
    i = lambda x: f"{x:.0f}"  # noqa: E731
    for t in rows:
        rs = runs[t]["outbound"]
        nr = len(rs)
        mid = [(r.get("conns") or {}).get("mid") for r in rs]
        aft = [(r.get("conns") or {}).get("after") for r in rs]
        per = "; ".join(" / ".join(str(v) for v in m["per_endpoint"].values()) for m in mid if m) or "—"
        amp = [r["app_requests"] / r["requests"] if r.get("app_requests") is not None and r.get("requests") else None
               for r in rs]
        L.append("| " + " | ".join([
            t if t != "direct" else "app direct",
            cell([m["clients"] if m else None for m in mid], i, nr),
            cell([m["upstream"] if m else None for m in mid], i, nr), per,
            cell([a["upstream"] if a else None for a in aft], i, nr),
            cell([r.get("app_accepts") for r in rs], i, nr), cell(amp, lambda x: f"{x:.4f}", nr)]) + " |")
    L.append("")


def fail_report(L, data, wl):
    """outbound-fail: the share of requests the client saw succeed, and the requests the
    endpoints saw per request sent (retries), per proxy; the bars; Sidecar's counters and log."""
    runs, targets, w = data["runs"], data["targets"], wl[0]
    rows = [t for t in targets if runs.get(t, {}).get(w)]
    L.append(f"## {wl[1]}")
    L.append("")
    L.append("Endpoints 127.0.0.21 and .22 answer `hello world`, 127.0.0.23 answers 503 to everything; each request "
             "an endpoint answers is a line in its access log (`$server_addr $status`), counted after the run. "
             "Success: 2xx responses the client (h2load) saw over requests sent. Amplification: requests the three "
             "endpoints saw over requests sent. Each run is the proxy's first meeting with the failing endpoint "
             f"(processes fresh each round, no warm-up). Sidecar: `balance: {data.get('outbound_balance', 'p2c-ewma')}`, "
             "`retry: { attempts: 2, budget: 20%, "
             "min_retries_per_second: 10, on: [connect-failure, reset, 503] }`, `outlier: { consecutive_failures: 5, "
             "base_ejection: 30s, max_ejected: 50% }`; nginx: `proxy_next_upstream error timeout http_503; "
             "proxy_next_upstream_tries 2` (passive `max_fails=1 fail_timeout=10s`, its defaults); HAProxy: "
             "`retries 1`, `option redispatch`, `retry-on conn-failure empty-response 503`, no health checks.")
    L.append("")
    for t, why in data.get("skipped", {}).get(w, {}).items():
        L.append(f"Not run: **{t}**: {why}.")
        L.append("")
    L.append("| proxy | sent | 2xx | non-2xx | client errors | success | at the endpoints (.21 / .22 / .23) | "
             "endpoints ÷ sent | p50 ms | p99 ms (2xx) | time s | CPU-s/100k |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = {}
    for t in rows:
        rs = runs[t][w]
        nr = len(rs)
        sent = [r.get("sent") for r in rs]
        ok = [r.get("status", {}).get("2xx") for r in rs]
        non2 = [r["sent"] - r["status"]["2xx"] if r.get("status") else None for r in rs]
        succ = [r["status"]["2xx"] / r["sent"] * 100 if r.get("status") and r.get("sent") else None for r in rs]
        at = [sum(r.get("endpoints", {}).values()) for r in rs]
        amp = [a / r["sent"] if r.get("sent") else None for a, r in zip(at, rs)]
        worst[t] = (min([x for x in succ if x is not None], default=None), max([x for x in amp if x is not None], default=None))
        per = "; ".join(ep_cell(r.get("endpoints", {})) for r in rs)
        i = lambda x: f"{x:.0f}"  # noqa: E731
        L.append("| " + " | ".join([
            t, cell(sent, i, nr), cell(ok, i, nr), cell(non2, i, nr), cell([r["errors"] for r in rs], i, nr),
            cell(succ, lambda x: f"{x:.2f}%", nr), per, cell(amp, lambda x: f"{x:.3f}×", nr),
            cell([r.get("p50") for r in rs], fmt_ms, nr), cell([r.get("p99") for r in rs], fmt_ms, nr),
            cell([r.get("secs") for r in rs], lambda x: f"{x:.2f}", nr),
            cell([r.get("cpu_per_100k") for r in rs], fmt_f, nr)]) + " |")
    L.append("")
    if any(r.get("metrics") for t in rows for r in runs[t][w]):
        L.append("Sidecar's own counters over each run (admin `/metrics`, upstream `orders-fail`): "
                 + "; ".join(f"round {r.get('round', 0) + 1}: responses by status "
                             + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(r['metrics'].get('requests', {}).items()))
                             + f", retries {r['metrics'].get('retries', 0):.0f}, endpoints after: "
                             + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r['metrics'].get('endpoints', {}).items()))
                             for r in runs.get("sidecar", {}).get(w, []) if r.get("metrics")) + ".")
        L.append("")
    if worst:
        L.append("Bars (Sidecar's; the others measured against the same), worst round:")
        L.append("")
        L.append("| proxy | success ≥ 99.9 % | met | endpoints ÷ sent ≤ 1.2× | met |")
        L.append("|---|---|---|---|---|")
        for t, (s_, a_) in worst.items():
            L.append(f"| {t} | {fmt_f(s_, 3)}% | {yes(s_ is not None and s_ >= 99.9)} | "
                     f"{fmt_f(a_, 3)}× | {yes(a_ is not None and a_ <= 1.2)} |")
        L.append("")
    logs = {k: v for k, v in data.get("logs", {}).items() if "outbound" in k}
    if logs:
        L.append("Sidecar's outbound process, last lines of its stderr (log level "
                 "`warn` unless BENCH_SIDECAR_LOG_LEVEL) at the end of each round:")
        L.append("")
        L.append("```")
        for k, v in logs.items():
            L.append(f"# {k}")
            L += v.splitlines()[-8:]
        L.append("```")
        L.append("")


def ep_cell(counts):
    """`.21 / .22 / .23` request counts of one run (non-200 answers in brackets)."""
    by_ip: dict[str, list[int]] = {}
    for k, v in counts.items():
        ip, st = k.split()
        by_ip.setdefault(ip, [0, 0])[0 if st == "200" else 1] += v
    ips = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
    return " / ".join(f"{by_ip.get(ip, [0, 0])[0] + by_ip.get(ip, [0, 0])[1]}"
                      + (f" ({by_ip[ip][1]} non-200)" if by_ip.get(ip, [0, 0])[1] else "") for ip in ips)


def yes(ok):
    return "yes" if ok else "no"
