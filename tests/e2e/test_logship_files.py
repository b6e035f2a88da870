"""Log shipping: the files an app and logrotate leave behind. Rotation by rename (with a glob that
still matches the rotated file and one that does not), copytruncate, truncation, delete and
re-create, lines longer than max_line_bytes, a thousand files, multi-line events, JSON lines,
read_from. Each case writes numbered lines and checks that every number arrives exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from helpers import wait_until
from test_logship import (  # noqa: F401 - receiver is a fixture
    LogFile,
    assert_exactly_once,
    count_numbers,
    delivery_report,
    describe,
    ls_config,
    metric,
    receiver,
    sink,
    source,
    wait_delivered,
)

MiB = 2**20


@pytest.mark.parametrize("glob", ["app.log*", "*.log"])
def test_rename_rotation_reads_the_rotated_file_to_its_end(tmp_path, start_sidecar, receiver, glob):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / glob])], [sink(rx)], rotate_wait="5s"))
    app.start(per_second=300)
    try:
        for _ in range(3):
            time.sleep(1.0)
            # 50 more lines reach the renamed file through the app's open handle: with `*.log`
            # only the sidecar's own open handle can still read them.
            app.rotate_rename(keep=3, tail_lines=50)
        time.sleep(1.0)
    finally:
        app.stop()
    assert_exactly_once(rx, {"a": app.written}, timeout=40)
    files = {r.fields["file"] for r in rx.records}
    assert str(app.path) in files
    assert files <= {str(tmp_path / n) for n in ("app.log", "app.log.1", "app.log.2", "app.log.3")}, files
    sc.assert_alive()


def test_rotation_while_the_sidecar_is_stopped_resumes_each_file_at_its_checkpoint(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    cfg = ls_config(tmp_path, [source([tmp_path / "app.log*"])], [sink(rx)])
    sc = start_sidecar(cfg)
    app.write(100)
    wait_delivered(rx, {"a": 100}, quiet=0.3)
    sc.signal(signal.SIGTERM)
    sc.wait_exit(15)
    app.write(50)  # unread, then renamed to app.log.1 with 20 more
    app.rotate_rename(keep=3, tail_lines=20)
    app.write(30)  # the new app.log
    start_sidecar(cfg)
    assert_exactly_once(rx, {"a": app.written})


def test_a_symlinked_file_rotated_behind_the_link(tmp_path, start_sidecar, receiver):
    """The Kubernetes layout: the glob matches links (containers/*.log) to files that are
    rotated by rename where they live (pods/.../0.log → 0.log.N)."""
    rx = receiver("http")
    (tmp_path / "pods").mkdir()
    (tmp_path / "containers").mkdir()
    app = LogFile(tmp_path / "pods" / "0.log", "a")
    os.symlink(app.path, tmp_path / "containers" / "app.log")
    start_sidecar(ls_config(tmp_path, [source([tmp_path / "containers" / "*.log"])], [sink(rx)]))
    app.start(per_second=300)
    try:
        for i in range(3):
            time.sleep(1.0)
            app.rotate_rename(keep=4, tail_lines=20)
        time.sleep(1.0)
    finally:
        app.stop()
    assert_exactly_once(rx, {"a": app.written}, timeout=40)
    assert {r.fields["file"] for r in rx.records} == {str(tmp_path / "containers" / "app.log")}


def test_a_file_rotated_and_deleted_while_the_sink_is_down_is_still_read_to_its_end(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)], rotate_wait="2s"))
    app.write(10)
    wait_delivered(rx, {"a": 10}, quiet=0.2)
    rx.down()
    for _ in range(20):
        app.write(10486)  # 20 MiB: reading pauses part-way with the sink down
    time.sleep(1.0)
    assert metric(sc, "sidecar_logship_lines_read_total", source="app") < app.written, "reading should be paused"
    app.rotate_rename(keep=1)
    os.unlink(tmp_path / "app.log.1")  # logrotate's `rotate 0`: only the sidecar's handle is left
    app.write(10)
    time.sleep(4.0)  # twice rotate_wait without growth, while the rest waits unread
    rx.up()
    wait_until(lambda: len(rx.records) >= app.written or metric(sc, "sidecar_logship_lost_bytes_total", source="app") > 0,
               60, what="everything delivered (or the loss counted)")
    wait_until(lambda: metric(sc, "sidecar_logship_pending_bytes", source="app") == 0, 30, what="nothing pending")
    time.sleep(0.5)
    missing, dups, extra = delivery_report(rx.lines(), {"a": app.written})
    lost = metric(sc, "sidecar_logship_lost_bytes_total", source="app")
    assert not dups and not extra, describe(missing, dups, extra)
    assert len(missing) * app.line_bytes == lost, f"{len(missing)} lines missing, {lost:.0f} bytes counted lost"
    assert not missing, f"the rotated file was closed with {len(missing)} lines unread: rotate_wait counts from its last growth"


def test_copytruncate_rotation(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    app.write(300)  # the file is large, so it is slow to grow back past the old offset
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "app.log*"])], [sink(rx)]))
    app.start(per_second=200)
    try:
        for _ in range(2):
            time.sleep(1.5)
            app.copytruncate()
        time.sleep(1.5)
    finally:
        app.stop()
    assert_exactly_once(rx, {"a": app.written}, timeout=40)
    sc.assert_alive()


def test_truncation_to_zero_then_appends(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)]))
    app.write(100)
    wait_delivered(rx, {"a": 100}, quiet=0.3)
    app.truncate()
    app.write(30)  # 3,000 bytes: shorter than the 10,000 read before
    assert_exactly_once(rx, {"a": 130})
    app.truncate()
    time.sleep(1.0)
    app.write(150)  # and this time longer than before
    assert_exactly_once(rx, {"a": 280})
    sc.assert_alive()


def test_truncation_then_regrowth_past_the_old_offset_before_the_next_read(tmp_path, start_sidecar, receiver):
    """copytruncate on a busy file: by the time the sidecar looks, the file is longer than the
    offset it had read to. Only a check of the file's first bytes shows it is new content; read
    from the old offset, it gives duplicates and, with other line lengths, a cut line. Five
    rounds, each at another moment of the sidecar's scan cycle."""
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "r0")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)]))
    app.write(100)
    expected = {"r0": 100}
    for k in range(1, 6):
        wait_delivered(rx, expected, quiet=0.1 + 0.23 * k)
        lines = 50 + 50 * k  # 150 bytes each: always longer than the content before
        with app.lock:
            os.truncate(app.path, 0)
            app.f.write(b"".join(f"r{k} line {i:06d} ".encode() + b"z" * 133 + b"\n" for i in range(lines)))
        expected[f"r{k}"] = lines
    missing, dups, extra = wait_delivered(rx, expected)
    cut = [line[:40] for line in rx.lines() if not re.match(r"r\d line ", line)]
    assert not cut, f"{len(cut)} pieces of lines shipped: {cut[:3]}"
    assert not (missing or dups or extra), describe(missing, dups, extra)
    sc.assert_alive()


def test_a_file_truncated_before_it_was_read_counts_every_unread_byte_as_lost(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    rx.down()  # reading pauses once the sink's queue is full: the file is the buffer
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)]))
    for _ in range(10):
        app.write(10486)  # 10 MiB in all
    wait_until(lambda: metric(sc, "sidecar_logship_lines_read_total", source="app") > 0, 10, what="reading started")
    time.sleep(1.0)
    read = metric(sc, "sidecar_logship_lines_read_total", source="app")
    assert read < app.written, "the whole file was read with the sink down: this test needs it paused"
    app.truncate()
    b = LogFile(tmp_path / "app.log", "b")
    b.write(10)
    rx.up()
    wait_until(lambda: sum(1 for line in rx.lines() if line.startswith("b ")) >= 10, 30, what="the lines written after the truncation")
    time.sleep(0.5)
    lost = metric(sc, "sidecar_logship_lost_bytes_total", source="app")
    missing, dups, extra = delivery_report(rx.lines(), {"a": app.written, "b": 10})
    assert not dups and not extra and all(tag == "a" for tag, _ in missing), describe(missing, dups, extra)
    delivered_a = len(count_numbers(line for line in rx.lines() if line.startswith("a "))[0])
    assert delivered_a * app.line_bytes + lost == app.written * app.line_bytes, \
        f"{delivered_a} lines delivered + {lost:.0f} bytes lost != {app.written * app.line_bytes} bytes written"


def test_line_shapes_partial_writes_escapes_and_invalid_utf8(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    path = tmp_path / "app.log"
    path.write_bytes(b"")
    start_sidecar(ls_config(tmp_path, [source([path])], [sink(rx)]))
    with open(path, "ab", buffering=0) as f:
        f.write(b"first half of a line, ")
        time.sleep(2.0)  # longer than batch timeout and scan interval: still one line
        f.write(b"second half\n")
        f.write('quotes " back\\slash \t tab é☃𝄞 ctl \x01 del \x7f\n'.encode())
        f.write(b"bad utf8 \xff\xfe end\n")
        f.write(b"windows line end\r\n")
        f.write(b"last\n")
    rx.wait_records(5, timeout=15)
    time.sleep(0.5)
    assert not rx.problems, rx.problems  # every body valid UTF-8 JSON
    assert rx.lines() == [
        "first half of a line, second half",
        'quotes " back\\slash \t tab é☃𝄞 ctl \x01 del \x7f',
        "bad utf8 \ufffd\ufffd end",
        "windows line end",
        "last",
    ]


def test_delete_and_recreate(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)]))
    for _ in range(3):
        app.write(10)
        wait_until(lambda: metric(sc, "sidecar_logship_lines_read_total", source="app") == app.written, 10,
                   what="the new app.log open and read")
        app.write(100)
        app.delete_and_recreate()  # at once: the last 100 lines are read through the open handle
    app.write(100)
    assert_exactly_once(rx, {"a": app.written})
    wait_until(lambda: metric(sc, "sidecar_logship_files", source="app") == 1, 15,
               what="deleted files closed after rotate_wait (5 s)")


def test_a_10_mib_line_is_cut_at_max_line_bytes_and_flagged(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    app = LogFile(tmp_path / "app.log", "a")
    sc = start_sidecar(ls_config(tmp_path, [source([tmp_path / "*.log"], max_line_bytes="1MiB")],
                                 [sink(rx, batch={"max_bytes": "1MiB"})]))
    app.write(5)
    with app.lock:
        app.f.write(b"big " + b"y" * (10 * MiB) + b"\n")
    app.write(5)
    wait_delivered(rx, {"a": 10}, timeout=40)
    big = [r for r in rx.records if r.line and r.line.startswith("big ")]
    assert len(big) == 1, f"{len(big)} records from the long line (the rest of it must be skipped, not shipped)"
    msg = big[0].line
    assert MiB - 4 <= len(msg.encode()) <= MiB, len(msg.encode())
    assert big[0].fields.get("truncated") is True, {k: v for k, v in big[0].fields.items() if k != "message"}
    missing, dups, extra = delivery_report(rx.lines(), {"a": 10})
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert len(rx.records) == 11, [r.line[:40] for r in rx.records]
    assert [r.line[:13] for r in rx.records if not r.line.startswith("big")] == [f"a line {i:06d}" for i in range(10)], \
        "the lines after the long one arrive, in order"
    assert all("truncated" not in r.fields for r in rx.records if r is not big[0])
    assert metric(sc, "sidecar_logship_truncated_total", source="app") == 1
    assert not rx.problems, rx.problems


@pytest.mark.timeout(150)
def test_a_thousand_files_in_the_glob(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    d = tmp_path / "logs"
    d.mkdir()
    lines = 3
    files = []
    for i in range(500):
        f = LogFile(d / f"f{i:04d}.log", f"f{i:04d}")
        f.write(lines)
        f.close()
        files.append(f)
    ignored = LogFile(d / "old.log.gz", "gz")
    ignored.write(5)
    ignored.close()
    sc = start_sidecar(ls_config(tmp_path, [source([d / "*"], exclude=[str(d / "*.gz")])], [sink(rx)]))
    for i in range(500, 1000):  # and 500 appearing while it runs
        f = LogFile(d / f"f{i:04d}.log", f"f{i:04d}")
        f.write(lines)
        f.close()
        files.append(f)
    expected = {f.tag: lines for f in files}
    missing, dups, extra = wait_delivered(rx, expected, timeout=100)
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert not rx.problems, rx.problems
    assert metric(sc, "sidecar_logship_lines_read_total", source="app") == 3000
    assert metric(sc, "sidecar_logship_files", source="app") <= 1000

    # Restarted, it resumes all 1,000 files from the checkpoint: only new lines are sent.
    sc.signal(signal.SIGTERM)
    assert sc.wait_exit(15) == 0
    for f in files[::100]:
        f.f = open(f.path, "ab", buffering=0)
        f.write(1)
        f.close()
        expected[f.tag] += 1
    sc2 = start_sidecar(sc.cfg)
    missing, dups, extra = wait_delivered(rx, expected, timeout=60)
    assert not (missing or dups or extra), describe(missing, dups, extra)
    assert metric(sc2, "sidecar_logship_lines_read_total", source="app") == 10


def test_multiline_events_are_joined_and_the_last_one_flushed_by_the_timeout(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    path = tmp_path / "app.log"
    path.write_text("")
    cfg = ls_config(tmp_path, [source([path], multiline={"start_pattern": r"^\S", "timeout": "1s"})], [sink(rx)])
    start_sidecar(cfg)
    with open(path, "a") as f:
        f.write("E1 java.lang.IllegalStateException: boom\n\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)\n")
        f.write("E2 single line\n")
        f.write("E3 Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: nope\n")
        f.write("E4 last event\n  continued\n")
        f.flush()
        t0 = time.monotonic()
        rx.wait_records(5, timeout=15)  # E4 has no successor: only the 1 s timeout ends it
        assert time.monotonic() - t0 >= 0.8, "E4 was shipped before its timeout, while it could still grow"
        f.write("E5 after the timeout\n")
        f.flush()
        rx.wait_records(6, timeout=15)
    time.sleep(0.5)
    assert [r.line for r in rx.records] == [
        "E1 java.lang.IllegalStateException: boom\n\tat a.B.c(B.java:1)\n\tat a.B.d(B.java:2)",
        "E2 single line",
        "E3 Traceback (most recent call last):\n  File \"x.py\", line 1",
        "ValueError: nope",
        "E4 last event\n  continued",
        "E5 after the timeout",
    ]


def test_a_multiline_event_longer_than_max_line_bytes_is_one_cut_record(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    path = tmp_path / "app.log"
    path.write_text("")
    src = source([path], multiline={"start_pattern": r"^\S", "timeout": "1s"}, max_line_bytes="64KiB")
    sc = start_sidecar(ls_config(tmp_path, [src], [sink(rx)]))
    with open(path, "a") as f:  # a 280 KB stack trace, then two ordinary events
        f.write("E1 start\n" + "".join(f"  cont {i:05d}\n" for i in range(20000)) + "E2 next\n  c\nE3 x\n")
    rx.wait_records(3, timeout=15)
    time.sleep(1.5)
    got = [(r.line[:12], len(r.line.encode()), r.fields.get("truncated")) for r in rx.records]
    assert len(rx.records) == 3, f"the long event is one record cut at the limit, the rest skipped; got {got}"
    first = rx.records[0]
    assert first.line.startswith("E1 start\n  cont 00000\n") and 64 * 1024 - 4 <= len(first.line.encode()) <= 64 * 1024, got
    assert first.fields.get("truncated") is True
    assert [r.line for r in rx.records[1:]] == ["E2 next\n  c", "E3 x"]
    assert metric(sc, "sidecar_logship_truncated_total", source="app") == 1


def test_json_lines_keep_their_members_and_gain_ours(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    path = tmp_path / "api.log"
    lines = [
        '{"level":"info","msg":"hello","n":1}',
        '{"timestamp":"2020-01-01T00:00:00Z","msg":"own time","team":"other"}',
        'plain text, not JSON',
        '[1,2,3]',
        '{}',
        '{"message":"already has one","nested":{"a":[1,{"b":null}]},"u":"é☃"}',
        '{"broken":',
    ]
    path.write_text("\n".join(lines) + "\n")
    start_sidecar(ls_config(tmp_path, [source([path], name="api", format="json", fields={"team": "shop"})], [sink(rx)]))
    recs = rx.wait_records(len(lines), timeout=15)
    time.sleep(0.5)
    assert not rx.problems, rx.problems  # a duplicated key would be one
    docs = [r.fields for r in rx.records]
    assert len(docs) == len(lines)
    ours = ["timestamp", "source", "file", "team"]
    assert list(docs[0]) == ours + ["level", "msg", "n"], docs[0]
    assert docs[0]["level"] == "info" and docs[0]["n"] == 1 and docs[0]["source"] == "api" and docs[0]["team"] == "shop"
    assert "message" not in docs[0]
    assert docs[1]["timestamp"] == "2020-01-01T00:00:00Z" and docs[1]["team"] == "other", "the line's own members win"
    assert list(docs[1]) == ["source", "file", "timestamp", "msg", "team"], docs[1]
    assert docs[2]["message"] == "plain text, not JSON" and list(docs[2]) == ours + ["message"]
    assert docs[3]["message"] == "[1,2,3]", "a JSON line that is not an object is text"
    assert list(docs[4]) == ours
    assert docs[5]["message"] == "already has one" and docs[5]["nested"] == {"a": [1, {"b": None}]} and docs[5]["u"] == "é☃"
    assert docs[6]["message"] == '{"broken":'
    assert json.dumps(recs[0].fields)  # round-trips


def test_pretty_printed_json_events_are_one_document_at_each_sink(tmp_path, start_sidecar, receiver):
    path = tmp_path / "api.log"
    events = [{"level": "error", "msg": "multi\nline value", "n": i, "nested": {"a": [1, 2]}} for i in range(3)]
    path.write_text("".join(json.dumps(e, indent=2) + "\n" for e in events))
    h, es = receiver("http"), receiver("elasticsearch")
    src = source([path], name="api", format="json", multiline={"start_pattern": r"^\{", "timeout": "500ms"})
    start_sidecar(ls_config(tmp_path, [src], [sink(h, "h"), sink(es, "es")]))
    for rx in (h, es):
        rx.wait_records(3, timeout=15)
    time.sleep(0.5)
    for rx in (h, es):
        assert not rx.problems, rx.problems
        docs = sorted((r.fields for r in rx.records), key=lambda d: d.get("n", -1))
        assert [{k: d.get(k) for k in ("level", "msg", "n", "nested")} for d in docs] == events, (rx.kind, docs)
        assert all(d["source"] == "api" and "message" not in d for d in docs)


def test_read_from_end_skips_what_exists_at_the_first_start_only(tmp_path, start_sidecar, receiver):
    rx = receiver("http")
    old = LogFile(tmp_path / "app.log", "old")
    old.write(50)
    cfg = ls_config(tmp_path, [source([tmp_path / "*.log"])], [sink(rx)], read_from="end")
    sc = start_sidecar(cfg)
    wait_until(lambda: metric(sc, "sidecar_logship_files", source="app") == 1, 10, what="app.log open")
    new = LogFile(tmp_path / "app.log", "new")
    new.write(20)
    later = LogFile(tmp_path / "later.log", "later")  # appears after the start: read whole
    later.write(10)
    assert_exactly_once(rx, {"new": 20, "later": 10})
    sc.signal(signal.SIGTERM)
    sc.wait_exit(15)
    new.write(5)  # while stopped: the checkpoint, not read_from, decides
    sc2 = start_sidecar(cfg)
    assert_exactly_once(rx, {"new": 25, "later": 10})
    assert not [line for line in rx.lines() if line.startswith("old ")]
    sc2.assert_alive()
