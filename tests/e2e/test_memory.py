"""What the sidecar keeps in memory (issue 9): no private-key file bytes after a rotation (bug 4,
read from a core dump taken with gdb's `gcore`), and a bound on what slow readers cost, given
back when they leave (bug 9, slowhttptest's slow-read attack)."""

from __future__ import annotations

import mmap
import os
import re
import resource
import shutil
import subprocess
import threading
import time

import pytest

from helpers import LOCALHOST, RssSampler, curl, make_config, read_rss_kib
from tls_helpers import PKI, SERVER_ID, flip_symlink, issue, serial_via_python, symlinked_tls_listener

MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# private keys (bug 4)
# --------------------------------------------------------------------------------------------
def _pem_body_lines(path) -> list[str]:
    """The base64 lines of a PEM file: the text a reader of the file holds in memory."""
    return [l for l in path.read_text().splitlines() if l and not l.startswith("-----")]


def _gcore(pid, out_dir) -> str:
    """A core dump of the running process (gdb's gcore); the process carries on afterwards."""
    if shutil.which("gcore") is None:
        pytest.fail("gcore not found: install the Debian package gdb (scripts/install-test-deps)")
    p = subprocess.run(["gcore", "-o", str(out_dir / "core"), str(pid)], capture_output=True, text=True, timeout=60)
    core = out_dir / f"core.{pid}"
    assert p.returncode == 0 and core.exists(), f"gcore failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return str(core)


@pytest.mark.timeout(60)
def test_private_key_file_bytes_are_not_kept_in_memory(tmp_path, http_app, start_sidecar):
    pki = PKI(tmp_path / "pki")
    certs = tmp_path / "certs"
    v1, listener = symlinked_tls_listener(pki, certs)
    cur = certs / "current"
    sc = start_sidecar(make_config(http_app.port, extra_inbound=[listener]))
    port = sc.port("tls")
    assert serial_via_python(port, pki.ca) == v1.serial
    v2 = issue(pki.ca_dir, SERVER_ID, certs / "v2", dns=["localhost", LOCALHOST])
    flip_symlink(cur, "v2")
    deadline = time.monotonic() + 8
    while serial_via_python(port, pki.ca) != v2.serial:
        assert time.monotonic() < deadline, "the rotation to v2 was not picked up within 8 s"
        time.sleep(0.2)
    time.sleep(1.5)  # a poll or two after the rotation: what the watcher keeps between polls
    assert serial_via_python(port, pki.ca) == v2.serial

    # The full 64-character base64 lines of each key file. The last, shorter line encodes only
    # public-key bytes, and for `sidecar certs issue` keys it appears verbatim in the
    # certificate's PEM too (which may stay in memory): it proves nothing, so it is left out.
    needles = {}
    for name, cred in (("old", v1), ("new", v2)):
        cert_text = cred.crt.read_text()
        for i, line in enumerate(_pem_body_lines(cred.key)):
            if len(line) == 64 and line not in cert_text:
                needles[f"{name} key line {i + 1}"] = line.encode()
    assert len(needles) == 4, f"expected two private 64-char lines per P-256 key: {sorted(needles)}"
    dump_dir = tmp_path / "core"
    dump_dir.mkdir()
    core = _gcore(sc.pid, dump_dir)
    try:
        size = os.path.getsize(core)
        with open(core, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            found = {what: _count(m, n) for what, n in needles.items()}
    finally:
        os.unlink(core)
    print(f"core dump of {size / MiB:.1f} MiB; key-file lines found: {found}")
    sc.assert_alive()
    leaked = {k: v for k, v in found.items() if v}
    assert not leaked, f"private-key PEM text is in the sidecar's memory after a rotation: {leaked}"


def _count(m: mmap.mmap, needle: bytes) -> int:
    n, i = 0, m.find(needle)
    while i != -1:
        n += 1
        i = m.find(needle, i + 1)
    return n


# --------------------------------------------------------------------------------------------
# slow readers (bug 9)
# --------------------------------------------------------------------------------------------
class _NormalClient:
    """A normal client next to the attack: curl of a small path every 0.5 s, each within 3 s
    (a shared 2-core machine also runs the attacker and a Python app with 500 threads). The
    same path straight from the app is timed too, to tell a slow app from a slow sidecar."""

    def __init__(self, url, app_url):
        self.url, self.app_url = url, app_url
        self.results: list[tuple[int, float]] = []  # (status, seconds)
        self.app_direct: list[float] = []  # seconds, straight to the app
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            r = curl("--max-time", "3", self.url, timeout=10)
            self.results.append((r.status, time.monotonic() - t0))
            t0 = time.monotonic()
            curl("--max-time", "3", self.app_url, timeout=10)
            self.app_direct.append(time.monotonic() - t0)
            self._stop.wait(0.5)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)


def _settled_rss_kib(pid, seconds) -> int:
    """The lowest RSS seen over the next `seconds` (memory given back shows as a drop)."""
    low = read_rss_kib(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.25)
        low = min(low, read_rss_kib(pid))
    return low


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slow_read_attack_has_bounded_memory_given_back_after(http_app, start_sidecar, tmp_path):
    """500 clients fetch a 4 MiB body (3 times each, pipelined) advertising a 512-1024 byte TCP
    window and reading 32 bytes every 3 s (slowhttptest -X). Whatever the sidecar buffers per
    connection is bounded (it stops reading from the app while the client does not read), so
    RSS stays under 64 MiB; when the clients leave the memory goes back to the system; and a
    normal client is served throughout."""
    if shutil.which("slowhttptest") is None:
        pytest.fail("slowhttptest not found: install the Debian package slowhttptest (scripts/install-test-deps)")
    n = 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4 * n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))  # slowhttptest inherits it
    sc = start_sidecar(make_config(http_app.port, limits={"max_connections": 2000, "header_read_timeout": "10s"}))
    port = sc.port("web")
    base = f"http://{LOCALHOST}:{port}"
    assert curl(f"{base}/big?bytes={4 * MiB}").status == 200  # warm: pool, buffers, allocator
    idle = _settled_rss_kib(sc.pid, 1.0)
    cmd = ["slowhttptest", "-X", "-c", str(n), "-r", "200", "-w", "512", "-y", "1024", "-n", "3", "-z", "32",
           "-k", "3", "-l", "30", "-u", f"{base}/big?bytes={4 * MiB}"]
    with _NormalClient(f"{base}/", f"http://{LOCALHOST}:{http_app.port}/") as normal, RssSampler(sc.pid, interval=0.1) as rss:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path)
        attack_peak = rss.peak_kib
    out = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)  # its status screen is coloured
    connected = [int(x) for x in re.findall(r"connected:\s+(\d+)", out)]
    after = _settled_rss_kib(sc.pid, 10.0)
    statuses = [s for s, _ in normal.results]
    slowest = max((t for _, t in normal.results), default=0.0)
    print(f"slowhttptest exit {p.returncode}; most connected at once: {max(connected, default=0)}; "
          f"sidecar RSS idle {idle / 1024:.1f} MiB, peak {attack_peak / 1024:.1f} MiB, 10 s after {after / 1024:.1f} MiB; "
          f"normal client: {len(statuses)} requests, statuses {sorted(set(statuses))}, slowest {slowest:.2f}s "
          f"(straight to the app: slowest {max(normal.app_direct, default=0):.2f}s)")
    slow_normal = [(r.get("path"), r.get("status"), r.get("duration_ms"), r.get("error")) for r in sc.access_log()
                   if r.get("path") == "/" and (r.get("status") != 200 or r.get("duration_ms", 0) > 500)]
    print("normal-client requests the sidecar logged as slow (> 500 ms) or failed:", slow_normal)
    tail = "\n".join(out.splitlines()[-25:])
    assert connected and max(connected) >= 0.8 * n, f"the attack did not happen: at most {max(connected, default=0)} of {n} clients connected at once:\n{tail}"
    assert len(statuses) >= 40, f"the normal client made only {len(statuses)} requests during the attack"
    assert all(s == 200 for s in statuses), (
        f"the normal client was not served during the attack: (status, seconds) {normal.results}; "
        f"the same path straight from the app took (seconds) {[round(t, 2) for t in normal.app_direct]}"
    )
    assert attack_peak < 64 * 1024, f"sidecar RSS reached {attack_peak / 1024:.1f} MiB under {n} slow readers (idle {idle / 1024:.1f} MiB)"
    assert after < idle + 16 * 1024, f"sidecar RSS {after / 1024:.1f} MiB 10 s after the slow readers left (idle {idle / 1024:.1f} MiB): memory not given back"
    sc.assert_alive()
