"""The access log never loses a record silently (issue 9, bug 5): every record that cannot be
written is counted in sidecar_access_log_dropped_total{reason="write_error"} (records the writer
could not keep up with: reason="queue_full"), the first error of a burst is logged once, the
sidecar keeps serving, and it writes again as soon as the destination takes bytes again."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from helpers import http_request, json_lines, make_config, wait_until

DROPPED = "sidecar_access_log_dropped_total"


def _with_access_log_path(cfg, path):
    cfg["telemetry"]["access_log"] = {"enabled": True, "format": "json", "path": str(path)}
    return cfg


def _dropped(sc, reason) -> float:
    return sc.metrics().value(DROPPED, reason=reason)


def _access_log_error_lines(sc) -> list[str]:
    """stderr lines at WARN or ERROR that are about the access log."""
    return [
        l for l in sc.stderr_text().splitlines()
        if re.search(r"\b(ERROR|WARN)\b", l) and re.search(r"access[ _-]?log", l, re.I)
    ]


def _requests(port, n, tag):
    for i in range(n):
        r = http_request(port, f"/?{tag}={i}", timeout=5)
        assert r.status == 200, f"request {tag}={i} answered {r.status}: the sidecar stopped serving"


def test_dropped_series_exist_at_zero(http_app, start_sidecar, tmp_path):
    sc = start_sidecar(_with_access_log_path(make_config(http_app.port), tmp_path / "access.log"))
    m = sc.metrics()
    got = {lab.get("reason"): v for lab, v in m.series(DROPPED)}
    assert got == {"queue_full": 0, "write_error": 0}, f"{DROPPED} series at start: {m.series(DROPPED)}"


def test_write_errors_are_counted_logged_once_and_serving_goes_on(http_app, start_sidecar):
    """/dev/full: every write fails with ENOSPC."""
    n = 50
    sc = start_sidecar(_with_access_log_path(make_config(http_app.port), "/dev/full"))
    port = sc.port("web")
    assert _dropped(sc, "write_error") == 0
    _requests(port, n, "full")
    try:
        wait_until(lambda: _dropped(sc, "write_error") == n, 5,
                   what=f'{DROPPED}{{reason="write_error"}} to reach {n} (one per request)')
    finally:
        print("dropped series:", sc.metrics().series(DROPPED))
    time.sleep(0.5)
    assert _dropped(sc, "write_error") == n, "more records counted as dropped than requests made"
    assert _dropped(sc, "queue_full") == 0
    lines = _access_log_error_lines(sc)
    assert len(lines) == 1, f"expected one error line about the access log for the burst, got {len(lines)}:\n" + "\n".join(lines[:10])
    assert http_request(port, "/", timeout=5).status == 200
    sc.assert_alive()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs, unmounted after the test (and after the sidecar that writes there,
    which must be requested after this fixture)."""
    d = tmp_path / "small"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {p.stderr.strip()}")
    yield d
    if subprocess.run(["umount", str(d)], capture_output=True, timeout=10).returncode != 0:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=10)


def _fill(path):
    """Writes a file until the filesystem is full (ENOSPC)."""
    block = b"f" * 4096
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC


def _records(path) -> list[dict]:
    return json_lines(path.read_text(errors="replace"), key="direction")


@pytest.mark.timeout(60)
def test_writes_resume_when_the_disk_has_room_again(small_tmpfs, http_app, start_sidecar):
    log = small_tmpfs / "access.log"
    sc = start_sidecar(_with_access_log_path(make_config(http_app.port), log))
    port = sc.port("web")
    # Filled before any record is written: the empty log file has no page to append into.
    filler = small_tmpfs / "filler"
    _fill(filler)
    sent = 0
    n1 = 30
    _requests(port, n1, "full")
    sent += n1
    wait_until(lambda: _dropped(sc, "write_error") == n1, 5,
               what=f'{DROPPED}{{reason="write_error"}} to count the {n1} records written to a full disk')
    assert _records(log) == [], "records were written to a full filesystem"

    filler.unlink()
    # The writer finds out that there is room again by writing: request until a record lands.
    deadline = time.monotonic() + 10
    while not _records(log):
        assert time.monotonic() < deadline, "no access-log record written within 10 s after the disk had room again"
        _requests(port, 1, "probe")
        sent += 1
        time.sleep(0.1)
    n2 = 30
    _requests(port, n2, "again")
    sent += n2
    wait_until(lambda: len([r for r in _records(log) if "again=" in str(r.get("path"))]) == n2, 5,
               what=f"the {n2} records made after recovery to be in the file")

    def accounted():
        return len(_records(log)) + _dropped(sc, "write_error") + _dropped(sc, "queue_full")

    wait_until(lambda: accounted() == sent, 5, what=f"records in the file + dropped to equal the {sent} requests")
    print(f"{sent} requests: {len(_records(log))} records in the file, dropped {sc.metrics().series(DROPPED)}")
    assert _dropped(sc, "queue_full") == 0
    sc.assert_alive()


def test_text_format_is_one_human_line(http_app, start_sidecar, tmp_path):
    """`format: text`: one line a request, in the order people read one, fields that are set as key=value."""
    path = tmp_path / "access.log"
    cfg = make_config(http_app.port)
    cfg["telemetry"]["access_log"] = {"enabled": True, "format": "text", "path": str(path)}
    sc = start_sidecar(cfg)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert http_request(sc.port("web"), '/headers?q=%22x%22', headers={"traceparent": tp}).status == 200
    wait_until(lambda: path.exists() and path.read_text().count("\n") >= 1, 5, what="a text access-log line")
    line = path.read_text().splitlines()[0]
    pattern = (r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z inbound web 127\.0\.0\.1:\d+ '
               r'"GET /headers\?q=%22x%22 HTTP/1\.1" 200 0 \d+ \d+\.\d{3}ms '
               r'trace_id=4bf92f3577b34da6a3ce929d0e0e4736$')
    assert re.match(pattern, line), line
