"""Processes and the machine: paths and CPU layout, /proc readings (CPU, memory, other work on
the machine), the processes a run starts (and stops, by pid), readiness waits, machine facts.

Not responsible for what the processes are (targets.py) nor for load or reports."""
from __future__ import annotations

import datetime as dt
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
LUA = os.path.join(HERE, "summary.lua")
CLK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "0"
LOAD_CPU = "1"


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


def cpu_steal() -> float:
    """Seconds of all CPUs together taken by the hypervisor since boot (/proc/stat `steal`)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / CLK


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
        offset = f.tell()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        f.close()
        p.logfile, p.log_offset = logfile, offset  # the log is appended to by each start
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


def tail(proc, n=1500, own=False):
    """The last n characters of a process's output; own: only what this start of it wrote."""
    try:
        with open(proc.logfile, "rb") as f:
            if own:
                f.seek(proc.log_offset)
            return f.read().decode(errors="replace")[-n:]
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

