"""The live admin page (GET / on the admin port, src/admin/page.html) in headless Chromium,
driven over the DevTools protocol on a pipe (--remote-debugging-pipe) in real time while load
runs through an inbound and an outbound listener: the page polls /stats, draws points, shows
rates, 5xx share, latency, readiness, endpoints and errors, and its charts change on screen.
Skipped when Chromium is not installed (scripts/install-test-deps installs Debian's)."""

from __future__ import annotations

import base64
import fcntl
import http.client
import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import zlib

import pytest

from helpers import LOCALHOST, AppProcess, die_with_parent, free_port, make_config, wait_until

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


# --------------------------------------------------------------------------------------------
# Chromium over the DevTools pipe: fd 3 carries commands in, fd 4 answers and events out, each
# message JSON ended by a NUL byte.
# --------------------------------------------------------------------------------------------
class Browser:
    def __init__(self, log_path):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_child, from_child = os.pipe(), os.pipe()
        # Out of the way of 3 and 4, so the dup2s in the child cannot overwrite each other.
        child_in = fcntl.fcntl(to_child[0], fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_child[1], fcntl.F_DUPFD_CLOEXEC, 10)

        def in_child():
            die_with_parent()
            os.dup2(child_in, 3)  # dup2 clears close-on-exec on the copies
            os.dup2(child_out, 4)

        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-background-timer-throttling",
             "--disable-renderer-backgrounding", "--hide-scrollbars", "--window-size=1280,900",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, close_fds=False,
            start_new_session=True, preexec_fn=in_child,
        )
        for fd in (*to_child[:1], from_child[1], child_in, child_out):
            os.close(fd)
        self.w, self.r = to_child[1], from_child[0]
        self.next_id, self.answers, self.cond = 0, {}, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self.r, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self.cond:
                    self.answers[None] = "closed"
                    self.cond.notify_all()
                return
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                doc = json.loads(m)
                if "id" in doc:
                    with self.cond:
                        self.answers[doc["id"]] = doc
                        self.cond.notify_all()

    def send(self, method, timeout=15.0, session=True, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        with self.cond:
            ok = self.cond.wait_for(lambda: self.next_id in self.answers or None in self.answers, timeout)
            doc = self.answers.pop(self.next_id, None)
        assert ok and doc is not None, f"no answer from Chromium to {method} (exited: {self.proc.poll()}); see {self.log.name}"
        assert "error" not in doc, f"{method}: {doc['error']}"
        return doc["result"]

    def open(self, url):
        target = self.send("Target.createTarget", url=url, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True, session=False)["sessionId"]

    def eval(self, expr):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True)
        assert "exceptionDetails" not in r, f"{expr}: {r['exceptionDetails']}"
        return r["result"].get("value")

    def text(self, testid):
        return self.eval(f'document.querySelector(\'[data-testid="{testid}"]\')?.textContent ?? null')

    def screenshot(self, clip=None) -> bytes:
        params = {"format": "png"}
        if clip:
            params["clip"] = {"scale": 1, **clip}
        return base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])

    def close(self):
        try:
            self.send("Browser.close", timeout=5, session=False)
            self.proc.wait(5)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self.w, self.r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def png_pixels(data: bytes):
    """(width, height, rows of (r, g, b) tuples) of an 8-bit RGB/RGBA PNG, stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = 3 if ctype == 2 else 4
    raw, stride, prev, rows = zlib.decompress(idat), w * bpp, bytearray(w * bpp), []
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(w)])
        prev = line
    return w, h, rows


def chart_ink(png: bytes) -> int:
    """Coloured pixels in a chart clip: its line and the light area under it (the card's
    background, text and axis are white or grey)."""
    _, _, rows = png_pixels(png)
    return sum(1 for row in rows for px in row if max(px) - min(px) > 20)


# --------------------------------------------------------------------------------------------
# load: keep-alive loops through the sidecar, one thread each
# --------------------------------------------------------------------------------------------
class Load:
    def __init__(self, *targets):  # (port, paths cycled through)
        self.stop_ev, self.sent = threading.Event(), {}
        self.threads = [threading.Thread(target=self._run, args=t, daemon=True) for t in targets]
        for t in self.threads:
            t.start()

    def _run(self, port, paths):
        conn, i = None, 0
        while not self.stop_ev.is_set():
            try:
                conn = conn or http.client.HTTPConnection(LOCALHOST, port, timeout=5)
                conn.request("GET", paths[i % len(paths)])
                r = conn.getresponse()
                r.read()
                self.sent[r.status] = self.sent.get(r.status, 0) + 1
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn:
                    conn.close()
                conn = None
                self.stop_ev.wait(0.05)
            i += 1
            self.stop_ev.wait(0.003)  # a few hundred requests/s: the page needs traffic, not a benchmark

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(10)


def _number(text):
    return float(text.split()[0].replace("–", "nan"))


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium.log")
    yield b
    b.close()


def test_admin_page_draws_live_charts(http_app, log_dir, start_sidecar, browser, tmp_path):
    pod = AppProcess("upstream_app.py", "--host", "127.0.0.1", log_dir=log_dir)
    dead = free_port()  # nothing listens: the `dead` listener answers 502 with a reason
    cfg = make_config(http_app.port, request_timeout="5s", extra_inbound=[
        {"name": "dead", "listen": f"{LOCALHOST}:{free_port()}", "protocol": "http", "target": f"{LOCALHOST}:{dead}"}])
    cfg["outbound"] = [{
        "name": "orders", "listen": f"{LOCALHOST}:{free_port()}", "protocol": "http",
        "upstream": {"endpoints": [pod.address], "http": "http1"}, "connect_timeout": "1s", "request_timeout": "5s",
    }]
    try:
        sc = start_sidecar(cfg)
        out_port = int(cfg["outbound"][0]["listen"].rsplit(":", 1)[1])
        # http_app answers in ~45 ms (Nagle against delayed ACKs), so three loops on `web`;
        # one request in ten there is answered 500 by the app.
        web_paths = (sc.port("web"), ["/"] * 9 + ["/status/500"])
        load = Load(web_paths, web_paths, web_paths, (out_port, ["/", "/?x=1"]), (sc.port("dead"), ["/gone"]))
        try:
            t0 = time.monotonic()
            browser.open(f"http://{LOCALHOST}:{sc.admin_port}/")

            def points(direction, name):
                t = browser.text(f"points-{direction}-{name}")
                return int(t) if t else 0

            wait_until(lambda: points("inbound", "web") >= 2 and points("outbound", "orders") >= 2, 15,
                       interval=0.2, what="the page to draw 2 points per listener (polls once a second)")
            clip = browser.eval('(r => ({x: r.x, y: r.y, width: r.width, height: r.height}))'
                                '(document.querySelector(\'[data-testid="chart-inbound-web-rps"]\').getBoundingClientRect())')
            assert clip["width"] > 50 and clip["height"] > 20, f"the requests/s chart has no size: {clip}"
            first_chart, first_page = browser.screenshot(clip), browser.screenshot()
            n = points("inbound", "web")
            wait_until(lambda: points("inbound", "web") >= n + 2, 10, interval=0.2, what="two more points")
            second_chart, second_page = browser.screenshot(clip), browser.screenshot()
            (tmp_path / "page-1.png").write_bytes(first_page)
            (tmp_path / "page-2.png").write_bytes(second_page)

            ready = browser.text("ready")
            values = {f"{d}-{name}-{m}": browser.text(f"value-{d}-{name}-{m}")
                      for d, name in (("inbound", "web"), ("inbound", "dead"), ("outbound", "orders"))
                      for m in ("rps", "errors", "p50", "p99")}
            page_text = browser.eval("document.body.innerText")
            banner = browser.eval('getComputedStyle(document.getElementById("banner")).display')
            small_page = browser.screenshot({"x": 0, "y": 0, "width": 1280, "height": 900, "scale": 0.25})
            took = time.monotonic() - t0
        finally:
            load.stop()
    finally:
        pod.stop()
    ink1, ink2 = chart_ink(first_chart), chart_ink(second_chart)
    print(f"page checked in {took:.1f}s; load {load.sent}; values {values}; chart ink {ink1}, {ink2}")

    assert ready == "ready", f"readiness shows {ready!r}"
    assert banner == "none", f"the `admin unreachable` banner is shown:\n{page_text}"
    for key in ("inbound-web", "outbound-orders"):
        assert _number(values[f"{key}-rps"]) > 10, f"{key} requests/s shown as {values[f'{key}-rps']!r} under load"
        for q in ("p50", "p99"):
            assert 0 < _number(values[f"{key}-{q}"]) < 5000, f"{key} {q} shown as {values[f'{key}-{q}']!r}"
    assert 0 < _number(values["inbound-web-errors"]) < 50, f"5xx share shown as {values['inbound-web-errors']!r} (1 in 10 sent)"
    assert _number(values["inbound-dead-errors"]) == 100, f"dead listener 5xx share {values.get('inbound-dead-errors')!r}"
    assert pod.address in page_text and "healthy" in page_text, f"endpoint {pod.address} not listed:\n{page_text}"
    assert "/gone" in page_text, f"the dead listener's 502s are not among the recent errors:\n{page_text}"

    # On screen: the chart has a drawn line, and it moved between the two screenshots.
    assert ink1 > 20 and ink2 > 20, f"the requests/s chart looks blank on screen ({ink1}, {ink2} coloured pixels)"
    assert png_pixels(first_chart)[2] != png_pixels(second_chart)[2], "the chart did not change between screenshots"
    assert first_page != second_page, "the page looked the same two polls apart"
    _, _, rows = png_pixels(small_page)  # a quarter-scale copy: decoding the full page in Python is slow
    assert len({px for row in rows for px in row}) > 16, "the page screenshot is (nearly) one colour"
