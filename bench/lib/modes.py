"""The modes besides the benchmark: the memory soak of Sidecar, perf record of Sidecar, and
syscalls per request of each proxy.

Not responsible for the benchmark rounds (bench.py)."""
from __future__ import annotations

import os
import re
import subprocess
import time

from procs import LOAD_CPU, LUA, ROOT, PROXY_CPU, cpu_seconds, log, machine_info, mem_kib, wait_quiet
from targets import PROXIES, Env

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
    tracepoints: counting only, little overhead), against wrk's request rate; and the context
    switches per request of the proxy and of the app behind it (how often each proxy makes the
    app wake up: a busy proxy that forwards in batches wakes it less)."""
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
        cmd += ["-e", "context-switches"]
        app_path = out_path.replace(".txt", "-app-cs.txt")
        app_cs = subprocess.Popen(["perf", "stat", "-x", ",", "-o", app_path, "-e", "context-switches",
                                   "-p", ",".join(map(str, env.pids("app"))), "--", "sleep", str(secs)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(cmd + ["--", "sleep", str(secs)], timeout=secs + 60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        app_cs.wait(timeout=secs + 60)
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
    for label, path in (("proxy context switches", out_path), ("app context switches", app_path)):
        with open(path) as f:
            cs = [int(ln.split(",")[0]) for ln in f if "context-switches" in ln and ln.split(",")[0].isdigit()]
        if cs:
            counts[label] = cs[0]
    with open(out_path, "a") as f:
        f.write(f"\n# requests in window (wrk's rate x {secs} s): {reqs:.0f}\n")
        for k, c in counts.items():
            f.write(f"# {k}: {c} = {c / reqs:.2f} per request\n")
    log(f"syscalls per request, {target}: " + ", ".join(f"{k} {c / reqs:.2f}" for k, c in counts.items()))
